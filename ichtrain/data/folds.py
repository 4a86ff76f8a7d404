"""Who validates: the train/val split and K patient folds, both grouped and stratified.

A group is a patient (a study without patient_id is its own group) or a study.  Groups are stratified by
how many bleeding slices (``any == 1``) they hold: bleeding groups, ranked by that count, are dealt out in
blocks (one per fold, or one in 1/val_fraction to validation, drawn by the seed), so every fold sees the
training set's share of bleeding slices, not just of bleeding patients.  Everything is a pure function of
the tables and the seed, never of row order.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..config import GROUPINGS, MAX_FOLDS, MIN_FOLDS, SPLITS, TrainConfig, check_choice, check_fraction, check_int
from ..errors import ConfigError, DataError
from .tables import _check_columns, is_positive

logger = logging.getLogger(__name__)


class Groups(NamedTuple):
    keys: np.ndarray  # (G,) sorted group keys
    inverse: np.ndarray  # (N,) each slot's group
    sizes: np.ndarray  # (G,) slots per group
    bleeding: np.ndarray  # (G,) slices labelled any == 1

    @property
    def positive(self) -> np.ndarray:
        return self.bleeding > 0


def groups_of(slices: pd.DataFrame, by: str = TrainConfig.split_by) -> Groups:
    """The slots' groups (``by`` patient or study), with each group's size and whether it holds a bleed."""
    check_choice("grouping", by, GROUPINGS)
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
    bleeding = np.bincount(inverse, weights=bleed, minlength=len(groups)).astype(np.int64)
    return Groups(keys=groups, inverse=inverse, sizes=sizes, bleeding=bleeding)


class Strata(NamedTuple):
    negative: np.ndarray  # groups without a bleeding slice, in a seeded shuffled order
    blocks: list[np.ndarray]  # bleeding groups ranked by their bleeding slices (ties by the seed), in blocks


def _strata(groups: Groups, rng: np.random.Generator, block: int) -> Strata:
    negative = np.flatnonzero(~groups.positive)
    bleeding = np.flatnonzero(groups.positive)
    bleeding = bleeding[rng.permutation(len(bleeding))]
    bleeding = bleeding[np.argsort(-groups.bleeding[bleeding], kind="stable")]
    return Strata(
        negative=negative[rng.permutation(len(negative))],
        blocks=[bleeding[i : i + block] for i in range(0, len(bleeding), block)],
    )


def split_slices(
    slices: pd.DataFrame, val_fraction: float = TrainConfig.val_fraction, seed: int = 0, by: str = TrainConfig.split_by
) -> np.ndarray:
    """``"train"``/``"val"`` for every slot, holding out about ``val_fraction`` of the slices.

    ``by="patient"`` (default) keeps each patient on one side, ``by="study"`` each study.  One bleeding group
    of each block of ``1 / val_fraction`` similar ones goes to val, then the shuffled groups without a bleed
    whose slices bring val nearest ``val_fraction`` of all slots; at least one group lands on each side.
    Every row counts, unlabelled ones included, so the fraction is one of slots.

    ``by="slice"`` is the reference method's random slice-level split (a permutation of row positions).
    It is *leaky*: neighbouring, nearly identical slices of one study land on both sides, so validation
    scores are optimistic.  It exists only to reproduce the reference numbers.
    """
    check_fraction("val_fraction", val_fraction)
    check_choice("split", by, SPLITS)
    n = len(slices)
    rng = np.random.default_rng(check_int("seed", seed))
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
    block = max(2, round(1 / val_fraction))
    strata = _strata(groups, rng, block=block)
    for members in strata.blocks:  # one bleeding group of each block validates; a short last block by chance
        if len(members) == block or rng.random() < len(members) / block:
            is_val[members[rng.integers(len(members))]] = True
    # Groups without a bleed then bring val to the slice fraction: the shuffled prefix nearest what is missing.
    missing = val_fraction * n - groups.sizes[is_val].sum()
    cum = np.concatenate([[0], np.cumsum(groups.sizes[strata.negative])])
    is_val[strata.negative[: int(np.argmin(np.abs(cum - max(missing, 0))))]] = True
    if not is_val.any():
        is_val[rng.integers(len(is_val))] = True
    if is_val.all():
        is_val[rng.integers(len(is_val))] = False
    split = np.where(is_val[groups.inverse], "val", "train")
    logger.info(
        "split by %s (seed %d, stratified by bleed): %d of %d groups, %d of %d slices (%.3f) in val",
        by,
        seed,
        int(is_val.sum()),
        len(is_val),
        int((split == "val").sum()),
        n,
        (split == "val").mean(),
    )
    return split


def assign_folds(slices: pd.DataFrame, folds: int, seed: int = 0, by: str = TrainConfig.split_by) -> np.ndarray:
    """int64 (N,): each slot's fold in ``0 .. folds-1``; a group's slots share one fold.

    Bleeding groups are dealt out one per fold from each block of ``folds`` similar ones; groups without a
    bleed, largest first (equal sizes in the seeded order), each go to the fold with the fewest slices so far.
    """
    folds, seed = check_int("folds", folds), check_int("seed", seed)
    if not MIN_FOLDS <= folds <= MAX_FOLDS:
        raise ConfigError(f"folds must be between {MIN_FOLDS} and {MAX_FOLDS}, got {folds}")
    groups = groups_of(slices, by)
    if len(groups.keys) < folds:
        raise DataError(f"cannot make {folds} folds from {len(groups.keys)} {by}(s); use fewer folds or more data")
    rng = np.random.default_rng(seed)
    fold_of, load = np.zeros(len(groups.keys), np.int64), np.zeros(folds, np.int64)
    strata = _strata(groups, rng, block=folds)
    for members in strata.blocks:  # each fold takes one bleeding group of each block, in a seeded order
        fold_of[members] = rng.permutation(folds)[: len(members)]
        np.add.at(load, fold_of[members], groups.sizes[members])
    for g in strata.negative[np.argsort(-groups.sizes[strata.negative], kind="stable")]:
        fold_of[g] = int(np.argmin(load))  # largest first, each to the fold with the fewest slices so far
        load[fold_of[g]] += groups.sizes[g]
    logger.info(
        "%d folds by %s (seed %d): %s slices, %s groups with a bleed",
        folds,
        by,
        seed,
        load.tolist(),
        np.bincount(fold_of[groups.positive], minlength=folds).tolist(),
    )
    return fold_of[groups.inverse]


def slot_table(slices: pd.DataFrame, **columns: np.ndarray) -> pd.DataFrame:
    """Each slot's image_id, study_uid and patient_id, then ``columns`` (a run's split, an experiment's fold)."""
    return pd.DataFrame(
        {
            "image_id": slices["image_id"],
            "study_uid": slices["study_uid"],
            "patient_id": slices["patient_id"],
            **columns,
        }
    )


def folds_table(slices: pd.DataFrame, fold: np.ndarray) -> pd.DataFrame:
    """The per-slot fold table written as ``EXP/folds.parquet``."""
    return slot_table(slices, fold=fold)


def run_split(
    slices: pd.DataFrame, *, val_fraction: float, seed: int, by: str, folds: int | None = None, fold: int | None = None
) -> np.ndarray:
    """A run's ``"train"``/``"val"`` per slot: fold ``fold`` of ``folds`` validates, else the fractional split."""
    if folds is None:
        return split_slices(slices, val_fraction=val_fraction, seed=seed, by=by)
    if by not in GROUPINGS:
        choices = " or ".join(GROUPINGS)
        raise ConfigError(f"folds keep each {choices} on one side; use --split-by {choices} with --folds")
    return np.where(assign_folds(slices, folds=folds, seed=seed, by=by) == fold, "val", "train")
