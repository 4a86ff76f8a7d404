"""Hostile and broken inputs: the run finishes, valid slices are all converted, each bad file is listed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from conftest import pydicom_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from ichprep import errors
from ichprep.cli import main
from ichprep.convert import convert
from ichprep.reading.dicomio import read_slice
from ichprep.storage.store import open_store


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, synth_dataset):
    """Synth files plus one of each kind of bad file; returns (folder, labels csv, {file name: expected reason})."""
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
    _save(ds, folder / "nopixels.dcm")
    expected["nopixels.dcm"] = "no_pixel_data"

    mr = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    _save(mr, folder / "mr.dcm")
    expected["mr.dcm"] = "unsupported_image"

    ds = pydicom.dcmread(template)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["multiframe"])
    _save(ds, folder / "multiframe.dcm")
    expected["multiframe.dcm"] = "unsupported_image"

    ds = pydicom.dcmread(template)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["rgb"])
    _save(ds, folder / "rgb.dcm")
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
    _save(ds, good[0])
    return folder, csv, expected, study_without_z


@pytest.fixture(scope="module")
def hostile_store(hostile, tmp_path_factory):
    folder, csv, _, _ = hostile
    root = tmp_path_factory.mktemp("hostile_store") / "cache.zarr"
    denied = str(folder / "denied.dcm")
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module in ("ichprep.reading.dicomio", "ichprep.reading.plainread"):  # both open files
            mp.setattr(f"{module}.open", guarded_open, raising=False)
        summary = convert(folder, root, labels_csv=csv)
    return root, summary


def test_every_bad_file_is_listed_with_its_reason(hostile, hostile_store):
    _, _, expected, _ = hostile
    root, summary = hostile_store
    rejected = pd.read_csv(root / "rejected.csv")
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    for name, reason in expected.items():
        assert reasons.get(name) == reason, (name, reasons)
    assert all(rejected["detail"].str.len() > 5)
    assert summary.n_rejected == len(rejected) == len(expected) + 1  # + synth's truncated-pixel file
    assert "dir_loop" not in " ".join(rejected["path"])


def test_every_valid_slice_is_converted(hostile, hostile_store, synth_dataset):
    root, _ = hostile_store
    slices = open_store(root).slices
    synth_ids = {p.stem for p in (synth_dataset / "stage_2_train").glob("*.dcm")}
    converted = set(slices.loc[slices["ok"], "image_id"])
    truncated = set(slices.loc[~slices["ok"], "image_id"])
    assert converted | truncated == synth_ids and len(truncated) == 1


def test_missing_position_falls_back_to_instance_number(hostile, hostile_store):
    _, _, _, study = hostile
    slices = open_store(hostile_store[0]).slices
    run = slices[slices["study_uid"] == study]
    assert set(run["order_by"]) == {"instance_number"}
    assert run["instance_number"].is_monotonic_increasing
    assert set(slices.loc[slices["study_uid"] != study, "order_by"]) == {"z"}


def test_cli_says_completed_with_rejections(hostile, tmp_path):
    folder, csv, expected, _ = hostile
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(folder),
            "--labels",
            str(csv),
            "-o",
            str(tmp_path / "c.zarr"),
            "--workers",
            "1",
            "--size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"completed with {len(expected) + 1} rejected" in result.output


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, "deflate", "implicit"])
def test_lossless_syntaxes_decode_to_the_original(synth_dataset, tmp_path, syntax):
    source = sorted((synth_dataset / "stage_2_train").glob("*.dcm"))[3]
    _, original = read_slice(source)
    ds = pydicom.dcmread(source)
    if syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    elif syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:
        ds.compress(syntax)
    path = _save(ds, tmp_path / "compressed.dcm")
    header, hu = read_slice(path)
    assert header.transfer_syntax == str(ds.file_meta.TransferSyntaxUID)
    np.testing.assert_array_equal(hu, original)


@pytest.mark.parametrize(
    "name, lossless",
    [
        ("MR_small_jpeg_ls_lossless.dcm", True),
        ("MR_small_RLE.dcm", True),
        ("MR_small_jp2klossless.dcm", True),
        ("MR_small_bigendian.dcm", True),
        ("JPEGLSNearLossless_16.dcm", False),
        ("693_J2KI.dcm", False),
    ],
)
def test_bundled_compressed_files_decode(tmp_path, name, lossless):
    """pydicom's own encodings of one image: lossless ones decode to the uncompressed original's values."""
    ds = pydicom.dcmread(pydicom_file(name))
    ds.Modality = "CT"  # the reader accepts CT only; the pixel data stay as encoded
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or "1.2.3.4"
    path = tmp_path / name
    ds.save_as(path)
    _, hu = read_slice(path)
    if lossless:
        ref = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        ref.Modality = "CT"
        ref.save_as(tmp_path / "ref.dcm")
        np.testing.assert_array_equal(hu, read_slice(tmp_path / "ref.dcm")[1])
    else:
        assert hu.shape == (ds.Rows, ds.Columns) and np.isfinite(hu).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_give_an_image_or_our_error(tmp_path, data):
    """Mutate bytes of a real CT file: the reader returns an image or raises DicomReadError, nothing else."""
    original = bytearray(pydicom_file("CT_small.dcm").read_bytes())
    n_mutations = data.draw(st.integers(1, 8))
    for _ in range(n_mutations):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        original = original[: data.draw(st.integers(0, len(original)))]
    path = tmp_path / "fuzzed.dcm"
    path.write_bytes(bytes(original))
    try:
        header, hu = read_slice(path)
    except errors.DicomReadError as exc:
        assert str(path) in str(exc)
    else:
        assert hu.ndim == 2 and hu.dtype == np.float32


def test_header_text_never_becomes_a_path(synth_dataset, tmp_path):
    """Identifiers that look like paths stay data: nothing is created outside the store."""
    folder = tmp_path / "dicoms"
    folder.mkdir()
    source = sorted((synth_dataset / "stage_2_train").glob("*.dcm"))[2]
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = "../../escaped_study"
    ds.SeriesInstanceUID = "/tmp/escaped_series"
    ds.PatientID = "..\\..\\escaped_patient"
    _save(ds, folder / "ID_pathlike0.dcm")
    root = tmp_path / "deep" / "cache.zarr"
    convert(folder, root)
    slices = open_store(root).slices
    assert slices.loc[0, "study_uid"] == "../../escaped_study"
    created = {p.name for p in tmp_path.rglob("*")}
    assert not any("escaped" in name for name in created)
    assert not list(Path("/tmp").glob("escaped*"))
