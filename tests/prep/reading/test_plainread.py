"""ichprep.reading.plainread: the plain-file walk reads every file it accepts as pydicom does, declines the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import pydicom_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ichprep.errors import DicomReadError
from ichprep.reading import dicomio
from ichprep.reading.plainread import HEAD_BYTES, parse, read_plain


def _read(ds, has_pixels: bool, path, stop_before_pixels: bool):
    """Header, and HU pixels unless header-only, from an opened dataset (pydicom's or a plain one)."""
    if stop_before_pixels:
        return dicomio._header(ds, has_pixels, path), None
    return dicomio._slice(ds, has_pixels, path)


def _pydicom_path(path, stop_before_pixels: bool):
    """What ichprep reads through pydicom alone (the error class where it fails)."""
    try:
        return _read(*dicomio._open(path, stop_before_pixels), path, stop_before_pixels)
    except DicomReadError as exc:
        return type(exc), None


def _plain_path(path, stop_before_pixels: bool):
    """The same through the plain walk; None where it declines (the caller would use pydicom)."""
    plain = read_plain(path, want_pixels=not stop_before_pixels)
    if plain is None:
        return None
    try:
        return _read(plain, plain.has_pixels, path, stop_before_pixels)
    except DicomReadError as exc:
        return type(exc), None


def _assert_same(path, stop_before_pixels: bool) -> bool:
    """True when the plain walk read the file (and then gave pydicom's result exactly)."""
    fast = _plain_path(path, stop_before_pixels)
    if fast is None:
        return False
    reference = _pydicom_path(path, stop_before_pixels)
    assert fast[0] == reference[0], path
    if not stop_before_pixels:
        np.testing.assert_array_equal(fast[1], reference[1], err_msg=str(path))
    return True


@pytest.mark.parametrize("stop_before_pixels", [True, False])
def test_every_synthetic_file_reads_as_pydicom_reads_it(synth_dataset, stop_before_pixels):
    files = sorted(synth_dataset.rglob("*.dcm"))
    read = sum(_assert_same(path, stop_before_pixels) for path in files)
    # Every RSNA-style file is plain; only the quirk file with truncated pixels falls back (for pixels).
    assert read >= len(files) - (0 if stop_before_pixels else 1)


def _bundled_files() -> list[Path]:
    """pydicom's bundled test files (listed from its folder: get_testdata_files may try downloads)."""
    return sorted((Path(pydicom_file("CT_small.dcm")).parent).glob("*.dcm"))


def test_pydicoms_own_files_read_as_pydicom_reads_them():
    headers = pixels = 0
    for path in _bundled_files():
        headers += _assert_same(path, stop_before_pixels=True)
        plain = read_plain(path)
        if plain is None:
            continue
        try:  # the raw pixel path, whatever the modality (check_slice would turn most of them away)
            header = dicomio._header(plain, plain.has_pixels, path)
            native = dicomio._native_pixels(plain, header) if header.rows and header.cols else None
        except DicomReadError:
            continue
        if native is not None:
            np.testing.assert_array_equal(native, pydicom.dcmread(path).pixel_array, err_msg=str(path))
            pixels += 1
    # Many are plain little endian files: neither comparison is empty.
    assert headers >= 10, (headers, pixels)
    assert pixels >= 3, (headers, pixels)


def test_compressed_big_endian_and_raw_files_are_declined(tmp_path):
    assert read_plain(pydicom_file("693_J2KI.dcm")) is None  # JPEG 2000
    big = pydicom_file("ExplVR_BigEnd.dcm")
    assert pydicom.dcmread(big).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    assert read_plain(big) is None
    assert read_plain(pydicom_file("ExplVR_LitEndNoMeta.dcm")) is None  # no preamble or file meta
    data = pydicom_file("CT_small.dcm").read_bytes()
    plain = parse(data)
    assert plain is not None
    assert parse(data[132:]) is None  # no preamble
    cut = data[: plain.get_item(0x7FE00010).value_tell + 100]
    assert parse(cut) is None  # pixels cut short
    assert parse(cut, want_pixels=False) is not None  # ... which a header read does not need
    assert parse(b"") is None
    assert parse(b"\0" * 200) is None


def _write(tmp_path: Path, name: str, syntax, **elements) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.arange(16, dtype="<i2").tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_both_little_endian_syntaxes_are_read(tmp_path, syntax):
    path = _write(tmp_path, "slice.dcm", syntax, ImagePositionPatient=[0, 0, "-12.5"], InstanceNumber="7")
    assert read_plain(path) is not None
    assert _assert_same(path, stop_before_pixels=False)
    assert _assert_same(path, stop_before_pixels=True)
    assert dicomio.read_header(path).z == -12.5


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path):
    path = _write(tmp_path, "long.dcm", ExplicitVRLittleEndian, ImageComments="x" * (HEAD_BYTES + 1000))
    plain = read_plain(path, want_pixels=False)
    assert plain is not None
    assert plain.has_pixels
    assert _assert_same(path, stop_before_pixels=True)


def test_a_big_file_that_is_not_dicom_is_not_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "video.dcm"
    path.write_bytes(b"\0" * (4 * HEAD_BYTES))
    seen = []
    real_parse = parse
    monkeypatch.setattr(
        "ichprep.reading.plainread.parse", lambda data, want: seen.append(len(data)) or real_parse(data, want)
    )
    assert read_plain(path, want_pixels=False) is None
    assert seen == [HEAD_BYTES]


@pytest.mark.parametrize("undefined", [False, True])
def test_sequences_of_defined_length_are_skipped_and_undefined_ones_declined(tmp_path, undefined):
    item = Dataset()
    item.CodeValue = "X"
    path = _write(tmp_path, "seq.dcm", ExplicitVRLittleEndian, ProcedureCodeSequence=Sequence([item]))
    if undefined:
        ds = pydicom.dcmread(path)
        ds["ProcedureCodeSequence"].is_undefined_length = True
        ds.save_as(path)
        assert b"\xff\xff\xff\xff" in path.read_bytes()
    assert (read_plain(path) is None) == undefined
    assert _assert_same(path, stop_before_pixels=False) != undefined
    assert dicomio.read_header(path).study_uid == "1.2.3"


def test_values_it_cannot_read_go_to_pydicom(tmp_path):
    # IS "7.0" is pydicom's to judge; the walk only reads plain integers and hands the rest to pydicom's conversion.
    path = _write(tmp_path, "is.dcm", ExplicitVRLittleEndian, InstanceNumber="7.0")
    assert read_plain(path) is not None
    assert _plain_path(path, stop_before_pixels=True) == _pydicom_path(path, stop_before_pixels=True)
    assert dicomio.read_header(path) == _pydicom_path(path, stop_before_pixels=True)[0]


def test_plain_dataset_answers_what_pydicom_answers():
    """Converted values and pixel_array come from pydicom, on the very raw elements the walk read."""
    path = pydicom_file("CT_small.dcm")
    plain, ds = read_plain(path), pydicom.dcmread(path)
    np.testing.assert_array_equal(plain.pixel_array, ds.pixel_array)
    assert plain[0x00100010].value == ds[0x00100010].value
    # The walk ends at the pixel data; pydicom also reads what trails it (here (FFFC,FFFC) padding).
    assert set(plain.keys()) == {tag for tag in ds.keys() if tag <= 0x7FE00010}
    assert len(plain) == len(plain.keys())
    assert 0x00100010 in plain
    assert 0x00100011 not in plain
    assert not hasattr(plain, "StudyInstanceUID")  # no catch-all attribute access


def test_a_header_only_walk_keeps_no_pixel_element_as_pydicom_keeps_none():
    path = pydicom_file("CT_small.dcm")
    plain, ds = read_plain(path, want_pixels=False), pydicom.dcmread(path, stop_before_pixels=True)
    assert plain.has_pixels
    assert 0x7FE00010 not in plain
    assert len(plain) == len(ds)
    assert sorted(plain.keys()) == sorted(ds.keys())


def test_declined_pixels_are_decoded_by_pydicom_from_the_same_elements(tmp_path):
    """Signed 12-bit data need sign extension: pixel_array of the plain walk's elements equals dcmread's."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.BitsStored, ds.HighBit = 12, 11
    path = tmp_path / "signed12.dcm"
    ds.save_as(path, enforce_file_format=True)
    plain = read_plain(path, reuse=True)
    header = dicomio._header(plain, plain.has_pixels, path)
    assert dicomio._native_pixels(plain, header) is None
    np.testing.assert_array_equal(plain.pixel_array, pydicom.dcmread(path).pixel_array)
    assert _assert_same(path, stop_before_pixels=False)
