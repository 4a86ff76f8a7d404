"""Figures for external (study-level) validation: ROC per finding with a bootstrap band, and the worst studies.

* :func:`plot_study_roc`: one panel per label; the ROC curve of the study scores, a 95 % pointwise band
  from a bootstrap by study (:func:`roc_band`), the chance diagonal, the operating points chosen on
  development data and the radiologists' reads (R1, R2, ...) as points in ROC space.
* :func:`plot_worst_studies`: the most confident misses (true 1, lowest study score) and false alarms
  (true 0, highest study score) picked by :func:`worst_studies`, each drawn as slice probability along z
  with its slice truth where known, its study score and the thresholds, in the look of
  :func:`ichtrain.evaluation.plots.plot_study` (``EXP/study_<uid>.png``).

Both take pandas tables with ``true_<label>`` (0/1, NA = unknown) and ``prob_<label>`` columns and build
figures the way :mod:`ichtrain.evaluation.plots` does (a bare :class:`~matplotlib.figure.Figure` on an Agg
canvas, no pyplot); ``*_figure`` functions return the figure unsaved so its layout can be inspected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from ichprep.reading.studylabels import SHORT_NAMES

from .bootstrap import (
    _CHUNK_CELLS,
    LEVEL,
    MIN_DEFINED,
    _indicator,
    _score_groups,
    auc_ap_from_groups,
    percentile_interval,
)
from .plots import _STAGES, _new_figure, _positive_runs, _save, _why_skipped, unit_square

logger = logging.getLogger(__name__)

#: Finding abbreviations for panel titles (CQ500 / CT-ICH): ``any`` -> ``ICH``, ``subdural`` -> ``SDH``, ...
FINDINGS: dict[str, str] = {name: short.upper() for short, name in SHORT_NAMES.items()}
#: False positive rates at which the bootstrap band is computed.
FPR_GRID = np.linspace(0.0, 1.0, 101)
#: Uids in titles are cut to their last characters (DICOM uids share long prefixes).
UID_CHARS = 12

_CURVE = _STAGES[1][1]  # the stage 2 blue of plot_study: the model's own line in both figures
# Operating points, in order of first appearance: (marker, colour).
_POINT_STYLES = (
    ("o", "tab:red"),
    ("s", "tab:orange"),
    ("D", "tab:green"),
    ("P", "tab:purple"),
    ("X", "tab:brown"),
    ("*", "tab:pink"),
)
_THRESHOLD_STYLES = (("tab:orange", "--"), ("tab:green", ":"), ("tab:purple", "--"), ("tab:brown", ":"))


def finding(label: str) -> str:
    """Short name of a label (``ICH`` for ``any``); an unknown label is returned as given."""
    return FINDINGS.get(label, label)


def _short_uid(uid: str) -> str:
    uid = str(uid)
    return uid if len(uid) <= UID_CHARS else "…" + uid[-UID_CHARS:]


# --------------------------------------------------------------------------- table checks


def _require(table: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, table.columns))})")


def _numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float with NA -> NaN (nullable Int8 and object columns included)."""
    return pd.to_numeric(table[column], errors="coerce").astype(float).to_numpy()


def _labelled(studies: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Truth and score of the studies with both known; truth other than 0/1 is an error."""
    t, p = _numeric(studies, f"true_{label}"), _numeric(studies, f"prob_{label}")
    bad = ~np.isnan(t) & ~np.isin(t, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"true_{label} must be 0, 1 or NA; got {sorted(set(t[bad].tolist()))[:5]}")
    unscored = ~np.isnan(t) & ~np.isfinite(p)
    if unscored.any():
        logger.warning("%s: %d labelled studies have no score and are left out", label, int(unscored.sum()))
    keep = ~np.isnan(t) & np.isfinite(p)
    return t[keep], p[keep]


# --------------------------------------------------------------------------- bootstrap band


class RocBand(NamedTuple):
    """ROC curve on a fixed FPR grid with its pointwise bootstrap percentile band, and AUC with its interval.

    ``tpr`` is the full sample's curve at ``fpr_grid`` (linear between ROC points, the upper TPR at a
    vertical step); ``low``/``high`` are NaN where too few replicates had both classes; ``auc_ci`` is
    ``[lo, hi]`` or None likewise.
    """

    fpr_grid: np.ndarray
    tpr: np.ndarray
    low: np.ndarray
    high: np.ndarray
    auc: float
    auc_ci: list[float] | None


def _groups(y: np.ndarray, p: np.ndarray) -> tuple:
    """Sparse (score groups ascending x items) indicators of positives and negatives (see bootstrap._score_groups)."""
    order = np.argsort(p, kind="stable")
    pos = y[order] == 1
    group = _score_groups(p[order], pos)
    shape = (int(group[-1]) + 1, y.size)
    return _indicator(group[pos], order[pos], shape), _indicator(group[~pos], order[~pos], shape)


def _tpr_on_grid(pos: np.ndarray, neg: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(R, len(grid)) TPR at ``grid`` of R weighted ROC curves, from weighted positives/negatives (G, R) per group."""
    # Thresholds descend through the ascending groups: TP/FP = weight at or above each group's score.
    tp, fp = np.cumsum(pos[::-1], axis=0), np.cumsum(neg[::-1], axis=0)
    defined = (tp[-1] > 0) & (fp[-1] > 0)
    zero = np.zeros((1, pos.shape[1]))
    tpr = np.vstack([zero, tp / np.where(defined, tp[-1], 1.0)])
    fpr = np.vstack([zero, fp / np.where(defined, fp[-1], 1.0)])
    # One np.interp for all replicates: replicate r's FPR (in [0, 1]) is shifted by 2r, so the curves lie
    # side by side on one non-decreasing axis; at a repeated FPR np.interp takes the last (highest) TPR.
    shift = 2.0 * np.arange(pos.shape[1])
    out = np.interp((grid[None, :] + shift[:, None]).ravel(), (fpr + shift).T.ravel(), tpr.T.ravel())
    out = out.reshape(pos.shape[1], grid.size)
    out[~defined] = np.nan
    return out


def roc_band(y, p, n_boot: int = 500, seed: int = 0, *, grid: np.ndarray = FPR_GRID) -> RocBand:
    """ROC curve at ``grid`` with a 95 % pointwise band: studies resampled ``n_boot`` times (same seed, same band).

    ``y`` are 0/1 labels and ``p`` scores of one label's studies (both classes needed).  Each replicate
    draws the studies with replacement (multinomial counts, as :func:`ichtrain.evaluation.bootstrap.resample`);
    its ROC curve and AUC come from the score groups sorted once, so replicates are processed in chunks of
    matrix products rather than one by one.
    """
    y, p, grid = np.asarray(y, dtype=float), np.asarray(p, dtype=float), np.asarray(grid, dtype=float)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"y and p must be 1-D of one length, got {y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or not np.isfinite(p).all():
        raise ValueError("y must be 0/1 and p finite (drop unlabelled studies first)")
    if not 0 < y.sum() < y.size:
        raise ValueError(f"ROC needs both classes: {int(y.sum())} positives of {y.size}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if grid.ndim != 1 or grid[0] != 0.0 or grid[-1] != 1.0 or (np.diff(grid) <= 0).any():
        raise ValueError("grid must increase from 0 to 1")

    pos, neg = _groups(y, p)
    ones = np.ones((y.size, 1))
    tpr = _tpr_on_grid(pos @ ones, neg @ ones, grid)[0]
    auc = float(auc_ap_from_groups(pos @ ones, neg @ ones).auc[0])

    rng = np.random.default_rng(seed)
    uniform = np.full(y.size, 1.0 / y.size)
    chunk = max(1, _CHUNK_CELLS // max(y.size, pos.shape[0], grid.size))
    curves, aucs = [], []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(y.size, uniform, size=min(chunk, n_boot - start)).T.astype(float)
        w_pos, w_neg = pos @ counts, neg @ counts
        curves.append(_tpr_on_grid(w_pos, w_neg, grid))
        aucs.append(auc_ap_from_groups(w_pos, w_neg).auc)
    curves = np.concatenate(curves)
    defined = ~np.isnan(curves[:, 0])
    if defined.sum() >= MIN_DEFINED * n_boot:
        low, high = np.percentile(curves[defined], [50 * (1 - LEVEL), 50 * (1 + LEVEL)], axis=0)
    else:
        low = high = np.full(grid.size, np.nan)
    return RocBand(
        fpr_grid=grid, tpr=tpr, low=low, high=high, auc=auc, auc_ci=percentile_interval(np.concatenate(aucs))
    )


# --------------------------------------------------------------------------- ROC figure


def _names_in_order(blocks: Mapping | None, labels) -> list[str]:
    """Keys of ``blocks[label]`` over all labels, in order of first appearance (one style or code per name)."""
    seen: dict[str, None] = {}
    for label in labels:
        for name in (blocks or {}).get(label) or {}:
            seen.setdefault(str(name), None)
    return list(seen)


def _point(entry: Mapping, where: str) -> tuple[float, float] | None:
    """(sensitivity, specificity) of a point, or None where either is undefined (None/NaN: a class had no studies)."""
    rates = []
    for key in ("sensitivity", "specificity"):
        if key not in entry:
            raise ValueError(f"{where}: needs {key!r}, got {dict(entry)!r}")
        try:
            value = math.nan if entry[key] is None else float(entry[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {key} must be a number, got {entry[key]!r}") from err
        if math.isnan(value):
            logger.info("%s: %s undefined, point not drawn", where, key)
            return None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}: {key} {value} is not in [0, 1]")
        rates.append(value)
    return rates[0], rates[1]


def _threshold_text(entry: Mapping) -> str:
    try:
        value = float(entry.get("threshold"))
    except (TypeError, ValueError):
        return ""  # no threshold given (or not a number): the name alone
    return f" t={value:.2f}" if math.isfinite(value) else ""


class _Styles(NamedTuple):
    points: dict[str, tuple[str, str]]  # operating point name -> (marker, colour)
    readers: dict[str, str]  # reader name -> R1, R2, ...


def _roc_panel(ax, label: str, t: np.ndarray, p: np.ndarray, marks: tuple[Mapping, Mapping], styles, boot) -> None:
    unit_square(ax)
    head = finding(label) if finding(label) == label else f"{finding(label)} ({label})"
    what = _why_skipped(t)
    if what:
        ax.set_title(f"{head}\nn={t.size}, {int(t.sum())} positive", fontsize=9)
        reason = "one class: no ROC" if t.size else "no labelled studies: no ROC"
        box = {"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round"}  # off the chance line
        ax.text(0.5, 0.5, f"{reason}\n({what})", ha="center", va="center", fontsize=9, transform=ax.transAxes, bbox=box)
        return
    band = roc_band(t, p, *boot)
    fpr, tpr, _ = roc_curve(t, p)
    ax.fill_between(band.fpr_grid, band.low, band.high, color=_CURVE, alpha=0.2, linewidth=0)
    ax.plot(fpr, tpr, color=_CURVE, linewidth=1.8)
    ci = f" [{band.auc_ci[0]:.2f}-{band.auc_ci[1]:.2f}]" if band.auc_ci else ""
    ax.set_title(f"{head}\nAUC {band.auc:.2f}{ci}, n={t.size}, {int(t.sum())} positive", fontsize=9)

    points, readers = marks
    handles = []
    for name, entry in points.items():
        rates = _point(entry, f"points[{label!r}][{name!r}]")
        if rates is None:
            continue
        se, sp = rates
        marker, color = styles.points[str(name)]
        style = {"linestyle": "none", "marker": marker, "color": color, "markeredgecolor": "black"}
        ax.plot(1 - sp, se, **style, markersize=7, zorder=4)
        handles.append(Line2D([], [], **style, label=f"{name}{_threshold_text(entry)}: se {se:.2f}, sp {sp:.2f}"))
    for name, entry in readers.items():
        rates = _point(entry, f"readers[{label!r}][{name!r}]")
        if rates is None:
            continue
        se, sp = rates
        ax.plot(1 - sp, se, linestyle="none", marker="^", color="0.35", markeredgecolor="black", markersize=6, zorder=5)
        code = styles.readers[str(name)]
        ax.annotate(code, (1 - sp, se), xytext=(4, -9), textcoords="offset points", fontsize=7, color="0.2")
    if handles:
        # Lower right stays clear of a useful ROC curve, which hugs the upper left.
        ax.legend(handles=handles, loc="lower right", fontsize=6.5, handlelength=1, borderpad=0.3, framealpha=0.85)


def study_roc_figure(
    studies: pd.DataFrame,
    *,
    labels: tuple[str, ...],
    points: Mapping[str, Mapping[str, Mapping]] | None,
    readers: Mapping[str, Mapping[str, Mapping]] | None,
    n_boot: int = 500,
    seed: int = 0,
) -> Figure:
    """The figure :func:`plot_study_roc` saves: one axes per label, in ``labels`` order (up to 3 per row)."""
    labels = tuple(labels)
    if not labels:
        raise ValueError("labels is empty: nothing to plot")
    _require(studies, [f"{k}_{label}" for label in labels for k in ("true", "prob")], "studies")
    point_names, reader_names = _names_in_order(points, labels), _names_in_order(readers, labels)
    styles = _Styles(
        points={name: _POINT_STYLES[i % len(_POINT_STYLES)] for i, name in enumerate(point_names)},
        readers={name: f"R{i + 1}" for i, name in enumerate(reader_names)},
    )
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig = _new_figure((3.4 * cols + 0.6, 3.7 * rows + 1.2))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, label in zip(axes, labels):
        t, p = _labelled(studies, label)
        marks = ((points or {}).get(label) or {}, (readers or {}).get(label) or {})
        _roc_panel(ax, label, t, p, marks, styles, (n_boot, seed))
    for ax in axes[len(labels) :]:
        ax.remove()  # an empty grid cell would still count as a panel

    handles = [
        Line2D([], [], color=_CURVE, linewidth=1.8, label="ROC (studies)"),
        Patch(color=_CURVE, alpha=0.2, label=f"{LEVEL:.0%} band (bootstrap by study, {n_boot}x)"),
        Line2D([], [], color="0.6", linestyle="--", linewidth=1, label="chance"),
    ]
    for name, (marker, color) in styles.points.items():
        handles.append(
            Line2D([], [], linestyle="none", marker=marker, color=color, markeredgecolor="black", label=name)
        )
    reader = {"linestyle": "none", "marker": "^", "color": "0.35", "markeredgecolor": "black"}
    codes = list(styles.readers.values())
    if codes and list(styles.readers) == codes:  # readers already called R1, R2, ...: one entry says it all
        handles.append(Line2D([], [], **reader, label=f"readers ({', '.join(codes)})"))
    else:
        handles += [Line2D([], [], **reader, label=f"{code} = {name}") for name, code in styles.readers.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8.5, frameon=False)
    fig.suptitle(f"Study-level ROC per finding ({len(studies)} studies)", fontsize=11)
    for k, ax in enumerate(axes[: len(labels)]):
        # Axis names on the outer panels only (a figure-level x label would collide with the legend).
        if k >= len(labels) - cols:
            ax.set_xlabel("1 - specificity (FPR)", fontsize=8.5)
        if k % cols == 0:
            ax.set_ylabel("sensitivity (TPR)", fontsize=8.5)
    return fig


def plot_study_roc(
    studies: pd.DataFrame,
    *,
    labels: tuple[str, ...],
    points: dict[str, dict[str, dict]] | None,
    readers: dict[str, dict[str, dict]] | None,
    path,
    n_boot: int = 500,
    seed: int = 0,
) -> Path:
    """ROC per label of the study scores, with a bootstrap band, operating points and readers; returns the PNG path.

    ``studies`` has one row per study with ``true_<label>`` (0/1, NA rows dropped per label) and
    ``prob_<label>``.  ``points[label]`` maps a name to ``{"sensitivity", "specificity", "threshold"}``
    (drawn as a marker, listed with its threshold in the panel's legend); ``readers[label]`` maps a reader
    to ``{"sensitivity", "specificity"}`` (grey triangles, coded R1, R2, ... in order of first appearance).
    A label with a single class gets "one class: no ROC" in its panel.
    """
    fig = study_roc_figure(studies, labels=labels, points=points, readers=readers, n_boot=n_boot, seed=seed)
    out = _save(fig, path)
    logger.info("study ROC of %s (%d studies) -> %s", ", ".join(labels), len(studies), out)
    return out


# --------------------------------------------------------------------------- worst studies


class WorstStudies(NamedTuple):
    """Study uids, most confident first: positives with the lowest scores, negatives with the highest."""

    misses: tuple[str, ...]
    false_alarms: tuple[str, ...]


def _study_table(studies: pd.DataFrame, label: str) -> pd.DataFrame:
    """``study_uid``, ``truth`` and ``score`` of the studies with both known (uids unique)."""
    if "study_uid" not in studies.columns and studies.index.name == "study_uid":
        studies = studies.reset_index()
    _require(studies, ["study_uid", f"true_{label}", f"prob_{label}"], "studies")
    table = pd.DataFrame(
        {
            "study_uid": studies["study_uid"].astype(str).to_numpy(),
            "truth": _numeric(studies, f"true_{label}"),
            "score": _numeric(studies, f"prob_{label}"),
        }
    )
    dup = table["study_uid"][table["study_uid"].duplicated()]
    if len(dup):
        raise ValueError(f"studies has repeated study_uid(s): {', '.join(dup.unique()[:5])}")
    return table[table["truth"].notna() & np.isfinite(table["score"])]


def worst_studies(studies: pd.DataFrame, label: str = "any", n: int = 6) -> WorstStudies:
    """The ``n // 2`` positive studies with the lowest scores and the ``n // 2`` negatives with the highest.

    Studies without truth or score are ignored; tied scores go by uid, so the pick is deterministic.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (half misses, half false alarms), got {n!r}")
    table = _study_table(studies, label).sort_values(["score", "study_uid"], kind="stable")
    k = n // 2
    misses = table[table["truth"] == 1].head(k)
    # Highest score first; among equal scores the uid order of the misses is kept.
    alarms = table[table["truth"] == 0].sort_values(["score", "study_uid"], ascending=[False, True]).head(k)
    return WorstStudies(misses=tuple(misses["study_uid"]), false_alarms=tuple(alarms["study_uid"]))


class _Slices(NamedTuple):
    """One study's slices in z order: x position, probability, truth (NaN = unknown)."""

    x: np.ndarray
    prob: np.ndarray
    truth: np.ndarray
    along_z: bool


def _order_key(rows: pd.DataFrame) -> tuple[str | None, bool]:
    """Column to sort one study's slices by and whether it is z itself (finite everywhere)."""
    if "z" in rows.columns and np.isfinite(_numeric(rows, "z")).all():
        return "z", True
    for column in ("slot", "order", "instance_number"):
        if column in rows.columns and rows[column].notna().all():
            return column, False
    return None, False  # the table's own row order


def _study_slices(rows: pd.DataFrame, label: str) -> _Slices:
    key, along_z = _order_key(rows)
    if key is not None:
        rows = rows.sort_values(key, kind="stable")
    truth = _numeric(rows, f"true_{label}") if f"true_{label}" in rows.columns else np.full(len(rows), np.nan)
    x = _numeric(rows, "z") if along_z else np.arange(len(rows), dtype=float)
    return _Slices(x=x, prob=_numeric(rows, f"prob_{label}"), truth=truth, along_z=along_z)


def _edges(x: np.ndarray) -> np.ndarray:
    """Slab boundaries around each slice position: midpoints, half a spacing past the ends."""
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.r_[x[0] - (mid[0] - x[0]), mid, x[-1] + (x[-1] - mid[-1])]


def _slice_panel(ax, uid: str, study: pd.Series, rows: pd.DataFrame, label: str, thresholds: Mapping) -> bool:
    """Draw one study; returns whether some slice of it was unlabelled while others were labelled."""
    ax.set_title(f"{_short_uid(uid)}\ntrue {int(study['truth'])}, score {study['score']:.3f}", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    for k, (name, value) in enumerate(thresholds.items()):
        color, style = _THRESHOLD_STYLES[k % len(_THRESHOLD_STYLES)]
        ax.axhline(value, color=color, linestyle=style, linewidth=1.2, label=f"{name} {value:.2f}")
    ax.axhline(study["score"], color="black", linestyle="-.", linewidth=1.2, label="study score")
    if rows.empty:
        ax.text(0.5, 0.5, "no slices in the table", ha="center", va="center", fontsize=9, transform=ax.transAxes)
        return False
    s = _study_slices(rows, label)
    edges = _edges(s.x)
    for first, stop in _positive_runs(s.truth):
        ax.axvspan(edges[first], edges[stop], color="tab:red", alpha=0.15, linewidth=0)
    unknown = np.isnan(s.truth)
    partial = bool(unknown.any() and not unknown.all())
    if partial:  # an all-unknown study (study-level truth only) would be one grey bar: said in the legend
        for first, stop in _positive_runs(unknown.astype(float)):
            ax.axvspan(edges[first], edges[stop], ymax=0.04, color="0.5", alpha=0.5, linewidth=0)
    ax.plot(s.x, s.prob, color=_CURVE, linewidth=1.4, marker="o", markersize=2.5, label="slice probability")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("z" if s.along_z else "slice index (z order)", fontsize=8.5)
    if not s.along_z:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return partial


def _row(subfig, title: str, picked, k: int, frames, thresholds, label: str, none_text: str) -> bool:
    """One row of k panels (a subfigure); returns whether any study in it had partly unknown slice truth."""
    subfig.suptitle(title, fontsize=10)
    axes = subfig.subplots(1, k, sharey=True, squeeze=False).ravel()
    studies, slices = frames
    partial = False
    for ax, uid in zip(axes, picked):
        rows = slices[slices["study_uid"] == uid]
        partial |= _slice_panel(ax, uid, studies.loc[uid], rows, label, thresholds)
    if not picked:  # centred on the row, not on its first cell
        subfig.text(0.5, 0.5, none_text, ha="center", va="center", fontsize=10)
    for ax in axes[len(picked) :]:
        ax.set_axis_off()
    if picked:
        axes[0].set_ylabel("probability", fontsize=9)
    return partial


def worst_studies_figure(
    slices: pd.DataFrame,
    studies: pd.DataFrame,
    *,
    label: str = "any",
    thresholds: Mapping[str, float | None] | None = None,
    n: int = 6,
) -> Figure:
    """The figure :func:`plot_worst_studies` saves: misses on the top row, false alarms below, ``n // 2`` columns."""
    _require(slices, ["study_uid", f"prob_{label}"], "slices")
    # A point a one-class validation could not fix is stored as None and has no line to draw.
    thresholds = {str(k): float(v) for k, v in (thresholds or {}).items() if v is not None}
    picked = worst_studies(studies, label, n)
    table = _study_table(studies, label).set_index("study_uid")
    shown = set(picked.misses) | set(picked.false_alarms)
    slices = slices[slices["study_uid"].astype(str).isin(shown)].assign(study_uid=lambda f: f["study_uid"].astype(str))
    k = n // 2

    fig = _new_figure((3.4 * k + 0.6, 2 * 2.7 + 1.4))
    top, bottom = fig.subfigures(2, 1)
    partial_top = _row(
        top,
        f"Most confident misses: true 1, lowest study score ({len(picked.misses)})",
        picked.misses,
        k,
        (table, slices),
        thresholds,
        label,
        f"no miss: no study has true_{label} = 1",
    )
    partial_bottom = _row(
        bottom,
        f"Most confident false alarms: true 0, highest study score ({len(picked.false_alarms)})",
        picked.false_alarms,
        k,
        (table, slices),
        thresholds,
        label,
        f"no false alarm: no study has true_{label} = 0",
    )

    handles = [
        Line2D([], [], color=_CURVE, linewidth=1.4, marker="o", markersize=2.5, label="slice probability"),
        Line2D([], [], color="black", linestyle="-.", linewidth=1.2, label="study score"),
    ]
    for i, (name, value) in enumerate(thresholds.items()):
        color, style = _THRESHOLD_STYLES[i % len(_THRESHOLD_STYLES)]
        handles.append(Line2D([], [], color=color, linestyle=style, linewidth=1.2, label=f"{name} {value:.2f}"))
    known = f"true_{label}" in slices.columns and slices[f"true_{label}"].notna().any()
    if known:
        handles.append(Patch(color="tab:red", alpha=0.15, label="positive slice"))
    if partial_top or partial_bottom:
        handles.append(Patch(color="0.5", alpha=0.5, label="unlabelled slice"))
    if not known and (picked.misses or picked.false_alarms):
        handles.append(Patch(color="none", label="no slice truth (study-level labels only)"))
    # One row while it fits the width (about 1.8 inch per entry), else rows of that many.
    ncol = max(2, min(len(handles), int(fig.get_figwidth() / 1.8)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8.5, frameon=False)
    fig.suptitle(f"Worst studies for {finding(label)} ({label}): {len(table)} labelled studies", fontsize=11)
    return fig


def plot_worst_studies(
    slices: pd.DataFrame,
    studies: pd.DataFrame,
    *,
    label: str = "any",
    thresholds: Mapping[str, float | None] | None,
    path,
    n: int = 6,
) -> Path:
    """The most confident misses and false alarms (:func:`worst_studies`), slice by slice; returns the PNG path.

    ``slices`` has ``study_uid``, ``prob_<label>``, optionally ``true_<label>`` (NA where unknown) and
    ``z`` (else ``slot``/``order`` gives the order, else the row order); ``studies`` has ``study_uid``,
    ``true_<label>`` and ``prob_<label>`` (the study score).  Each panel shows the slice probability along
    z, positive slices shaded, the study score and each of ``thresholds`` (name -> value) as horizontal
    lines.  A row with nothing to show says so.
    """
    fig = worst_studies_figure(slices, studies, label=label, thresholds=thresholds, n=n)
    out = _save(fig, path)
    logger.info("worst studies for %s -> %s", label, out)
    return out
