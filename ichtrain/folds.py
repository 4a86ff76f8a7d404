"""Who validates: the train/val split and K patient folds, both grouped and stratified.

A group is a patient (a study without patient_id is its own group) or a study.  Groups are stratified by
whether they hold a bleeding slice (``any == 1``), so validation sees the training set's mix of positive
and negative patients; everything is a pure function of the tables and the seed, never of row order.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd

from .config import MAX_FOLDS
from .config import SPLITS as SPLIT_BY
from .data import _check_columns, _check_int, _is_number, is_positive
from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)



class Groups(NamedTuple):
    keys: np.ndarray       # (G,) sorted group keys
    inverse: np.ndarray    # (N,) each slot's group
    sizes: np.ndarray      # (G,) slots per group
    positive: np.ndarray   # (G,) bool: the group has a slice labelled any == 1


def groups_of(slices: pd.DataFrame, by: str = "patient") -> Groups:
    """The slots' groups (``by`` patient or study), with each group's size and whether it holds a bleed."""
    if by not in ("patient", "study"):
        raise ConfigError(f"unknown grouping {by!r}; choose one of patient, study")
    _check_columns(slices, ["study_uid", "patient_id"], "slices")
    study = slices["study_uid"].astype(object)
    if study.isna().any():
        raise DataError("slices has rows without study_uid; the store is broken")
    if by == "patient":
        # Prefixes keep a patient id from colliding with a study uid that happens to be the same string.
        patient = slices["patient_id"].astype(object)
        keys = np.where(patient.isna(), "study:" + study.astype(str), "patient:" + patient.astype(str))
    else:
        keys = study.to_numpy(dtype=str)
    groups, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    bleed = is_positive(slices) if "any" in slices.columns else np.zeros(len(slices), bool)
    positive = np.bincount(inverse, weights=bleed, minlength=len(groups)) > 0
    return Groups(keys=groups, inverse=inverse, sizes=sizes, positive=positive)


def _strata(groups: Groups, rng: np.random.Generator) -> list[np.ndarray]:
    """Each stratum's groups (negative, then positive) in a seeded shuffled order."""
    return [members[rng.permutation(len(members))]
            for members in (np.flatnonzero(~groups.positive), np.flatnonzero(groups.positive))]


def split_slices(slices: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, by: str = "patient") -> np.ndarray:
    """``"train"``/``"val"`` for every slot, holding out about ``val_fraction`` of the slices.

    ``by="patient"`` (default) keeps each patient on one side, ``by="study"`` each study.  Within each stratum
    (groups with and without a bleed) the shuffled groups whose cumulative slice count is nearest
    ``val_fraction`` of the stratum's slices go to val; at least one group lands on each side.  Every row
    counts, unlabelled ones included, so the fraction is one of slots.

    ``by="slice"`` is the reference method's random slice-level split (a permutation of row positions).
    It is *leaky*: neighbouring, nearly identical slices of one study land on both sides, so validation
    scores are optimistic.  It exists only to reproduce the reference numbers.
    """
    if not _is_number(val_fraction) or not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    if by not in SPLIT_BY:
        raise ConfigError(f"unknown split {by!r}; choose one of {', '.join(SPLIT_BY)}")
    n = len(slices)
    rng = np.random.default_rng(_check_int("seed", seed))
    if by == "slice":
        if n < 2:
            raise DataError(f"cannot split {n} slice(s) into train and val")
        is_val = np.zeros(n, bool)
        is_val[rng.permutation(n)[: min(n - 1, max(1, round(val_fraction * n)))]] = True
        return np.where(is_val, "val", "train")

    groups = groups_of(slices, by)
    if len(groups.keys) < 2:
        raise DataError(f"cannot split by {by}: the store has {len(groups.keys)} {by}(s); use more data or by='slice'")
    is_val = np.zeros(len(groups.keys), bool)
    strata = _strata(groups, rng)
    for order in strata:
        cum = np.concatenate([[0], np.cumsum(groups.sizes[order])])
        k = int(np.argmin(np.abs(cum - val_fraction * cum[-1])))   # 0 .. all of the stratum's groups
        is_val[order[:k]] = True
    largest = max(strata, key=len)
    if not is_val.any():
        is_val[largest[0]] = True
    if is_val.all():
        is_val[largest[-1]] = False
    split = np.where(is_val[groups.inverse], "val", "train")
    logger.info("split by %s (seed %d, stratified by bleed): %d of %d groups, %d of %d slices (%.3f) in val", by,
                seed, int(is_val.sum()), len(is_val), int((split == "val").sum()), n, (split == "val").mean())
    return split


def assign_folds(slices: pd.DataFrame, folds: int, seed: int = 0, by: str = "patient") -> np.ndarray:
    """int64 (N,): each slot's fold in ``0 .. folds-1``; a group's slots share one fold.

    Within each stratum the shuffled groups, largest first (a stable sort, so equal sizes keep the seeded
    order), each go to the fold with the fewest slices so far: folds balance slices and bleeding patients.
    """
    folds, seed = _check_int("folds", folds), _check_int("seed", seed)
    if not 2 <= folds <= MAX_FOLDS:
        raise ConfigError(f"folds must be between 2 and {MAX_FOLDS}, got {folds}")
    groups = groups_of(slices, by)
    if len(groups.keys) < folds:
        raise DataError(f"cannot make {folds} folds from {len(groups.keys)} {by}(s); use fewer folds or more data")
    rng = np.random.default_rng(seed)
    fold_of, load = np.zeros(len(groups.keys), np.int64), np.zeros(folds, np.int64)
    for order in _strata(groups, rng):
        for g in order[np.argsort(-groups.sizes[order], kind="stable")]:
            fold_of[g] = int(np.argmin(load))
            load[fold_of[g]] += groups.sizes[g]
    logger.info("%d folds by %s (seed %d): %s slices, %s groups with a bleed", folds, by, seed, load.tolist(),
                np.bincount(fold_of[groups.positive], minlength=folds).tolist())
    return fold_of[groups.inverse]


def folds_table(slices: pd.DataFrame, fold: np.ndarray) -> pd.DataFrame:
    """The per-slot fold table written as ``EXP/folds.parquet``."""
    return pd.DataFrame({"image_id": slices["image_id"], "study_uid": slices["study_uid"],
                         "patient_id": slices["patient_id"], "fold": fold})


def run_split(slices: pd.DataFrame, *, val_fraction: float, seed: int, by: str, folds: int | None = None,
              fold: int | None = None) -> np.ndarray:
    """A run's ``"train"``/``"val"`` per slot: fold ``fold`` of ``folds`` validates, else the fractional split."""
    if folds is None:
        return split_slices(slices, val_fraction, seed, by)
    if by == "slice":
        raise ConfigError("folds group patients or studies; use --split-by patient or study with --folds")
    return np.where(assign_folds(slices, folds, seed, by) == fold, "val", "train")
