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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from ichprep.spec import PreprocessSpec
from ichprep.store import MANIFEST, Store, open_store

from .balance import importance_weights, sampling_rates
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TASKS, TrainConfig
from .data import ShardStream, epoch_plan, is_positive, select_slices, targets, train_candidates
from .engine import (
    Outputs,
    Predictions,
    StepSetup,
    WeightAverage,
    infer,
    loss_weights,
    refresh_batchnorm,
    sigmoid,
    train_one_epoch,
)
from .errors import CheckpointError, ConfigError, DataError, SpecMismatchError
from .folds import run_split, slot_table
from .metrics import compute_metrics, reference_table
from .model import build_model, random_init_advice
from .plots import plot_calibration, plot_loss_curves, plot_roc_curves
from .recalibrate import Platt, cross_fit, cross_fit_parts, fit_platt
from .ring import RingLoader

logger = logging.getLogger(__name__)

#: Config fields a resumed run shares with its checkpoint (so does the store, by manifest digest: the path may move).
RESUME_FIXED = (
    "task",
    "arch",
    "context",
    "image_size",
    "split_by",
    "val_fraction",
    "folds",
    "fold",
    "slice_selection",
    "seed",
    "balance",
    "pos_fraction",
    "calibration",
    "ema_decay",
    "optimizer",
    "scheduler",
)


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


def checkpoint_for_store(checkpoint: str | Path, store: Store) -> dict:
    """A checkpoint's state, refused when ``store`` was made with another preprocessing than its model saw."""
    state = load_checkpoint(checkpoint)
    check_spec(store, state["spec"], f"checkpoint {checkpoint}")
    return state


def check_spec(store: Store, spec_attrs: dict, where: str) -> None:
    """Refuse a store whose preprocessing differs from what the model was trained on."""
    trained = PreprocessSpec.from_attrs(spec_attrs)
    mismatch = trained.describe_mismatch(store.spec)
    if mismatch:
        raise SpecMismatchError(
            f"{store.root} was made with another preprocessing spec than {where} ({mismatch}); "
            "convert the data again with the checkpoint's windows and size"
        )


class Streams(NamedTuple):
    train: ShardStream
    val: ShardStream
    train_slots: np.ndarray  # training candidates, after --slice-selection
    val_slots: np.ndarray  # every labelled slot of the validation patients


def _streams(store: Store, cfg: TrainConfig, *, split: np.ndarray, y: np.ndarray, rank: int, world: int) -> Streams:
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
    return Streams(train=train, val=val, train_slots=train_slots, val_slots=val_slots)


def batch_loader(stream: ShardStream, workers: int, device: torch.device):
    """Whole batches of a stream: in this process, or from ``workers`` processes through reused slots.

    No persistent workers: each pass hands workers a fresh copy of the stream (new epoch plan).
    """
    if workers:
        return RingLoader(stream, workers, device)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0, pin_memory=device.type == "cuda")


def store_identity(store: Store) -> str:
    """sha256 of the store's manifest: names exactly the cache a run trained on."""
    return store.root.sha256(MANIFEST)


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
    plot_roc_curves(preds.targets, preds.probs, names, out / "roc.png")
    plot_calibration(preds.targets, preds.probs, names, out / "calibration.png")


def _json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def _clean(value):
    """JSON-safe numbers (NaN -> None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_resume(checkpoint: dict, cfg: TrainConfig, identity: str) -> None:
    saved = checkpoint["config"]
    changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(cfg, k)]
    if checkpoint.get("store_identity") != identity:
        changed.append("store (its manifest differs from the one the run trained on)")
    if changed:
        raise CheckpointError(
            f"--resume {cfg.resume}: options differ from the checkpoint's run ({', '.join(changed)}); "
            "resume with the same options and store, or start a new run"
        )


# ---------------------------------------------------------------- the run


@dataclass
class RunProgress:
    """Where a run stands: the epoch to train next, the best epoch so far, the latest metrics, every epoch's record."""

    next_epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> RunProgress:
        return cls(
            next_epoch=checkpoint["epoch"] + 1,
            best_val_loss=checkpoint["best_val_loss"],
            best_epoch=checkpoint["best_epoch"],
            best_metrics=checkpoint["best_metrics"],
            metrics=checkpoint["metrics"],
            history=list(checkpoint["history"]),
        )


def train(cfg: TrainConfig, progress: Callable[[str, int], Callable] | None = None) -> dict:
    """Run training; returns the best epoch's validation metrics (those of best.pt).

    ``progress(desc, total steps)`` makes an ``on_log(steps, loss, images/s)`` callback (rank 0 only).
    """
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: autotune the convolutions once
    out = Path(cfg.out)
    store = open_store(cfg.store)
    identity = store_identity(store)
    names = TASKS[cfg.task]

    checkpoint = None
    if cfg.resume:
        checkpoint = checkpoint_for_store(cfg.resume, store)
        _check_resume(checkpoint, cfg, identity)

    y = targets(store.slices, cfg.task)
    split = run_split(
        store.slices, val_fraction=cfg.val_fraction, seed=cfg.seed, by=cfg.split_by, folds=cfg.folds, fold=cfg.fold
    )
    streams = _streams(store, cfg, split=split, y=y, rank=rank, world=world)
    positive = is_positive(store.slices)
    n_pos = int(positive[streams.train_slots].sum())
    rates = sampling_rates(n_pos, len(streams.train_slots) - n_pos, balance=cfg.balance, pos_fraction=cfg.pos_fraction)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        slot_table(store.slices, split=split).to_parquet(out / "split.parquet")
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.pretrained is None and checkpoint is None:
            logger.warning(random_init_advice(cfg.arch))
    logger.info(
        "%d training slices (%s), %d validation slices (every labelled slice of the validation %ss); "
        "balance %s: positives x%.2f, negatives x%.3f, loss weighted by the inverse",
        len(streams.train_slots),
        cfg.slice_selection,
        len(streams.val_slots),
        cfg.split_by,
        cfg.balance,
        rates.r_pos,
        rates.p_neg,
    )

    windows = store.spec.channels
    in_channels = streams.train.sample_shape[0]
    model = build_model(
        cfg.arch,
        n_outputs=len(names),
        windows=windows,
        slices=2 * cfg.context + 1,
        pretrained=cfg.pretrained if checkpoint is None else None,
    ).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    amp_dtype = amp_dtype_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    run = RunProgress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        run = RunProgress.from_checkpoint(checkpoint)
        _set_rng_state(checkpoint["rng"], device)
        logger.info("resumed from %s at epoch %d", cfg.resume, run.next_epoch + 1)
    # The average starts from the weights as they are (a resumed run's average comes from its checkpoint).
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if average is not None and checkpoint is not None:
        average.module.load_state_dict(checkpoint["model"])
        average.updates = checkpoint.get("average_updates", WeightAverage.warmed_up(cfg.ema_decay))
    evaluated = model if average is None else average.module  # what each epoch refreshes, validates and saves
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    sample_weights = torch.as_tensor(importance_weights(streams.train_slots, positive, rates), device=device)
    parts = validation_parts(store, cfg, streams.val_slots) if cfg.calibration == "platt" else None
    label_weights = loss_weights(names, device)
    study_of = store.slices["study_uid"].to_numpy()  # for the study-level AUC and the study bootstrap
    train_prevalence = [float(np.nanmean(y[streams.train_slots, j])) for j in range(len(names))]

    for epoch in range(run.next_epoch, cfg.epochs):
        streams.train.set_epoch(
            epoch,
            epoch_plan(
                streams.train_slots,
                positive,
                balance=cfg.balance,
                pos_fraction=cfg.pos_fraction,
                seed=cfg.seed,
                epoch=epoch,
            ),
        )
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        setup = StepSetup(
            model=net,
            optimizer=optimizer,
            label_weights=label_weights,
            sample_weights=sample_weights,
            image_size=cfg.image_size,
            generator=generator,
            amp_dtype=amp_dtype,
            scaler=scaler,
            channels_last=channels_last,
            average=average,
        )
        steps = streams.train.batches(cfg.batch_size, cfg.workers)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        on_log = progress(f"epoch {epoch + 1}/{cfg.epochs}", steps) if progress and rank == 0 else None
        stats = train_one_epoch(
            setup, batch_loader(streams.train, cfg.workers, device), max_steps=cfg.max_steps, on_log=on_log
        )
        if average is not None:
            average.take_buffers(model)
        # The unwrapped model: each DDP rank refreshes its own copy, rank 0's buffers are broadcast at the next forward.
        refresh_batchnorm(
            dataclasses.replace(setup, model=evaluated),
            batch_loader(streams.train, cfg.workers, device),
            max_batches=cfg.bn_refresh_batches,
        )
        if average is not None and world > 1:
            for buffer in average.module.buffers():  # the average is not wrapped: rank 0's statistics, sent here
                dist.broadcast(buffer, 0)
        out_val = infer(
            net if average is None else evaluated,  # the average is never wrapped: it is not trained
            batch_loader(streams.val, cfg.workers, device),
            image_size=cfg.image_size,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )
        gathered = {key: _gather(getattr(out_val, key), world) for key in ("logits", "targets", "slots")}
        out_val = out_val._replace(**gathered)
        calibrated = calibrate_validation(out_val, names=names, parts=parts, method=cfg.calibration)
        preds = calibrated.preds
        metrics = run_metrics(
            preds.targets, preds.probs, names=names, study_ids=study_of[preds.slots], task=cfg.task, seed=cfg.seed
        )
        if calibrated.uncalibrated is not None:
            metrics["uncalibrated"] = calibrated.uncalibrated
        metrics = add_middle_block(
            metrics, preds, selection=cfg.slice_selection, store=store, names=names, task=cfg.task, seed=cfg.seed
        )
        run.metrics = metrics
        val_loss = metrics["weighted_log_loss"]
        if cfg.scheduler == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        record = {
            "epoch": epoch + 1,
            **stats._asdict(),
            "val_loss": val_loss,
            "val_weighted_log_loss": val_loss,
            "val_weighted_log_loss_ci95": metrics.get("ci95", {}).get("weighted_log_loss"),
            "val_mean_auc": metrics["mean_auc"],
            "val_mean_ece": metrics.get("mean_ece"),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if "any" in names:
            record["val_any_auc"] = metrics["per_class"]["any"]["roc_auc"]
            record["val_any_mean_prob"] = metrics["per_class"]["any"]["mean_prob"]
            record["val_study_any_auc"] = metrics.get("study_any_auc")
        record = {k: _clean(v) for k, v in record.items()}
        run.history.append(record)
        improved = val_loss < run.best_val_loss
        if improved:
            run.best_val_loss, run.best_epoch, run.best_metrics = val_loss, epoch + 1, metrics
        logger.info(
            "epoch %d: train loss %.4f (%.0f img/s), val weighted log loss %.4f, mean AUC %s%s",
            epoch + 1,
            stats.train_loss,
            stats.train_images_per_s,
            val_loss,
            metrics["mean_auc"],
            " (best so far)" if improved else "",
        )
        if rank == 0:
            _json_line(out / "metrics.jsonl", {**record, "metrics": metrics})
            state = {
                "model": evaluated.state_dict(),  # what evaluate loads
                **(
                    {} if average is None else {"trained_model": model.state_dict(), "average_updates": average.updates}
                ),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_val_loss": run.best_val_loss,
                "best_epoch": run.best_epoch,
                "best_metrics": run.best_metrics,
                "history": run.history,
                "rng": _rng_state(device),
                "config": cfg.to_dict(),
                "spec": store.spec.to_attrs(),
                "store_identity": identity,
                "names": list(names),
                "in_channels": in_channels,
                "metrics": metrics,
                "train_prevalence": train_prevalence,
                "calibration": None if calibrated.platt is None else calibrated.platt.to_dict(),
            }
            save_checkpoint(state, out / "last.pt")
            if improved:
                save_checkpoint(state, out / "best.pt")
                write_figures(out, preds, names=names, store=store, predictions="val_predictions.parquet")
            plot_loss_curves(run.history, out / "loss.png")
    if rank == 0:
        summary = {"final": run.best_metrics, "best_epoch": run.best_epoch, "last": run.metrics, "history": run.history}
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return {**run.best_metrics, "best_epoch": run.best_epoch}
