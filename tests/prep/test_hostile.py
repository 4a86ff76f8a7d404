"""ichprep.convert and ichprep.reading.dicomio on hostile and broken inputs: every valid slice, each bad file listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import pydicom_file
from conftest import save_dicom as _save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless

from ichprep import errors
from ichprep.convert import convert
from ichprep.reading.dicomio import read_slice
from ichprep.storage.store import open_store


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
    assert converted | truncated == synth_ids
    assert len(truncated) == 1


def test_missing_position_falls_back_to_instance_number(hostile, hostile_store):
    _, _, _, study = hostile
    slices = open_store(hostile_store[0]).slices
    run = slices[slices["study_uid"] == study]
    assert set(run["order_by"]) == {"instance_number"}
    assert run["instance_number"].is_monotonic_increasing
    assert set(slices.loc[slices["study_uid"] != study, "order_by"]) == {"z"}


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
        assert hu.shape == (ds.Rows, ds.Columns)
        assert np.isfinite(hu).all()


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
        assert hu.ndim == 2
        assert hu.dtype == np.float32


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
