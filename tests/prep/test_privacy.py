"""ichprep.privacy: a pseudonymised store holds no original identifier or path; pseudonyms are keyed and stable."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pydicom
import pytest

from ichprep.convert import convert
from ichprep.privacy import pseudonym
from ichprep.storage.store import MANIFEST, open_store

KEY = "correct horse battery staple 42"


def _originals(dicom_dir) -> set[str]:
    """Every identifier and path the source holds that must not reach the store."""
    found = {str(dicom_dir), str(dicom_dir.resolve())}
    for path in dicom_dir.glob("*.dcm"):
        found |= {path.name, path.stem}
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the test's own bad files; their names are already collected
            continue
        found |= {
            str(ds.get(k))
            for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            if ds.get(k)
        }
    return found


@pytest.fixture(scope="module")
def private_store(synth_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("private")
    folder = tmp / "dicoms"
    shutil.copytree(synth_dataset / "stage_2_train", folder)
    first = sorted(folder.glob("*.dcm"))[0]
    shutil.copy(first, folder / "a_copy.dcm")  # a duplicate: its error text quotes a SOP UID and a path
    root = tmp / "cache.zarr"
    convert(folder, root, labels_csv=synth_dataset / "stage_2_train.csv", pseudonymize_key=KEY)
    return folder, root


def test_no_original_identifier_or_path_remains_in_any_file(private_store):
    folder, root = private_store
    originals = _originals(folder)
    assert len(originals) > 50
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        leaked = [o for o in originals if o.encode() in data]
        assert not leaked, (path, leaked[:3])
    # Parquet compresses strings, so also look at the decoded tables, cell by cell.
    store = open_store(root)
    tables = [store.slices, store.studies, pd.read_csv(root / "rejected.csv", dtype=str)]
    for table in tables:
        text = " ".join(map(str, table.to_numpy().ravel()))
        assert not [o for o in originals if o in text]


def test_pseudonyms_are_keyed_hashes_and_stable(private_store, synth_dataset, tmp_path):
    folder, root = private_store
    slices = open_store(root).slices
    ds = pydicom.dcmread(sorted(folder.glob("ID_*.dcm"))[3], stop_before_pixels=True)
    assert pseudonym(KEY, "S", ds.StudyInstanceUID) in set(slices["study_uid"])
    assert pseudonym(KEY, "P", ds.PatientID) in set(slices["patient_id"])
    assert slices["path"].str.fullmatch(r"ID_[0-9a-f]{20}\.dcm").all()
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["pseudonymized"] is True
    again = tmp_path / "again.zarr"
    convert(folder, again, labels_csv=synth_dataset / "stage_2_train.csv", pseudonymize_key=KEY)
    assert (again / MANIFEST).read_bytes() == (root / MANIFEST).read_bytes()
    other = tmp_path / "other.zarr"
    convert(folder, other, labels_csv=synth_dataset / "stage_2_train.csv", pseudonymize_key=KEY[::-1])
    assert set(open_store(other).slices["study_uid"]).isdisjoint(slices["study_uid"])


def test_labels_survive_pseudonymisation(private_store, synth_dataset):
    _, root = private_store
    slices = open_store(root).slices
    csv = pd.read_csv(synth_dataset / "stage_2_train.csv")
    assert int(slices["any"].sum()) == int(csv.loc[csv["ID"].str.endswith("_any"), "Label"].sum())


def test_short_key_is_refused_before_any_work(synth_dataset, tmp_path):
    with pytest.raises(ValueError, match="at least 16 characters"):
        convert(synth_dataset / "stage_2_train", tmp_path / "s.zarr", pseudonymize_key="short")
    assert not (tmp_path / "s.zarr").exists()
