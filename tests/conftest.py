"""Shared fixtures and helpers: real pydicom CT files, small synthetic RSNA-style datasets, stores and runs.

This is the one conftest.py: the test folders have none, because conftest files outside a package are all
imported under the name ``conftest`` and ``from conftest import ...`` would then find the last one loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file


def random_scores(n: int, seed: int, rate: float, signal: float, noise: float):
    """Labels (n, 6: five subtypes + any) and scores that track them: for metric and plot tests."""
    rng = np.random.default_rng(seed)
    sub = (rng.random((n, 5)) < rate).astype(float)
    y = np.c_[sub, sub.max(axis=1)]
    return y, np.clip(signal * y + noise * rng.random(y.shape), 0, 1)


def pydicom_file(name: str) -> Path:
    """A file bundled with pydicom (download=False: tests never touch the network)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return Path(path)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """``ichprep synth --studies 2 --seed 0``: the smallest valid dataset (with quirks)."""
    from ichprep.synth import generate

    out = tmp_path_factory.mktemp("synth2")
    generate(out, studies=2, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_dataset6(tmp_path_factory) -> Path:
    """Six studies (~180 slices): enough shards for ordering, resume and scaling tests."""
    from ichprep.synth import generate

    out = tmp_path_factory.mktemp("synth6")
    summary = generate(out, studies=6, seed=1)
    # Which image ids carry which quirk, for tests that check each one (not read by ichprep).
    (out / "quirks.json").write_text(json.dumps(summary.quirks))
    return out


@pytest.fixture(scope="session")
def store6(synth_dataset6, tmp_path_factory) -> Path:
    """The six-study dataset converted in-process with 16-slice shards (tests must not modify it)."""
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec

    root = tmp_path_factory.mktemp("store6") / "cache.zarr"
    convert(
        synth_dataset6 / "stage_2_train",
        root,
        PreprocessSpec(shard_slices=16),
        labels_csv=synth_dataset6 / "stage_2_train.csv",
    )
    return root


@pytest.fixture(scope="session")
def easy_store(tmp_path_factory) -> Path:
    """An easy, positive-rich set (every labelled lesion visible at 64²) converted at 64² for CPU training."""
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec
    from ichprep.synth import generate

    out = tmp_path_factory.mktemp("easy")
    generate(out / "data", studies=30, seed=7, lesion_rate=0.9, min_lesion_pixels=800)
    root = out / "cache.zarr"
    convert(
        out / "data" / "stage_2_train",
        root,
        PreprocessSpec(size=64, shard_slices=32),
        labels_csv=out / "data" / "stage_2_train.csv",
    )
    return root


#: A run small enough for a test: resnet18 at 48², one epoch of 3 steps of 8 slices, on the CPU.
TINY_RUN = dict(arch="resnet18", image_size=48, epochs=1, batch_size=8, workers=0, max_steps=3, device="cpu")


@pytest.fixture(scope="session")
def tiny_config(easy_store):
    """``make(out, **overrides)``: a TrainConfig of :data:`TINY_RUN` on the easy store."""
    from ichtrain.config import TrainConfig

    def make(out, **overrides):
        return TrainConfig(**{"store": str(easy_store), "out": str(out), **TINY_RUN, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tmp_path_factory) -> Path:
    """A one-epoch, few-step resnet18 run on the easy store (for evaluate/predict/resume tests)."""
    from ichtrain.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_config(out))
    return out


BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env():
    """Start moto's standalone S3 server; yield the environment a client needs (never hard-coded in ichkit)."""
    port = _port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("ichkit-test")
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.kill()
    server.wait()


def kill_after_shards(cmd: list[str], markers: Path, shards: int) -> int:
    """Start a converter, ``kill -9`` its process group once ``shards`` shard markers exist; the markers then."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(markers.glob("*.json"))) < shards:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(markers.glob("*.json")))


def save_dicom(ds, path):
    """Write a pydicom dataset as a conforming file; its path."""
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, synth_dataset):
    """Synth files plus one of each kind of bad file; returns (folder, labels csv, {file name: expected reason})."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("hostile") / "dicoms"
    shutil.copytree(synth_dataset / "stage_2_train", folder)
    good = sorted(folder.glob("ID_*.dcm"))
    template = good[5]
    expected = {}

    (folder / "zero.dcm").write_bytes(b"")
    expected["zero.dcm"] = "empty_file"
    (folder / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    expected["random.dcm"] = "not_dicom"
    (folder / "notes.dcm").write_text("Patient notes, not an image\n" * 50)
    expected["notes.dcm"] = "not_dicom"
    (folder / "cut_header.dcm").write_bytes(template.read_bytes()[:400])
    expected["cut_header.dcm"] = "truncated"

    ds = pydicom.dcmread(template)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["nopixels"])
    save_dicom(ds, folder / "nopixels.dcm")
    expected["nopixels.dcm"] = "no_pixel_data"

    mr = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    save_dicom(mr, folder / "mr.dcm")
    expected["mr.dcm"] = "unsupported_image"

    ds = pydicom.dcmread(template)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["multiframe"])
    save_dicom(ds, folder / "multiframe.dcm")
    expected["multiframe.dcm"] = "unsupported_image"

    ds = pydicom.dcmread(template)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["rgb"])
    save_dicom(ds, folder / "rgb.dcm")
    expected["rgb.dcm"] = "unsupported_image"

    shutil.copy(good[7], folder / "copy_of_a_slice.dcm")  # same SOPInstanceUID as good[7]
    expected["copy_of_a_slice.dcm"] = "duplicate"

    os.symlink(folder / "loop_b.dcm", folder / "loop_a.dcm")
    os.symlink(folder / "loop_a.dcm", folder / "loop_b.dcm")
    expected["loop_a.dcm"] = expected["loop_b.dcm"] = "unreadable_file"
    os.symlink(folder, folder / "dir_loop")  # a folder symlinked into itself is not followed
    (folder / "denied.dcm").write_bytes(template.read_bytes())  # made unreadable by the test (root ignores chmod)
    expected["denied.dcm"] = "unreadable_file"

    ds = pydicom.dcmread(good[0])
    study_without_z = ds.StudyInstanceUID
    labels = pd.read_csv(synth_dataset / "stage_2_train.csv")
    labels = pd.concat([labels, pd.DataFrame({"ID": ["ID_ffffffff0_any"], "Label": [1]})])  # an id with no file
    csv = folder.parent / "labels.csv"
    labels.to_csv(csv, index=False)
    # One slice loses ImagePositionPatient: its whole study is ordered by InstanceNumber and says so.
    del ds.ImagePositionPatient
    save_dicom(ds, good[0])
    return folder, csv, expected, study_without_z


#: The synthetic archive of :func:`archives`.
ARCHIVE_ARGS = {"studies": 4, "seed": 11, "test_studies": 1}


@pytest.fixture(scope="session")
def archives(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic archive as a folder, a deflated zip and a stored zip (tests must not modify them)."""
    from ichprep.synth import generate

    base = tmp_path_factory.mktemp("sources")
    generate(base / "folder", **ARCHIVE_ARGS)
    generate(base / "deflated.zip", **ARCHIVE_ARGS, as_zip=True, zip_method="deflated")
    generate(base / "stored.zip", **ARCHIVE_ARGS, as_zip=True, zip_method="stored")
    return {"folder": base / "folder", "deflated": base / "deflated.zip", "stored": base / "stored.zip"}


def fake_slices(n_patients=150, seed=0) -> pd.DataFrame:
    """Patients with 1-3 studies of 20-40 slices; every 7th patient's id is null (study is its own group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(rng.integers(1, 4)):
            pid = None if p % 7 == 0 else f"ID_p{p}"
            rows += [(f"1.2.{p}.{s}", pid)] * int(rng.integers(20, 41))
    frame = pd.DataFrame(rows, columns=["study_uid", "patient_id"]).astype("string")
    return frame


def wait_for(predicate, timeout: float = 120.0, poll: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def ichprep_command() -> str:
    """The venv's ``ichprep`` console script."""
    return str(BIN / "ichprep")
