"""The validation report: recalibrated figures of one pass, the network's own beside them, predictions and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ichprep.storage.store import Store

from ..config import TrainConfig
from ..data.tables import select_slices
from ..device import gather
from ..engine import Outputs, Predictions, infer, sigmoid
from ..files import CALIBRATION_PLOT, METRICS, PREDICTIONS, ROC_PLOT
from .metrics import compute_metrics, reference_table
from .plots import plot_calibration, plot_roc_curves
from .recalibrate import Platt, cross_fit, cross_fit_parts, fit_platt

logger = logging.getLogger(__name__)


def run_metrics(
    truth: np.ndarray,
    probs: np.ndarray,
    *,
    names: tuple[str, ...],
    study_ids: np.ndarray,
    task: str,
    thresholds: dict | None = None,
    seed: int = 0,
) -> dict:
    """compute_metrics (with study-bootstrap intervals), plus the reference thesis's table for --task binary.

    ``thresholds`` (per class) replace the Youden thresholds of these data, e.g. the validation ones.
    """
    metrics = compute_metrics(truth, probs, names, study_ids=study_ids, thresholds=thresholds, seed=seed)
    if task == "binary":
        metrics["reference_table"] = reference_table(metrics)
    return metrics


def uncalibrated_block(truth: np.ndarray, probs: np.ndarray, names: tuple[str, ...]) -> dict:
    """The headline figures of the network's own probabilities, kept beside the recalibrated ones."""
    raw = compute_metrics(truth, probs, names, bootstrap=0)
    return {
        "weighted_log_loss": raw["weighted_log_loss"],
        "mean_ece": raw["mean_ece"],
        "mean_auc": raw["mean_auc"],
        "mean_prob": {name: m["mean_prob"] for name, m in raw["per_class"].items()},
        "log_loss": {name: m["log_loss"] for name, m in raw["per_class"].items()},
        # Cross-fitted parts pass through different maps, so their pooled AUC may differ from the network's.
        "roc_auc": {name: m["roc_auc"] for name, m in raw["per_class"].items()},
    }


class Calibrated(NamedTuple):
    """One validation pass, recalibrated (or as trained with ``--calibration none``)."""

    preds: Predictions  # probabilities each scored by a map not fitted on its patient
    platt: Platt | None  # fitted on every validation slice: the map the checkpoint applies to new data
    uncalibrated: dict | None  # :func:`uncalibrated_block` of the network's own probabilities


def calibrate_validation(out: Outputs, *, names: tuple[str, ...], parts: np.ndarray | None, method: str) -> Calibrated:
    """Recalibrate a validation pass: cross-fitted over ``parts`` (slot -> part, -1 outside validation)."""
    if method == "none":
        preds = Predictions(probs=sigmoid(out.logits), targets=out.targets, slots=out.slots)
        return Calibrated(preds=preds, platt=None, uncalibrated=None)
    held_out = cross_fit(out.logits, out.targets, None if parts is None else parts[out.slots])
    return Calibrated(
        preds=Predictions(probs=sigmoid(held_out), targets=out.targets, slots=out.slots),
        platt=fit_platt(out.logits, out.targets),
        uncalibrated=uncalibrated_block(out.targets, sigmoid(out.logits), names),
    )


def through_map(out: Outputs, *, names: tuple[str, ...], platt: Platt | None) -> Calibrated:
    """A pass through a stored map (fitted on other slices: nothing to cross-fit), the network's own beside."""
    if platt is None:
        return calibrate_validation(out, names=names, parts=None, method="none")
    preds = Predictions(probs=sigmoid(platt(out.logits)), targets=out.targets, slots=out.slots)
    return Calibrated(
        preds=preds, platt=platt, uncalibrated=uncalibrated_block(out.targets, sigmoid(out.logits), names)
    )


def score(
    calibrated: Calibrated, *, store: Store, cfg: TrainConfig, names: tuple[str, ...], thresholds: dict | None = None
) -> dict:
    """The metrics block of a recalibrated pass: figures with intervals, the network's own, the middle slices."""
    preds = calibrated.preds
    study = store.slices["study_uid"].to_numpy()[preds.slots]
    metrics = run_metrics(
        preds.targets, preds.probs, names=names, study_ids=study, task=cfg.task, thresholds=thresholds, seed=cfg.seed
    )
    if calibrated.uncalibrated is not None:
        metrics["uncalibrated"] = calibrated.uncalibrated
    return add_middle_block(
        metrics, preds, selection=cfg.slice_selection, store=store, names=names, task=cfg.task, seed=cfg.seed
    )


class Validation(NamedTuple):
    """One scored validation pass: what an epoch reports and its checkpoint keeps."""

    preds: Predictions
    platt: Platt | None
    metrics: dict


def validate_epoch(
    model: torch.nn.Module,
    loader,
    *,
    store: Store,
    cfg: TrainConfig,
    names: tuple[str, ...],
    parts: np.ndarray | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: str = "none",
    thresholds: dict | None = None,
    world: int = 1,
) -> Validation:
    """Infer the validation patients (gathered from every rank), recalibrate cross-fitted over ``parts``, score."""
    out = infer(
        model,
        loader,
        image_size=cfg.image_size,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        tta=tta,
    )
    out = out._replace(**{key: gather(getattr(out, key), world) for key in ("logits", "targets", "slots")})
    calibrated = calibrate_validation(out, names=names, parts=parts, method=cfg.calibration)
    metrics = score(calibrated, store=store, cfg=cfg, names=names, thresholds=thresholds)
    return Validation(preds=calibrated.preds, platt=calibrated.platt, metrics=metrics)


def validation_parts(store: Store, cfg: TrainConfig, val_slots: np.ndarray) -> np.ndarray | None:
    """Every slot's cross-fit part (-1 outside validation), None where validation holds a single patient."""
    parts = cross_fit_parts(store.slices, val_slots, seed=cfg.seed, by=cfg.split_by)
    if parts is None:
        logger.warning("validation holds one %s: its figures are not recalibrated", cfg.split_by)
        return None
    of_slot = np.full(len(store.slices), -1, np.int64)
    of_slot[val_slots] = parts
    return of_slot


def add_middle_block(
    metrics: dict, preds: Predictions, *, selection: str, store: Store, names: tuple[str, ...], task: str, seed: int
) -> dict:
    """With --slice-selection middle:K, the reference method's figures on those slices, as an extra block."""
    if selection == "all":
        return metrics
    keep = select_slices(store.slices, store.studies, selection)[preds.slots]
    study = store.slices["study_uid"].to_numpy()[preds.slots[keep]]
    block = run_metrics(preds.targets[keep], preds.probs[keep], names=names, study_ids=study, task=task, seed=seed)
    return {**metrics, "middle_slices": {"selection": selection, **block}}


def write_predictions(
    path: Path,
    store: Store,
    *,
    slots: np.ndarray,
    probs: np.ndarray,
    truth: np.ndarray,
    names: tuple[str, ...],
    columns: dict[str, np.ndarray] | None = None,
) -> None:
    """One row per slot: ids, any extra ``columns`` (e.g. fold), then true_<label> and prob_<label>."""
    rows = store.slices.iloc[slots]
    frame = pd.DataFrame(
        {
            "slot": slots,
            "image_id": rows["image_id"].to_numpy(),
            "study_uid": rows["study_uid"].to_numpy(),
            **(columns or {}),
        }
    )
    for j, name in enumerate(names):
        frame[f"true_{name}"] = truth[:, j]
        frame[f"prob_{name}"] = probs[:, j]
    frame.to_parquet(path, index=False)


def write_figures(out: Path, preds: Predictions, *, names: tuple[str, ...], store: Store, predictions: str) -> None:
    """The ``predictions`` parquet file, roc.png and calibration.png of one prediction set."""
    write_predictions(out / predictions, store, slots=preds.slots, probs=preds.probs, truth=preds.targets, names=names)
    plot_roc_curves(preds.targets, preds.probs, names, out / ROC_PLOT)
    plot_calibration(preds.targets, preds.probs, names, out / CALIBRATION_PLOT)


def write_report(out: str | Path, preds: Predictions, metrics: dict, *, names: tuple[str, ...], store: Store) -> Path:
    """``ichtrain evaluate``'s folder: predictions.parquet, roc.png, calibration.png and metrics.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_figures(out, preds, names=names, store=store, predictions=PREDICTIONS)
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return out
