"""Stage 2 of an experiment: a sequence model over each study's z-ordered stage-1 outputs, on the same folds.

EXP/seq/
  seq.pt            the K fold models (fold k's model never trained on fold k's patients) and their settings
  oof.parquet       every labelled slot's stage-2 probabilities from the fold that did not train on it
  metrics.json      {"oof": ..., "stage1": the same slots' stage-1 block, "folds": [...], "any_max": ...}
EXP/compare.png     per-label log loss and AUC, stage 1 vs stage 2, out of fold
EXP/study_<uid>.png one study's stage-1 and stage-2 probabilities along z
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ichprep.storage.store import Store

from ..config import SEQ_INPUTS, SeqConfig, check_choice
from ..data.tables import targets
from ..engine import sigmoid
from ..errors import ConfigError
from ..evaluation.metrics import weighted_log_loss
from ..evaluation.plots import plot_compare, plot_study
from ..evaluation.report import write_predictions
from ..files import COMPARE_PLOT, METRICS, OOF, STAGE2_DIR, STAGE2_MODEL, study_plot
from ..tblog import write_stage2_logs
from .experiment import (
    Inferred,
    calibrated_oof,
    oof_block,
    oof_outputs,
    open_experiment,
    open_training_store,
    scored_slots,
)
from .external import write_reference
from .sequence import SeqInputs, cross_fit, save_seq

logger = logging.getLogger(__name__)


def study_ranges(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of every study in slot order: each study's slices are contiguous and z-sorted."""
    studies = store.studies.sort_values("start")
    return studies["start"].to_numpy(np.int64), studies["stop"].to_numpy(np.int64)


def seq_inputs(store: Store, outputs: Inferred, *, kind: str, task: str, slot_fold: np.ndarray) -> SeqInputs:
    """Stage 2's view of a store: one row per slot; slots without pixels get the mean of the others.

    ``slot_fold`` gives each slot's fold (a study takes its first slot's); labels of slots without pixels
    are dropped, as in every metric.
    """
    check_choice("stage-2 input", kind, SEQ_INPUTS)
    n = len(store.slices)
    logits = np.empty((n, outputs.logits.shape[1]), np.float32)
    logits[:] = outputs.logits.astype(np.float64).mean(axis=0)
    logits[outputs.slots] = outputs.logits
    if kind == "features":
        x = np.empty((n, outputs.features.shape[1]), np.float16)
        x[:] = outputs.features.astype(np.float32).mean(axis=0)
        x[outputs.slots] = outputs.features
    else:
        x = logits
    y = targets(store.slices, task)
    y[~store.slices["ok"].to_numpy(bool)] = np.nan
    starts, stops = study_ranges(store)
    return SeqInputs(
        x=x, logits=logits, targets=y, starts=starts, stops=stops, study_fold=np.asarray(slot_fold, np.int64)[starts]
    )


def any_max(probs: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """``any`` raised to the largest subtype probability (a bleed of any subtype is a bleed)."""
    if "any" not in names or len(names) < 2:
        return probs
    out = probs.copy()
    j = names.index("any")
    out[:, j] = np.maximum(out[:, j], np.delete(out, j, axis=1).max(axis=1))
    return out


def compare_table(stage1: dict, stage2: dict, names: tuple[str, ...]) -> str:
    """Per-label AUC and log loss of the two stages side by side, and the weighted log loss."""

    def cell(value) -> str:
        return "   -  " if value is None else f"{value:6.4f}"

    lines = [f"{'label':18s} {'AUC 1':>7s} {'AUC 2':>7s} {'loss 1':>7s} {'loss 2':>7s}"]
    for n in names:
        one, two = stage1["per_class"][n], stage2["per_class"][n]
        lines.append(
            f"{n:18s} {cell(one['roc_auc']):>7s} {cell(two['roc_auc']):>7s} {cell(one['log_loss']):>7s} "
            f"{cell(two['log_loss']):>7s}"
        )
    lines.append(
        f"{'weighted log loss':18s} {'':>7s} {'':>7s} {stage1['weighted_log_loss']:7.4f} "
        f"{stage2['weighted_log_loss']:7.4f}"
    )
    lines.append(
        f"{'study any AUC':18s} {cell(stage1.get('study_any_auc')):>7s} {cell(stage2.get('study_any_auc')):>7s}"
    )
    return "\n".join(lines)


def _showcase_study(inputs: SeqInputs, *, probs1: np.ndarray, probs2: np.ndarray, names: tuple[str, ...]) -> int:
    """The bleeding study whose slices stage 2 improved most (weighted log loss summed over its slices)."""
    best, gain = 0, -np.inf
    for s, (a, b) in enumerate(zip(inputs.starts, inputs.stops)):
        y = inputs.targets[a:b]
        labelled = ~np.isnan(y).any(axis=1)
        if not labelled.any() or not np.nansum(y) or np.isnan(probs2[a:b]).any():
            continue
        rows = labelled.sum()
        delta = rows * (
            weighted_log_loss(y[labelled], probs1[a:b][labelled], names)
            - weighted_log_loss(y[labelled], probs2[a:b][labelled], names)
        )
        if delta > gain:
            best, gain = s, delta
    return best


def run_seq(
    exp: str | Path, out: str | Path | None, cfg: SeqConfig, *, kind: str = "logits", calibrated: bool = True
) -> dict:
    """Cross-fit stage 2 on EXP's out-of-fold outputs; writes EXP/seq (or ``out``) and EXP's two figures.

    ``calibrated``: stage 2 reads (and corrects) the stage-1 logits after each fold's Platt map, so that every
    fold's logits mean the same thing; False reads them as the networks made them.
    """
    if cfg.model == "window" and kind != "logits":
        raise ConfigError(
            f"the window model reads stage 1's logits only; --inputs {kind} is for --model gru or transformer"
        )
    experiment = open_experiment(exp)
    store = open_training_store(experiment)
    task, names, seed = experiment.cfg.task, experiment.names, experiment.cfg.seed
    out = Path(out) if out is not None else experiment.path / STAGE2_DIR
    out.mkdir(parents=True, exist_ok=True)
    raw = oof_outputs(experiment, store)
    mapped = calibrated_oof(experiment, store, raw)
    calibrated = calibrated and experiment.cfg.calibration != "none"
    inputs = seq_inputs(store, mapped if calibrated else raw, kind=kind, task=task, slot_fold=experiment.fold)
    fitted = cross_fit(inputs, cfg, names)
    save_seq(
        out / STAGE2_MODEL,
        fitted.fitted,
        cfg,
        names=names,
        in_dim=inputs.x.shape[1],
        inputs_kind=kind,
        calibrated=calibrated,
    )

    slots = scored_slots(store, task)
    probs1 = sigmoid(mapped.logits[np.searchsorted(mapped.slots, slots)])
    probs2 = fitted.probs[slots].astype(np.float32)
    truth = inputs.targets[slots]
    fold = experiment.fold[slots]
    write_predictions(out / OOF, store, slots=slots, probs=probs2, truth=truth, names=names, columns={"fold": fold})
    write_reference(out / OOF)
    stage1 = oof_block(store, slots, probs1, names=names, task=task, seed=seed)
    stage2 = oof_block(store, slots, probs2, names=names, task=task, seed=seed)
    per_fold = [
        {
            "fold": k,
            "weighted_log_loss": weighted_log_loss(truth[fold == k], probs2[fold == k], names),
            "stage1_weighted_log_loss": weighted_log_loss(truth[fold == k], probs1[fold == k], names),
            "history": f.history,
        }
        for k, f in zip(sorted(set(fold.tolist())), fitted.fitted)
    ]
    any_rule = {
        f"stage{i}": {
            "weighted_log_loss": weighted_log_loss(truth, p, names),
            "with_any_max": weighted_log_loss(truth, any_max(p, names), names),
        }
        for i, p in ((1, probs1), (2, probs2))
    }
    summary = {
        "oof": stage2,
        "stage1": stage1,
        "folds": per_fold,
        "any_max": any_rule,
        "config": {**dataclasses.asdict(cfg), "inputs": kind, "calibrated": calibrated},
    }
    (out / METRICS).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    if experiment.cfg.tb:
        write_stage2_logs(out, per_fold, stage2)

    plot_compare(stage1, stage2, names, experiment.path / COMPARE_PLOT)
    shown = inputs if calibrated else seq_inputs(store, mapped, kind="logits", task=task, slot_fold=experiment.fold)
    full1, full2 = sigmoid(shown.logits), fitted.probs
    s = _showcase_study(inputs, probs1=full1, probs2=full2, names=names)
    a, b = inputs.starts[s], inputs.stops[s]
    uid = str(store.slices["study_uid"].iloc[a])
    for stale in experiment.path.glob(study_plot("*")):  # the showcase of an earlier stage 2
        stale.unlink()
    plot_study(
        full1[a:b],
        full2[a:b],
        inputs.targets[a:b],
        names=names,
        title=f"study {uid}: stage 1 (dashed) vs stage 2",
        out_png=experiment.path / study_plot(uid),
    )
    logger.info(
        "stage 2 (%s on %s): out-of-fold weighted log loss %.4f vs stage 1 %.4f on %d slices",
        cfg.model,
        kind,
        stage2["weighted_log_loss"],
        stage1["weighted_log_loss"],
        len(slots),
    )
    return summary
