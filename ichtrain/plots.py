"""Training plots: loss curves, per-class ROC curves and reliability diagrams, written as PNG files.

Figures are built with :class:`matplotlib.figure.Figure` directly rather than
through pyplot: no global figure registry (nothing to leak or close in a long
training loop), no GUI backend selection, and safe to call from worker threads
or headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from .metrics import _check, calibration

# Series drawn by plot_loss_curves: history key -> (legend label, style).
_LOSS_SERIES = (
    ("train_loss", "train loss", {"color": "tab:blue", "marker": "o"}),
    ("val_loss", "validation loss", {"color": "tab:orange", "marker": "s"}),
    ("val_weighted_log_loss", "validation weighted log loss (RSNA)", {"color": "tab:green", "marker": "^", "linestyle": "--"}),
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
                epochs[best], color="0.55", linestyle=":", linewidth=1.2, zorder=0,
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
    # Legend under the axes: it can never hide a point (with one epoch all
    # markers share one x, where any inside placement may cover them).
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
    """Per-class ROC curves on one axes, AUC and positives in the legend, chance diagonal.

    Rows with NaN truth are dropped per class; a class with a single label
    value has no ROC curve and is listed in the legend as skipped.
    """
    yt, yp, names = _check(y_true, y_prob, names)
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
            fpr, tpr, color=colors[j % len(colors)], linewidth=2.4 if wide else 1.5, zorder=3 if wide else 2,
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
    return _save(fig, out_png)


def _reliability_panel(ax, name: str, t: np.ndarray, p: np.ndarray) -> None:
    calib = calibration(t, p)
    bins = calib.reliability
    mean_p = np.array([b["mean_prob"] for b in bins])
    observed = np.array([b["observed"] for b in bins])
    counts = np.array([b["n"] for b in bins])
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    ax.plot(mean_p, observed, color="tab:blue", linewidth=1.2)
    # Marker area tracks the rows in each bin (deciles: equal unless ties merged bins).
    ax.scatter(mean_p, observed, s=15 + 100 * counts / counts.max(), color="tab:blue", zorder=3)
    # A little room past [0, 1] so markers at exactly 0 or 1 are not cut by the frame.
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ticks = [0, 0.25, 0.5, 0.75, 1]
    ax.set_xticks(ticks, ["0", "", "0.5", "", "1"])
    ax.set_yticks(ticks, ["0", "", "0.5", "", "1"])
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{name} (n={t.size}, {len(bins)} bins)\nECE {calib.ece:.3f}, mean p {calib.mean_prob:.3f} "
                 f"vs prevalence {t.mean():.3f}", fontsize=8.5)


def plot_calibration(y_true, y_prob, names: Sequence[str], out_png) -> Path:
    """Reliability diagram per class: observed frequency against mean predicted probability per decile bin.

    One panel per class with positives (diagonal = perfect calibration,
    marker area = rows in the bin, ECE and mean probability vs prevalence in
    the title); classes without positives are listed as skipped.
    """
    yt, yp, names = _check(y_true, y_prob, names)
    shown, skipped = [], []
    for j, name in enumerate(names):
        t, p = _class_rows(yt, yp, j)
        if t.sum() > 0:
            shown.append((name, t, p))
        else:
            skipped.append(f"{name} ({_why_skipped(t)})")
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _new_figure((max(5.0, 3.1 * cols + 0.6), 3.3 * rows + 1.1))  # wide enough for the title
    for k, (name, t, p) in enumerate(shown):
        _reliability_panel(fig.add_subplot(rows, cols, k + 1), name, t, p)
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
