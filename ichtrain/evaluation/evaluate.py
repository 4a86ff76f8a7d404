"""A checkpoint applied to a store: loading it, its outputs, and ``ichtrain evaluate``.

Several checkpoints and experiments together, and DICOM folders, are :mod:`ichtrain.study.submit`'s job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ichprep.storage.store import Store, open_store

from ..checkpoint import Checkpoint, checkpoint_for_store, store_identity
from ..config import EVAL_SPLITS, INFER_BATCH_SIZE, INFER_WORKERS, TrainConfig, check_choice
from ..data.folds import run_split
from ..data.loader import batch_loader
from ..data.stream import ShardStream
from ..data.tables import targets, train_candidates
from ..device import amp_dtype_for, resolve_device
from ..engine import Outputs, infer, sigmoid
from ..model import build_model
from .metrics import youden_thresholds
from .recalibrate import Platt
from .report import score, through_map, validate_epoch, validation_parts, write_report

logger = logging.getLogger(__name__)


class Loaded(NamedTuple):
    """A checkpoint applied to a store: everything evaluate and predict need."""

    checkpoint: Checkpoint
    cfg: TrainConfig
    names: tuple[str, ...]
    store: Store
    device: torch.device
    model: torch.nn.Module

    @property
    def platt(self) -> Platt:
        """The checkpoint's Platt map (the identity for a run without one)."""
        return Platt.from_dict(self.checkpoint.calibration, len(self.names))


def as_store(store: Store | str | Path) -> Store:
    """``store`` itself when it is already open (its tables read once for many uses), else the store at that path."""
    return store if isinstance(store, Store) else open_store(store)


def load_for_store(checkpoint: str | Path, store: Store | str | Path, device: str = TrainConfig.device) -> Loaded:
    """Load a checkpoint, refuse a store of another preprocessing, build the model on ``device``."""
    store = as_store(store)
    saved = checkpoint_for_store(checkpoint, store)
    cfg = TrainConfig.from_dict(saved.config)
    names = tuple(saved.names)
    dev = resolve_device(device)
    model = build_model(cfg.arch, n_outputs=len(names), windows=len(saved.spec["windows"]), slices=2 * cfg.context + 1)
    model.load_state_dict(saved.model)
    return Loaded(checkpoint=saved, cfg=cfg, names=names, store=store, device=dev, model=model.to(dev).eval())


def calibrated_probs(loaded: Loaded, logits: np.ndarray) -> np.ndarray:
    """The checkpoint's probabilities: its logits through the Platt map stored with it (none: as trained)."""
    return sigmoid(loaded.platt(logits))


def loader_for(
    loaded: Loaded,
    mask: np.ndarray,
    *,
    y: np.ndarray | None = None,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
):
    """Batches of the readable slots in ``mask``, each shard read once, in store order.

    ``y`` (N, K) gives the targets passed along with each slot (zeros when None).
    """
    store = loaded.store
    counts = (mask & store.slices["ok"].to_numpy(bool)).astype(np.int64)
    if y is None:
        y = np.zeros((len(store.slices), len(loaded.names)), np.float32)
    stream = ShardStream.from_store(store, counts, y, context=loaded.cfg.context, shuffle=False, batch_size=batch_size)
    return batch_loader(stream, workers, loaded.device)


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
    """The model's outputs on the readable slots in ``mask`` (:func:`loader_for`)."""
    return infer(
        loaded.model,
        loader_for(loaded, mask, y=y, batch_size=batch_size, workers=workers),
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
    store, cfg, names, saved = loaded.store, loaded.cfg, loaded.names, loaded.checkpoint
    y = targets(store.slices, cfg.task)
    if split == "val":
        parts = run_split(
            store.slices, val_fraction=cfg.val_fraction, seed=cfg.seed, by=cfg.split_by, folds=cfg.folds, fold=cfg.fold
        )
    else:
        parts = np.full(len(store.slices), "val")
    mask = np.zeros(len(store.slices), bool)
    mask[train_candidates(store.slices, parts, None, task=cfg.task, part="val")] = True
    # "At Youden" uses the run's validation thresholds: on other data, what a deployed threshold would give.
    thresholds = youden_thresholds(saved.metrics) if saved.metrics else None
    common = dict(store=store, cfg=cfg, names=names, thresholds=thresholds)
    if split == "val" and saved.calibration and saved.store_identity == store_identity(store):
        # The stored map was fitted on these very slices: score them cross-fitted, as training did.
        validation = validate_epoch(
            loaded.model,
            loader_for(loaded, mask, y=y, batch_size=batch_size, workers=workers),
            parts=validation_parts(store, cfg, np.flatnonzero(mask)),
            device=loaded.device,
            amp_dtype=amp_dtype_for(loaded.device, True),
            tta=tta,
            **common,
        )
        preds, metrics = validation.preds, validation.metrics
    else:
        outputs = infer_loaded(loaded, mask, y=y, tta=tta, batch_size=batch_size, workers=workers)
        calibrated = through_map(outputs, names=names, platt=loaded.platt if saved.calibration else None)
        preds, metrics = calibrated.preds, score(calibrated, **common)
    write_report(out, preds, metrics, names=names, store=store)
    return metrics
