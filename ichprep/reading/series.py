"""Which series of each study a store holds, and the order of their slices.

A study of an outside archive holds several series: thin and thick reconstructions, soft-tissue and
bone kernels, pre- and post-contrast, a localizer, a dose-report screen capture.  A store must hold
one run of slices per series it keeps, never an interleaving of several.  :func:`choose_series`
decides per series, from the scan table alone, and returns every decision in :data:`SERIES_COLUMNS`
(the store's ``series.parquet``).

Eligible (:class:`SeriesRule`): CT image storage (not a secondary capture or any other object), not a
localizer or screen save, axial (slice normal within ``max_tilt_deg`` of the z axis: a tilted gantry
stays), at least ``min_slices`` slices where the study has a series that long.  ``auto`` keeps one
eligible series per study, ranked by kernel (soft tissue, then unknown, then bone or lung:
:data:`SOFT_KERNELS`, :data:`SHARP_KERNELS`), then non-contrast, then thickness closest to
``target_mm``, then most slices, then lowest SeriesNumber, then SeriesInstanceUID: a total order, so
the choice is deterministic.  ``all`` keeps every eligible series; a set of SeriesInstanceUIDs keeps
exactly those.

Within a kept series a second slice at a position already taken (within ``same_position_mm``) is
left out as ``repeated_position`` (the first by InstanceNumber, then image id, stays); spacing and
gaps over ``gap_factor`` times the median spacing are reported, not mended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

OK = "ok"
#: The scan-table status of a file whose series the store does not hold (its reason is the series').
SERIES_LEFT_OUT = "series_left_out"
REPEATED_POSITION = "repeated_position"
#: ``--series`` choices besides a FILE of SeriesInstanceUIDs.
SERIES_MODES: tuple[str, ...] = ("auto", "all")

#: SOP classes of CT slices (CT Image Storage and its legacy-converted enhanced form); None (absent) passes.
CT_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.2"})

#: ConvolutionKernel values of soft-tissue (brain) reconstructions, by vendor; matched on the first value,
#: upper case.  Extend with ``--soft-kernel``.
SOFT_KERNELS: dict[str, tuple[str, ...]] = {
    "GE": ("STANDARD", "SOFT", "BRAIN", "STND"),
    "Siemens": ("H20S", "H21S", "H30S", "H31S", "H37S", "H40S", "H41S", "J30S", "J37S", "J40S", "HR36", "HR38", "HR40"),
    "Philips": ("UA", "UB", "UC", "B", "C"),
    "Canon/Toshiba": ("FC21", "FC22", "FC23", "FC24", "FC25", "FC26", "FC64"),
}
#: ConvolutionKernel values of bone, lung and edge reconstructions, by vendor.  Extend with ``--sharp-kernel``.
SHARP_KERNELS: dict[str, tuple[str, ...]] = {
    "GE": ("BONE", "BONEPLUS", "LUNG", "DETAIL", "EDGE", "CHST"),
    "Siemens": ("H60S", "H60F", "H70S", "H70H", "H80S", "J70H", "J70S", "HR60", "HR64", "HR68", "BR64"),
    "Philips": ("D", "E", "YC", "YD", "L"),
    "Canon/Toshiba": ("FC30", "FC31", "FC35", "FC50", "FC51", "FC52", "FC81"),
}
#: SeriesDescription words that tell the kernel where ConvolutionKernel is absent or unknown.
_SHARP_WORDS = ("BONE", "LUNG")
_SOFT_WORDS = ("SOFT", "BRAIN", "STD", "STANDARD")
KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}
#: ImageType values and SeriesDescription words of images that are not slices of a volume.
_LOCALIZER_TYPES = frozenset({"LOCALIZER"})
_SCREEN_TYPES = frozenset({"SCREEN SAVE", "DOSE INFO", "DOSE REPORT"})
_LOCALIZER_WORDS = ("SCOUT", "TOPOGRAM", "LOCALIZER", "SCANOGRAM")
_SCREEN_WORDS = ("DOSE",)
_NO_AGENT = frozenset({"", "NONE", "NO", "N", "NONE.", "0"})

#: Columns of ``series.parquet``, in order: one row per series seen.
SERIES_COLUMNS = [
    "study_uid",
    "series_uid",
    "series_number",
    "series_description",
    "sop_class_uid",
    "image_type",
    "kernel",
    "kernel_class",
    "contrast",
    "thickness_mm",
    "tilt_deg",
    "n_files",
    "n_slices",
    "spacing_median_mm",
    "spacing_min_mm",
    "spacing_max_mm",
    "n_repeated",
    "n_gaps",
    "max_gap_mm",
    "eligible",
    "kept",
    "reason",
]


@dataclass(frozen=True)
class SeriesRule:
    """What makes a series eligible and which one ``auto`` prefers (defaults for 5 mm non-contrast models)."""

    max_tilt_deg: float = 30.0
    min_slices: int = 10
    target_mm: float = 5.0
    same_position_mm: float = 0.01
    gap_factor: float = 1.5
    soft_kernels: frozenset[str] = frozenset(k for ks in SOFT_KERNELS.values() for k in ks)
    sharp_kernels: frozenset[str] = frozenset(k for ks in SHARP_KERNELS.values() for k in ks)

    def __post_init__(self):
        if not 0 <= self.max_tilt_deg < 90:
            raise ValueError(f"max_tilt_deg must be in [0, 90), got {self.max_tilt_deg}")
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")
        if not self.target_mm > 0:
            raise ValueError(f"target_mm must be > 0, got {self.target_mm}")
        if self.gap_factor <= 1:
            raise ValueError(f"gap_factor must be > 1, got {self.gap_factor}")

    def extended(self, soft: Collection[str] = (), sharp: Collection[str] = ()) -> SeriesRule:
        """This rule with more kernel names (a site's own)."""
        return SeriesRule(
            max_tilt_deg=self.max_tilt_deg,
            min_slices=self.min_slices,
            target_mm=self.target_mm,
            same_position_mm=self.same_position_mm,
            gap_factor=self.gap_factor,
            soft_kernels=self.soft_kernels | {k.strip().upper() for k in soft},
            sharp_kernels=self.sharp_kernels | {k.strip().upper() for k in sharp},
        )


class SeriesChoice(NamedTuple):
    """:func:`choose_series`' result: the scan table with left-out files marked, and one row per series."""

    table: pd.DataFrame
    series: pd.DataFrame


def kernel_class(kernel: str | None, description: str | None, rule: SeriesRule) -> str:
    """``soft``, ``sharp`` or ``unknown``: the kernel's first value looked up, else the description's words."""
    first = (kernel or "").split("\\")[0].strip().upper()
    if first in rule.soft_kernels:
        return "soft"
    if first in rule.sharp_kernels:
        return "sharp"
    words = (description or "").upper()
    if any(w in words for w in _SHARP_WORDS):
        return "sharp"
    if any(w in words for w in _SOFT_WORDS):
        return "soft"
    return "unknown"


def _has_contrast(agent: str | None, description: str | None) -> bool:
    """ContrastBolusAgent names an agent, or the description says post-contrast ("PRE CONTRAST" does not)."""
    if agent is not None and agent.strip().upper() not in _NO_AGENT:
        return True
    words = (description or "").upper()
    return "PRE" not in words and ("POST" in words or "C+" in words or "WITH CONTRAST" in words)


def _ineligible(props: dict, rule: SeriesRule) -> str | None:
    """Why a series cannot be a model's input, or None."""
    sop_class = props["sop_class_uid"]
    if sop_class is not None and sop_class not in CT_IMAGE_CLASSES:
        return f"not CT image storage (SOP class {sop_class})"
    types = {t.strip().upper() for t in (props["image_type"] or "").split("\\")}
    words = (props["series_description"] or "").upper()
    if types & _LOCALIZER_TYPES or any(w in words for w in _LOCALIZER_WORDS):
        return "localizer"
    if types & _SCREEN_TYPES or any(w in words for w in _SCREEN_WORDS):
        return "screen capture"
    if props["tilt_deg"] is not None and props["tilt_deg"] > rule.max_tilt_deg:
        return f"not axial (normal {props['tilt_deg']:.0f} deg from z, over {rule.max_tilt_deg:g})"
    return None


def _too_few(study_rows: list[dict], rule: SeriesRule) -> None:
    """Make a series of under ``min_slices`` slices ineligible, where its study has a longer eligible one.

    (A study whose every series is short, a partial export or a test folder, keeps them eligible.)
    """
    long_enough = [r for r in study_rows if r["eligible"] and r["n_slices"] >= rule.min_slices]
    if not long_enough:
        return
    for r in study_rows:
        if r["eligible"] and r["n_slices"] < rule.min_slices:
            r.update(eligible=False, reason=f"too few slices ({r['n_slices']} < {rule.min_slices})")


def _rank(props: dict, rule: SeriesRule) -> tuple:
    """``auto``'s preference, smallest first; SeriesNumber and UID make the order total."""
    thickness = props["thickness_mm"]
    number = props["series_number"]
    return (
        KERNEL_RANK[props["kernel_class"]],
        int(props["contrast"]),
        abs(thickness - rule.target_mm) if thickness is not None else math.inf,
        -props["n_slices"],
        number if number is not None else math.inf,
        props["series_uid"],
    )


def _lost_to(props: dict, best: dict, rule: SeriesRule) -> str:
    """Why ``auto`` preferred ``best``: the first criterion of the ranking where the two differ."""
    mine, theirs = _rank(props, rule), _rank(best, rule)
    other = f"series {best['series_number'] if best['series_number'] is not None else best['series_uid']} kept"
    if mine[0] != theirs[0]:
        return f"{props['kernel_class']} kernel {props['kernel'] or '?'} ({other})"
    if mine[1] != theirs[1]:
        return f"contrast ({other})"
    if mine[2] != theirs[2]:
        thickness = props["thickness_mm"]
        shown = f"{thickness:g} mm" if thickness is not None else "unknown"
        return f"thickness {shown}, further from {rule.target_mm:g} mm ({other})"
    if mine[3] != theirs[3]:
        return f"fewer slices ({other})"
    return f"higher SeriesNumber ({other})"


def along_normal(table: pd.DataFrame) -> pd.Series:
    """Each slice's position along its normal; z where a table (an older scan) has no position."""
    return table["position"].astype("Float64").fillna(table["z"].astype("Float64"))


def _ranks(column: pd.Series) -> np.ndarray:
    """Each text value's rank in sorted order, missing values last (integer keys sort far faster than text)."""
    codes, _ = pd.factorize(column, sort=True)
    return np.where(codes < 0, len(codes), codes)


def sort_slices(table: pd.DataFrame) -> pd.DataFrame:
    """Slices grouped by study, each study's series by SeriesNumber, each series along its normal.

    Ties go by InstanceNumber, then image id, then the table's own order (a stable sort); missing keys last.
    A series where any slice lacks a position is ordered by InstanceNumber, and says so in ``order_by``.
    """
    study, series = _ranks(table["study_uid"]), _ranks(table["series_uid"])
    position = along_normal(table)
    by_series = pd.Series(study * (len(table) + 1) + series, index=table.index)
    all_pos = position.notna().groupby(by_series).transform("all")
    number = table["instance_number"].astype("Float64")
    order = np.lexsort(  # last key first
        [
            _ranks(table["image_id"]),
            number.to_numpy(float, na_value=np.inf),
            position.where(all_pos, number).to_numpy(float, na_value=np.inf),
            series,
            table["series_number"].astype("Float64").to_numpy(float, na_value=np.inf),
            study,
        ]
    )
    ordered = table.assign(order_by=all_pos.map({True: "z", False: "instance_number"}).astype("string"))
    return ordered.iloc[order]


def _spacing(ok: pd.DataFrame, rule: SeriesRule) -> pd.DataFrame:
    """Per series: its readable slices, their spacing (median, min, max), repeats and gaps, from sorted rows."""
    study, series = ok["study_uid"].to_numpy(object), ok["series_uid"].to_numpy(object)
    first = np.r_[True, (study[1:] != study[:-1]) | (series[1:] != series[:-1])] if len(ok) else np.zeros(0, bool)
    run = np.cumsum(first) - 1  # one integer per series: sorted rows hold each series as one run
    position = along_normal(ok).to_numpy(float, na_value=np.nan)
    step = np.where(first, np.nan, np.diff(position, prepend=np.nan))
    repeated = np.abs(step) <= rule.same_position_mm
    moving = pd.Series(np.where(repeated, np.nan, step))
    by_run = moving.groupby(run)
    median = by_run.transform("median").to_numpy()
    gaps = moving.to_numpy() > rule.gap_factor * median
    frame = pd.DataFrame(
        {
            "n_slices": np.bincount(run),
            "spacing_median_mm": by_run.median(),
            "spacing_min_mm": by_run.min(),
            "spacing_max_mm": by_run.max(),
            "n_repeated": np.bincount(run, weights=repeated, minlength=run[-1] + 1 if len(run) else 0),
            "n_gaps": np.bincount(run, weights=gaps, minlength=run[-1] + 1 if len(run) else 0),
            "max_gap_mm": moving.where(gaps).groupby(run).max(),
        }
    )
    frame.index = pd.MultiIndex.from_arrays([study[first], series[first]], names=["study_uid", "series_uid"])
    return frame


def _properties(table: pd.DataFrame, ok: pd.DataFrame, rule: SeriesRule) -> pd.DataFrame:
    """One row per series: what choosing it needs (text fields from its first file that has them).

    ``ok``: the table's readable slices, sorted (:func:`sort_slices`).
    """
    seen = table[table["series_uid"].notna()]
    props = seen.groupby(["study_uid", "series_uid"], sort=True).agg(  # one grouping for every column
        series_number=("series_number", "min"),
        series_description=("series_description", "first"),
        sop_class_uid=("sop_class_uid", "first"),
        image_type=("image_type", "first"),
        kernel=("kernel", "first"),
        contrast_agent=("contrast", "first"),
        slice_thickness=("slice_thickness", "median"),
        normal_z=("normal_z", "median"),
        n_files=("status", "size"),
    )
    props = props.join(_spacing(ok, rule))
    props["n_slices"] = props["n_slices"].fillna(0).astype(int)  # a series with no readable slice has none
    return props


def _decide(props: pd.DataFrame, mode: str | frozenset[str], rule: SeriesRule) -> pd.DataFrame:
    rows = []
    props = props.reset_index()
    records = props.astype(object).where(props.notna(), None).to_dict("records")  # None, not pd.NA: rules test truth
    for p in records:
        study, series = p["study_uid"], p["series_uid"]
        number = p["series_number"]
        spacing = p["spacing_median_mm"]
        thickness = p["slice_thickness"] if p["slice_thickness"] is not None else spacing
        row = {
            "study_uid": study,
            "series_uid": series,
            "series_number": int(number) if number is not None else None,
            "series_description": p["series_description"],
            "sop_class_uid": p["sop_class_uid"],
            "image_type": p["image_type"],
            "kernel": p["kernel"],
            "kernel_class": kernel_class(p["kernel"], p["series_description"], rule),
            "contrast": _has_contrast(p["contrast_agent"], p["series_description"]),
            "thickness_mm": float(thickness) if thickness is not None else None,
            "tilt_deg": math.degrees(math.acos(min(1.0, abs(float(p["normal_z"])))))
            if p["normal_z"] is not None
            else None,
            "n_files": int(p["n_files"]),
            "n_slices": int(p["n_slices"]),
            **{k: p[k] for k in ("spacing_median_mm", "spacing_min_mm", "spacing_max_mm", "max_gap_mm")},
            "n_repeated": int(p["n_repeated"] or 0),
            "n_gaps": int(p["n_gaps"] or 0),
        }
        why_not = _ineligible(row, rule)
        row.update(eligible=why_not is None, kept=False, reason=why_not)
        rows.append(row)
    by_study: dict[str, list[dict]] = {}
    for row in rows:
        by_study.setdefault(row["study_uid"], []).append(row)
    for study_rows in by_study.values():
        _too_few(study_rows, rule)
        eligible = [r for r in study_rows if r["eligible"]]
        if isinstance(mode, frozenset):
            for r in study_rows:
                r["kept"] = r["series_uid"] in mode
                r["reason"] = "listed" if r["kept"] else "not in the series list"
        elif mode == "all":
            for r in eligible:
                r.update(kept=True, reason="eligible")
        elif eligible:
            best = min(eligible, key=lambda r: _rank(r, rule))
            for r in eligible:
                r.update(kept=r is best, reason="preferred" if r is best else _lost_to(r, best, rule))
        if not eligible and not isinstance(mode, frozenset):
            logger.warning("study %s has no eligible series: %s", study_rows[0]["study_uid"], _reasons(study_rows))
    frame = pd.DataFrame(rows, columns=SERIES_COLUMNS)
    return frame.astype(
        {
            "study_uid": "string",
            "series_uid": "string",
            "series_number": "Int64",
            "series_description": "string",
            "sop_class_uid": "string",
            "image_type": "string",
            "kernel": "string",
            "kernel_class": "string",
            "contrast": "boolean",
            "thickness_mm": "Float64",
            "tilt_deg": "Float64",
            "n_files": "Int64",
            "n_slices": "Int64",
            "spacing_median_mm": "Float64",
            "spacing_min_mm": "Float64",
            "spacing_max_mm": "Float64",
            "n_repeated": "Int64",
            "n_gaps": "Int64",
            "max_gap_mm": "Float64",
            "eligible": "boolean",
            "kept": "boolean",
            "reason": "string",
        }
    )


def _reasons(rows: list[dict]) -> str:
    return "; ".join(f"series {r['series_number']}: {r['reason']}" for r in rows)


def _mark_repeated(table: pd.DataFrame, ok: pd.DataFrame, rule: SeriesRule) -> pd.DataFrame:
    """Leave out a kept series' second slice at one position; the first (InstanceNumber, image id) stays.

    ``ok``: the readable slices before the series choice, sorted; a repeat in a series left out stays so.
    """
    same = along_normal(ok).groupby([ok["study_uid"], ok["series_uid"]]).diff().abs() <= rule.same_position_mm
    same = same.fillna(False).to_numpy(bool) & (table.loc[ok.index, "status"] == OK).to_numpy()
    if not same.any():
        return table
    first = ok["image_id"].where(~same).ffill()  # the slice each repeat repeats (sorted: it comes first)
    table = table.copy()
    index = ok.index[same]
    table.loc[index, "status"] = REPEATED_POSITION
    table.loc[index, "error"] = [
        f"same position ({p:.2f} mm along the normal) as {kept}, kept"
        for p, kept in zip(along_normal(ok).loc[index], first[same])
    ]
    logger.warning("%d slices repeat a position already taken in their series; they are left out", len(index))
    return table


def read_series_list(path) -> frozenset[str]:
    """SeriesInstanceUIDs, one per line (a header line ``series_uid`` or ``SeriesInstanceUID`` is skipped)."""
    from .source import read_file

    lines = [line.strip().strip(",") for line in read_file(path).decode().splitlines()]
    uids = [line.split(",")[0] for line in lines if line and not line.startswith("#")]
    return frozenset(u for u in uids if u.lower() not in ("series_uid", "seriesinstanceuid"))


def choose_series(
    table: pd.DataFrame, mode: str | frozenset[str] = "auto", rule: SeriesRule = SeriesRule()
) -> SeriesChoice:
    """Decide, per series, whether the store holds it (see the module docstring).

    Parameters
    ----------
    table : pandas.DataFrame
        A scan table (:data:`ichprep.reading.scan.SCAN_DTYPES`).
    mode : "auto", "all" or a set of SeriesInstanceUIDs
        One preferred series per study, every eligible one, or exactly the ones listed.
    rule : SeriesRule
        Eligibility limits, the thickness sought and the kernel lists.

    Returns
    -------
    SeriesChoice
        The table with every file of a left-out series marked ``series_left_out`` (its series' reason in
        ``error``) and repeated positions ``repeated_position``; and one row per series (:data:`SERIES_COLUMNS`).
    """
    if isinstance(mode, str) and mode not in SERIES_MODES:
        raise ValueError(f"series mode must be one of {', '.join(SERIES_MODES)} or a set of UIDs, got {mode!r}")
    if isinstance(mode, frozenset) and mode:
        unknown = mode - set(table["series_uid"].dropna().astype(str))
        if unknown:
            logger.warning("%d listed series are not in the source, e.g. %s", len(unknown), sorted(unknown)[0])
    ok = sort_slices(table[table["status"] == OK])
    series = _decide(_properties(table, ok, rule), mode, rule)
    left_out = series[~series["kept"]]
    reasons = pd.Series(
        left_out["reason"].to_numpy(), index=pd.MultiIndex.from_frame(left_out[["study_uid", "series_uid"]])
    )
    keys = pd.MultiIndex.from_frame(table[["study_uid", "series_uid"]].astype("string"))
    dropped = (table["status"] == OK).to_numpy() & keys.isin(reasons.index)
    table = table.copy()
    if dropped.any():
        table.loc[dropped, "status"] = SERIES_LEFT_OUT
        table.loc[dropped, "error"] = reasons.reindex(keys[dropped]).to_numpy()
    return SeriesChoice(_mark_repeated(table, ok, rule), series)


def decision_counts(series: pd.DataFrame) -> dict[str, int]:
    """Series left out, by the first words of their reason (``bone kernel``, ``localizer``, ...), and kept."""
    kept = int(series["kept"].sum())
    reasons = series.loc[~series["kept"], "reason"].astype(str).map(_reason_kind)
    counts = reasons.value_counts()
    return {"kept": kept, **{str(k): int(v) for k, v in sorted(counts.items())}}


def _reason_kind(reason: str) -> str:
    """A reason without its particulars: "sharp kernel BONE (series 2 kept)" -> "sharp kernel"."""
    head = reason.split(" (")[0]
    for prefix in ("sharp kernel", "unknown kernel", "soft kernel", "thickness", "too few slices", "not axial"):
        if head.startswith(prefix):
            return prefix
    return head
