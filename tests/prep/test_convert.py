"""ichprep.convert: the store against an independent recomputation, its tables, resume, locks and verify."""

from __future__ import annotations

import json
import shutil
import subprocess

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import zarr
from conftest import ichprep_command as _ichprep
from conftest import kill_after_shards

from ichprep.cluster import dask_client
from ichprep.convert import convert, shards_per_task, store_lock
from ichprep.errors import StoreExistsError, StoreLockedError
from ichprep.reading.labels import LABELS
from ichprep.spec import PreprocessSpec
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, STATE, open_store, shard_path


def independent_image(path: str, size: int = 256) -> np.ndarray:
    """The cached image recomputed from the DICOM without ichprep's code: pydicom LUT, numpy, cv2."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    intercept = float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        pixels = pixels + 1000
        pixels[pixels >= 4096] -= 4096
        intercept = -1000.0
    hu = (pixels * float(ds.RescaleSlope) + intercept).astype(np.float32)
    rows, cols = hu.shape
    side = max(rows, cols)
    square = np.full((side, side), -1000, np.float32)
    square[(side - rows) // 2 : (side - rows) // 2 + rows, (side - cols) // 2 : (side - cols) // 2 + cols] = hu
    small = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
    channels = []
    for center, width in ((40, 80), (80, 200), (40, 380)):
        channels.append(np.clip(np.floor((small - (center - width / 2)) * 255 / width + 0.5), 0, 255))
    return np.stack(channels).astype(np.uint8)


def test_store_contents_equal_independent_recomputation(store6, synth_dataset6):
    store = open_store(store6)
    slices = store.slices
    assert store.images.shape == (len(slices), 3, 256, 256)
    quirky = json.loads((synth_dataset6 / "quirks.json").read_text())
    sample = list(slices[slices["ok"]].sample(6, random_state=0).index)
    for name in ("wrap12", "signed", "odd_size", "multiwindow"):
        quirk_slots = slices.index[slices["image_id"].isin(quirky[name])]
        assert len(quirk_slots) >= 1, name
        sample += [int(i) for i in quirk_slots]
    for i in sorted(set(sample)):
        expected = independent_image(str(synth_dataset6 / "stage_2_train" / slices.loc[i, "path"]))
        got = store.images[i]
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 1, slices.loc[i, "image_id"]  # float32 vs float64 rounding at .5 only
        assert (diff == 0).mean() > 0.999


def test_store_tables_follow_the_contract(store6, synth_dataset6):
    store = open_store(store6)
    slices, studies = store.slices, store.studies
    assert list(slices.columns[:6]) == ["image_id", "study_uid", "series_uid", "patient_id", "z", "instance_number"]
    for row in studies.itertuples():
        run = slices.iloc[row.start : row.stop]
        assert (run["study_uid"] == row.study_uid).all()
        assert run["z"].is_monotonic_increasing
        assert row.n_slices == len(run)
        assert row.any == run["any"].max()
    assert studies["start"].iloc[0] == 0
    assert studies["stop"].iloc[-1] == len(slices)
    assert set(slices["study_uid"]) == set(studies["study_uid"])
    attrs = zarr.open_group(str(store6), mode="r").attrs["ichkit"]
    assert [w["name"] for w in attrs["windows"]] == ["brain", "subdural", "soft"]
    assert attrs["size"] == 256
    assert attrs["layout"]["shard_slices"] == 16
    assert store.images.shards == (16, 3, 256, 256)
    assert store.images.chunks == (1, 3, 256, 256)
    # Every file of the source folder is accounted for: a slot, or a line in rejected.csv.
    n_files = len(list((synth_dataset6 / "stage_2_train").glob("*.dcm")))
    rejected = pd.read_csv(store6 / "rejected.csv")
    assert len(slices) + (rejected["stage"] == "header").sum() == n_files


def test_bad_pixels_keep_their_slot_zero_filled(store6):
    store = open_store(store6)
    bad = store.slices[~store.slices["ok"]]
    assert len(bad) >= 1  # the synth's truncated file
    for i in bad.index:
        assert not store.images[i].any()
        assert bad.loc[i, "error"].startswith("truncated")
    rejected = pd.read_csv(store6 / "rejected.csv")
    assert set(bad["image_id"]) <= set(rejected.loc[rejected["stage"] == "pixels", "image_id"])
    assert (rejected["reason"] == "truncated").sum() >= 1
    assert rejected["detail"].str.len().min() > 0


def test_labels_in_slices_match_the_csv(store6, synth_dataset6):
    slices = open_store(store6).slices.set_index("image_id")
    csv = pd.read_csv(synth_dataset6 / "stage_2_train.csv")
    csv[["image_id", "label"]] = csv["ID"].str.rsplit("_", n=1, expand=True)
    for name in LABELS:
        part = csv[csv["label"] == name].set_index("image_id")["Label"]
        common = part.index.intersection(slices.index)
        assert (slices.loc[common, name].astype(int) == part.loc[common]).all()


def test_identical_bytes_across_worker_counts_and_resume_skips(store6, synth_dataset6, tmp_path):
    root = tmp_path / "two_workers.zarr"
    spec = PreprocessSpec(shard_slices=16)
    with dask_client(workers=2) as client:
        summary = convert(
            synth_dataset6 / "stage_2_train", root, spec, labels_csv=synth_dataset6 / "stage_2_train.csv", client=client
        )
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    assert summary.shards_skipped == 0
    files = json.loads((root / MANIFEST).read_text())["files"]
    assert summary.n_shards == sum(name.startswith("images/c/") for name in files)
    again = convert(synth_dataset6 / "stage_2_train", root, spec, labels_csv=synth_dataset6 / "stage_2_train.csv")
    assert again.shards_skipped == again.n_shards
    # A shard altered on disk is not trusted: it is rewritten to the same bytes.
    shard = root / shard_path(1)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    fixed = convert(synth_dataset6 / "stage_2_train", root, spec, labels_csv=synth_dataset6 / "stage_2_train.csv")
    assert fixed.shards_skipped == fixed.n_shards - 1
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()


def test_shards_per_task_balances_and_caps():
    assert shards_per_task(7, 2) == 1  # few shards: one a task, so both workers stay busy
    assert shards_per_task(48, 2) == 6  # at least 4 tasks a worker
    assert shards_per_task(11_763, 16) == 8  # the RSNA archive: capped at ~0.25 s of work a task
    assert shards_per_task(5, 0) == 1


def test_several_shards_a_task_give_the_same_bytes(synth_dataset6, tmp_path):
    spec = PreprocessSpec(size=64, shard_slices=4)  # ~48 shards: 6 a task on 2 workers
    src, csv = synth_dataset6 / "stage_2_train", synth_dataset6 / "stage_2_train.csv"
    alone = convert(src, tmp_path / "alone.zarr", spec, labels_csv=csv)
    assert shards_per_task(alone.n_shards, 2) > 1
    with dask_client(workers=2) as client:
        together = convert(src, tmp_path / "cluster.zarr", spec, labels_csv=csv, client=client)
    assert (tmp_path / "cluster.zarr" / MANIFEST).read_bytes() == (tmp_path / "alone.zarr" / MANIFEST).read_bytes()
    assert together.n_slices == alone.n_slices


def test_other_options_refuse_without_overwrite(store6, synth_dataset6, tmp_path):
    root = tmp_path / "s.zarr"
    src = synth_dataset6 / "stage_2_train"
    convert(src, root, PreprocessSpec(size=64, shard_slices=32))
    with pytest.raises(StoreExistsError, match="differs in: spec.*--overwrite"):
        convert(src, root, PreprocessSpec(size=128, shard_slices=32))
    summary = convert(src, root, PreprocessSpec(size=128, shard_slices=32), overwrite=True)
    assert open_store(root).images.shape[2:] == (128, 128)
    assert summary.shards_skipped == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="not an ichprep store"):
        convert(src, tmp_path / "other", PreprocessSpec(size=64))


def test_second_converter_is_locked_out(tmp_path):
    root = tmp_path / "locked.zarr"
    root.mkdir()
    with store_lock(root):
        with pytest.raises(StoreLockedError, match="being written by another ichprep convert"):
            with store_lock(root):
                pass


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_catches_damage(store6, tmp_path, damage):
    import shutil

    root = tmp_path / "copy.zarr"
    shutil.copytree(store6, root)
    assert verify_store(root).ok
    shard = root / shard_path(2)
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    report = verify_store(root)
    assert not report.ok
    kinds = {p.kind for p in report.problems if p.path == shard_path(2)}
    assert kinds == {{"flip": "altered", "truncate": "size", "delete": "missing"}[damage]}


def test_verify_refuses_manifest_paths_outside_the_store(store6, tmp_path):
    manifest = json.loads((store6 / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(manifest))
    report = verify_store(store6, path)
    assert [p.kind for p in report.problems] == ["unsafe_path"]


def test_resume_removes_temporaries_of_a_killed_writer(store6, synth_dataset6, tmp_path):
    root = tmp_path / "interrupted.zarr"
    shutil.copytree(store6, root)
    (root / MANIFEST).unlink()  # as if killed before the end: one shard unfinished, two writes cut short
    (root / STATE / "shards" / "000001.json").unlink()
    leftovers = [
        root / "images" / "c" / "1" / "0" / "0" / ".0.4242.tmp",
        root / STATE / "shards" / ".000001.json.4242.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half a write")
    summary = convert(
        synth_dataset6 / "stage_2_train",
        root,
        PreprocessSpec(shard_slices=16),
        labels_csv=synth_dataset6 / "stage_2_train.csv",
    )
    assert summary.shards_skipped == summary.n_shards - 1
    assert not any(path.exists() for path in leftovers)
    assert verify_store(root).ok
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()


def test_resume_after_kill_gives_identical_bytes(synth_dataset6, store6, tmp_path):
    """kill -9 a real converter mid-run; rerunning the same command finishes with a clean run's bytes."""
    root = tmp_path / "killed.zarr"
    cmd = [
        _ichprep(),
        "convert",
        str(synth_dataset6 / "stage_2_train"),
        "--labels",
        str(synth_dataset6 / "stage_2_train.csv"),
        "-o",
        str(root),
        "--shard-slices",
        "16",
        "--workers",
        "1",
    ]
    done = kill_after_shards(cmd, root / STATE / "shards", shards=2)
    total = -(-len(open_store(store6).slices) // 16)
    assert 1 <= done < total, f"kill landed outside the run ({done}/{total} shards)"
    assert not (root / MANIFEST).exists()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "already done, verified and skipped" in result.stdout
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    assert verify_store(root).ok
