"""ichprep.synthlayouts: the hospital (CQ500-style) and nifti (CT-ICH-style) synthetic archives."""

from __future__ import annotations

import csv
import hashlib
import math
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import replace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from ichprep import synthlayouts as sl
from ichprep.cli import main
from ichprep.reading.labels import LABELS, SUBTYPES
from ichprep.synth import generate, slice_labels

SIZE = 64  # small images: the layouts' structure does not depend on the size
STUDY_DIR = re.compile(r"^CQ500CT(\d+) CQ500CT\1$")


def sha256s(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A three-study hospital archive (seed 0), its summary and its plan."""
    out = tmp_path_factory.mktemp("hospital") / "archive"
    seen = []
    summary = sl.generate_hospital(out, 3, seed=0, size=SIZE, progress=seen.append)
    return out, summary, sl.plan_hospital(3, 0), seen


@pytest.fixture(scope="module")
def headers(hospital):
    """Every DICOM file's header, by (study folder, series folder, file name)."""
    out = hospital[0]
    return {
        (p.parts[-4], p.parts[-2], p.name): pydicom.dcmread(p, stop_before_pixels=True)
        for p in sorted(out.glob("*/Unknown Study/*/*.dcm"))
    }


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    out = tmp_path_factory.mktemp("nifti") / "ctich"
    return out, sl.generate_nifti(out, 3, seed=0, size=SIZE), sl.plan_nifti(3, 0)


# ------------------------------------------------------------------------------------------------ plan
def test_plan_of_ten_studies_has_every_kind_and_case():
    plans = sl.plan_hospital(10, 0)
    assert {kind for p in plans for kind in p.kinds()} == set(sl.SERIES_KINDS)
    assert sum(p.thin_only for p in plans) == 2  # about one in five
    series = [s for p in plans for s in p.series]
    assert any(s.tilt_deg for s in series) and any(s.repeated is not None for s in series)
    assert any(s.gap is not None for s in series)
    for p in plans:
        assert [s.number for s in p.series] == list(range(1, len(p.series) + 1))
        assert list(p.kinds()) == sorted(p.kinds(), key=sl.SERIES_KINDS.index)  # SeriesNumber order
        (expected,) = [s for s in p.series if s.expected]
        assert expected.kind == ("thin" if p.thin_only else "thick_soft")
        if p.thin_only:
            assert not {"bone", "contrast"} & set(p.kinds())
        vendor = sl.VENDORS[p.vendor]
        kernels = dict.fromkeys(("thick_soft", "thin", "contrast"), vendor.soft) | {"bone": vendor.bone}
        for s in p.series:
            assert s.kernel in kernels.get(s.kind, ("",))
            if s.kind == "thin":
                assert s.thickness in sl.THIN_MM and s.n_positions == p.geometry.n_slices * 5 / s.thickness
            if s.repeated is not None or s.gap is not None:
                assert s.expected and s.repeated != s.gap
    assert not plans[0].thin_only and plans[0].geometry.lesions  # study 0: full, and bleeding


@pytest.mark.parametrize("studies", [2, 3, 7])
def test_small_plans_still_cover_every_case(studies):
    for seed in range(4):
        plans = sl.plan_hospital(studies, seed)
        assert {kind for p in plans for kind in p.kinds()} == set(sl.SERIES_KINDS), (studies, seed)
        assert any(p.thin_only for p in plans)
        series = [s for p in plans for s in p.series]
        assert any(s.tilt_deg for s in series) and any(s.gap is not None for s in series)


def test_plans_are_deterministic_and_seeded():
    assert sl.plan_hospital(6, 3) == sl.plan_hospital(6, 3)
    assert sl.plan_hospital(6, 3) != sl.plan_hospital(6, 4)
    assert sl.plan_nifti(4, 1) == sl.plan_nifti(4, 1)


# ------------------------------------------------------------------------------------------- hospital
def test_folder_structure_and_repeated_file_names(hospital):
    out, summary, plans, seen = hospital
    studies = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert studies == [f"CQ500CT{n} CQ500CT{n}" for n in range(3)]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["reads.csv", "series_truth.csv", "study_truth.csv"]
    names = Counter()
    for study, plan in zip(studies, plans):
        assert [p.name for p in (out / study).iterdir()] == ["Unknown Study"]
        folders = sorted(p.name for p in (out / study / "Unknown Study").iterdir())
        assert folders == sorted(f"CT {s.description}" for s in plan.series)
        for s in plan.series:
            files = sorted(p.name for p in (out / study / "Unknown Study" / s.folder).iterdir())
            assert files == [f"CT{j:06d}.dcm" for j in range(s.n_files)]  # names restart in every series
            names.update(files)
    assert names["CT000000.dcm"] == summary.n_series > 3  # so a file name is no identity
    assert seen == [sum(s.n_files for s in p.series) for p in plans]
    assert summary.n_files == sum(seen) == len(list(out.rglob("*.dcm")))


def test_series_truth_matches_the_files(hospital, headers):
    out, summary, plans, _ = hospital
    truth = read_rows(out / "series_truth.csv")
    assert list(truth[0]) == list(sl.SERIES_TRUTH_COLUMNS)
    files = defaultdict(list)
    for (study, series, _), ds in headers.items():
        files[ds.SeriesInstanceUID].append((study, series, ds))
    assert {row["SeriesInstanceUID"] for row in truth} == set(files)
    for row in truth:
        group = files[row["SeriesInstanceUID"]]
        assert {(st, se) for st, se, _ in group} == {(row["study_folder"], row["series_folder"])}
        assert len(group) == int(row["n_files"])
        for _, _, ds in group:
            assert ds.StudyInstanceUID == row["StudyInstanceUID"]
            assert ds.SeriesNumber == int(row["SeriesNumber"]) and ds.SeriesDescription == row["description"]
            assert row["series_folder"] == f"CT {ds.SeriesDescription}"
            assert ds.get("ConvolutionKernel", "") == row["kernel"]
            if "SliceThickness" in ds:
                assert f"{float(ds.SliceThickness):g}" == row["thickness"]
            else:
                assert row["thickness"] == "" and row["kind"] in ("localizer", "dose")
            assert (ds.get("ContrastBolusAgent") == sl.CONTRAST_AGENT) == (row["kind"] == "contrast")
    per_study = defaultdict(list)
    for row in truth:
        per_study[row["study_folder"]].append(row)
    for study, rows in per_study.items():
        assert sum(int(r["expected"]) for r in rows) == 1
        series_ds = [ds for (st, _, _), ds in headers.items() if st == study]
        assert len({ds.StudyInstanceUID for ds in series_ds}) == 1 and len({ds.PatientID for ds in series_ds}) == 1
    assert len({ds.SOPInstanceUID for ds in headers.values()}) == len(headers)
    assert Counter(row["kind"] for row in truth) == Counter({k: n for k, n in summary.kinds.items() if n})


def _normal(ds) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def test_tilt_repeat_and_gap_are_in_the_headers(hospital, headers):
    out = hospital[0]
    truth = read_rows(out / "series_truth.csv")
    flags = Counter()
    for row in truth:
        if row["kind"] not in sl.AXIAL_KINDS:
            continue
        group = sorted(
            (ds for ds in headers.values() if ds.SeriesInstanceUID == row["SeriesInstanceUID"]),
            key=lambda ds: ds.InstanceNumber,
        )
        iop = [float(v) for v in group[0].ImageOrientationPatient]
        a = math.radians(float(row["tilt_deg"]))
        assert iop == pytest.approx([1, 0, 0, 0, math.cos(a), -math.sin(a)], abs=1e-6)
        if row["tilted"] == "1":
            assert 12 <= float(row["tilt_deg"]) <= 20
        normal = _normal(group[0])
        ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in group])
        steps = np.diff(ipp, axis=0)
        along = steps @ normal
        # positions advance along the (tilted) normal only, not within the image plane
        assert np.abs(steps - along[:, None] * normal).max() < 2e-3
        thickness = float(row["thickness"])
        ordinary = along[: len(along) - int(row["repeated_position"])]  # the repeat comes last
        gaps = np.flatnonzero(np.abs(ordinary - 2 * thickness) < 1e-2)
        assert np.count_nonzero(np.abs(ordinary - thickness) > 1e-2) == len(gaps) == int(row["gap"])
        rounded = [tuple(np.round(p, 2)) for p in ipp]
        assert (len(set(rounded)) < len(rounded)) == (row["repeated_position"] == "1")
        instance = [int(ds.InstanceNumber) for ds in group]
        assert len(set(instance)) == len(instance)
        flags.update({k for k in ("tilted", "repeated_position", "gap") if row[k] == "1"})
    assert set(flags) == {"tilted", "repeated_position", "gap"}  # each case is exercised


def test_localizer_and_dose_tags(hospital, headers):
    kinds = {r["SeriesInstanceUID"]: r["kind"] for r in read_rows(hospital[0] / "series_truth.csv")}
    scouts = [ds for ds in headers.values() if kinds[ds.SeriesInstanceUID] == "localizer"]
    doses = [ds for ds in headers.values() if kinds[ds.SeriesInstanceUID] == "dose"]
    assert scouts and doses
    for ds in scouts:
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] and "SliceThickness" not in ds
        expected = [0, 1, 0, 0, 0, -1] if ds.InstanceNumber == 1 else [1, 0, 0, 0, 0, -1]
        assert [float(v) for v in ds.ImageOrientationPatient] == expected
    for ds in doses:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" == ds.file_meta.MediaStorageSOPClassUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SCREEN SAVE"] and ds.Modality in ("CT", "OT")
        assert "ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds
    axial = [ds for ds in headers.values() if kinds[ds.SeriesInstanceUID] in sl.AXIAL_KINDS]
    assert all(ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.ImageType[2] == "AXIAL" for ds in axial)
    assert all(ds.ConvolutionKernel for ds in axial)


def test_pixels_read_back_as_hu(hospital):
    out, _, plans, _ = hospital
    study = plans[0]
    rendered = sl.render_volume(study.geometry, SIZE)
    thick = next(s for s in study.series if s.kind == "thick_soft")
    ds = pydicom.dcmread(out / study.folder / "Unknown Study" / thick.folder / "CT000005.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(np.rint(sl.axial_hu(0, study, thick, rendered, ds.InstanceNumber - 1)), -1024, None)
    np.testing.assert_array_equal(hu, expected)
    dose_series = next(s for p in plans for s in p.series if s.kind == "dose")
    dose_study = next(p for p in plans if dose_series in p.series)
    dose = pydicom.dcmread(out / dose_study.folder / "Unknown Study" / dose_series.folder / "CT000000.dcm")
    assert dose.pixel_array.dtype == np.uint8 and 0 < np.count_nonzero(dose.pixel_array) < dose.pixel_array.size // 4


def test_thin_series_averages_back_to_the_thick_one():
    study = sl.plan_hospital(1, 0)[0]
    rendered = sl.render_volume(study.geometry, 128)
    clean, n = rendered.clean, study.geometry.n_slices
    thick = next(s for s in study.series if s.kind == "thick_soft")
    thick_hu = [sl.axial_hu(0, study, thick, rendered, z) for z in range(n)]
    for mm in sl.THIN_MM:
        m = round(5 / mm)
        thin = replace(thick, kind="thin", thickness=mm, n_positions=n * m)
        for z in range(n):
            average = np.mean([sl.axial_hu(0, study, thin, rendered, z * m + i) for i in range(m)], axis=0)
            head = clean[z] > -500
            # the thin slices of a 5 mm slab average to that 5 mm slice: the difference is noise alone
            assert np.abs(average - clean[z])[head].mean() < 6, (mm, z)
            diff = [np.abs(average - thick_hu[zz])[head].mean() for zz in (z - 1, z, z + 1) if 0 <= zz < n]
            assert min(diff) == np.abs(average - thick_hu[z])[head].mean(), (mm, z, diff)  # its own 5 mm slice


def test_study_truth_and_reads(hospital):
    out, summary, plans, _ = hospital
    studies = read_rows(out / "study_truth.csv")
    assert list(studies[0]) == list(sl.STUDY_TRUTH_COLUMNS)
    assert [r["name"] for r in studies] == [f"CQ500-CT-{n}" for n in range(3)]
    for row, plan in zip(studies, plans):
        labels = {k: int(row[k]) for k in LABELS}
        assert labels["any"] == max(labels[s] for s in SUBTYPES)
        assert {s for s in SUBTYPES if labels[s]} <= {les.subtype for les in plan.geometry.lesions}
        assert labels == sl.study_labels(sl.render_volume(plan.geometry, SIZE))
    assert studies[0]["any"] == "1" and summary.n_positive_studies == sum(int(r["any"]) for r in studies)
    reads = read_rows(out / "reads.csv")
    head = ["name", "Category", "R1:ICH", "R1:IPH", "R1:IVH", "R1:SDH", "R1:EDH", "R1:SAH"]
    assert list(reads[0])[:8] == head and list(reads[0]) == list(sl.READS_COLUMNS)
    assert {"R3:Fracture", "R2:MidlineShift", "R1:BleedLocation-Left"} <= set(reads[0])
    assert [r["name"] for r in reads] == [r["name"] for r in studies]
    assert all(r["Category"] in ("B1", "B2") for r in reads)
    assert {v for r in reads for k, v in r.items() if ":" in k} <= {"0", "1"}
    abbr = {"ICH": "any", **sl.CQ500_SUBTYPES}
    agree = [
        (sum(int(r[f"{reader}:{f}"]) for reader in sl.READERS) >= 2) == (s[label] == "1")
        for r, s in zip(reads, studies)
        for f, label in abbr.items()
    ]
    assert sum(agree) >= 0.8 * len(agree)


def test_readers_disagree_but_their_majority_is_the_truth():
    plans = sl.plan_hospital(300, 5)
    agree_reader, agree_majority, n = Counter(), 0, 0
    for plan in plans:
        labels = dict.fromkeys(SUBTYPES, 0) | {les.subtype: 1 for les in plan.geometry.lesions}
        labels["any"] = max(labels.values())
        truth, row = sl.true_findings(plan, labels), sl.reads_row(plan, labels)
        assert truth["ICH"] == labels["any"] and truth["IPH"] == labels["intraparenchymal"]
        for f in sl.READ_FINDINGS[:6]:
            votes = [row[f"{r}:{f}"] for r in sl.READERS]
            agree_reader.update(r for r, v in zip(sl.READERS, votes) if v == truth[f])
            agree_majority += (sum(votes) >= 2) == bool(truth[f])
            n += 1
    for reader in sl.READERS:
        assert 0.86 < agree_reader[reader] / n < 0.98  # each reader errs now and then
    assert agree_majority / n > max(agree_reader.values()) / n  # the majority errs less than any one reader
    assert agree_majority / n > 0.95


def test_each_readers_row_is_consistent_ich_whenever_a_subtype():
    for plan in sl.plan_hospital(100, 3):
        labels = dict.fromkeys(SUBTYPES, 0) | {les.subtype: 1 for les in plan.geometry.lesions}
        labels["any"] = max(labels.values())
        row = sl.reads_row(plan, labels)
        for r in sl.READERS:
            assert row[f"{r}:ICH"] == max(row[f"{r}:{f}"] for f in ("ICH", *sl.CQ500_SUBTYPES))


def test_bleed_side_is_where_the_lesion_is_drawn():
    checked = 0
    for plan in sl.plan_hospital(40, 2, lesion_rate=1.0):
        lateral = ("epidural", "subdural", "intraparenchymal")
        lesions = [les for les in plan.geometry.lesions if les.subtype in lateral and abs(math.cos(les.angle)) > 0.5]
        if len(plan.geometry.lesions) != 1 or not lesions:  # one clearly lateral lesion
            continue
        rendered = sl.render_volume(plan.geometry, 128, masks=True)
        labels = sl.study_labels(rendered)
        if not labels["any"]:
            continue
        columns = np.nonzero(rendered.lesion_mask)[2]
        found = sl.true_findings(plan, labels)
        # an axial DICOM image's column index grows toward the patient's left
        assert found["BleedLocation-Left"] == int(columns.mean() > 63.5) == 1 - found["BleedLocation-Right"]
        checked += 1
    assert checked >= 8


def test_same_arguments_same_bytes(tmp_path):
    sl.generate_hospital(tmp_path / "a", 2, seed=1, size=SIZE)
    sl.generate_hospital(tmp_path / "b", 2, seed=1, size=SIZE)
    sl.generate_hospital(tmp_path / "c", 2, seed=2, size=SIZE)
    first = sha256s(tmp_path / "a")
    assert sha256s(tmp_path / "b") == first
    assert sha256s(tmp_path / "c") != first


def test_zip_per_study(tmp_path):
    summary = sl.generate_hospital(tmp_path / "z", 2, seed=1, size=SIZE, as_zip=True)
    sl.generate_hospital(tmp_path / "again", 2, seed=1, size=SIZE, as_zip=True)
    sl.generate_hospital(tmp_path / "folders", 2, seed=1, size=SIZE)
    assert sha256s(tmp_path / "again") == sha256s(tmp_path / "z")
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == [
        "CQ500-CT-0.zip",
        "CQ500-CT-1.zip",
        "reads.csv",
        "series_truth.csv",
        "study_truth.csv",
    ]
    assert summary.zipped and summary.studies == (tmp_path / "z" / "CQ500-CT-0.zip", tmp_path / "z" / "CQ500-CT-1.zip")
    folders = sha256s(tmp_path / "folders")
    n_files = 0
    for n in range(2):
        with zipfile.ZipFile(tmp_path / "z" / f"CQ500-CT-{n}.zip") as zf:
            top = f"CQ500CT{n} CQ500CT{n}/"
            assert all(i.filename.startswith(top) for i in zf.infolist())
            for info in zf.infolist():
                assert info.date_time == (1980, 1, 1, 0, 0, 0)
                if info.is_dir():
                    continue
                assert info.compress_type == zipfile.ZIP_DEFLATED
                assert hashlib.sha256(zf.read(info)).hexdigest() == folders[info.filename]
                n_files += 1
    assert n_files == summary.n_files == sum(name.endswith(".dcm") for name in folders)
    for name in ("reads.csv", "series_truth.csv", "study_truth.csv"):
        assert (tmp_path / "z" / name).read_bytes() == (tmp_path / "folders" / name).read_bytes()


def test_bad_arguments_are_refused(tmp_path):
    for kwargs, message in [
        ({"studies": 0}, "studies"),
        ({"studies": 2, "seed": -1}, "seed"),
        ({"studies": 2, "size": 65}, "size"),
        ({"studies": 2, "size": 32}, "size"),
        ({"studies": 2, "size": 2048}, "size"),
        ({"studies": 2, "lesion_rate": 1.5}, "lesion_rate"),
        ({"studies": 2, "min_lesion_pixels": 0}, "min_lesion_pixels"),
        ({"studies": 2, "as_zip": "yes"}, "as_zip"),
    ]:
        with pytest.raises(ValueError, match=message):
            sl.generate_hospital(tmp_path / "h", **kwargs)
    with pytest.raises(ValueError, match="gz"):
        sl.generate_nifti(tmp_path / "n", 2, gz=1)
    with pytest.raises(ValueError, match="three-digit"):
        sl.plan_nifti(1000, 0)
    assert not (tmp_path / "h").exists() and not (tmp_path / "n").exists()
    sl.generate_hospital(tmp_path / "h", 1, size=SIZE)
    with pytest.raises(FileExistsError, match="CQ500CT0"):
        sl.generate_hospital(tmp_path / "h", 1, size=SIZE)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        sl.generate_nifti(tmp_path / "file", 1, size=SIZE)


# ---------------------------------------------------------------------------------------------- nifti
def test_nifti_volumes_shape_affine_and_scaling(nifti):
    out, summary, plans = nifti
    assert [p.name for p in summary.volumes] == ["049.nii", "050.nii", "051.nii"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["049.nii", "050.nii", "051.nii"]
    assert summary.scaled == ("050",) and summary.reversed == ("051",)
    for path, plan in zip(summary.volumes, plans):
        img = nib.load(path)
        n, spacing = plan.geometry.n_slices, plan.geometry.spacing * 512 / SIZE
        assert img.shape == (SIZE, SIZE, n) and sl.NIFTI_SLICES[0] <= n < sl.NIFTI_SLICES[1]
        assert img.get_data_dtype() == np.int16
        assert img.header.get_zooms() == pytest.approx((spacing, spacing, 5.0), rel=1e-5)
        assert nib.aff2axcodes(img.affine) == ("L", "A", "I" if plan.reversed else "S")
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.header.get_qform(), img.affine, atol=1e-4)
        assert (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0 if plan.scaled else 0.0)
        hu = np.asarray(img.dataobj)
        raw = img.dataobj.get_unscaled()
        np.testing.assert_array_equal(raw, hu + (1024 if plan.scaled else 0))
        assert -1100 < hu.min() and hu.max() < 3000 and np.median(hu) == pytest.approx(-1000, abs=60)
        mask = nib.load(out / "masks" / path.name)
        np.testing.assert_array_equal(mask.affine, img.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 255}


def test_nifti_orientation_convention(nifti):
    out, summary, plans = nifti
    for path, plan in zip(summary.volumes, plans):
        img = nib.load(path)
        rendered = sl.render_volume(plan.geometry, SIZE)
        images = sl.nifti_hu(0, plan, rendered)  # display order: z ascending, rows A->P, columns R->L
        data = np.asarray(img.dataobj)
        n = len(images)
        for z in range(n):
            k = n - 1 - z if plan.reversed else z
            # the documented mapping: image == data[:, ::-1, k].T == np.rot90(data[:, :, k])
            np.testing.assert_array_equal(data[:, ::-1, k].T, images[z])
            np.testing.assert_array_equal(np.rot90(data[:, :, k]), images[z])
        canonical = nib.as_closest_canonical(img).get_fdata()
        np.testing.assert_array_equal(canonical[::-1, ::-1, :].transpose(2, 1, 0), images)
        # the head is longer front to back than side to side: rows run A->P in the display
        head = images[n // 2] > -500
        assert np.count_nonzero(head.any(axis=1)) > 1.08 * np.count_nonzero(head.any(axis=0))
        # a voxel's world position is its pixel's DICOM (LPS) position with x and y negated
        g, r, c, z = rendered.geometry, 5, 9, 3
        lps = np.array([-(SIZE / 2) * g.spacing + c * g.spacing, -(SIZE / 2) * g.spacing + r * g.spacing, g.z0 + 5 * z])
        k = n - 1 - z if plan.reversed else z
        world = img.affine @ [c, SIZE - 1 - r, k, 1]
        np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-6)


def test_nifti_labels_csv(nifti):
    out, summary, plans = nifti
    rows = read_rows(out / "hemorrhage_diagnosis_raw_ct.csv")
    assert list(rows[0]) == [
        "PatientNumber",
        "SliceNumber",
        "Intraventricular",
        "Intraparenchymal",
        "Subarachnoid",
        "Epidural",
        "Subdural",
        "No_Hemorrhage",
        "Fracture_Yes_No",
    ]
    assert len(rows) == summary.n_slices == sum(p.geometry.n_slices for p in plans)
    assert summary.n_positive_slices == sum(r["No_Hemorrhage"] == "0" for r in rows) > 0
    for plan, path in zip(plans, summary.volumes):
        mine = [r for r in rows if int(r["PatientNumber"]) == plan.number]
        n = plan.geometry.n_slices
        assert [int(r["SliceNumber"]) for r in mine] == list(range(1, n + 1))
        rendered = sl.render_volume(plan.geometry, SIZE, masks=True)
        mask = np.asarray(nib.load(out / "masks" / path.name).dataobj)
        for r in mine:
            k = int(r["SliceNumber"]) - 1
            z = n - 1 - k if plan.reversed else k  # SliceNumber follows the voxel order
            labels = slice_labels(rendered.pixels[z], rendered.geometry.min_lesion_pixels)
            assert {s: int(r[s.capitalize()]) for s in SUBTYPES} == {s: labels[s] for s in SUBTYPES}
            assert int(r["No_Hemorrhage"]) == 1 - labels["any"] and r["Fracture_Yes_No"] == "0"
            assert bool(mask[:, :, k].any()) == bool(labels["any"])
            if labels["any"]:  # a labelled slice lies within a planned lesion of that subtype
                hits = [les for les in plan.geometry.lesions if labels[les.subtype]]
                assert any(les.first <= z <= les.last for les in hits)
    assert any(r["No_Hemorrhage"] == "0" for r in rows if r["PatientNumber"] == "49")


def test_nifti_gz_is_deterministic(tmp_path):
    a = sl.generate_nifti(tmp_path / "a", 2, seed=3, size=SIZE, gz=True)
    sl.generate_nifti(tmp_path / "b", 2, seed=3, size=SIZE, gz=True)
    assert sha256s(tmp_path / "a") == sha256s(tmp_path / "b")
    assert a.volumes[0].name == "049.nii.gz" and a.volumes[0].read_bytes()[4:8] == b"\0\0\0\0"  # no mtime
    plain = sl.generate_nifti(tmp_path / "plain", 2, seed=3, size=SIZE)
    np.testing.assert_array_equal(nib.load(a.volumes[1]).get_fdata(), nib.load(plain.volumes[1]).get_fdata())


# ------------------------------------------------------------------------------------------------ cli
def test_cli_layouts(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main, ["synth", str(tmp_path / "h"), "--layout", "hospital", "--studies", "2", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "thin-only" in result.output and (tmp_path / "h" / "series_truth.csv").exists()
    result = runner.invoke(main, ["synth", str(tmp_path / "n"), "--layout", "nifti", "--studies", "1", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "n" / "ct_scans" / "049.nii").exists()
    for args, message in [
        (["--layout", "nifti", "--zip"], "--nii-gz"),
        (["--layout", "hospital", "--test-studies", "1"], "--test-studies applies to --layout kaggle"),
        (["--layout", "nifti", "--partial-volume"], "--partial-volume"),
        (["--size", "64"], "--size applies to --layout hospital or nifti"),
        (["--layout", "kaggle", "--nii-gz"], "--nii-gz"),
    ]:
        result = runner.invoke(main, ["synth", str(tmp_path / "x"), "--studies", "1", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "x").exists()
    result = runner.invoke(main, ["synth", str(tmp_path / "odd"), "--layout", "nifti", "--size", "65"])
    assert result.exit_code == 1 and "even" in result.output


def test_cli_default_layout_is_the_kaggle_one(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "cli"), "--studies", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    generate(tmp_path / "lib", studies=2, seed=4)
    assert sha256s(tmp_path / "cli") == sha256s(tmp_path / "lib")
    assert {name.split("/")[0] for name in sha256s(tmp_path / "cli")} == {"stage_2_train", "stage_2_train.csv"}
