"""Training plots: loss curves, per-class ROC curves, reliability diagrams and stage 1 vs stage 2, as PNG files.

Figures are built with :class:`matplotlib.figure.Figure` directly rather than
through pyplot: no global figure registry (nothing to leak or close in a long
training loop), no GUI backend selection, and safe to call from worker threads
or headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from .metrics import _check, calibration

# Series drawn by plot_loss_curves: history key -> (legend label, style).
_LOSS_SERIES = (
    ("train_loss", "train loss", {"color": "tab:blue", "marker": "o"}),
    ("val_loss", "validation loss", {"color": "tab:orange", "marker": "s"}),
    (
        "val_weighted_log_loss",
        "validation weighted log loss (RSNA)",
        {"color": "tab:green", "marker": "^", "linestyle": "--"},
    ),
)


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attach an Agg canvas so savefig never needs pyplot
    return fig


def _save(fig: Figure, out_png) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    fig.clear()  # drop artists now; the Figure itself is not registered anywhere
    return out


def _value(row: Mapping, key: str) -> float:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def plot_loss_curves(history: Sequence[Mapping], out_png) -> Path:
    """Train and validation loss per epoch (plus the RSNA weighted log loss when recorded).

    ``history`` rows look like ``{"epoch": 1, "train_loss": .., "val_loss": ..,
    "val_weighted_log_loss": ..}``; missing or non-finite values are left as
    gaps.  The best validation epoch is marked.  Returns the PNG path.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = np.array([_value(r, "epoch") if "epoch" in r else i + 1 for i, r in enumerate(history)], dtype=float)

    fig = _new_figure((7.0, 5.0))
    ax = fig.add_subplot()
    drawn = 0
    for key, label, style in _LOSS_SERIES:
        y = np.array([_value(r, key) for r in history])
        if np.isnan(y).all():
            continue
        ax.plot(epochs, y, label=label, linewidth=1.8, markersize=6, **style)
        drawn += 1
    if not drawn:
        raise ValueError(f"history has none of {', '.join(k for k, _, _ in _LOSS_SERIES)}")

    # Mark the epoch a checkpoint selector would keep (lowest validation metric).
    for key in ("val_weighted_log_loss", "val_loss"):
        y = np.array([_value(r, key) for r in history])
        if not np.isnan(y).all():
            best = int(np.nanargmin(y))
            what = "weighted log loss" if key == "val_weighted_log_loss" else "val loss"
            ax.axvline(
                epochs[best],
                color="0.55",
                linestyle=":",
                linewidth=1.2,
                zorder=0,
                label=f"best epoch {epochs[best]:g} ({what} {y[best]:.4f})",
            )
            break

    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss")
    if len(epochs) <= 20:  # label every epoch while that stays readable
        ax.set_xticks(epochs[np.isfinite(epochs)])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:  # a single point would otherwise sit on an axis of width ~0
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
    ax.margins(y=0.12)  # keep markers off the frame
    ax.grid(True, alpha=0.3)
    # Legend under the axes: inside, it may cover a point (with one epoch all markers share one x).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    return _save(fig, out_png)


class _Rows(NamedTuple):
    """One class's labelled rows: truth and probability."""

    t: np.ndarray
    p: np.ndarray


def _class_rows(yt: np.ndarray, yp: np.ndarray, j: int) -> _Rows:
    keep = ~np.isnan(yt[:, j])
    return _Rows(t=yt[keep, j], p=yp[keep, j])


def _why_skipped(t: np.ndarray) -> str | None:
    """Why a class has no curve (None when it has both label values)."""
    n_pos = int(t.sum())
    if 0 < n_pos < t.size:
        return None
    if t.size == 0:
        return "no labels"
    return "no positives" if n_pos == 0 else "no negatives"


def plot_roc_curves(y_true, y_prob, names: Sequence[str], out_png) -> Path:
    """Per-class ROC curves on one axes, AUC and positives in the legend, chance diagonal (:func:`roc_figure`)."""
    return _save(roc_figure(y_true, y_prob, names), out_png)


def roc_figure(y_true, y_prob, names: Sequence[str]) -> Figure:
    """The figure :func:`plot_roc_curves` saves (TensorBoard's ``val/roc`` too).

    Rows with NaN truth are dropped per class; a class with a single label
    value has no ROC curve and is listed in the legend as skipped.
    """
    checked = _check(y_true, y_prob, names)
    yt, yp, names = checked.y_true, checked.y_prob, checked.names
    fig = _new_figure((6.5, 6.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    colors = ["tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "black"]
    for j, name in enumerate(names):
        t, p = _class_rows(yt, yp, j)
        what = _why_skipped(t)
        if what:
            ax.add_line(Line2D([], [], linestyle="none", label=f"{name}: skipped ({what})"))
            continue
        n_pos = int(t.sum())
        fpr, tpr, _ = roc_curve(t, p)
        auc = roc_auc_score(t, p)
        # "any" is the headline class: draw it thicker, on top.
        wide = name == "any"
        ax.plot(
            fpr,
            tpr,
            color=colors[j % len(colors)],
            linewidth=2.4 if wide else 1.5,
            zorder=3 if wide else 2,
            label=f"{name} (AUC {auc:.3f}, n+={n_pos})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves per class")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    return fig


def unit_square(ax) -> None:
    """Axes of a rate against a rate: the diagonal, equal scales, quarter ticks, a light grid.

    A little room past [0, 1] so markers at exactly 0 or 1 are not cut by the frame.
    """
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ticks = [0, 0.25, 0.5, 0.75, 1]
    ax.set_xticks(ticks, ["0", "", "0.5", "", "1"])
    ax.set_yticks(ticks, ["0", "", "0.5", "", "1"])
    ax.grid(True, alpha=0.3)


def _reliability_panel(ax, name: str, labelled: _Rows) -> None:
    t, p = labelled.t, labelled.p
    calib = calibration(t, p)
    bins = calib.reliability
    mean_p = np.array([b["mean_prob"] for b in bins])
    observed = np.array([b["observed"] for b in bins])
    counts = np.array([b["n"] for b in bins])
    unit_square(ax)
    ax.plot(mean_p, observed, color="tab:blue", linewidth=1.2)
    # Marker area tracks the rows in each bin (deciles: equal unless ties merged bins).
    ax.scatter(mean_p, observed, s=15 + 100 * counts / counts.max(), color="tab:blue", zorder=3)
    ax.set_title(
        f"{name} (n={t.size}, {len(bins)} bins)\nECE {calib.ece:.3f}, mean p {calib.mean_prob:.3f} "
        f"vs prevalence {t.mean():.3f}",
        fontsize=8.5,
    )


def plot_calibration(y_true, y_prob, names: Sequence[str], out_png) -> Path:
    """Reliability diagram per class: observed frequency against mean predicted probability per decile bin.

    One panel per class with positives (diagonal = perfect calibration,
    marker area = rows in the bin, ECE and mean probability vs prevalence in
    the title); classes without positives are listed as skipped.
    """
    checked = _check(y_true, y_prob, names)
    yt, yp, names = checked.y_true, checked.y_prob, checked.names
    shown, skipped = [], []
    for j, name in enumerate(names):
        labelled = _class_rows(yt, yp, j)
        if labelled.t.sum() > 0:
            shown.append((name, labelled))
        else:
            skipped.append(f"{name} ({_why_skipped(labelled.t)})")
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _new_figure((max(5.0, 3.1 * cols + 0.6), 3.3 * rows + 1.1))  # wide enough for the title
    for k, (name, labelled) in enumerate(shown):
        _reliability_panel(fig.add_subplot(rows, cols, k + 1), name, labelled)
    if not shown:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no class has positives", ha="center", va="center")
    title = "Calibration per class (decile bins of predicted probability)"
    if skipped:
        title += "\nskipped: " + ", ".join(skipped)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("mean predicted probability", fontsize=9)
    fig.supylabel("observed frequency", fontsize=9)
    return _save(fig, out_png)


# --------------------------------------------------------------------------- stage 2 against stage 1

_STAGES = (("stage 1", "tab:gray"), ("stage 2", "tab:blue"))


def _class_values(metrics: Mapping, names: Sequence[str], key: str) -> np.ndarray:
    """``per_class[name][key]`` of a :func:`~ichtrain.evaluation.metrics.compute_metrics` result (NaN: undefined)."""
    per_class = metrics["per_class"]
    return np.array([_value(per_class.get(name, {}), key) for name in names])


def _paired_bars(ax, blocks: Sequence[Mapping], names: Sequence[str], key: str, fmt: str) -> None:
    """Stage 1 and stage 2 side by side per class, value over each bar; nothing where a value is undefined."""
    x = np.arange(len(names))
    width = 0.38
    for k, ((label, color), block) in enumerate(zip(_STAGES, blocks)):
        values = _class_values(block, names, key)
        shown = np.isfinite(values)
        bars = ax.bar(x[shown] + (k - 0.5) * width, values[shown], width, color=color, label=label)
        ax.bar_label(bars, labels=[format(v, fmt) for v in values[shown]], fontsize=7, padding=1.5)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8.5)
    ax.margins(y=0.15)  # room for the value labels
    ax.grid(True, axis="y", alpha=0.3)


def plot_compare(stage1: Mapping, stage2: Mapping, names: Sequence[str], out_png) -> Path:
    """Per-class log loss and ROC AUC of stage 1 and stage 2 side by side (two :func:`compute_metrics` blocks).

    The weighted log loss (the RSNA metric) of both is in the title; a class whose value is undefined
    (``None``: no labels, or a single label value for AUC) has no bar.
    """
    names = tuple(names)
    fig = _new_figure((max(8.0, 1.3 * len(names) + 3.0), 4.4))
    loss_ax, auc_ax = fig.subplots(1, 2)
    _paired_bars(loss_ax, (stage1, stage2), names, "log_loss", ".3f")
    loss_ax.set_title("log loss per class (lower is better)", fontsize=10)
    loss_ax.set_ylim(bottom=0)
    _paired_bars(auc_ax, (stage1, stage2), names, "roc_auc", ".3f")
    auc_ax.set_title("ROC AUC per class (higher is better)", fontsize=10)
    aucs = np.concatenate([_class_values(b, names, "roc_auc") for b in (stage1, stage2)])
    # Zoom on the range the AUCs span (they are usually all near 1); the bars start at its floor.
    low = np.nanmin(aucs) if np.isfinite(aucs).any() else 0.5
    floor = max(0.0, math.floor((low - 0.05) * 20) / 20)
    auc_ax.set_ylim(floor, 1.0 + 0.1 * (1.0 - floor))  # headroom for the value over a bar at 1.0
    auc_ax.set_yticks([t for t in auc_ax.get_yticks() if floor <= t <= 1.0])
    handles = [Patch(color=color, label=label) for label, color in _STAGES]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8.5, frameon=False)
    wll = [_value(b, "weighted_log_loss") for b in (stage1, stage2)]
    fig.suptitle(f"Stage 1 vs stage 2: weighted log loss {wll[0]:.4f} -> {wll[1]:.4f}", fontsize=11)
    return _save(fig, out_png)


def _positive_runs(truth: np.ndarray) -> list[tuple[int, int]]:
    """(first, last + 1) of each run of consecutive slices with truth 1 (NaN counts as not positive)."""
    positive = np.nan_to_num(truth, nan=0.0) > 0.5
    edges = np.diff(np.r_[0, positive.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def plot_study(stage1_probs, stage2_probs, truth, names: Sequence[str], title: str, out_png) -> Path:
    """One study: per class, probability against slice index, stage 1 dashed and stage 2 solid.

    Slices whose label is positive are shaded; unlabelled slices (NaN truth) are hatched grey along the
    bottom of the panel.
    """
    names = tuple(names)
    arrays = [np.asarray(a, dtype=float).reshape(len(a), -1) for a in (stage1_probs, stage2_probs, truth)]
    if any(a.shape != arrays[0].shape for a in arrays) or arrays[0].shape[1] != len(names):
        raise ValueError(
            f"stage 1, stage 2 and truth must all be (T, {len(names)}), got {', '.join(str(a.shape) for a in arrays)}"
        )
    p1, p2, yt = arrays
    slices = np.arange(len(yt))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _new_figure((3.4 * cols + 0.6, 2.4 * rows + 0.9))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for j, (ax, name) in enumerate(zip(axes, names)):
        for first, stop in _positive_runs(yt[:, j]):
            ax.axvspan(first - 0.5, stop - 0.5, color="tab:red", alpha=0.15, linewidth=0)
        for first, stop in _positive_runs(np.isnan(yt[:, j]).astype(float)):
            ax.axvspan(first - 0.5, stop - 0.5, ymax=0.04, color="0.5", alpha=0.5, linewidth=0)
        ax.plot(slices, p1[:, j], color=_STAGES[0][1], linestyle="--", linewidth=1.2, label=_STAGES[0][0])
        ax.plot(slices, p2[:, j], color=_STAGES[1][1], linewidth=1.6, label=_STAGES[1][0])
        ax.set_title(name, fontsize=9.5)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if j >= len(names) - cols:  # the lowest panel of its column
            ax.set_xlabel("slice index (z order)", fontsize=8.5)
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    handles = [*axes[0].get_lines(), Patch(color="tab:red", alpha=0.15, label="positive slice")]
    if np.isnan(yt).any():
        handles.append(Patch(color="0.5", alpha=0.5, label="unlabelled slice"))
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles) if cols > 1 else 2, fontsize=8.5, frameon=False
    )
    fig.suptitle(title, fontsize=10.5)
    fig.supylabel("probability", fontsize=9)
    return _save(fig, out_png)
