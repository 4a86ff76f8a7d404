"""``ichtrain train``: the training run, from an ichprep store to checkpoints, metrics and plots.

Single process on CPU or one GPU, or distributed data parallel under
``torchrun`` (NCCL on GPU, gloo on CPU): each rank streams a disjoint set of
shards, validation predictions are gathered on every rank, and only rank 0
writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from ichprep.storage.store import Store, open_store

from . import files
from .backbones import backbone_record
from .checkpoint import Checkpoint, check_resume, checkpoint_for_store, store_identity
from .config import TASKS, TrainConfig
from .data.balance import Rates, epoch_plan, importance_weights, sampling_rates
from .data.folds import run_split, slot_table
from .data.loader import batch_loader
from .data.stream import ShardStream
from .data.tables import is_positive, select_slices, targets, train_candidates
from .device import amp_dtype_for, compute_facts, init_distributed, resolve_device, rng_state, set_rng_state
from .engine import EpochStats, StepSetup, WeightAverage, loss_weights, refresh_batchnorm, train_one_epoch
from .errors import DataError
from .evaluation.metrics import fmt
from .evaluation.plots import plot_loss_curves
from .evaluation.report import Validation, validate_epoch, validation_parts, write_figures
from .model import build_model, random_init_advice
from .study.external import write_reference
from .tblog import RunLog, shown_slices

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


class RunData(NamedTuple):
    """The slots a run trains and validates on, their streams, and the balance of training."""

    train: ShardStream
    val: ShardStream
    train_slots: np.ndarray  # training candidates, after --slice-selection
    val_slots: np.ndarray  # every labelled slot of the validation patients
    split: np.ndarray  # every slot's part
    targets: np.ndarray  # float32 (N, K)
    positive: np.ndarray  # bool (N,)
    rates: Rates


def run_data(store: Store, cfg: TrainConfig, *, rank: int, world: int) -> RunData:
    y = targets(store.slices, cfg.task)
    split = run_split(
        store.slices, val_fraction=cfg.val_fraction, seed=cfg.seed, by=cfg.split_by, folds=cfg.folds, fold=cfg.fold
    )
    # --slice-selection chooses what to train on; validation is always the competition's distribution.
    selection = select_slices(store.slices, store.studies, cfg.slice_selection)
    train_slots = train_candidates(store.slices, split, selection, task=cfg.task, part="train")
    val_slots = train_candidates(store.slices, split, None, task=cfg.task, part="val")
    if len(train_slots) == 0 or len(val_slots) == 0:
        raise DataError(
            f"{len(train_slots)} training and {len(val_slots)} validation slices: both must be > 0 "
            "(is the store labelled? is --val-fraction sensible for this many patients?)"
        )
    val_counts = np.zeros(len(store.slices), np.int64)
    val_counts[val_slots] = 1
    common = dict(targets=y, context=cfg.context, seed=cfg.seed, rank=rank, world_size=world, batch_size=cfg.batch_size)
    train = ShardStream.from_store(
        store, np.zeros(len(store.slices), np.int64), shuffle=True, buffer_shards=cfg.buffer_shards, **common
    )
    val = ShardStream.from_store(store, val_counts, shuffle=False, **common)
    positive = is_positive(store.slices)
    n_pos = int(positive[train_slots].sum())
    rates = sampling_rates(n_pos, len(train_slots) - n_pos, balance=cfg.balance, pos_fraction=cfg.pos_fraction)
    return RunData(train, val, train_slots, val_slots, split, y, positive, rates)


# ---------------------------------------------------------------- the model and its optimisation


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


class Learner(NamedTuple):
    """The model of a run, in its three roles, and what trains it."""

    model: torch.nn.Module  # the trained weights
    evaluated: torch.nn.Module  # what each epoch refreshes, validates and saves: the weight average when there is one
    net: torch.nn.Module  # what a training step calls: the model, wrapped for DDP and compiled when asked
    average: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler

    @property
    def validated(self) -> torch.nn.Module:
        """What validation calls: the average (never wrapped: it is not trained), else the wrapped model."""
        return self.net if self.average is None else self.evaluated


def build_learner(
    cfg: TrainConfig, *, n_outputs: int, windows: int, device: torch.device, world: int, resumed: Checkpoint | None
) -> Learner:
    model = build_model(
        cfg.arch,
        n_outputs=n_outputs,
        windows=windows,
        slices=2 * cfg.context + 1,
        pretrained=cfg.pretrained if resumed is None else None,
    ).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype_for(device, cfg.amp) == torch.float16)
    if resumed is not None:
        model.load_state_dict(resumed.model if resumed.trained_model is None else resumed.trained_model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        scaler.load_state_dict(resumed.scaler)
        set_rng_state(resumed.rng, device)
    # The average starts from the weights as they are (a resumed run's average comes from its checkpoint).
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if average is not None and resumed is not None:
        average.module.load_state_dict(resumed.model)
        saved = resumed.average_updates
        average.updates = WeightAverage.warmed_up(cfg.ema_decay) if saved is None else saved
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    evaluated = model if average is None else average.module
    return Learner(model, evaluated, net, average, optimizer, scheduler, scaler)


def start_epoch(data: RunData, base: StepSetup, cfg: TrainConfig, *, epoch: int, rank: int) -> StepSetup:
    """Give the training stream this epoch's plan; the epoch's steps draw augmentations from their own seed."""
    plan = epoch_plan(
        data.train_slots, data.positive, balance=cfg.balance, pos_fraction=cfg.pos_fraction, seed=cfg.seed, epoch=epoch
    )
    data.train.set_epoch(epoch, plan)
    generator = torch.Generator(device=base.device).manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
    return dataclasses.replace(base, generator=generator)


def schedule(learner: Learner, cfg: TrainConfig, val_loss: float) -> None:
    if cfg.scheduler == "plateau":
        learner.scheduler.step(val_loss)
    else:
        learner.scheduler.step()


def refresh_evaluated(learner: Learner, setup: StepSetup, loader, *, batches: int, world: int) -> None:
    """The evaluated model's BatchNorm statistics, recomputed for its final weights after an epoch."""
    if learner.average is not None:
        learner.average.take_buffers(learner.model)
    # The unwrapped model: each DDP rank refreshes its own copy, rank 0's buffers are broadcast at the next forward.
    refresh_batchnorm(dataclasses.replace(setup, model=learner.evaluated), loader, max_batches=batches)
    if learner.average is not None and world > 1:
        for buffer in learner.average.module.buffers():  # the average is not wrapped: rank 0's statistics, sent here
            dist.broadcast(buffer, 0)


# ---------------------------------------------------------------- where a run stands


def _clean(value):
    """JSON-safe numbers (NaN -> None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def epoch_record(epoch: int, stats: EpochStats, metrics: dict, *, lr: float, names: tuple[str, ...]) -> dict:
    """One epoch's line of the history: training figures, the headline validation figures, the learning rate."""
    val_loss = metrics["weighted_log_loss"]
    record = {
        "epoch": epoch + 1,
        **stats._asdict(),
        "val_loss": val_loss,
        "val_weighted_log_loss": val_loss,
        "val_weighted_log_loss_ci95": metrics.get("ci95", {}).get("weighted_log_loss"),
        "val_mean_auc": metrics["mean_auc"],
        "val_mean_ece": metrics.get("mean_ece"),
        "lr": lr,
    }
    if "any" in names:
        record["val_any_auc"] = metrics["per_class"]["any"]["roc_auc"]
        record["val_any_mean_prob"] = metrics["per_class"]["any"]["mean_prob"]
        record["val_study_any_auc"] = metrics.get("study_any_auc")
    return {k: _clean(v) for k, v in record.items()}


def log_epoch(epoch: int, stats: EpochStats, metrics: dict, *, improved: bool) -> None:
    """The epoch's line, then its per-label table (numbers to 4 significant digits)."""
    logger.info(
        "epoch %d: train loss %.4g (%.0f img/s), val weighted log loss %.4g, mean AUC %s%s\n%s",
        epoch + 1,
        stats.train_loss,
        stats.train_images_per_s,
        metrics["weighted_log_loss"],
        fmt(metrics["mean_auc"]),
        " (best so far)" if improved else "",
        label_table(metrics),
    )


def label_table(metrics: dict) -> str:
    """Per label: AUC, log loss, mean predicted probability against prevalence, and positives of n."""
    lines = [f"  {'label':<18} {'AUC':>7} {'log loss':>9} {'mean p':>8} {'prevalence':>10} {'positives':>11}"]
    for name, per in metrics["per_class"].items():
        cells = [_sig(per.get("roc_auc")), _sig(per.get("log_loss")), _pct(per.get("mean_prob"))]
        cells += [_pct(per.get("prevalence")), f"{per.get('n_pos', 0)}/{per.get('n', 0)}"]
        lines.append(f"  {name:<18} {cells[0]:>7} {cells[1]:>9} {cells[2]:>8} {cells[3]:>10} {cells[4]:>11}")
    return "\n".join(lines)


def _sig(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


@dataclass
class Progress:
    """Where a run stands: the epoch to train next, the best epoch so far, the latest metrics, every epoch's record."""

    next_epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Progress:
        return cls(
            next_epoch=checkpoint.epoch + 1,
            best_val_loss=checkpoint.best_val_loss,
            best_epoch=checkpoint.best_epoch,
            best_metrics=checkpoint.best_metrics,
            metrics=checkpoint.metrics,
            history=list(checkpoint.history),
        )

    def add(self, record: dict, metrics: dict) -> bool:
        """Record an epoch; True when it is the best so far (lowest validation weighted log loss)."""
        self.metrics = metrics
        self.history.append(record)
        improved = metrics["weighted_log_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.best_metrics = (
                metrics["weighted_log_loss"],
                record["epoch"],
                metrics,
            )
        return improved

    def summary(self) -> dict:
        return {
            "final": self.best_metrics,
            "best_epoch": self.best_epoch,
            "last": self.metrics,
            "history": self.history,
        }


class RunFacts(NamedTuple):
    """What every checkpoint of a run records besides its weights and progress."""

    config: dict
    spec: dict
    store_identity: str
    names: list[str]
    in_channels: int
    train_prevalence: list[float]
    backbone: dict | None  # a timm model's name, default input size and normalisation; None for torchvision


def epoch_checkpoint(
    learner: Learner, progress: Progress, validation: Validation, *, epoch: int, facts: RunFacts, device: torch.device
) -> Checkpoint:
    average = learner.average
    return Checkpoint(
        model=learner.evaluated.state_dict(),  # what evaluate loads
        trained_model=None if average is None else learner.model.state_dict(),
        average_updates=None if average is None else average.updates,
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        scaler=learner.scaler.state_dict(),
        epoch=epoch,
        best_val_loss=progress.best_val_loss,
        best_epoch=progress.best_epoch,
        best_metrics=progress.best_metrics,
        history=progress.history,
        rng=rng_state(device),
        metrics=validation.metrics,
        calibration=None if validation.platt is None else validation.platt.to_dict(),
        **facts._asdict(),
    )


def save_epoch(
    out: Path, checkpoint: Checkpoint, validation: Validation, *, record: dict, improved: bool, store: Store
) -> None:
    """The epoch's line of metrics.jsonl, last.pt, and when it is the best so far best.pt and its figures."""
    with open(out / files.METRICS_LOG, "a") as f:
        f.write(json.dumps({**record, "metrics": validation.metrics}, allow_nan=False) + "\n")
    checkpoint.save(out / files.LAST)
    if improved:
        checkpoint.save(out / files.BEST)
        write_figures(
            out, validation.preds, names=tuple(checkpoint.names), store=store, predictions=files.VAL_PREDICTIONS
        )
        write_reference(out / files.VAL_PREDICTIONS)
    plot_loss_curves(checkpoint.history, out / files.LOSS_PLOT)
    write_history(checkpoint.history, out / files.HISTORY, best_epoch=checkpoint.best_epoch)


#: history.csv's columns, in order: the epoch's training figures, its validation headline, the learning rate.
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_weighted_log_loss",
    "val_weighted_log_loss_lo",
    "val_weighted_log_loss_hi",
    "val_mean_auc",
    "val_any_auc",
    "val_study_any_auc",
    "val_mean_ece",
    "val_any_mean_prob",
    "lr",
    "train_images_per_s",
    "train_seconds",
    "best",
)


def write_history(history: list[dict], path: Path, *, best_epoch: int) -> None:
    """Every epoch so far as one CSV row (rewritten each epoch, so a resumed run's file holds them all)."""
    frame = pd.DataFrame(history)
    interval = frame.pop("val_weighted_log_loss_ci95") if "val_weighted_log_loss_ci95" in frame else None
    if interval is not None:
        frame["val_weighted_log_loss_lo"] = [ci[0] if ci else None for ci in interval]
        frame["val_weighted_log_loss_hi"] = [ci[1] if ci else None for ci in interval]
    frame["best"] = frame["epoch"] == best_epoch
    frame.reindex(columns=list(HISTORY_COLUMNS)).to_csv(path, index=False, float_format="%.6g")


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, progress: Callable[[str, int], Callable] | None = None) -> dict:
    """Run training; returns the best epoch's validation metrics (those of best.pt).

    ``progress(desc, total steps)`` makes an ``on_log(steps, loss, images/s)`` callback (rank 0 only).
    """
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: autotune the convolutions once
    out, store, names = Path(cfg.out), open_store(cfg.store, skip_damaged=cfg.skip_damaged), TASKS[cfg.task]
    identity = store_identity(store)
    resumed = checkpoint_for_store(cfg.resume, store) if cfg.resume else None
    if resumed is not None:
        check_resume(resumed, cfg, identity)
    data = run_data(store, cfg, rank=rank, world=world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        slot_table(store.slices, split=data.split).to_parquet(out / files.SPLIT)
        (out / files.CONFIG).write_text(json.dumps(files.recorded_config(cfg.to_dict(), out), indent=2) + "\n")
        compute = compute_facts(device)
        (out / files.COMPUTE).write_text(json.dumps(compute, indent=2) + "\n")
        logger.info("on %s: %d threads, CPU kernels %s", device, compute["threads"], compute["cpu_capability"])
        if cfg.pretrained is None and resumed is None:
            logger.warning(random_init_advice(cfg.arch))
    logger.info(
        "%d training slices (%s), %d validation slices (every labelled slice of the validation %ss); "
        "balance %s: positives x%.2f, negatives x%.3f, loss weighted by the inverse",
        len(data.train_slots),
        cfg.slice_selection,
        len(data.val_slots),
        cfg.split_by,
        cfg.balance,
        data.rates.r_pos,
        data.rates.p_neg,
    )
    learner = build_learner(
        cfg, n_outputs=len(names), windows=store.spec.channels, device=device, world=world, resumed=resumed
    )
    run = Progress() if resumed is None else Progress.from_checkpoint(resumed)
    if resumed is not None:
        logger.info("resumed from %s at epoch %d", cfg.resume, run.next_epoch + 1)
    base = StepSetup(
        model=learner.net,
        optimizer=learner.optimizer,
        label_weights=loss_weights(names, device),
        sample_weights=torch.as_tensor(importance_weights(data.train_slots, data.positive, data.rates), device=device),
        image_size=cfg.image_size,
        generator=torch.Generator(device=device),
        amp_dtype=amp_dtype_for(device, cfg.amp),
        scaler=learner.scaler,
        channels_last=device.type == "cuda",
        average=learner.average,
    )
    parts = validation_parts(store, cfg, data.val_slots) if cfg.calibration == "platt" else None
    facts = RunFacts(
        config=files.recorded_config(cfg.to_dict(), cfg.out),
        spec=store.spec.to_attrs(),
        store_identity=identity,
        names=list(names),
        in_channels=data.train.sample_shape[0],
        train_prevalence=[float(np.nanmean(data.targets[data.train_slots, j])) for j in range(len(names))],
        backbone=backbone_record(cfg.arch),
    )

    log = RunLog(out, enabled=cfg.tb and rank == 0, names=names)
    for epoch in range(run.next_epoch, cfg.epochs):
        setup = start_epoch(data, base, cfg, epoch=epoch, rank=rank)
        steps = min(data.train.batches(cfg.batch_size, cfg.workers), cfg.max_steps or math.inf)
        bar = progress(f"epoch {epoch + 1}/{cfg.epochs}", steps) if progress and rank == 0 else None
        on_log = log.train_progress(bar, lr=lambda: learner.optimizer.param_groups[0]["lr"])
        loader = batch_loader(data.train, cfg.workers, device)
        stats = train_one_epoch(setup, loader, max_steps=cfg.max_steps, on_log=on_log)
        refresh_evaluated(learner, setup, loader, batches=cfg.bn_refresh_batches, world=world)
        validation = validate_epoch(
            learner.validated,
            batch_loader(data.val, cfg.workers, device),
            store=store,
            cfg=cfg,
            names=names,
            parts=parts,
            device=device,
            amp_dtype=setup.amp_dtype,
            channels_last=setup.channels_last,
            world=world,
        )
        schedule(learner, cfg, validation.metrics["weighted_log_loss"])
        record = epoch_record(epoch, stats, validation.metrics, lr=learner.optimizer.param_groups[0]["lr"], names=names)
        improved = run.add(record, validation.metrics)
        log_epoch(epoch, stats, validation.metrics, improved=improved)
        if rank == 0:
            checkpoint = epoch_checkpoint(learner, run, validation, epoch=epoch, facts=facts, device=device)
            save_epoch(out, checkpoint, validation, record=record, improved=improved, store=store)
            if log.writer is not None:
                shown = validation.preds.slots[shown_slices(validation.preds)]
                images = np.stack([np.asarray(store.images[int(slot)]) for slot in shown]) if len(shown) else None
                log.epoch(epoch, validation.metrics, validation.preds, images)
    log.close()
    if rank == 0:
        (out / files.METRICS).write_text(json.dumps(run.summary(), indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return {**run.best_metrics, "best_epoch": run.best_epoch}
