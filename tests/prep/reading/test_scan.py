"""ichprep.reading.scan: every file in the table, studies ordered by z, labels attached, bad files flagged."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest

from ichprep.cluster import dask_client
from ichprep.reading.labels import LABELS
from ichprep.reading.scan import OK, list_dicom_files, order_slices, read_scan, scan, to_frame, write_scan


def test_scan_reads_every_file_and_orders_by_study_then_z(synth_dataset):
    table, summary = scan(synth_dataset / "stage_2_train", synth_dataset / "stage_2_train.csv")
    files = list_dicom_files(synth_dataset / "stage_2_train")
    assert len(table) == len(files) == summary.n_files
    ok = table[table["status"] == OK]
    # Each study is one contiguous run, z ascending within it.
    uids = ok["study_uid"].astype(str).tolist()
    n_runs = 1 + sum(a != b for a, b in zip(uids, uids[1:]))
    assert n_runs == ok["study_uid"].nunique() == summary.n_studies
    for _, study in ok.groupby("study_uid"):
        assert study["z"].is_monotonic_increasing
    # The order comes from the headers, not the file names.
    assert list(ok["image_id"]) != sorted(ok["image_id"])
    for row in ok.sample(5, random_state=0).itertuples():
        ds = pydicom.dcmread(row.path, stop_before_pixels=True)
        assert row.study_uid == ds.StudyInstanceUID
        assert row.z == pytest.approx(float(ds.ImagePositionPatient[2]))


def test_scan_attaches_labels_and_leaves_unlabelled_missing(synth_dataset):
    table, summary = scan(synth_dataset / "stage_2_train", synth_dataset / "stage_2_train.csv")
    csv = pd.read_csv(synth_dataset / "stage_2_train.csv")
    labelled = {i.rsplit("_", 1)[0] for i in csv["ID"]}
    has = table["any"].notna()
    assert set(table.loc[has, "image_id"]) == labelled & set(table["image_id"])
    assert (~has).sum() >= 1  # the synth leaves a few files out of the CSV
    row = csv[csv["ID"].str.endswith("_any")].iloc[0]
    image_id = row["ID"].rsplit("_", 1)[0]
    assert table.set_index("image_id").loc[image_id, "any"] == row["Label"]
    for name in LABELS:
        assert str(table[name].dtype) == "Int8"
    assert summary.n_labelled == int(table.loc[table["status"] == OK, "any"].notna().sum())


def test_bad_files_stay_in_the_table_flagged(tmp_path, synth_dataset):
    folder = tmp_path / "dicoms"
    folder.mkdir()
    good = sorted((synth_dataset / "stage_2_train").glob("*.dcm"))[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "ID_text.dcm").write_text("not a dicom at all")
    (folder / "ID_empty.dcm").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored: not .dcm")
    table, summary = scan(folder)
    assert summary.n_files == 5
    assert summary.n_ok == 3
    assert summary.n_rejected == 2
    bad = table[table["status"] != OK].set_index("image_id")
    assert set(bad.index) == {"ID_text", "ID_empty"}
    assert bad.loc["ID_text", "status"] == "not_dicom"
    assert all(bad["error"].str.len() > 0)
    assert list(table["status"].iloc[-2:]) != [OK, OK]  # failures sort after the readable slices


def test_order_ties_and_missing_z_fall_back_to_instance_number():
    rows = [
        dict(image_id="a", path="a", study_uid="s1", z=10.0, instance_number=2, status=OK),
        dict(image_id="b", path="b", study_uid="s1", z=5.0, instance_number=1, status=OK),
        dict(image_id="c", path="c", study_uid="s1", z=5.0, instance_number=3, status=OK),
        dict(image_id="d", path="d", study_uid="s0", z=None, instance_number=2, status=OK),
        dict(image_id="e", path="e", study_uid="s0", z=1.0, instance_number=1, status=OK),
        dict(image_id="x", path="x", study_uid=None, status="not_dicom"),
    ]
    ordered = order_slices(to_frame(rows))
    assert list(ordered["image_id"]) == ["e", "d", "b", "c", "a", "x"]
    assert list(ordered["order_by"][:5]) == ["instance_number"] * 2 + ["z"] * 3


def test_scan_on_dask_matches_in_process(synth_dataset, tmp_path):
    local, _ = scan(synth_dataset / "stage_2_train", synth_dataset / "stage_2_train.csv")
    with dask_client(workers=2) as client:
        distributed, _ = scan(
            synth_dataset / "stage_2_train", synth_dataset / "stage_2_train.csv", client=client, batch_size=7
        )
    pd.testing.assert_frame_equal(local, distributed)
    write_scan(distributed, tmp_path / "slices.parquet")
    pd.testing.assert_frame_equal(read_scan(tmp_path / "slices.parquet"), local)
