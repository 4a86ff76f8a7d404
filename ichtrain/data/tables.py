"""The store's tables as training sees them: targets, positives, slice selection and candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import SPLIT_PARTS, TASKS, check_choice, middle_count
from ..errors import DataError


def _check_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)}; is it an ichprep store table?")


def targets(slices: pd.DataFrame, task: str) -> np.ndarray:
    """float32 (N, K) targets of ``task``; an unlabelled slice (null label) gives NaN there (a NaN row)."""
    check_choice("task", task, TASKS)
    columns = TASKS[task]
    _check_columns(slices, columns, "slices")
    return slices[list(columns)].to_numpy(dtype=np.float32, na_value=np.nan)


def is_positive(slices: pd.DataFrame) -> np.ndarray:
    """bool (N,): the slice is labelled ``any == 1`` (nulls count as not positive)."""
    _check_columns(slices, ["any"], "slices")
    return slices["any"].eq(1).fillna(False).to_numpy(dtype=bool)


def select_slices(slices: pd.DataFrame, studies: pd.DataFrame, selection: str = "all") -> np.ndarray:
    """bool (N,): the slots a selection keeps.

    ``"all"`` keeps every slot; ``"middle:K"`` keeps, per study, the K slices centred on its middle slice
    ``start + n // 2`` (the reference method trains on these), the whole study when it has fewer than K.
    """
    n = len(slices)
    k = middle_count(selection)
    if k is None:
        return np.ones(n, bool)
    start, stop = study_bounds(studies, n)
    # Per study the window is [mid - k//2, mid - k//2 + k); it only leaves the study when n_study < k.
    mid = start + (stop - start) // 2
    lo = np.maximum(start, mid - k // 2)
    hi = np.minimum(stop, mid - k // 2 + k)
    slot = np.arange(n)
    return (slot >= lo) & (slot < hi)


def study_bounds(studies: pd.DataFrame, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot ``(start, stop)`` of the slot's study, int64 (N,) each; checks the studies tile [0, N)."""
    _check_columns(studies, ["start", "stop"], "studies")
    start = studies["start"].to_numpy(np.int64)
    stop = studies["stop"].to_numpy(np.int64)
    order = np.argsort(start, kind="stable")
    start, stop = start[order], stop[order]
    edges_ok = len(start) > 0 and start[0] == 0 and stop[-1] == n_slices and np.array_equal(start[1:], stop[:-1])
    if not edges_ok or (stop <= start).any():
        raise DataError(
            f"studies do not tile the {n_slices} slots as contiguous [start, stop) runs; "
            "the store's studies.parquet does not match its slices"
        )
    size = stop - start
    return np.repeat(start, size), np.repeat(stop, size)


def train_candidates(
    slices: pd.DataFrame, split: np.ndarray, selection_mask: np.ndarray | None, task: str, part: str = "train"
) -> np.ndarray:
    """Sorted slots eligible for ``part`` of ``task``.

    Eligible: ``ok`` (not zero-filled), every task label present, ``split == part``, selected
    (``selection_mask``; None = all).  Task ``subtypes`` models only bleeding slices, so it also requires
    ``any == 1``.
    """
    check_choice("split part", part, SPLIT_PARTS)
    n = len(slices)
    split = np.asarray(split)
    if split.shape != (n,):
        raise DataError(f"split has shape {split.shape}, expected ({n},) (one entry per slot)")
    mask = np.ones(n, bool) if selection_mask is None else np.asarray(selection_mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise DataError(f"selection_mask must be bool of shape ({n},), got {mask.dtype} {mask.shape}")
    _check_columns(slices, ["ok"], "slices")
    keep = slices["ok"].to_numpy(dtype=bool) & ~np.isnan(targets(slices, task)).any(axis=1) & (split == part) & mask
    if task == "subtypes":
        keep &= is_positive(slices)
    return np.flatnonzero(keep)
