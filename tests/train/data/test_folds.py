"""ichtrain.data.folds: patient-grouped, bleed-stratified folds and split, deterministic by seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ichtrain.config import TrainConfig
from ichtrain.data.folds import assign_folds, folds_table, groups_of, run_split, split_slices
from ichtrain.errors import ConfigError, DataError


def patients(n_patients=90, bleed_rate=0.3, seed=0) -> pd.DataFrame:
    """Patients with 1-3 studies of 20-40 slices; a bleeding patient's first study has a run of positive slices."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        bleeds = rng.random() < bleed_rate
        for s in range(rng.integers(1, 4)):
            n = int(rng.integers(20, 41))
            anys = np.zeros(n)
            if bleeds and s == 0:
                anys[5 : 5 + int(rng.integers(1, 15))] = 1
            pid = None if p % 11 == 0 else f"ID_p{p}"
            rows += [(f"ID_{p}_{s}_{i}", f"1.2.{p}.{s}", pid, a) for i, a in enumerate(anys)]
    frame = pd.DataFrame(rows, columns=["image_id", "study_uid", "patient_id", "any"])
    return frame.astype({"image_id": "string", "study_uid": "string", "patient_id": "string"})


def test_folds_group_stratify_and_balance():
    frame = patients()
    fold = assign_folds(frame, 5, seed=0)
    groups = groups_of(frame)
    per_group = pd.Series(fold).groupby(groups.inverse).nunique()
    assert (per_group == 1).all()  # a patient never straddles folds
    sizes = np.bincount(fold, minlength=5)
    assert sizes.min() > 0
    assert sizes.max() / sizes.min() < 1.15
    group_fold = pd.Series(fold).groupby(groups.inverse).first().to_numpy()
    bleeding = np.bincount(group_fold[groups.positive], minlength=5)
    assert bleeding.max() - bleeding.min() <= 1  # bleeding patients spread evenly
    slices = np.bincount(fold, weights=frame["any"].to_numpy(), minlength=5)
    assert slices.max() / slices.min() < 2.0  # and so do their bleeding slices
    assert np.array_equal(fold, assign_folds(frame, 5, seed=0))
    assert not np.array_equal(fold, assign_folds(frame, 5, seed=1))
    perm = np.random.default_rng(0).permutation(len(frame))
    assert np.array_equal(assign_folds(frame.iloc[perm].reset_index(drop=True), 5, seed=0), fold[perm])
    table = folds_table(frame, fold)
    assert list(table.columns) == ["image_id", "study_uid", "patient_id", "fold"]
    assert len(table) == len(frame)


def test_fold_errors():
    frame = patients(6)
    with pytest.raises(ConfigError, match="between 2 and 20"):
        assign_folds(frame, 1)
    with pytest.raises(DataError, match="fewer folds"):
        assign_folds(frame.iloc[:25], 3)
    with pytest.raises(ConfigError, match="patient or study"):
        run_split(frame, val_fraction=0.2, seed=0, by="slice", folds=3, fold=0)
    with pytest.raises(ConfigError, match="together"):
        TrainConfig(store="s", out="o", folds=3)
    with pytest.raises(ConfigError, match="0 <= fold < folds"):
        TrainConfig(store="s", out="o", folds=3, fold=3)


def test_run_split_by_fold_is_that_fold():
    frame = patients()
    fold = assign_folds(frame, 4, seed=2)
    for k in range(4):
        split = run_split(frame, val_fraction=0.2, seed=2, by="patient", folds=4, fold=k)
        assert np.array_equal(split == "val", fold == k)


def test_split_is_stratified_by_bleeding_patients():
    """Val holds about val_fraction of the bleeding patients' slices, not a lucky or unlucky share of them."""
    frame = patients(60, bleed_rate=0.25)
    groups = groups_of(frame)
    bleeding_slots = groups.positive[groups.inverse]
    bleed = frame["any"].to_numpy() == 1
    prevalence_gap = []
    for seed in range(8):
        val = split_slices(frame, 0.2, seed=seed) == "val"
        assert abs(val[bleeding_slots].mean() - 0.2) < 0.1
        assert abs(val.mean() - 0.2) < 0.03
        prevalence_gap.append(abs(bleed[val].mean() / bleed[~val].mean() - 1))
    # Ranking bleeding patients by their bleeding slices keeps val's slice prevalence near train's
    # (a split stratified by bleeding patients only: 0.43 on average here).
    assert np.mean(prevalence_gap) < 0.25
