"""ichprep.reading.dicomio: headers and HU pixels as pydicom reads them, the wrap-around fix, and each read error."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import pydicom_file
from pydicom.pixels import apply_modality_lut

from ichprep import errors
from ichprep.reading import dicomio
from ichprep.reading.dicomio import first_value, needs_wrap_fix, read_header, read_slice, to_hu


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_hu_matches_pydicom_modality_lut(name):
    path = pydicom_file(name)
    header, hu = read_slice(path)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert hu.dtype == np.float32
    assert hu.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert header.study_uid == ds.StudyInstanceUID
    assert header.z == pytest.approx(float(ds.ImagePositionPatient[2]))


def test_jpeg2000_decodes_with_plugins():
    header, hu = read_slice(pydicom_file("693_J2KI.dcm"))
    assert header.transfer_syntax == "1.2.840.10008.1.2.4.91"
    assert hu.shape == (512, 512)
    assert hu.std() > 10  # real anatomy, not a blank frame


def test_header_read_does_not_decode_pixels(monkeypatch):
    path = pydicom_file("CT_small.dcm")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded pixels")))
    header = read_header(path)
    assert header.rows == 128
    assert header.cols == 128
    assert header.has_pixels
    assert header.image_id == "CT_small"


def test_to_hu_slope_intercept():
    pixels = np.array([[0, 1000], [2000, 24]], dtype=np.uint16)
    hu = to_hu(pixels, slope=2.0, intercept=-1024.0, bits_stored=16, pixel_representation=0)
    np.testing.assert_array_equal(hu, [[-1024, 976], [2976, -976]])


def test_to_hu_wrap_around_fix():
    # HU stored modulo 4096 in 12 unsigned bits with intercept 0: air -1000 is stored as 3096.
    true_hu = np.array([[-1000, -5], [40, 1500]], dtype=np.int32)
    stored = (true_hu % 4096).astype(np.uint16)
    assert needs_wrap_fix(12, 0, 0.0)
    hu = to_hu(stored, slope=1.0, intercept=0.0, bits_stored=12, pixel_representation=0)
    np.testing.assert_array_equal(hu, true_hu)
    # Without the quirk's signature (intercept -1024) the plain formula applies.
    assert not needs_wrap_fix(12, 0, -1024.0)
    assert not needs_wrap_fix(16, 0, 0.0)
    assert not needs_wrap_fix(12, 1, 0.0)


def _rewrite(tmp_path, name="quirk.dcm", **changes):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    pixels = changes.pop("pixels", None)
    for key, value in changes.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_wrap_around_slice_read_end_to_end(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    true_hu = np.clip(apply_modality_lut(ds.pixel_array, ds), -1000, 3095).astype(np.int32)
    stored = (true_hu % 4096).astype(np.uint16)
    path, _ = _rewrite(tmp_path, BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept=0, pixels=stored)
    header, hu = read_slice(path)
    assert header.wrap12
    np.testing.assert_array_equal(hu, true_hu)


def test_multivalued_window_takes_first(tmp_path):
    path, _ = _rewrite(tmp_path, WindowCenter=[36, 40], WindowWidth=[80, 120])
    header = read_header(path)
    assert header.window_center == 36
    assert header.window_width == 80
    assert first_value(pydicom.dcmread(path).WindowCenter) == 36


def test_truncated_pixel_data(tmp_path):
    src = pydicom_file("CT_small.dcm")
    path = tmp_path / "truncated.dcm"
    data = src.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    assert read_header(path).study_uid  # the header still reads
    with pytest.raises(errors.TruncatedFileError) as info:
        read_slice(path)
    assert info.value.reason == "truncated"
    assert str(path) in str(info.value)


def test_truncated_header(tmp_path):
    path = tmp_path / "cut.dcm"
    path.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:300])
    with pytest.raises(errors.DicomReadError) as info:
        read_header(path)
    assert info.value.reason in {"truncated", "missing_tag", "bad_header"}
    assert str(path) in str(info.value)


def test_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not a DICOM\n" * 20)
    with pytest.raises(errors.NotDicomError) as info:
        read_header(path)
    assert isinstance(info.value, ValueError)  # catchable as a built-in too
    assert "not_dicom" in str(info.value)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(errors.DicomReadError):
        read_header(path)


def test_missing_pixel_data(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert not read_header(path).has_pixels
    with pytest.raises(errors.NoPixelDataError, match="no PixelData"):
        read_slice(path)


def test_non_ct_modality_rejected():
    with pytest.raises(errors.UnsupportedImageError, match="modality 'MR'"):
        read_slice(pydicom_file("MR_small.dcm"))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope.dcm")


def test_no_preamble_still_reads(tmp_path):
    # A raw dataset without the 128-byte preamble + DICM is still DICOM.
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.preamble = None
    del ds.file_meta
    path = tmp_path / "raw.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    header, hu = read_slice(path)
    assert header.study_uid == ds.StudyInstanceUID
    assert hu.shape == (128, 128)


def test_native_fast_path_equals_pixel_array(synth_dataset, tmp_path):
    """Uncompressed slices skip pixel_array; whatever the fast path returns equals pixel_array exactly."""
    from ichprep.reading.dicomio import _header, _native_pixels, _open

    used = 0
    for path in sorted((synth_dataset / "stage_2_train").glob("*.dcm")):
        ds, has_pixels = _open(path, stop_before_pixels=False)
        header = _header(ds, has_pixels, path)
        fast = _native_pixels(ds, header)
        if fast is None:
            continue
        used += 1
        np.testing.assert_array_equal(fast, ds.pixel_array)
        assert fast.dtype == ds.pixel_array.dtype
    assert used > 40
    # Signed data with BitsStored < 16 needs sign extension: the fast path declines it.
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.BitsStored, ds.HighBit = 12, 11
    path = tmp_path / "signed12.dcm"
    ds.save_as(path, enforce_file_format=True)
    ds2, has = _open(path, stop_before_pixels=False)
    assert _native_pixels(ds2, _header(ds2, has, path)) is None


def test_read_slice_returns_a_named_header_and_hu():
    result = read_slice(pydicom_file("CT_small.dcm"))
    header, hu = result
    assert result.header is header
    assert result.hu is hu
    assert header.rows == hu.shape[0]


def test_truncated_pixel_data_is_worded_as_pydicom_words_it(tmp_path):
    """Checked before decoding, on either reader's dataset; the detail stays pydicom's sentence (rejected.csv bytes)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:1000]
    path = tmp_path / "short.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError) as pydicoms:
        _ = pydicom.dcmread(path).pixel_array
    for read in (lambda: read_slice(path), lambda: read_slice("short.dcm", data=path.read_bytes())):
        with pytest.raises(errors.TruncatedFileError) as info:
            read()
        assert info.value.detail == f"pixel data is truncated: {pydicoms.value}"


def _with_syntax(tmp_path, syntax: str):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "compressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_transfer_syntax_without_a_decoder_is_unsupported(tmp_path, monkeypatch):
    path = _with_syntax(tmp_path, "1.2.840.10008.1.2.4.100")  # MPEG2: pydicom has no decoder
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("tried to decode")))
    with pytest.raises(errors.UnsupportedTransferSyntaxError, match="no decoder"):
        read_slice(path)


def test_a_decoder_without_its_plugins_is_unsupported(tmp_path, monkeypatch):
    path = _with_syntax(tmp_path, pydicom.uid.JPEG2000Lossless)

    class Missing:
        is_available, is_native, missing_dependencies = False, False, ["pylibjpeg - requires pylibjpeg"]

    monkeypatch.setattr("ichprep.reading.dicomio.get_decoder", lambda uid: Missing())
    dicomio._syntax.cache_clear()
    try:
        with pytest.raises(errors.UnsupportedTransferSyntaxError, match="no decoder plugin is installed"):
            read_slice(path)
    finally:
        dicomio._syntax.cache_clear()


def test_data_an_available_decoder_cannot_decode_is_a_decode_error(tmp_path):
    path = _with_syntax(tmp_path, pydicom.uid.JPEG2000Lossless)  # raw pixels where a J2K codestream belongs
    with pytest.raises(errors.PixelDecodeError):
        read_slice(path)


def test_bad_bits_allocated_and_pixel_element_are_our_errors(tmp_path):
    """Both were read only when decoding, where pydicom's errors once escaped as they were."""
    data = pydicom_file("CT_small.dcm").read_bytes()
    bits = data.index(b"\x28\x00\x00\x01US\x02\x00")  # (0028,0100) BitsAllocated, explicit VR, 2 bytes
    odd = tmp_path / "odd_bits.dcm"
    odd.write_bytes(data[:bits] + b"\x28\x00\x00\x01UX\x02\x00" + data[bits + 8 :])
    with pytest.raises(errors.InvalidHeaderError):
        read_slice(odd)
    pixel = data.index(b"\xe0\x7f\x10\x00OW")
    unknown = tmp_path / "unknown_vr.dcm"
    unknown.write_bytes(data[:pixel] + b"\xe0\x7f\x10\x00CW" + data[pixel + 6 :])
    with pytest.raises(errors.DicomReadError):
        read_slice(unknown)
