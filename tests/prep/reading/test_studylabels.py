"""ichprep.reading.studylabels: study-label CSVs (label and reader forms) parsed, combined and joined onto studies."""

from __future__ import annotations

import logging
import zipfile

import pandas as pd
import pytest

from ichprep.errors import LabelsError
from ichprep.reading.labels import LABELS
from ichprep.reading.studylabels import (
    READER_RULES,
    KeyLine,
    folder_key,
    match_study_labels,
    read_study_labels,
)

_FINDINGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")


def _csv(tmp_path, header, rows, name="labels.csv"):
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _reads_csv(tmp_path, studies):
    """A CQ500-style reads.csv: studies = {name: [R1 findings, R2 findings, R3 findings]} plus a Fracture column."""
    header = ["name", "Category"]
    for reader in ("R1", "R2", "R3"):
        header += [f"{reader}:{f}" for f in _FINDINGS] + [f"{reader}:Fracture"]
    rows = []
    for name, reads in studies.items():
        cells = [name, "B1"]
        for values in reads:
            cells += [str(v) for v in values] + ["1"]
        rows.append(",".join(cells))
    return _csv(tmp_path, ",".join(header), rows, name="reads.csv")


#             ICH IPH IVH SDH EDH SAH
_NONE = [0, 0, 0, 0, 0, 0]
_IPH = [1, 1, 0, 0, 0, 0]
_SDH = [1, 0, 0, 1, 0, 0]
_CQ500 = {
    "CQ500-CT-1": [_NONE, _NONE, _NONE],
    "CQ500-CT-2": [_IPH, _IPH, _NONE],  # 2 of 3
    "CQ500-CT-3": [_NONE, _SDH, _NONE],  # 1 of 3, and that one is R2
}


def _studies(uids, patients=None, labels=None):
    """A studies.parquet-like frame; labels: per study a list of six values (None = NA), default all NA."""
    n = len(uids)
    frame = pd.DataFrame(
        {
            "study_uid": pd.array(uids, dtype="string"),
            "patient_id": pd.array(patients or [f"P{i}" for i in range(n)], dtype="string"),
            "start": range(n),
            "stop": range(1, n + 1),
            "n_slices": [1] * n,
            "n_ok": [1] * n,
        }
    )
    values = labels or [[None] * 6] * n
    for i, label in enumerate(LABELS):
        frame[label] = pd.array([row[i] for row in values], dtype="Int8")
    return frame


# ---- reader form ---------------------------------------------------------------------------------------------


def test_reads_csv_majority(tmp_path):
    labels = read_study_labels(_reads_csv(tmp_path, _CQ500))
    assert labels.key_column == "name"
    assert labels.readers == ("R1", "R2", "R3")
    assert labels.rule == "majority"
    table = labels.table
    assert table.loc["CQ500-CT-2", "any"] == 1 and table.loc["CQ500-CT-2", "intraparenchymal"] == 1
    assert table.loc["CQ500-CT-3", "any"] == 0 and table.loc["CQ500-CT-3", "subdural"] == 0
    assert table.loc["CQ500-CT-1"][list(LABELS)].sum() == 0
    assert list(table.columns[:6]) == list(LABELS)
    assert "R1:intraparenchymal" in table and "R3:any" in table
    assert not any("Fracture" in c or "fracture" in c for c in table.columns)
    assert table.loc["CQ500-CT-3", "R2:subdural"] == 1 and table.loc["CQ500-CT-3", "R1:subdural"] == 0
    assert all(str(t) == "Int8" for t in table.dtypes)
    assert labels.lines["CQ500-CT-3"] == 4


def test_reads_csv_any_and_one_reader(tmp_path):
    path = _reads_csv(tmp_path, _CQ500)
    anyone = read_study_labels(path, readers="any").table
    assert anyone.loc["CQ500-CT-3", "subdural"] == 1 and anyone.loc["CQ500-CT-3", "any"] == 1
    assert anyone.loc["CQ500-CT-1", "any"] == 0
    r2 = read_study_labels(path, readers="R2")
    assert r2.rule == "R2"
    assert r2.table.loc["CQ500-CT-3", "subdural"] == 1
    r3 = read_study_labels(path, readers="R3").table
    assert r3.loc["CQ500-CT-2", "any"] == 0 and r3.loc["CQ500-CT-3", "any"] == 0


def test_majority_tie_with_two_readers_is_positive(tmp_path):
    header = "name,R1:ICH,R1:IPH,R2:ICH,R2:IPH"
    path = _csv(tmp_path, header, ["a,1,1,0,0", "b,0,0,0,0", "c,1,1,,"])
    table = read_study_labels(path).table
    assert table.loc["a", "any"] == 1  # 1 of 2: a tie counts as positive
    assert table.loc["b", "any"] == 0
    assert table.loc["c", "any"] == 1  # R2 gave nothing: R1 alone decides
    assert pd.isna(table.loc["a", "subdural"])  # no reader gave subdural


@pytest.mark.parametrize("rule", ["R9", "median", "R1:ICH"])
def test_unknown_rule_or_reader_lists_the_valid_ones(tmp_path, rule):
    path = _reads_csv(tmp_path, _CQ500)
    with pytest.raises(LabelsError, match=r"unknown reader rule .*majority, any, R1, R2, R3"):
        read_study_labels(path, readers=rule)


def test_reader_rule_needs_reader_columns(tmp_path):
    path = _csv(tmp_path, "name,ICH", ["a,1"])
    with pytest.raises(LabelsError, match=r"use one of majority, any \(the CSV has no reader columns\)"):
        read_study_labels(path, readers="R1")
    assert READER_RULES == ("majority", "any")


def test_reader_inconsistent_any_names_reader_and_line(tmp_path):
    header = "name,R1:ICH,R1:SAH,R2:ICH,R2:SAH"
    path = _csv(tmp_path, header, ["a,0,0,0,0", "b,1,1,0,1"])
    with pytest.raises(LabelsError, match=r"reader R2: any \(ICH\) is 0 while a subtype is 1 at line 3"):
        read_study_labels(path)


# ---- label-column form ---------------------------------------------------------------------------------------


def test_short_names_and_missing_any(tmp_path):
    path = _csv(tmp_path, "study_uid,IPH,sdh,Epidural", ["1.2.3,1,0,0", "1.2.4,0,0,0", "1.2.5,,,"])
    labels = read_study_labels(path)
    assert labels.rule == "columns" and labels.readers == () and labels.key_column == "study_uid"
    table = labels.table
    assert list(table.columns) == list(LABELS)
    assert table.loc["1.2.3", "intraparenchymal"] == 1
    assert table.loc["1.2.3", "any"] == 1  # computed: max of the subtypes
    assert table.loc["1.2.4", "any"] == 0
    assert pd.isna(table.loc["1.2.5", "any"]) and pd.isna(table.loc["1.2.3", "subarachnoid"])


def test_label_csv_inside_a_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "labels.zip", "w") as archive:
        archive.writestr("top/labels.csv", "name,ICH\nx,1\n")
    labels = read_study_labels(f"{tmp_path / 'labels.zip'}::top/labels.csv")
    assert labels.table.loc["x", "any"] == 1


def test_inconsistent_any_names_the_line(tmp_path):
    path = _csv(tmp_path, "name,any,subdural", ["a,1,1", "b,0,0", "c,0,1"])
    with pytest.raises(LabelsError, match=r"any \(ICH\) is 0 while a subtype is 1 at line 4"):
        read_study_labels(path)


@pytest.mark.parametrize(
    "row, message",
    [("c,yes,0", "not 0 or 1 at line 4"), ("c,0.5,0", "not 0 or 1 at line 4"), ("c,2,", "not 0 or 1 at line 4")],
)
def test_bad_values_name_the_line(tmp_path, row, message):
    path = _csv(tmp_path, "name,ICH,IPH", ["a,1,1", "b,0,0", row])
    with pytest.raises(LabelsError, match=message):
        read_study_labels(path)


def test_blank_lines_keep_line_numbers(tmp_path):
    path = _csv(tmp_path, "name,ICH", ["a,1", "", "b,x"])
    with pytest.raises(LabelsError, match="at line 4"):
        read_study_labels(path)


def test_duplicates_that_agree_merge_conflicts_name_both_lines(tmp_path):
    agree = read_study_labels(_csv(tmp_path, "name,ICH", ["a,1", "b,0", "a,1"])).table
    assert list(agree.index) == ["a", "b"]
    with pytest.raises(LabelsError, match=r"conflicting rows for one key \(name\) at line 2, line 4"):
        read_study_labels(_csv(tmp_path, "name,ICH", ["a,1", "b,0", "a,0"]))


def test_key_column_given_or_missing(tmp_path):
    path = _csv(tmp_path, "Accession,PatientID,ICH", ["A1,P1,1"])
    assert read_study_labels(path).key_column == "PatientID"
    assert read_study_labels(path, key_column="accession").table.index.tolist() == ["A1"]
    with pytest.raises(LabelsError, match="no key column 'nope'"):
        read_study_labels(path, key_column="nope")
    with pytest.raises(LabelsError, match="no key column found"):
        read_study_labels(_csv(tmp_path, "Accession,ICH", ["A1,1"]))
    with pytest.raises(LabelsError, match="no label columns"):
        read_study_labels(_csv(tmp_path, "name,Fracture", ["a,1"]))


# ---- matching ------------------------------------------------------------------------------------------------


def test_match_by_study_uid_fills_labels_and_reader_columns(tmp_path):
    header = "StudyInstanceUID,R1:ICH,R1:IPH,R2:ICH,R2:IPH,R3:ICH,R3:IPH"
    path = _csv(tmp_path, header, ["1.2.1,1,1,1,1,0,0", "1.2.2,0,0,0,0,0,0"])
    match = match_study_labels(_studies(["1.2.1", "1.2.2", "1.2.9"]), read_study_labels(path))
    assert match.matched_by == "study_uid"
    out = match.studies.set_index("study_uid")
    assert out.loc["1.2.1", "any"] == 1 and out.loc["1.2.1", "intraparenchymal"] == 1
    assert out.loc["1.2.2", "any"] == 0
    assert pd.isna(out.loc["1.2.9", "any"])
    assert out.loc["1.2.1", "R3:any"] == 0 and str(out.dtypes["R3:any"]) == "Int8"
    assert match.studies_without_labels == ("1.2.9",)
    assert match.unmatched_keys == ()


def test_match_by_patient_id(tmp_path):
    path = _csv(tmp_path, "PatientID,ICH", ["P-7,1", "P-8,0"])
    studies = _studies(["1.2.1", "1.2.2"], patients=["P-8", "P-7"])
    match = match_study_labels(studies, read_study_labels(path))
    assert match.matched_by == "patient_id"
    assert match.studies["any"].tolist() == [0, 1]
    assert dict(match.counts) == {"study_uid": 0, "patient_id": 2}


@pytest.mark.parametrize("folder", ["CQ500CT3 CQ500CT3", "CQ500-CT-3.zip", "cq500ct3", "CQ500CT3 CQ500CT3/Unknown"])
def test_match_by_folder_name(tmp_path, folder):
    labels = read_study_labels(_reads_csv(tmp_path, _CQ500), readers="any")
    studies = _studies(["1.2.3", "1.2.30"], patients=["x", "y"])
    folders = pd.Series([folder, "CQ500CT30 CQ500CT30"], index=studies.index)
    match = match_study_labels(studies, labels, folders=folders)
    assert match.matched_by == "folder"
    assert match.studies.loc[0, "subdural"] == 1  # CQ500-CT-3, not CQ500-CT-30
    assert pd.isna(match.studies.loc[1, "any"])
    assert match.studies.loc[0, "R2:subdural"] == 1
    assert [k.key for k in match.unmatched_keys] == ["CQ500-CT-1", "CQ500-CT-2"]


def test_folders_indexed_by_study_uid(tmp_path):
    labels = read_study_labels(_csv(tmp_path, "name,ICH", ["CQ500-CT-3,1"]))
    studies = _studies(["1.2.3"])
    folders = pd.Series(["CQ500CT3 CQ500CT3"], index=["1.2.3"])
    assert match_study_labels(studies, labels, folders=folders).studies.loc[0, "any"] == 1


def test_folder_key_normalisation():
    assert folder_key("CQ500CT12 CQ500CT12") == folder_key("CQ500-CT-12") == folder_key("CQ500-CT-12.zip")
    assert folder_key("CQ500-CT-12") == "cq500ct12"
    assert folder_key("John Smith") == "johnsmith"  # different words are kept, not cut to the first
    assert folder_key("CQ500-CT-1") != folder_key("CQ500-CT-12")


def test_unmatched_keys_reported_with_lines(tmp_path, caplog):
    path = _csv(tmp_path, "study_uid,ICH", ["1.2.1,1", "9.9.9,0", "1.2.2,0", "8.8.8,1"])
    with caplog.at_level(logging.WARNING, logger="ichprep.reading.studylabels"):
        match = match_study_labels(_studies(["1.2.1", "1.2.2"]), read_study_labels(path))
    assert match.unmatched_keys == (KeyLine("9.9.9", 3), KeyLine("8.8.8", 5))
    assert "9.9.9 (line 3)" in caplog.text
    assert match.studies_without_labels == ()


def test_nothing_matches_says_what_was_tried(tmp_path):
    path = _csv(tmp_path, "name,ICH", ["CQ500-CT-1,1", "CQ500-CT-2,0"])
    studies = _studies(["1.2.1"], patients=["P-1"])
    with pytest.raises(LabelsError, match=r"'CQ500-CT-1'.*study_uid \('1\.2\.1'\).*patient_id \('P-1'\).*folder"):
        match_study_labels(studies, read_study_labels(path))
    folders = pd.Series(["other other"], index=studies.index)
    with pytest.raises(LabelsError, match=r"folder \('other other'\)"):
        match_study_labels(studies, read_study_labels(path), folders=folders)


def test_slice_labels_kept_and_conflicts_listed(tmp_path):
    path = _csv(tmp_path, "study_uid,any,subdural", ["1.2.1,1,1", "1.2.2,0,0"])
    slice_labels = [[None] * 6, [0, 0, 0, 0, 1, 1]]  # 1.2.2: its slices say subdural
    match = match_study_labels(_studies(["1.2.1", "1.2.2"], labels=slice_labels), read_study_labels(path))
    out = match.studies.set_index("study_uid")
    assert out.loc["1.2.1", "subdural"] == 1  # NA from slices: filled from the CSV
    assert out.loc["1.2.2", "subdural"] == 1 and out.loc["1.2.2", "any"] == 1  # slice values kept
    assert out.loc["1.2.2", "epidural"] == 0
    assert sorted(match.conflicts["label"]) == ["any", "subdural"]
    assert set(match.conflicts["study_uid"]) == {"1.2.2"}
    assert match.conflicts.iloc[0][["slices", "csv"]].tolist() == [1, 0]


def test_two_keys_with_different_labels_for_one_study(tmp_path):
    path = _csv(tmp_path, "name,ICH", ["CQ500-CT-3,1", "CQ500CT3,0"])
    studies = _studies(["1.2.3"])
    folders = pd.Series(["CQ500CT3 CQ500CT3"], index=studies.index)
    with pytest.raises(LabelsError, match=r"'CQ500-CT-3' \(line 2\) and 'CQ500CT3' \(line 3\) both match"):
        match_study_labels(studies, read_study_labels(path), folders=folders)


def test_equal_counts_go_to_the_earlier_rule(tmp_path):
    path = _csv(tmp_path, "study,ICH", ["S1,1", "P2,0"])
    match = match_study_labels(_studies(["S1", "S2"], patients=["P1", "P2"]), read_study_labels(path))
    assert dict(match.counts) == {"study_uid": 1, "patient_id": 1}
    assert match.matched_by == "study_uid"
    assert match.unmatched_keys == (KeyLine("P2", 3),)
