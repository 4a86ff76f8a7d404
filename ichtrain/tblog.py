"""A run's TensorBoard log, ``RUN/tb/`` (``tensorboard --logdir RUN``; ``--no-tb`` writes none).

Scalars ``train/loss``, ``train/lr`` and ``train/samples_per_s`` at every progress point of an epoch (the
step counts across epochs); per epoch ``val/weighted_log_loss`` (with its 95 % interval), ``val/mean_auc``,
``val/mean_ece``, and per label ``auc``, ``log_loss`` (each with its interval), ``ece`` and ``mean_prob``
against ``prevalence``; per label a PR curve and a ROC figure; and a figure of validation slices (the three
windows side by side) titled with each slice's truth and predicted ``any``.  cv's folds are train runs, so
each writes its own ``EXP/fold{k}/tb``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import Predictions

TB_DIR = "tb"
_SHOWN_SLICES = 6


class RunLog:
    """Writes one run's events; every method does nothing when the log is off (``enabled`` False)."""

    def __init__(self, out: str | Path, *, enabled: bool, names: tuple[str, ...]):
        self.names = names
        self.step = 0
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / TB_DIR))

    def train_progress(self, inner, lr):
        """An ``on_log(steps, loss, samples/s)`` that logs, then calls ``inner`` (the progress bar) if any."""

        def on_log(steps: int, loss: float, rate: float) -> None:
            self.step += steps
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, self.step)
                self.writer.add_scalar("train/lr", lr(), self.step)
                self.writer.add_scalar("train/samples_per_s", rate, self.step)
            if inner is not None:
                inner(steps, loss, rate)

        return on_log

    def epoch(self, epoch: int, metrics: dict, preds: Predictions, images: np.ndarray | None) -> None:
        """The epoch's validation: metrics per label with intervals, curves, and a figure of slices."""
        if self.writer is None:
            return
        w, e = self.writer, epoch + 1
        for key in ("weighted_log_loss", "mean_auc", "mean_ece", "study_any_auc"):
            if metrics.get(key) is not None:
                w.add_scalar(f"val/{key}", metrics[key], e)
        interval = (metrics.get("ci95") or {}).get("weighted_log_loss")
        if interval:
            w.add_scalars("val/weighted_log_loss_ci95", {"lo": interval[0], "hi": interval[1]}, e)
        for j, name in enumerate(self.names):
            per = metrics["per_class"].get(name) or {}
            for key in ("roc_auc", "log_loss", "ece", "mean_prob", "prevalence"):
                if per.get(key) is not None:
                    w.add_scalar(f"{name}/{key}", per[key], e)
            for key in ("roc_auc", "log_loss"):
                ci = (per.get("ci95") or {}).get(key)
                if ci:
                    w.add_scalars(f"{name}/{key}_ci95", {"lo": ci[0], "hi": ci[1]}, e)
            truth, prob = preds.targets[:, j], preds.probs[:, j]
            known = ~np.isnan(truth)
            if known.any():
                w.add_pr_curve(f"{name}/pr", truth[known].astype(bool), prob[known], e)
        from .evaluation.plots import roc_figure

        w.add_figure("val/roc", roc_figure(preds.targets, preds.probs, self.names), e)
        if images is not None:
            w.add_figure("val/slices", _slices_figure(images, preds, self.names), e)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def shown_slices(preds: Predictions) -> np.ndarray:
    """The validation rows drawn each epoch: the first few positive and negative slices by ``any``, fixed."""
    any_truth = preds.targets[:, -1]
    pos, neg = np.flatnonzero(any_truth == 1), np.flatnonzero(any_truth == 0)
    half = _SHOWN_SLICES // 2
    return np.sort(np.r_[pos[:half], neg[: _SHOWN_SLICES - min(half, len(pos))]])


def _slices_figure(images: np.ndarray, preds: Predictions, names: tuple[str, ...]):
    """One row per slice: its windows side by side, titled with truth and prediction of the last label."""
    from matplotlib.figure import Figure

    rows = shown_slices(preds)
    fig = Figure(figsize=(2.0 * images.shape[1], 2.1 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), images.shape[1], squeeze=False)
    for r, row in enumerate(rows):
        for c in range(images.shape[1]):
            ax = axes[r][c]
            ax.imshow(images[r, c], cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
        label = names[-1]
        axes[r][0].set_title(
            f"slot {int(preds.slots[row])}: true {label} {preds.targets[row, -1]:.0f}, p {preds.probs[row, -1]:.2f}",
            fontsize=8,
            loc="left",
        )
    return fig


def write_stage2_logs(out: str | Path, per_fold: list[dict], oof: dict) -> None:
    """``EXP/seq/tb/fold{k}``: each stage-2 fold's training and holdout loss and lr by epoch; and the out-of-fold
    weighted log loss and AUCs of stage 2 at the last step of the first fold's log."""
    from torch.utils.tensorboard import SummaryWriter

    for fold in per_fold:
        with SummaryWriter(str(Path(out) / TB_DIR / f"fold{fold['fold']}")) as w:
            for row in fold["history"]:
                for key in ("train_loss", "holdout_loss", "lr"):
                    if row.get(key) is not None:
                        w.add_scalar(f"seq/{key}", row[key], row["epoch"])
            w.add_scalar("seq/fold_weighted_log_loss", fold["weighted_log_loss"], len(fold["history"]))
    with SummaryWriter(str(Path(out) / TB_DIR / "oof")) as w:
        w.add_scalar("oof/weighted_log_loss", oof["weighted_log_loss"], 0)
        for name, per in oof["per_class"].items():
            if per.get("roc_auc") is not None:
                w.add_scalar(f"oof/{name}_roc_auc", per["roc_auc"], 0)
