"""``ichtrain train``: the training run, from an ichprep store to checkpoints, metrics and plots.

Single process on CPU or one GPU, or distributed data parallel under
``torchrun`` (NCCL on GPU, gloo on CPU): each rank streams a disjoint set of
shards, validation predictions are gathered on every rank, and only rank 0
writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from ichprep.spec import PreprocessSpec
from ichprep.store import Store, open_store

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import TASKS, ShardStream, epoch_plan, is_positive, select_slices, split_slices, targets, train_candidates
from .engine import evaluate, loss_weights, train_one_epoch
from .errors import CheckpointError, ConfigError, DataError, SpecMismatchError
from .metrics import compute_metrics, reference_table
from .model import build_model
from .plots import plot_loss_curves, plot_roc_curves

logger = logging.getLogger(__name__)

#: Config fields a resumed run must share with its checkpoint (the rest, e.g. epochs or workers, may change).
RESUME_FIXED = ("task", "arch", "context", "image_size", "split_by", "val_fraction", "slice_selection", "seed",
                "balance", "pos_fraction", "optimizer", "scheduler")


# ---------------------------------------------------------------- process setup

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it, fp16 (with a GradScaler) on older ones; full precision on CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _gather(array: np.ndarray, world: int) -> np.ndarray:
    if world == 1:
        return array
    parts = [None] * world
    dist.all_gather_object(parts, array)
    return np.concatenate([p for p in parts if len(p)]) if any(len(p) for p in parts) else array


# ---------------------------------------------------------------- data

def check_spec(store: Store, spec_attrs: dict, where: str) -> None:
    """Refuse a store whose preprocessing differs from what the model was trained on."""
    trained = PreprocessSpec.from_attrs(spec_attrs)
    mismatch = trained.describe_mismatch(store.spec)
    if mismatch:
        raise SpecMismatchError(
            f"{store.root} was made with another preprocessing spec than {where} ({mismatch}); "
            "convert the data again with the checkpoint's windows and size"
        )


def _streams(store: Store, cfg: TrainConfig, split: np.ndarray, y: np.ndarray, rank: int, world: int):
    selection = select_slices(store.slices, store.studies, cfg.slice_selection)
    train_idx = train_candidates(store.slices, split, selection, cfg.task, "train")
    val_idx = train_candidates(store.slices, split, selection, cfg.task, "val")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{len(train_idx)} training and {len(val_idx)} validation slices: both must be > 0 "
                        "(is the store labelled? is --val-fraction sensible for this many patients?)")
    val_counts = np.zeros(len(store.slices), np.int64)
    val_counts[val_idx] = 1
    common = dict(targets=y, context=cfg.context, seed=cfg.seed, rank=rank, world_size=world)
    train = ShardStream.from_store(store, np.zeros(len(store.slices), np.int64), shuffle=True,
                                   buffer_shards=cfg.buffer_shards, **common)
    val = ShardStream.from_store(store, val_counts, shuffle=False, **common)
    return train, val, train_idx, val_idx


def _loader(stream, cfg: TrainConfig, device: torch.device):
    # No persistent workers: each epoch's iterator hands workers a fresh copy of the stream (new epoch plan).
    return torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None)


# ---------------------------------------------------------------- optimisation

def build_optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=2)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return optimizer, scheduler


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- outputs

def run_metrics(truth: np.ndarray, probs: np.ndarray, names: tuple[str, ...], study_ids: np.ndarray,
                task: str, thresholds: dict | None = None) -> dict:
    """compute_metrics, plus the reference thesis's table (accuracy, recall, F1, ROC AUC) for --task binary.

    ``thresholds`` (per class) replace the Youden thresholds of these data, e.g. the validation ones.
    """
    metrics = compute_metrics(truth, probs, names, study_ids=study_ids, thresholds=thresholds)
    if task == "binary":
        metrics["reference_table"] = reference_table(metrics)
    return metrics


def write_predictions(path: Path, store: Store, slots: np.ndarray, probs: np.ndarray, truth: np.ndarray,
                      names: tuple[str, ...]) -> None:
    rows = store.slices.iloc[slots]
    frame = pd.DataFrame({"slot": slots, "image_id": rows["image_id"].to_numpy(),
                          "study_uid": rows["study_uid"].to_numpy()})
    for j, name in enumerate(names):
        frame[f"true_{name}"] = truth[:, j]
        frame[f"prob_{name}"] = probs[:, j]
    frame.to_parquet(path, index=False)


def _json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def _clean(value):
    """JSON-safe numbers (NaN -> None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- the run

def train(cfg: TrainConfig, progress: Callable[[str, int], Callable] | None = None) -> dict:
    """Run training; returns the final validation metrics. ``progress(desc, total)`` makes a step callback."""
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    store = open_store(cfg.store)
    names = TASKS[cfg.task]

    checkpoint = None
    if cfg.resume:
        checkpoint = load_checkpoint(cfg.resume)
        check_spec(store, checkpoint["spec"], f"checkpoint {cfg.resume}")
        saved = checkpoint["config"]
        changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise CheckpointError(f"--resume {cfg.resume}: options differ from the checkpoint's run ({', '.join(changed)}); "
                                  "resume with the same options, or start a new run")

    y = targets(store.slices, cfg.task)
    split = split_slices(store.slices, cfg.val_fraction, cfg.seed, cfg.split_by)
    train_stream, val_stream, train_idx, val_idx = _streams(store, cfg, split, y, rank, world)
    positive = is_positive(store.slices)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"image_id": store.slices["image_id"], "study_uid": store.slices["study_uid"],
                      "patient_id": store.slices["patient_id"], "split": split}).to_parquet(out / "split.parquet")
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    logger.info("%d training and %d validation slices (split by %s)", len(train_idx), len(val_idx), cfg.split_by)

    in_channels = train_stream.sample_shape[0]
    model = build_model(cfg.arch, len(names), in_channels, cfg.pretrained if checkpoint is None else None).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    amp_dtype = amp_dtype_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, best, history = 0, math.inf, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best, history = checkpoint["epoch"] + 1, checkpoint["best_val_loss"], list(checkpoint["history"])
        _set_rng_state(checkpoint["rng"], device)
        logger.info("resumed from %s at epoch %d", cfg.resume, start_epoch + 1)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    weights = loss_weights(names, device)
    metrics = checkpoint["metrics"] if checkpoint is not None else {}
    study_of = store.slices["study_uid"].to_numpy()  # for the study-level AUC, slot -> study
    train_prevalence = [float(np.nanmean(y[train_idx, j])) for j in range(len(names))]

    for epoch in range(start_epoch, cfg.epochs):
        counts = epoch_plan(train_idx, positive, cfg.balance, cfg.pos_fraction, cfg.seed, epoch)
        train_stream.set_epoch(epoch, counts)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        steps = train_stream.batches(cfg.batch_size, cfg.workers)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        bar = progress(f"epoch {epoch + 1}/{cfg.epochs}", steps) if progress and rank == 0 else None
        stats = train_one_epoch(net, _loader(train_stream, cfg, device), optimizer, weights, device, cfg.image_size,
                                generator, amp_dtype, scaler, channels_last, cfg.max_steps, bar)
        probs, truth, slots = evaluate(net, _loader(val_stream, cfg, device), device, amp_dtype, channels_last)
        probs, truth, slots = (_gather(a, world) for a in (probs, truth, slots))
        metrics = run_metrics(truth, probs, names, study_of[slots], cfg.task)
        val_loss = metrics["weighted_log_loss"]
        if cfg.scheduler == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        record = {"epoch": epoch + 1, **stats, "val_loss": val_loss, "val_weighted_log_loss": val_loss,
                  "val_mean_auc": metrics["mean_auc"], "lr": optimizer.param_groups[0]["lr"]}
        if "any" in names:
            record["val_any_auc"] = metrics["per_class"]["any"]["roc_auc"]
            record["val_study_any_auc"] = metrics.get("study_any_auc")
        record = {k: _clean(v) for k, v in record.items()}
        history.append(record)
        improved = val_loss < best
        best = min(best, val_loss)
        logger.info("epoch %d: train loss %.4f (%.0f img/s), val weighted log loss %.4f, mean AUC %s",
                    epoch + 1, stats["train_loss"], stats["train_images_per_s"], val_loss, metrics["mean_auc"])
        if rank == 0:
            _json_line(out / "metrics.jsonl", {**record, "metrics": metrics})
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_val_loss": best, "history": history, "rng": _rng_state(device),
                     "config": cfg.to_dict(), "spec": store.spec.to_attrs(), "names": list(names),
                     "in_channels": in_channels, "metrics": metrics,
                     "train_prevalence": train_prevalence}
            save_checkpoint(state, out / "last.pt")
            if improved:
                save_checkpoint(state, out / "best.pt")
                write_predictions(out / "val_predictions.parquet", store, slots, probs, truth, names)
                plot_roc_curves(truth, probs, names, out / "roc.png")
            plot_loss_curves(history, out / "loss.png")
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return metrics
