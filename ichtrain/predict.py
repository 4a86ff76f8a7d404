"""``ichtrain evaluate`` and ``ichtrain predict``: a checkpoint applied to a store or a DICOM folder.

``predict --dicom-dir`` converts the folder into a temporary store with the
checkpoint's own preprocessing spec, through the converter's code (same HU,
windows, resize, study grouping and z order that ``--context`` needs), then
predicts from that store: there is one preprocessing path, not two.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ichprep.convert import convert
from ichprep.labels import LABELS
from ichprep.spec import PreprocessSpec
from ichprep.store import REJECTED, Store, open_store

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import ShardStream, select_slices, split_slices, targets, train_candidates
from .engine import evaluate
from .errors import ConfigError
from .metrics import youden_thresholds
from .model import build_model
from .plots import plot_roc_curves
from .train import amp_dtype_for, check_spec, resolve_device, run_metrics, write_predictions

logger = logging.getLogger(__name__)


def _load_model(state: dict, device: torch.device) -> torch.nn.Module:
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.arch, len(state["names"]), state["in_channels"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _run(model, store: Store, counts: np.ndarray, y: np.ndarray, context: int, device, batch_size: int,
         workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stream = ShardStream.from_store(store, counts, y, context=context, shuffle=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    return evaluate(model, loader, device, amp_dtype_for(device, True))


def evaluate_checkpoint(checkpoint: str | Path, store_path: str | Path, out: str | Path, split: str = "val",
                        device: str = "auto", batch_size: int = 64, workers: int = 2) -> dict:
    """Metrics, predictions and ROC plot of a checkpoint on the validation split (or all labelled slices)."""
    if split not in ("val", "all"):
        raise ConfigError(f"invalid split {split!r}; choose one of val, all")
    state = load_checkpoint(checkpoint)
    store = open_store(store_path)
    check_spec(store, state["spec"], f"checkpoint {checkpoint}")
    cfg = TrainConfig.from_dict(state["config"])
    names = tuple(state["names"])
    y = targets(store.slices, cfg.task)
    if split == "val":
        parts = split_slices(store.slices, cfg.val_fraction, cfg.seed, cfg.split_by)
        selection = select_slices(store.slices, store.studies, cfg.slice_selection)
        chosen = train_candidates(store.slices, parts, selection, cfg.task, "val")
    else:
        chosen = train_candidates(store.slices, np.full(len(store.slices), "val"), None, cfg.task, "val")
    counts = np.zeros(len(store.slices), np.int64)
    counts[chosen] = 1
    dev = resolve_device(device)
    probs, truth, slots = _run(_load_model(state, dev), store, counts, y, cfg.context, dev, batch_size, workers)
    # Sensitivity/specificity "at Youden" use the thresholds chosen on the run's validation split,
    # so numbers on other data are what a deployed threshold would give.
    thresholds = youden_thresholds(state["metrics"]) if state.get("metrics") else None
    metrics = run_metrics(truth, probs, names, store.slices["study_uid"].to_numpy()[slots], cfg.task, thresholds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.parquet", store, slots, probs, truth, names)
    plot_roc_curves(truth, probs, names, out / "roc.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _kaggle_rows(image_ids: list[str], table: np.ndarray) -> pd.DataFrame:
    """Kaggle's submission format: ``ID_<image>_<label>``, six rows per image in LABELS order."""
    ids = [f"{image_id}_{name}" for image_id in image_ids for name in LABELS]
    return pd.DataFrame({"ID": ids, "Label": table.reshape(-1)})


def _six_columns(probs: np.ndarray, names: tuple[str, ...], prevalence: dict[str, float]) -> np.ndarray:
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


def predict_store(checkpoint: str | Path, store_path: str | Path, out_csv: str | Path, device: str = "auto",
                  batch_size: int = 64, workers: int = 2, unreadable: list[str] | None = None) -> pd.DataFrame:
    """Write a Kaggle-format CSV for every slice of a store; unreadable slices get the training prevalence."""
    state = load_checkpoint(checkpoint)
    store = open_store(store_path)
    check_spec(store, state["spec"], f"checkpoint {checkpoint}")
    cfg = TrainConfig.from_dict(state["config"])
    names = tuple(state["names"])
    prevalence = dict(zip(names, state.get("train_prevalence", [0.5] * len(names))))
    ok = store.slices["ok"].to_numpy(bool)
    dev = resolve_device(device)
    y = np.zeros((len(store.slices), len(names)), np.float32)  # unused truth: predict needs no labels
    probs, _, slots = _run(_load_model(state, dev), store, ok.astype(np.int64), y, cfg.context, dev,
                           batch_size, workers)
    full = np.full((len(store.slices), len(names)), np.nan)
    full[slots] = probs
    fallback = np.array([prevalence.get(n, 0.5) for n in names])
    full[~ok] = fallback  # zero-filled slots: no pixels to judge
    image_ids = store.slices["image_id"].astype(str).tolist()
    extra = list(unreadable or [])
    if extra:
        image_ids += extra
        full = np.vstack([full, np.tile(fallback, (len(extra), 1))])
    no_pixels = store.slices.loc[~ok, "image_id"].astype(str).tolist() + extra
    if no_pixels:
        logger.warning("%d images have no readable pixels and get the training prevalence: %s", len(no_pixels),
                       ", ".join(no_pixels))
    frame = _kaggle_rows(image_ids, _six_columns(full, names, prevalence))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False, float_format="%.6f")
    logger.info("wrote %d predictions (%d images, %d without readable pixels) to %s",
                len(frame), len(image_ids), int((~ok).sum()) + len(extra), out_csv)
    return frame


def predict_dicoms(checkpoint: str | Path, dicom_dir: str | Path, out_csv: str | Path, device: str = "auto",
                   batch_size: int = 64, workers: int = 2, client=None) -> pd.DataFrame:
    """Convert ``dicom_dir`` with the checkpoint's spec into a temporary store, then predict from it."""
    state = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_attrs(state["spec"])
    with tempfile.TemporaryDirectory(prefix="ichtrain-predict-") as tmp:
        store = Path(tmp) / "cache.zarr"
        convert(dicom_dir, store, spec, client=client)
        rejected = pd.read_csv(store / REJECTED, dtype=str)
        unreadable = rejected.loc[rejected["stage"] == "header", "image_id"].tolist()
        return predict_store(checkpoint, store, out_csv, device, batch_size, workers, unreadable=unreadable)
