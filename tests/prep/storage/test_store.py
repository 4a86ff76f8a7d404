"""ichprep.storage.store: studies.parquet from slices.parquet, runs, counts, label maxima, the contiguity rule."""

from __future__ import annotations

import pandas as pd
import pytest

from ichprep.errors import StoreError
from ichprep.reading.labels import LABELS
from ichprep.storage.store import build_studies


def _slices(studies: list[str], patients: list, ok: list[bool], any_label: list) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "study_uid": pd.array(studies, dtype="string"),
            "patient_id": pd.array(patients, dtype="string"),
            "ok": ok,
        }
    )
    for label in LABELS:
        frame[label] = pd.array(any_label if label == "any" else [None] * len(studies), dtype="Int8")
    return frame


def test_runs_counts_and_label_maxima():
    slices = _slices(
        ["a", "a", "a", "b", "c", "c"],
        [None, "P1", "P1", "P2", "P3", None],
        [True, False, True, True, True, True],
        [0, 1, None, None, None, 0],
    )
    studies = build_studies(slices)
    assert studies["study_uid"].tolist() == ["a", "b", "c"]
    assert studies["start"].tolist() == [0, 3, 4]
    assert studies["stop"].tolist() == [3, 4, 6]
    assert studies["n_slices"].tolist() == [3, 1, 2]
    assert studies["n_ok"].tolist() == [2, 1, 2]
    assert studies["patient_id"].tolist() == ["P1", "P2", "P3"]  # the first one given in the study
    assert studies["any"].tolist() == [1, pd.NA, 0]  # NA only where no slice of the study is labelled
    assert studies["epidural"].isna().all()
    assert studies["any"].dtype == "Int8"
    assert studies["start"].dtype == "int64"


def test_a_study_split_in_two_runs_is_refused():
    with pytest.raises(StoreError, match="contiguous"):
        build_studies(_slices(["a", "b", "a"], ["P", "Q", "P"], [True] * 3, [0, 0, 1]))


def test_no_slices_no_studies():
    studies = build_studies(_slices([], [], [], []))
    assert len(studies) == 0
    assert "any" in studies.columns
