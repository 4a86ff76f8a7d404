"""ichprep.synth: layout, labels, headers, HU values, lesions and quirks of the synthetic RSNA dataset."""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections import Counter, defaultdict

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from ichprep import synth
from ichprep.reading.labels import LABELS
from ichprep.synth import LESION_CODE, SUBTYPES, generate, plan_dataset, slice_regions

KAGGLE_ORDER = (*SUBTYPES, "any")


@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    """``--studies 2 --seed 0``: summary, and image id -> (study plan, slice index)."""
    seen = []
    summary = generate(tmp_path_factory.mktemp("synth"), studies=2, seed=0, progress=seen.append)
    plans, _ = plan_dataset(2, 0)
    where = {image_id: (plan, z) for plan in plans for z, image_id in enumerate(plan.image_ids)}
    return summary, where, seen


def read_csv(path) -> dict[str, dict[str, int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,Label"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) % 6 == 0
    labels = {}
    for i in range(0, len(rows), 6):
        image_id = rows[i][0].rsplit("_", 1)[0]
        assert [r[0] for r in rows[i : i + 6]] == [f"{image_id}_{name}" for name in KAGGLE_ORDER]
        assert image_id not in labels
        labels[image_id] = {name: int(r[1]) for name, r in zip(KAGGLE_ORDER, rows[i : i + 6])}
    return labels


def to_hu(ds) -> np.ndarray:
    """Reader's decode, with the community fix for the 12-bit wrap-around slices."""
    px = ds.pixel_array.astype(np.float32)
    intercept = float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        px += 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0
    return px * float(ds.RescaleSlope) + intercept


def load(summary, image_id, **kw):
    return pydicom.dcmread(summary.dicom_dir / f"{image_id}.dcm", **kw)


def sha256s(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_csv(ds2):
    summary, where, seen = ds2
    files = sorted(p.name for p in summary.dicom_dir.iterdir())
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", f) for f in files)
    assert len(files) == summary.n_slices == len(where) == sum(seen)
    assert summary.labels_csv == summary.out_dir / "stage_2_train.csv"
    assert summary.n_studies == 2
    assert summary.n_patients in (1, 2)
    labels = read_csv(summary.labels_csv)
    ids = {f[:-4] for f in files}
    unlabelled = set(summary.quirks["unlabelled"])
    assert unlabelled
    assert unlabelled <= ids
    assert summary.n_unlabelled == len(unlabelled)
    assert set(labels) == ids - unlabelled
    for row in labels.values():
        assert set(row.values()) <= {0, 1}
        assert row["any"] == max(row[s] for s in SUBTYPES)
    assert summary.n_positive_slices == sum(row["any"] for row in labels.values()) > 0


def test_same_seed_same_bytes_other_seed_differs(ds2, tmp_path):
    summary, _, _ = ds2
    generate(tmp_path / "again", studies=2, seed=0)
    generate(tmp_path / "other", studies=2, seed=1)
    first = sha256s(summary.out_dir)
    assert sha256s(tmp_path / "again") == first
    other = sha256s(tmp_path / "other")
    assert set(other) != set(first)
    assert set(other.values()).isdisjoint(first.values())


def test_headers(ds2):
    summary, where, _ = ds2
    odd = set(summary.quirks["odd_size"])
    studies = defaultdict(list)
    for image_id in where:
        ds = load(summary, image_id, stop_before_pixels=True)
        raw = (summary.dicom_dir / f"{image_id}.dcm").read_bytes()
        assert raw[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.file_meta.ImplementationClassUID):
            assert UID(uid).is_valid
        assert ds.Modality == "CT"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.SamplesPerPixel == 1
        assert ds.BitsAllocated == 16
        assert ds.RescaleSlope == 1
        assert 0.4 <= float(ds.PixelSpacing[0]) <= 0.5
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        assert (ds.Rows, ds.Columns) != (512, 512) if image_id in odd else (ds.Rows, ds.Columns) == (512, 512)
        studies[ds.StudyInstanceUID].append(ds)
    assert len(studies) == 2
    assert len({ds.SOPInstanceUID for group in studies.values() for ds in group}) == summary.n_slices
    for group in studies.values():
        assert 20 <= len(group) <= 40
        assert len({ds.SeriesInstanceUID for ds in group}) == len({ds.PatientID for ds in group}) == 1
        group.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        assert np.allclose(np.diff([float(ds.ImagePositionPatient[2]) for ds in group]), 5.0)
        numbers = [int(ds.InstanceNumber) for ds in group]
        assert numbers in (list(range(1, len(group) + 1)), list(range(len(group), 0, -1)))


def check_anatomy(hu, regions):
    assert abs(np.median(hu[regions == synth.AIR]) + 1000) < 5
    bone = hu[regions == synth.BONE]
    assert bone.max() > 1200
    assert 700 < np.median(bone) < 1500
    assert 25 <= np.median(hu[regions == synth.BRAIN]) <= 45


def test_hu_of_every_storage_kind(ds2):
    """Decoding a file gives back the rendered HU (rounded), for normal, wrap12, signed and odd-size slices."""
    summary, where, _ = ds2
    quirky = {name: ids[0] for name, ids in summary.quirks.items() if ids and name != "truncated_pixels"}
    normal = next(i for i in where if not any(i in ids for ids in summary.quirks.values()))
    for name, image_id in {"normal": normal, **quirky}.items():
        plan, z = where[image_id]
        ds = load(summary, image_id)
        shape = (ds.Rows, ds.Columns)
        hu, _ = synth.render_slice(plan.geometry, z, shape, synth._rng(0, 1, plan.index, z))
        decoded = to_hu(ds)
        # wrap12 holds HU >= -1000; unsigned storage with intercept -1024 holds HU >= -1024; signed holds all
        lowest = -1000 if ds.BitsStored == 12 and ds.RescaleIntercept > -100 else -1024 - 32768 * ds.PixelRepresentation
        assert np.array_equal(decoded, np.maximum(np.rint(hu), lowest)), name
        check_anatomy(decoded, slice_regions(plan.geometry, z, shape))
    wrap = load(summary, quirky["wrap12"])
    assert wrap.BitsStored == 12
    assert wrap.PixelRepresentation == 0
    assert wrap.RescaleIntercept > -100
    assert 3096 <= np.median(wrap.pixel_array[:50, :50]) < 3106  # air stored as -1000 mod 4096
    signed = load(summary, quirky["signed"])
    assert signed.PixelRepresentation == 1
    assert signed.RescaleIntercept == 0
    assert signed.pixel_array.dtype == np.int16
    assert abs(np.median(signed.pixel_array[:50, :50]) + 1000) < 5
    multi = load(summary, quirky["multiwindow"], stop_before_pixels=True)
    assert len(multi.WindowCenter) == len(multi.WindowWidth) == 2


def test_labels_follow_drawn_lesions_and_blood_is_visible(ds2):
    summary, where, _ = ds2
    labels = read_csv(summary.labels_csv)
    positives = 0
    for image_id, row in labels.items():
        if image_id in summary.quirks["truncated_pixels"]:
            continue
        plan, z = where[image_id]
        ds = load(summary, image_id)
        regions = slice_regions(plan.geometry, z, (ds.Rows, ds.Columns))
        hu = to_hu(ds)
        for i, les in enumerate(plan.geometry.lesions):
            lesion = regions == LESION_CODE + i
            if lesion.sum() >= synth.MIN_LESION_PIXELS:
                assert row[les.subtype] == 1
                blood = hu[lesion]
                assert 55 <= np.median(blood) <= 85
                assert np.mean((blood >= 50) & (blood <= 90)) > 0.9
                positives += 1
        drawn = {
            les.subtype
            for i, les in enumerate(plan.geometry.lesions)
            if (regions == LESION_CODE + i).sum() >= synth.MIN_LESION_PIXELS
        }
        assert {s for s in SUBTYPES if row[s]} == drawn
        if not (regions >= LESION_CODE).any():  # no blood-range blobs in brain without lesions
            brain = cv2.erode((regions == synth.BRAIN).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            smooth = cv2.medianBlur(hu.astype(np.float32), 3)
            assert np.count_nonzero((smooth[brain] >= 55) & (smooth[brain] <= 90)) <= 5
    assert positives > 0


def test_partial_volume_fades_only_the_edge_slices_of_each_lesion(ds2, tmp_path):
    summary, where, _ = ds2
    faded = generate(tmp_path, studies=2, seed=0, partial_volume=True)
    assert faded.labels_csv.read_bytes() == summary.labels_csv.read_bytes()  # labels, names, quirks: unchanged
    plans, _ = plan_dataset(2, 0, partial_volume=True)
    edge_slices = 0
    for image_id, (plan, z) in where.items():
        if image_id in summary.quirks["truncated_pixels"]:
            continue
        full, part = load(summary, image_id), load(faded, image_id)
        geometry = plans[plan.index].geometry
        edges = [(i, les) for i, les in enumerate(geometry.lesions) if z in (les.first, les.last)]
        regions = slice_regions(geometry, z, (full.Rows, full.Columns))
        drawn = [(i, les) for i, les in edges if (regions == LESION_CODE + i).any()]
        if not drawn:
            assert part.PixelData == full.PixelData
            continue
        edge_slices += 1
        loss = to_hu(full) - to_hu(part)
        for i, les in drawn:
            fill = les.edge_fill[0] if z == les.first else les.edge_fill[1]
            assert 0 <= fill <= 1
            lesion = regions == LESION_CODE + i
            # What stays is the share of blood over what lies around it (CSF 7 HU to gray matter 38 HU).
            background = les.hu - np.median(loss[lesion]) / max(1 - fill, 1e-6)
            assert fill > 0.97 or -5 <= background <= 45
        assert np.all(loss[regions < LESION_CODE] == 0)
    assert edge_slices >= 2
    assert all(les.edge_fill == (1.0, 1.0) for plan in plan_dataset(2, 0)[0] for les in plan.geometry.lesions)


def test_truncated_file(ds2):
    summary, _, _ = ds2
    (image_id,) = summary.quirks["truncated_pixels"]
    header = load(summary, image_id, stop_before_pixels=True)
    assert header.Rows == 512
    assert header.StudyInstanceUID
    ds = load(summary, image_id)
    with pytest.raises(ValueError):
        _ = ds.pixel_array


def test_one_study_dataset_is_nearly_clean(tmp_path):
    summary = generate(tmp_path, studies=1, seed=3)
    assert {k for k, ids in summary.quirks.items() if ids} == {"truncated_pixels", "wrap12"}
    assert summary.n_unlabelled == 0
    assert summary.n_positive_slices > 0


def test_plan_statistics_and_independence():
    plans, quirks = plan_dataset(300, 7)
    with_lesions = [p for p in plans if p.geometry.lesions]
    assert 0.3 <= len(with_lesions) / len(plans) <= 0.5
    subtypes = Counter(les.subtype for p in with_lesions for les in p.geometry.lesions)
    assert min(subtypes, key=subtypes.get) == "epidural"
    assert len(subtypes) == 5
    for p in with_lesions:
        assert len({les.subtype for les in p.geometry.lesions}) == len(p.geometry.lesions)
        assert all(3 <= les.last - les.first + 1 <= 10 for les in p.geometry.lesions)
    studies_of = Counter(p.patient_id for p in plans)
    assert set(studies_of.values()) == {1, 2}
    assert 0.05 < sum(n == 2 for n in studies_of.values()) / len(studies_of) < 0.3
    ids = [i for p in plans for i in p.image_ids]
    assert len(set(ids)) == len(ids)
    quirky = [i for name, q in quirks.items() if name != "reversed_instance_number" for i in q]
    assert len(set(quirky)) == len(quirky) < 0.05 * len(ids)
    assert quirks["reversed_instance_number"]
    small, _ = plan_dataset(3, 7)  # study k does not depend on how many studies there are
    assert [p.geometry for p in small] == [p.geometry for p in plans[:3]]
    assert [p.image_ids for p in small] == [p.image_ids for p in plans[:3]]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"studies": 0}, "studies must be an integer >= 1"),
        ({"studies": 2.5}, "studies must be an integer >= 1"),
        ({"studies": 1, "seed": -1}, "seed must be an integer >= 0"),
        ({"studies": 1, "test_studies": -1}, "test_studies must be an integer >= 0"),
        ({"studies": 1, "as_zip": True, "zip_method": "bzip2"}, "zip_method must be one of deflated, stored"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error):
    with pytest.raises(ValueError, match=error):
        generate(tmp_path, **kwargs)


def test_refuses_a_folder_with_dicom_files(ds2):
    with pytest.raises(FileExistsError, match="already holds DICOM files"):
        generate(ds2[0].out_dir, studies=1)


def test_uids_are_unique_across_studies_and_slices(tmp_path):
    """Study 1 slice 12 and study 11 slice 2 once shared a SOPInstanceUID (entropy concatenation)."""
    import pydicom

    from ichprep.synth import generate

    generate(tmp_path, studies=13, seed=0)
    sops, studies = [], set()
    for path in (tmp_path / "stage_2_train").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sops.append(ds.SOPInstanceUID)
        studies.add(ds.StudyInstanceUID)
    assert len(sops) == len(set(sops))
    assert len(studies) == 13


# ------------------------------------------------------------------------------ test split and Kaggle zip
TOP = synth.KAGGLE_TOP


def read_zip(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """``--studies 2 --seed 0 --test-studies 1`` as a folder, and as a zip with the default (studies // 5, >= 1)."""
    root = tmp_path_factory.mktemp("kaggle")
    folder = generate(root / "folder", studies=2, seed=0, test_studies=1)
    zipped = generate(root / "out" / "rsna.zip", studies=2, seed=0, as_zip=True)
    return folder, zipped


def test_test_split_leaves_the_train_files_alone(ds2, tmp_path):
    summary = generate(tmp_path, studies=2, seed=0, test_studies=2)
    hashes, before = sha256s(tmp_path), sha256s(ds2[0].out_dir)
    assert {name: h for name, h in hashes.items() if name.startswith("stage_2_train")} == before
    tests = {name for name in hashes if name.startswith("stage_2_test/")}
    assert set(hashes) == set(before) | tests | {"stage_2_sample_submission.csv"}
    assert len(tests) == summary.n_test_slices
    assert summary.n_test_studies == 2
    assert summary.test_dir == tmp_path / "stage_2_test"
    assert summary.sample_submission == tmp_path / "stage_2_sample_submission.csv"
    assert (summary.n_slices, summary.quirks) == (ds2[0].n_slices, ds2[0].quirks)


def test_zip_holds_the_kaggle_layout(kaggle):
    folder, zipped = kaggle
    files = sha256s(folder.out_dir)
    members = read_zip(zipped.zip_path)
    assert list(members) == sorted(members)
    dirs = {f"{TOP}/", f"{TOP}/stage_2_train/", f"{TOP}/stage_2_test/"}
    assert set(members) == dirs | {f"{TOP}/{name}" for name in files}
    assert {name.split("/")[0] for name in files} == {
        "stage_2_train",
        "stage_2_test",
        "stage_2_train.csv",
        "stage_2_sample_submission.csv",
    }
    for name, digest in files.items():
        assert hashlib.sha256(members[f"{TOP}/{name}"]).hexdigest() == digest, name
    assert (zipped.n_slices, zipped.n_test_slices, zipped.n_test_studies) == (folder.n_slices, folder.n_test_slices, 1)


def test_zip_summary_names_sources_inside_the_zip(kaggle):
    _, zipped = kaggle
    where = f"{zipped.zip_path}::{TOP}"
    assert zipped.zip_path.name == "rsna.zip"
    assert zipped.out_dir == zipped.zip_path
    assert (zipped.dicom_dir, zipped.labels_csv) == (f"{where}/stage_2_train", f"{where}/stage_2_train.csv")
    assert (zipped.test_dir, zipped.sample_submission) == (
        f"{where}/stage_2_test",
        f"{where}/stage_2_sample_submission.csv",
    )
    assert [p.name for p in zipped.zip_path.parent.iterdir()] == ["rsna.zip"]  # no temporary file left


def test_zip_is_deterministic_and_honours_the_method(kaggle, tmp_path):
    _, zipped = kaggle
    again = generate(tmp_path / "again.zip", studies=2, seed=0, as_zip=True, test_studies=1)
    assert again.zip_path.read_bytes() == zipped.zip_path.read_bytes()
    stored = generate(tmp_path / "stored.zip", studies=2, seed=0, as_zip=True, zip_method="stored")
    assert read_zip(stored.zip_path) == read_zip(zipped.zip_path)
    for path, method in ((zipped.zip_path, zipfile.ZIP_DEFLATED), (stored.zip_path, zipfile.ZIP_STORED)):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                assert info.date_time == synth.ZIP_DATE_TIME
                assert info.create_system == 3
                mode = info.external_attr >> 16
                assert mode == (0o40755 if info.is_dir() else 0o100644), info.filename
                assert info.compress_type == (zipfile.ZIP_STORED if info.is_dir() else method), info.filename


def test_sample_submission_lists_the_test_images(kaggle):
    folder, _ = kaggle
    test_ids = sorted(p.stem for p in folder.test_dir.iterdir())
    lines = folder.sample_submission.read_text().splitlines()
    assert lines == ["ID,Label"] + [f"{i}_{label},0.5" for i in test_ids for label in LABELS]
    assert len(test_ids) == folder.n_test_slices
    assert not set(test_ids) & set(read_csv(folder.labels_csv))


def test_test_split_has_other_patients_and_readable_files(kaggle):
    folder, _ = kaggle
    headers = {
        split: [pydicom.dcmread(p) for p in sorted(d.iterdir())]
        for split, d in (("train", folder.dicom_dir), ("test", folder.test_dir))
    }
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        train, test = ({getattr(ds, key) for ds in headers[split]} for split in ("train", "test"))
        assert train, key
        assert test, key
        assert not train & test, key
    assert len({ds.PatientID for ds in headers["test"]}) == folder.n_test_patients
    assert not set(folder.test_quirks) & {"truncated_pixels", "unlabelled"}
    for ds in headers["test"]:  # every test image can be predicted
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_test_split_plan_avoids_train_names():
    train, _ = plan_dataset(300, 7)
    test, _ = synth.plan_test_split(60, 7, train)
    for key in (lambda p: {p.patient_id}, lambda p: set(p.image_ids)):
        assert not set().union(*map(key, train)) & set().union(*map(key, test))
    # Names already taken get salted instead of reused.
    first, _ = plan_dataset(2, 0)
    taken = {i for p in first for i in (p.patient_id, *p.image_ids)}
    again, _ = plan_dataset(2, 0, taken=taken)
    assert [p.geometry for p in again] == [p.geometry for p in first]
    assert not taken & {i for p in again for i in (p.patient_id, *p.image_ids)}


def test_killed_zip_run_leaves_no_zip(tmp_path):
    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "rsna.zip", studies=1, seed=0, as_zip=True, progress=killed)
    assert list(tmp_path.iterdir()) == []


def test_zip_refuses_an_existing_file_and_a_folder_path_must_not_be_a_file(kaggle):
    _, zipped = kaggle
    with pytest.raises(FileExistsError, match="already exists"):
        generate(zipped.zip_path, studies=1, as_zip=True)
    with pytest.raises(NotADirectoryError, match="is a file"):
        generate(zipped.zip_path, studies=1)
