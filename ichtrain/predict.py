"""A checkpoint applied to a store: loading it, evaluating it, and its outputs in Kaggle's six columns.

Several checkpoints and experiments together, and DICOM folders, are :mod:`ichtrain.submit`'s job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ichprep.labels import LABELS
from ichprep.store import Store, open_store

from .config import EVAL_SPLITS, INFER_BATCH_SIZE, INFER_WORKERS, TrainConfig, check_choice
from .data import ShardStream, targets, train_candidates
from .engine import Outputs, Predictions, infer, sigmoid
from .errors import ConfigError
from .folds import run_split
from .metrics import youden_thresholds
from .model import build_model
from .recalibrate import Platt
from .train import (
    add_middle_block,
    amp_dtype_for,
    batch_loader,
    calibrate_validation,
    checkpoint_for_store,
    resolve_device,
    run_metrics,
    store_identity,
    uncalibrated_block,
    validation_parts,
    write_figures,
)

logger = logging.getLogger(__name__)

#: Submitted probabilities stay inside [CLIP, 1 - CLIP]: written with 6 decimals, a smaller one would read as 0.
CLIP = 1e-6


class Loaded(NamedTuple):
    """A checkpoint applied to a store: everything evaluate and predict need."""

    state: dict
    cfg: TrainConfig
    names: tuple[str, ...]
    store: Store
    device: torch.device
    model: torch.nn.Module


def as_store(store: Store | str | Path) -> Store:
    """``store`` itself when it is already open (its tables read once for many uses), else the store at that path."""
    return store if isinstance(store, Store) else open_store(store)


def load_for_store(checkpoint: str | Path, store: Store | str | Path, device: str = TrainConfig.device) -> Loaded:
    """Load a checkpoint, refuse a store of another preprocessing, build the model on ``device``."""
    store = as_store(store)
    state = checkpoint_for_store(checkpoint, store)
    cfg = TrainConfig.from_dict(state["config"])
    names = tuple(state["names"])
    dev = resolve_device(device)
    model = build_model(
        cfg.arch, n_outputs=len(names), windows=len(state["spec"]["windows"]), slices=2 * cfg.context + 1
    )
    model.load_state_dict(state["model"])
    return Loaded(state=state, cfg=cfg, names=names, store=store, device=dev, model=model.to(dev).eval())


def calibrated_probs(loaded: Loaded, logits: np.ndarray) -> np.ndarray:
    """The checkpoint's probabilities: its logits through the Platt map stored with it (none: as trained)."""
    return sigmoid(Platt.from_state(loaded.state, len(loaded.names))(logits))


def infer_loaded(
    loaded: Loaded,
    mask: np.ndarray,
    *,
    y: np.ndarray | None = None,
    tta: str = "none",
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
    features: bool = False,
) -> Outputs:
    """The model's outputs on the readable slots in ``mask``, each shard read once, in store order.

    ``y`` (N, K) gives the targets passed along with each slot (zeros when None).
    """
    store = loaded.store
    counts = (mask & store.slices["ok"].to_numpy(bool)).astype(np.int64)
    if y is None:
        y = np.zeros((len(store.slices), len(loaded.names)), np.float32)
    stream = ShardStream.from_store(store, counts, y, context=loaded.cfg.context, shuffle=False, batch_size=batch_size)
    return infer(
        loaded.model,
        batch_loader(stream, workers, loaded.device),
        image_size=loaded.cfg.image_size,
        device=loaded.device,
        amp_dtype=amp_dtype_for(loaded.device, True),
        tta=tta,
        features=features,
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    store_path: Store | str | Path,
    out: str | Path,
    split: str = "val",
    device: str = TrainConfig.device,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
    tta: str = "none",
) -> dict:
    """Metrics (with study-bootstrap intervals), predictions, ROC and calibration plots of a checkpoint.

    ``split="val"``: every labelled slice of the run's validation patients; ``"all"``: every labelled slice.
    """
    check_choice("split", split, EVAL_SPLITS)
    loaded = load_for_store(checkpoint, store_path, device)
    store, cfg, names = loaded.store, loaded.cfg, loaded.names
    y = targets(store.slices, cfg.task)
    if split == "val":
        parts = run_split(
            store.slices, val_fraction=cfg.val_fraction, seed=cfg.seed, by=cfg.split_by, folds=cfg.folds, fold=cfg.fold
        )
    else:
        parts = np.full(len(store.slices), "val")
    mask = np.zeros(len(store.slices), bool)
    mask[train_candidates(store.slices, parts, None, task=cfg.task, part="val")] = True
    outputs = infer_loaded(loaded, mask, y=y, tta=tta, batch_size=batch_size, workers=workers)
    state = loaded.state
    if split == "val" and state.get("calibration") and state.get("store_identity") == store_identity(store):
        # The stored map was fitted on these very slices: score them cross-fitted, as training did.
        parts = validation_parts(store, cfg, np.flatnonzero(mask))
        calibrated = calibrate_validation(outputs, names=names, parts=parts, method=cfg.calibration)
        preds, uncalibrated = calibrated.preds, calibrated.uncalibrated
    else:
        probs = calibrated_probs(loaded, outputs.logits)
        preds = Predictions(probs=probs, targets=outputs.targets, slots=outputs.slots)
        raw = sigmoid(outputs.logits)
        uncalibrated = uncalibrated_block(outputs.targets, raw, names) if state.get("calibration") else None
    # "At Youden" uses the run's validation thresholds: on other data, what a deployed threshold would give.
    thresholds = youden_thresholds(state["metrics"]) if state.get("metrics") else None
    study = store.slices["study_uid"].to_numpy()[preds.slots]
    metrics = run_metrics(
        preds.targets, preds.probs, names=names, study_ids=study, task=cfg.task, thresholds=thresholds, seed=cfg.seed
    )
    if uncalibrated is not None:
        metrics["uncalibrated"] = uncalibrated
    metrics = add_middle_block(
        metrics, preds, selection=cfg.slice_selection, store=store, names=names, task=cfg.task, seed=cfg.seed
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_figures(out, preds, names=names, store=store, predictions="predictions.parquet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def kaggle_rows(image_ids: list[str], table: np.ndarray) -> pd.DataFrame:
    """Kaggle's submission format: ``ID_<image>_<label>``, six rows per image in LABELS order."""
    ids = [f"{image_id}_{name}" for image_id in image_ids for name in LABELS]
    return pd.DataFrame({"ID": ids, "Label": table.reshape(-1)})


def six_columns(probs: np.ndarray, names: tuple[str, ...], prevalence: dict[str, float]) -> np.ndarray:
    """Fill all six Kaggle labels: the model's outputs where it has them, else derived or prevalence.

    A binary model has no subtype outputs (they get the training prevalence); a subtype model has no
    ``any`` output (it gets the maximum subtype probability, since any = OR of the subtypes).
    """
    table = np.empty((len(probs), len(LABELS)), np.float64)
    for j, name in enumerate(LABELS):
        if name in names:
            table[:, j] = probs[:, names.index(name)]
        elif name == "any":
            table[:, j] = probs.max(axis=1) if len(names) else prevalence.get("any", 0.5)
        else:
            table[:, j] = prevalence.get(name, 0.0)
    return table


def check_task(loaded: Loaded, checkpoint, allow_subtypes_only: bool) -> None:
    """A subtypes-only model never saw a normal slice: its ``any`` (the max subtype) is not a detector."""
    if "any" in loaded.names:
        return
    message = (
        f"checkpoint {checkpoint} was trained with --task {loaded.cfg.task} on bleeding slices only, so it "
        "never learned to reject normal slices and its 'any' (max subtype) is not a hemorrhage detector"
    )
    if not allow_subtypes_only:
        raise ConfigError(
            f"{message}; predict with an rsna or binary checkpoint, or pass --allow-subtypes-only "
            "to write these probabilities anyway"
        )
    logger.warning("%s; writing them anyway (--allow-subtypes-only)", message)
