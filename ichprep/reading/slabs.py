"""The store's slots: one per slice of a kept series, or one per slab of a thin series.

A model trained on RSNA 2019 reads ~5 mm slices; a series of 0.625-1.25 mm slices shows it thin,
noisier slices it never saw.  ``--slab-mm`` averages HU over consecutive slices of such a series
into slabs: slab j of a series holds the slices whose position along the normal lies in
``[p0 + j*T, p0 + (j+1)*T)`` (``p0`` the series' first position), so a gap leaves a slab short, never
a slab across it.  A slab's row in the slice table is its middle member's (id, path, size), with z
the members' mean and each label the members' maximum; ``slabs.parquet`` lists every member, so a
prediction for a slab can be traced back to its files.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd

from .labels import LABELS
from .series import along_normal, sort_slices

OK = "ok"
#: ``--slab-mm`` choices besides a thickness in mm.
SLAB_MODES: tuple[str, ...] = ("auto", "off")
#: ``auto`` slabs a kept series thinner than THIN_MM into slabs of SLAB_MM; a 5 mm series is never slabbed.
THIN_MM = 3.0
SLAB_MM = 5.0
_EDGE = 1e-6  # a position exactly on a slab's boundary belongs to the next slab, whatever the rounding

#: Columns of ``slabs.parquet``: one row per member slice of a slab.
SLAB_COLUMNS = ["image_id", "member_id", "member_path", "position", "z"]


class Slots(NamedTuple):
    """:func:`plan_slots`' result."""

    slots: pd.DataFrame  # one row per slot, in store order (scan columns; a slab's as described above)
    members: pd.DataFrame  # one row per file read, in store order, with its ``slot``
    slabs: pd.DataFrame | None  # SLAB_COLUMNS, None when nothing was slabbed


def parse_slab(text: str) -> str | float:
    """``auto``, ``off`` or a thickness in mm (> 0); ValueError listing the choices otherwise."""
    if text in SLAB_MODES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"--slab-mm must be one of {', '.join(SLAB_MODES)} or a thickness in mm > 0, got {text!r}")
    return value


def slab_thickness(series: pd.DataFrame, slab: str | float) -> pd.Series:
    """Per kept series (index study_uid, series_uid): the slab thickness to use, NaN where it stays as is."""
    kept = series[series["kept"]].set_index(["study_uid", "series_uid"])
    thickness = kept["thickness_mm"].astype("Float64").astype(float)
    if slab == "off":
        return pd.Series(np.nan, index=kept.index)
    target, below = (SLAB_MM, THIN_MM) if slab == "auto" else (float(slab), float(slab) * 0.95)
    return pd.Series(np.where(thickness < below, target, np.nan), index=kept.index)


def plan_slots(table: pd.DataFrame, series: pd.DataFrame, slab: str | float = "auto") -> Slots:
    """The slots of the store from the readable slices of ``table`` (after :func:`choose_series`).

    Without slabs (every Kaggle archive) each readable slice is one slot, in :func:`sort_slices`' order.
    """
    ok = sort_slices(table[table["status"] == OK]).reset_index(drop=True)
    keys = pd.MultiIndex.from_frame(ok[["study_uid", "series_uid"]].astype("string"))
    thickness = slab_thickness(series, slab).reindex(keys).to_numpy(float) if len(ok) else np.zeros(0)
    slabbed = ~np.isnan(thickness)
    if not slabbed.any():
        return Slots(ok, ok.assign(slot=np.arange(len(ok))), None)
    position = along_normal(ok).to_numpy(float, na_value=np.nan)
    group = pd.Series(keys.codes[0] * (len(keys.levels[1]) + 1) + keys.codes[1])  # one number per series
    first = pd.Series(position).groupby(group).transform("first").to_numpy()
    within = np.where(slabbed, np.floor((position - first) / np.where(slabbed, thickness, 1) + _EDGE), 0)
    within = np.where(slabbed, within, ok.groupby(group.to_numpy()).cumcount().to_numpy())
    new_slot = np.r_[True, (group.to_numpy()[1:] != group.to_numpy()[:-1]) | (within[1:] != within[:-1])]
    slot = np.cumsum(new_slot) - 1
    members = ok.assign(slot=slot)
    sizes = np.bincount(slot)
    starts = np.flatnonzero(new_slot)
    middle = starts + sizes // 2
    slots = ok.iloc[middle].reset_index(drop=True)
    multi = sizes > 1
    if multi.any():
        slots["z"] = pd.array(
            ok["z"].astype("Float64").groupby(slot).mean().to_numpy(float, na_value=np.nan), dtype="Float64"
        )
        slots["position"] = pd.array(pd.Series(position).groupby(slot).mean().to_numpy(), dtype="Float64")
        for label in LABELS:
            maxima = ok[label].astype("Float64").groupby(slot).max()  # NA only where no member is labelled
            slots[label] = maxima.astype("Int8").array
    member_of = np.repeat(slots["image_id"].to_numpy(object), sizes)
    in_slab = np.repeat(multi, sizes)
    slabs = pd.DataFrame(
        {
            "image_id": member_of[in_slab],
            "member_id": ok["image_id"].to_numpy(object)[in_slab],
            "member_path": ok["path"].to_numpy(object)[in_slab],
            "position": position[in_slab],
            "z": ok["z"].astype("Float64").to_numpy(float, na_value=np.nan)[in_slab],
        }
    ).astype({"image_id": "string", "member_id": "string", "member_path": "string"})
    return Slots(slots, members, slabs)
