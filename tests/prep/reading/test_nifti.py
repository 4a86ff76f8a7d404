"""ichprep.reading.nifti: NIfTI volumes scanned as slices and read as DICOM-oriented HU; CT-ICH labels.

Every geometry case stores the same patient (one unique value per voxel, so any flip or transposition
shows) under a different voxel layout and affine, and must give the same images, in the same place.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import threading

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ichprep.errors import (
    DicomReadError,
    EmptyFileError,
    InvalidHeaderError,
    LabelsError,
    PixelDecodeError,
    TruncatedFileError,
    UnsupportedImageError,
)
from ichprep.reading import nifti
from ichprep.reading.dicomio import slice_normal
from ichprep.reading.labels import LABELS, is_ctich_csv, read_ctich_labels, read_labels
from ichprep.reading.nifti import (
    FRAME_SEP,
    NotNiftiError,
    is_volume,
    layout_of,
    read_volume_slice,
    scan_volume,
    split_frame,
    volume_id,
)

NX, NY, NZ = 40, 32, 6  # non-square in-plane, so a rows/cols swap shows
ZOOMS = (0.8, 0.6, 5.0)
ORIGIN = (-16.0, -9.0, 20.0)
# Patient in the standard RAS layout: i toward the patient's right, j anterior, k superior; unique values.
PATIENT = (np.arange(NX)[:, None, None] + NX * np.arange(NY)[None, :, None] + NX * NY * np.arange(NZ)).astype(np.int16)
STANDARD = np.diag([*ZOOMS, 1.0])
STANDARD[:3, 3] = ORIGIN


def _expected_image(k: int) -> np.ndarray:
    """DICOM display of standard slice k: row 0 most anterior (largest j), column 0 patient's right (largest i)."""
    return PATIENT[::-1, ::-1, k].T.astype(np.float32)


def _save(tmp_path, name, data, affine, cls=nib.Nifti1Image):
    path = tmp_path / name
    nib.save(cls(data, affine), path)
    return str(path)


def _patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _index_map(rows):
    """4x4 matrix taking a variant's voxel index (homogeneous) to the standard voxel index."""
    m = np.eye(4)
    m[:3, :] = rows
    return m


# (data, affine, standard slice shown by the variant's slice k) for one patient stored four other ways
VARIANTS = {
    "ras": (PATIENT, STANDARD, lambda k: k),
    "lps_flipped": (
        PATIENT[::-1, ::-1, :],
        STANDARD @ _index_map([[-1, 0, 0, NX - 1], [0, -1, 0, NY - 1], [0, 0, 1, 0]]),
        lambda k: k,
    ),
    "slice_axis_first": (
        PATIENT.transpose(2, 0, 1),
        STANDARD @ _index_map([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]),
        lambda k: k,
    ),
    "z_decreasing": (
        PATIENT[:, :, ::-1],
        STANDARD @ _index_map([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, NZ - 1]]),
        lambda k: NZ - 1 - k,
    ),
    "rows_first_and_flipped": (  # voxel axis 0 = anterior->posterior, axis 1 = right->left: DICOM's own order
        PATIENT.transpose(1, 0, 2)[::-1, ::-1, :],
        STANDARD @ _index_map([[0, -1, 0, NX - 1], [-1, 0, 0, NY - 1], [0, 0, 1, 0]]),
        lambda k: k,
    ),
}


# --- names -------------------------------------------------------------------------------------------


def test_names_and_frames():
    assert is_volume("ct_scans/049.nii") and is_volume("049.NII.GZ") and is_volume("a/049.nii#3")
    assert not is_volume("049.dcm") and not is_volume("049.nii.zip") and not is_volume("nii")
    assert ".nii" in nifti.VOLUME_SUFFIXES and ".nii.gz" in nifti.VOLUME_SUFFIXES
    assert volume_id("ct_scans/049.nii") == "049"
    assert volume_id("x.zip::ct_scans/130.Nii.Gz#2") == "130"
    assert split_frame(f"a/049.nii{FRAME_SEP}12") == ("a/049.nii", 12)
    assert split_frame("a/049.nii") == ("a/049.nii", None)
    assert split_frame("a#b/049.nii") == ("a#b/049.nii", None)


# --- geometry ----------------------------------------------------------------------------------------


def test_standard_volume_scans_one_row_per_slice(tmp_path):
    path = _save(tmp_path, "049.nii", PATIENT, STANDARD)
    rows = scan_volume(path)
    assert [r["image_id"] for r in rows] == [f"049_{k:03d}" for k in range(1, NZ + 1)]
    assert [r["path"] for r in rows] == [f"{path}#{k}" for k in range(NZ)]
    assert [r["frame"] for r in rows] == list(range(NZ))
    assert [r["instance_number"] for r in rows] == list(range(1, NZ + 1))
    first = rows[0]
    assert (first["study_uid"], first["series_uid"], first["patient_id"]) == ("049", "049", "049")
    assert (first["rows"], first["cols"]) == (NY, NX)
    assert first["pixel_spacing_row"] == pytest.approx(0.6)  # between rows: along j
    assert first["pixel_spacing_col"] == pytest.approx(0.8)
    assert first["slice_thickness"] == pytest.approx(5.0)
    assert (first["slope"], first["intercept"], first["modality"], first["status"]) == (1.0, 0.0, "CT", "ok")
    assert (first["sop_uid"], first["bits_stored"], first["error"]) == (None, None, None)
    assert (first["normal_x"], first["normal_y"], first["normal_z"]) == pytest.approx((0, 0, 1))
    assert [r["z"] for r in rows] == pytest.approx([20.0 + 5 * k for k in range(NZ)])
    assert [r["position"] for r in rows] == pytest.approx([r["z"] for r in rows])


def test_scan_rows_fit_the_scan_table(tmp_path):
    from ichprep.reading.scan import SCAN_DTYPES, to_frame

    frame = to_frame(scan_volume(_save(tmp_path, "049.nii", PATIENT, STANDARD)))
    assert len(frame) == NZ and list(frame.columns) == list(SCAN_DTYPES)
    assert (frame["status"] == "ok").all() and frame["z"].is_monotonic_increasing


def test_image_puts_the_patient_as_dicom_does(tmp_path):
    """Column index grows toward the patient's left (LPS +x), row index toward posterior (LPS +y)."""
    data = np.zeros((NX, NY, NZ), np.int16)
    data[1, NY - 3, 2] = 500  # near the patient's left (small RAS x) and anterior (large RAS y)
    image = read_volume_slice(_save(tmp_path, "m.nii", data, STANDARD) + "#2")
    assert image.shape == (NY, NX) and image.dtype == np.float32
    (row, col), *others = np.argwhere(image == 500)
    assert not others
    assert (row, col) == (2, NX - 2)  # top (anterior) rows, right-hand columns (patient's left)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_layout_shows_the_same_patient(tmp_path, name):
    data, affine, standard_k = VARIANTS[name]
    path = _save(tmp_path, f"{name}.nii", np.ascontiguousarray(data), affine)
    reference = scan_volume(_save(tmp_path, "ref.nii", PATIENT, STANDARD))
    rows = scan_volume(path)
    assert len(rows) == NZ
    for k, row in enumerate(rows):
        ref = reference[standard_k(k)]
        assert row["image_id"] == f"{name}_{k + 1:03d}"
        for key in ("rows", "cols", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "z", "position"):
            assert row[key] == pytest.approx(ref[key]), key
        assert (row["normal_x"], row["normal_y"], row["normal_z"]) == pytest.approx((0, 0, 1))
        np.testing.assert_array_equal(read_volume_slice(row["path"]), _expected_image(standard_k(k)))


def test_z_decreasing_volume_lists_z_downward(tmp_path):
    data, affine, _ = VARIANTS["z_decreasing"]
    rows = scan_volume(_save(tmp_path, "down.nii", np.ascontiguousarray(data), affine))
    assert [r["z"] for r in rows] == pytest.approx([20.0 + 5 * (NZ - 1 - k) for k in range(NZ)])


def test_layouts_agree_with_nibabel_canonical_orientation(tmp_path):
    """Independent oracle: nibabel's RAS canonical array, shown DICOM-style, equals our image."""
    for name, (data, affine, standard_k) in VARIANTS.items():
        path = _save(tmp_path, f"{name}.nii", np.ascontiguousarray(data), affine)
        canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
        for k in range(NZ):
            shown = canonical[::-1, ::-1, standard_k(k)].T
            np.testing.assert_array_equal(read_volume_slice(f"{path}#{k}"), shown, err_msg=name)


def test_tilted_volume(tmp_path):
    theta = math.radians(15)
    c, s = math.cos(theta), math.sin(theta)
    tilt = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]])
    affine = tilt @ STANDARD
    path = _save(tmp_path, "tilt.nii", PATIENT, affine)
    rows = scan_volume(path)
    normal = (0.0, s, c)  # LPS: the slice axis (0, -s, c) in RAS, y negated
    for row in rows:
        assert (row["normal_x"], row["normal_y"], row["normal_z"]) == pytest.approx(normal)
        assert (row["rows"], row["cols"]) == (NY, NX)
    assert np.diff([r["position"] for r in rows]) == pytest.approx([5.0] * (NZ - 1))
    assert np.diff([r["z"] for r in rows]) == pytest.approx([5 * c] * (NZ - 1))
    centre = affine @ np.array([(NX - 1) / 2, (NY - 1) / 2, 3, 1])
    assert rows[3]["z"] == pytest.approx(centre[2])
    assert rows[3]["position"] == pytest.approx(-centre[1] * s + centre[2] * c)  # LPS centre . normal
    layout = layout_of(affine)
    assert layout.row_direction == pytest.approx((1, 0, 0)) and layout.col_direction == pytest.approx((0, c, -s))
    assert slice_normal([*layout.row_direction, *layout.col_direction]) == pytest.approx(normal)  # DICOM's rule
    for k in range(NZ):
        np.testing.assert_array_equal(read_volume_slice(f"{path}#{k}"), _expected_image(k))


def test_slice_axis_is_the_voxel_axis_nearest_world_z():
    theta = math.radians(60)  # past 45 degrees, j is nearer z than k
    c, s = math.cos(theta), math.sin(theta)
    affine = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]]) @ STANDARD
    layout = layout_of(affine)
    assert layout.slice_axis == 1 and layout.col_axis == 0 and layout.row_axis == 2
    assert layout_of(STANDARD).slice_axis == 2
    assert layout_of(VARIANTS["slice_axis_first"][1]).slice_axis == 0


def test_scaling_gives_hu(tmp_path):
    stored = (PATIENT % 1500).astype(np.int16)
    path = _save(tmp_path, "scaled.nii", stored, STANDARD)
    _patch(path, 112, "<ff", 2.0, -1024.0)  # scl_slope, scl_inter (nibabel resets them on save)
    assert np.asarray(nib.load(path).dataobj)[0, 0, 0] == -1024  # the patch took
    rows = scan_volume(path)
    assert (rows[0]["slope"], rows[0]["intercept"]) == (1.0, 0.0)  # the reader applies the scaling
    for k in range(NZ):
        expected = stored[::-1, ::-1, k].T.astype(np.float32) * 2 - 1024
        np.testing.assert_array_equal(read_volume_slice(f"{path}#{k}"), expected)


def test_gzip_and_nifti2_read_the_same(tmp_path):
    data, affine, _ = VARIANTS["slice_axis_first"]
    data = np.ascontiguousarray(data)
    plain = _save(tmp_path, "v.nii", data, affine)
    packed = _save(tmp_path, "v.nii.gz", data, affine)
    two = _save(tmp_path, "v2.nii", data, affine, cls=nib.Nifti2Image)
    with open(packed, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    drop = {"path", "image_id", "study_uid", "series_uid", "patient_id"}
    expected = [pytest.approx({k: v for k, v in r.items() if k not in drop}) for r in scan_volume(plain)]
    for other in (packed, two):  # approx: NIfTI-2 stores the affine in float64, NIfTI-1 in float32
        assert [{k: v for k, v in r.items() if k not in drop} for r in scan_volume(other)] == expected
    for k in range(NZ):
        image = read_volume_slice(f"{plain}#{k}")
        np.testing.assert_array_equal(read_volume_slice(f"{packed}#{k}"), image)
        np.testing.assert_array_equal(read_volume_slice(f"{two}#{k}"), image)


def test_bytes_instead_of_a_path(tmp_path):
    packed = _save(tmp_path, "v.nii.gz", PATIENT, STANDARD)
    with open(packed, "rb") as f:
        blob = f.read()
    rows = scan_volume("archive.zip::ct/v.nii.gz", data=blob)
    assert rows[0]["image_id"] == "v_001" and rows[0]["path"] == "archive.zip::ct/v.nii.gz#0"
    np.testing.assert_array_equal(read_volume_slice("archive.zip::ct/v.nii.gz#4", data=blob), _expected_image(4))


# --- header only -------------------------------------------------------------------------------------


def test_scan_reads_the_header_only(tmp_path, monkeypatch):
    big = np.random.default_rng(0).integers(-1000, 2000, size=(128, 128, 40), dtype=np.int16)  # incompressible
    packed = _save(tmp_path, "big.nii.gz", big, STANDARD)
    with open(packed, "rb") as f:
        blob = f.read()
    assert len(blob) > 500_000
    monkeypatch.setattr(nifti, "_decode_volume", _forbidden)
    monkeypatch.setattr(nifti, "to_hu", _forbidden)
    assert len(scan_volume("big.nii.gz", data=blob[:4096])) == 40  # a prefix holding the header is enough
    cut = tmp_path / "cut.nii.gz"  # the data stream ends early: only reading the pixels can tell
    cut.write_bytes(blob[: len(blob) // 3])
    assert len(scan_volume(str(cut))) == 40
    monkeypatch.undo()
    with pytest.raises(TruncatedFileError, match=r"cut\.nii\.gz"):
        read_volume_slice(f"{cut}#0")


def _forbidden(*args, **kwargs):
    raise AssertionError("the header scan decoded pixel data")


# --- per-thread reuse --------------------------------------------------------------------------------


def test_consecutive_slices_decode_the_volume_once(tmp_path, monkeypatch):
    calls = []
    decode = nifti._decode_volume

    def counting(path, data, *rest):
        calls.append(path)
        return decode(path, data, *rest)

    monkeypatch.setattr(nifti, "_decode_volume", counting)
    a = _save(tmp_path, "a.nii.gz", PATIENT, STANDARD)
    b = _save(tmp_path, "b.nii.gz", PATIENT[:, :, :3], STANDARD)
    for k in range(NZ):
        read_volume_slice(f"{a}#{k}")
    assert calls == [a]
    read_volume_slice(f"{b}#0")
    read_volume_slice(f"{a}#0")  # one volume kept per thread: a is decoded again
    assert calls == [a, b, a]

    image = read_volume_slice(f"{a}#1")
    image[:] = 0  # the caller owns the array; the cached volume is untouched
    np.testing.assert_array_equal(read_volume_slice(f"{a}#1"), _expected_image(1))

    thread = threading.Thread(target=read_volume_slice, args=(f"{a}#2",))
    thread.start()
    thread.join()
    assert calls == [a, b, a, a]  # another thread keeps its own volume

    nib.save(nib.Nifti1Image(PATIENT[::-1], STANDARD), a)  # rewritten in place: same size
    os.utime(a, ns=(1, 1))
    np.testing.assert_array_equal(read_volume_slice(f"{a}#2"), _expected_image(2)[:, ::-1])
    assert len(calls) == 5


# --- errors ------------------------------------------------------------------------------------------


def _raises(cls, path, match=None):
    with pytest.raises(cls) as info:
        scan_volume(path)
    assert isinstance(info.value, DicomReadError) and info.value.path == str(path)
    assert str(path) in str(info.value)
    if match:
        assert match in info.value.detail, info.value.detail
    return info.value


def test_several_volumes_refused_one_accepted(tmp_path):
    four = _save(tmp_path, "four.nii", np.stack([PATIENT, PATIENT], axis=-1), STANDARD)
    error = _raises(UnsupportedImageError, four, match="2 volumes")
    assert error.reason == "unsupported_image"
    assert len(scan_volume(_save(tmp_path, "one.nii", PATIENT[..., None], STANDARD))) == NZ


def test_two_d_image_refused(tmp_path):
    _raises(UnsupportedImageError, _save(tmp_path, "flat.nii", PATIENT[:, :, 0], np.eye(4)), match="2-D")


def test_complex_voxels_refused(tmp_path):
    _raises(UnsupportedImageError, _save(tmp_path, "c.nii", PATIENT.astype(np.complex64), STANDARD))


def test_non_finite_affine_refused(tmp_path):
    path = _save(tmp_path, "nan.nii", PATIENT, STANDARD)
    _patch(path, 280 + 16 + 4, "<f", float("nan"))  # srow_y[1]; the sform is the affine nibabel uses
    _raises(InvalidHeaderError, path, match="non-finite")


def test_singular_affine_refused(tmp_path):
    path = _save(tmp_path, "flat_axis.nii", PATIENT, STANDARD)
    _patch(path, 280 + 32, "<4f", 0, 0, 0, ORIGIN[2])  # srow_z = 0: with srow_x, srow_y's zero z, k has no length
    _raises(InvalidHeaderError, path, match="singular")


def test_unreadable_files(tmp_path):
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    assert _raises(EmptyFileError, empty).reason == "empty_file"
    junk = tmp_path / "junk.nii"
    junk.write_bytes(bytes(range(256)) * 4)
    assert _raises(NotNiftiError, junk).reason == "not_nifti"
    fake_gzip = tmp_path / "fake.nii.gz"
    fake_gzip.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    _raises(NotNiftiError, fake_gzip)
    good = _save(tmp_path, "good.nii", PATIENT, STANDARD)
    with open(good, "rb") as f:
        blob = f.read()
    short_header = tmp_path / "short.nii"
    short_header.write_bytes(blob[:200])
    _raises(TruncatedFileError, short_header)
    short_data = tmp_path / "short_data.nii"
    short_data.write_bytes(blob[:-10])
    assert _raises(TruncatedFileError, short_data, match="announces").reason == "truncated"
    bad_code = tmp_path / "bad_code.nii"
    bad_code.write_bytes(blob)
    _patch(bad_code, 70, "<h", 9999)  # datatype
    _raises(InvalidHeaderError, bad_code, match="9999")
    with pytest.raises(FileNotFoundError):
        scan_volume(str(tmp_path / "missing.nii"))


def test_corrupt_gzip_data_fails_on_reading(tmp_path):
    big = np.random.default_rng(1).integers(-1000, 2000, size=(64, 64, 20), dtype=np.int16)
    packed = _save(tmp_path, "bad.nii.gz", big, STANDARD)
    blob = bytearray(open(packed, "rb").read())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    with open(packed, "wb") as f:
        f.write(blob)
    assert len(scan_volume(packed)) == 20
    with pytest.raises(PixelDecodeError, match=r"bad\.nii\.gz"):
        read_volume_slice(f"{packed}#0")


def test_gzip_crc_mismatch_fails_on_reading(tmp_path):
    big = np.random.default_rng(2).integers(-1000, 2000, size=(128, 128, 40), dtype=np.int16)  # > one inflate buffer
    packed = _save(tmp_path, "crc.nii.gz", big, STANDARD)
    blob = bytearray(open(packed, "rb").read())
    blob[-8:-4] = bytes(4 * [0xFF]) if blob[-8:-4] != bytes(4 * [0xFF]) else bytes(4)  # the CRC-32 trailer
    with open(packed, "wb") as f:
        f.write(blob)
    with pytest.raises(PixelDecodeError, match="inflate"):
        read_volume_slice(f"{packed}#0")


def test_bad_slice_paths(tmp_path):
    path = _save(tmp_path, "v.nii", PATIENT, STANDARD)
    with pytest.raises(ValueError, match="names no slice"):
        read_volume_slice(path)
    with pytest.raises(InvalidHeaderError, match="outside"):
        read_volume_slice(f"{path}#{NZ}")


def test_gzip_of_a_plain_name_is_still_read(tmp_path):
    """Compression is told by the bytes, not the name."""
    plain = _save(tmp_path, "v.nii", PATIENT, STANDARD)
    misnamed = tmp_path / "w.nii"
    misnamed.write_bytes(gzip.compress(open(plain, "rb").read()))
    np.testing.assert_array_equal(read_volume_slice(f"{misnamed}#3"), _expected_image(3))


# --- CT-ICH labels -----------------------------------------------------------------------------------

CTICH_HEADER = (
    "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
    "No_Hemorrhage,Fracture_Yes_No"
)


def _ctich(tmp_path, rows, header=CTICH_HEADER):
    path = tmp_path / "hemorrhage_diagnosis_raw_ct.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


GOOD = [
    "49,1,0,0,0,0,0,1,0",
    "49,2,1,0,0,0,0,0,0",  # intraventricular
    "49,3,0,1,0,0,1,0,1",  # intraparenchymal + subdural
    "130,12,0,0,0,1,0,0,0",  # epidural
    "130,13,0,0,1,0,0,0,0",  # subarachnoid
]


def test_read_labels_takes_the_ctich_form_too(tmp_path):
    path = _ctich(tmp_path, GOOD)
    pd.testing.assert_frame_equal(read_labels(path), read_ctich_labels(path))


def test_ctich_labels(tmp_path):
    labels = read_ctich_labels(_ctich(tmp_path, GOOD))
    assert list(labels.columns) == list(LABELS)
    assert all(str(t) == "Int8" for t in labels.dtypes)
    assert list(labels.index) == ["049_001", "049_002", "049_003", "130_012", "130_013"]
    assert labels.index.name == "image_id"
    assert labels.loc["049_001"].tolist() == [0, 0, 0, 0, 0, 0]
    assert labels.loc["049_002"].tolist() == [0, 0, 1, 0, 0, 1]
    assert labels.loc["049_003"].tolist() == [0, 1, 0, 0, 1, 1]
    assert labels.loc["130_012"].tolist() == [1, 0, 0, 0, 0, 1]
    assert labels.loc["130_013"].tolist() == [0, 0, 0, 1, 0, 1]


def test_ctich_ids_match_the_scan(tmp_path):
    labels = read_ctich_labels(_ctich(tmp_path, GOOD[:3]))
    rows = scan_volume(_save(tmp_path, "049.nii", PATIENT[:, :, :3], STANDARD))
    assert [r["image_id"] for r in rows] == list(labels.index)


def test_ctich_without_fracture_column_and_agreeing_duplicates(tmp_path):
    header = CTICH_HEADER.rsplit(",", 1)[0]
    rows = [r.rsplit(",", 1)[0] for r in GOOD]
    labels = read_ctich_labels(_ctich(tmp_path, [*rows, rows[1]], header=header))
    assert len(labels) == 5 and labels.loc["049_002", "intraventricular"] == 1


def test_is_ctich_csv():
    assert is_ctich_csv(CTICH_HEADER.split(","))
    assert is_ctich_csv([" " + c for c in CTICH_HEADER.split(",")[:-1]])
    assert not is_ctich_csv(["ID", "Label"])
    assert not is_ctich_csv(CTICH_HEADER.split(",")[:-2])


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["49,1,0,0,0,0,1,1,0"], r"No_Hemorrhage contradicts the subtype columns at line 3 "),
        (["49,1,0,0,0,0,0,0,0"], r"No_Hemorrhage contradicts the subtype columns at line 3 "),
        (["49,1,0,0,2,0,0,0,0"], r"not 0 or 1 at line 3 "),
        (["49,1,0,,0,0,0,1,0"], r"not 0 or 1 at line 3 "),
        (["49,0,0,0,0,0,0,1,0"], r"SliceNumber is not an integer >= 1 at line 3 "),
        (["x,1,0,0,0,0,0,1,0"], r"PatientNumber is not an integer >= 0 at line 3 "),
        (["49,1,1,0,0,0,0,0,0"], r"conflicting duplicate rows .* at line 2, line 3 "),
    ],
)
def test_ctich_bad_rows_name_the_line(tmp_path, rows, match):
    with pytest.raises(LabelsError, match=match):
        read_ctich_labels(_ctich(tmp_path, ["49,1,0,0,0,0,0,1,0", *rows]))


def test_ctich_bad_files(tmp_path):
    with pytest.raises(LabelsError, match="missing column.*Subdural"):
        read_ctich_labels(_ctich(tmp_path, ["49,1,0,0,0,0,1,0"], header=CTICH_HEADER.replace("Subdural,", "")))
    with pytest.raises(LabelsError, match="missing column"):
        read_ctich_labels(_ctich(tmp_path, ["ID_1_any,0"], header="ID,Label"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LabelsError, match="not a readable CSV"):
        read_ctich_labels(empty)
    with pytest.raises(LabelsError):
        read_ctich_labels(tmp_path / "missing.csv")
