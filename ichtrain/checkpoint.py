"""Checkpoints: plain tensors and Python values only, loaded with ``weights_only=True``.

A checkpoint carries the model, optimizer, scheduler and scaler state, the
epoch, RNG states, the run config and the store's preprocessing spec, so a
run resumes exactly and ``predict`` knows what input the model expects.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ichprep.spec import PreprocessSpec
from ichprep.storage.store import MANIFEST, Store

from .config import RESUME_FIXED, TrainConfig
from .errors import CheckpointError, SpecMismatchError

REQUIRED = ("model", "config", "spec", "names", "epoch", "in_channels")


@dataclass
class Checkpoint:
    """One saved epoch of a run (``best.pt``, ``last.pt``): what evaluate, predict and ``--resume`` read.

    Saved as a plain dict (:meth:`to_state`); :meth:`from_state` reads every checkpoint ichtrain has written,
    filling what older ones lack (the weight average, the Platt map, the store's identity) as absent.
    """

    model: dict  # the weights that are evaluated: the weight average when there is one
    config: dict  # TrainConfig.to_dict()
    spec: dict  # the store's PreprocessSpec.to_attrs()
    names: list[str]  # the model's outputs, in order
    epoch: int  # 0-based epoch this state ends
    in_channels: int
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    best_val_loss: float = math.inf
    best_epoch: int = 0  # 1-based, as logged
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    rng: dict | None = None
    store_identity: str | None = None  # sha256 of the training store's manifest
    metrics: dict = field(default_factory=dict)  # this epoch's validation metrics
    train_prevalence: list[float] | None = None  # per output, on the training slots
    calibration: dict | None = None  # Platt.to_dict(), None: probabilities as trained
    trained_model: dict | None = None  # the raw weights, beside a weight average (what --resume trains on)
    average_updates: int | None = None  # the weight average's update count
    backbone: dict | None = None  # timm: name, input_size, mean, std (ichtrain.backbones); None: torchvision

    def to_state(self) -> dict:
        """The dict ``torch.save`` writes (keys without a value are left out, as ichtrain always wrote them)."""
        state = {"model": self.model}
        if self.trained_model is not None:
            state |= {"trained_model": self.trained_model, "average_updates": self.average_updates}
        if self.backbone is not None:
            state |= {"backbone": self.backbone}
        return state | {
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "history": self.history,
            "rng": self.rng,
            "config": self.config,
            "spec": self.spec,
            "store_identity": self.store_identity,
            "names": self.names,
            "in_channels": self.in_channels,
            "metrics": self.metrics,
            "train_prevalence": self.train_prevalence,
            "calibration": self.calibration,
        }

    @classmethod
    def from_state(cls, state: dict) -> Checkpoint:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in state.items() if key in known})

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        return cls.from_state(load_checkpoint(path))

    def save(self, path: str | Path) -> None:
        save_checkpoint(self.to_state(), path)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write-then-rename: a crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _unpickler_reason(exc: Exception) -> str:
    """torch's message minus its advice to retry with weights_only=False (exactly what we must not do)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(boilerplate)]
    return " ".join(kept) or type(exc).__name__


def safe_load(path: str | Path, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` on CPU; a file that needs arbitrary code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        reason = _unpickler_reason(exc)
        raise CheckpointError(
            f"{what} {path} cannot be loaded with weights_only=True ({type(exc).__name__}: {reason}); "
            "it is damaged or contains pickled code, which ichtrain never runs"
        ) from exc


def load_checkpoint(path: str | Path) -> dict:
    """Load an ichtrain checkpoint safely and check it has what resuming and predicting need."""
    state = safe_load(path)
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise CheckpointError(f"{path} is not an ichtrain checkpoint (needs keys {', '.join(REQUIRED)})")
    return state


def checkpoint_for_store(path: str | Path, store: Store) -> Checkpoint:
    """A checkpoint, refused when ``store`` was made with another preprocessing than its model saw."""
    checkpoint = Checkpoint.load(path)
    check_spec(store, checkpoint.spec, f"checkpoint {path}")
    return checkpoint


def check_spec(store: Store, spec_attrs: dict, where: str) -> None:
    """Refuse a store whose preprocessing differs from what the model was trained on."""
    trained = PreprocessSpec.from_attrs(spec_attrs)
    mismatch = trained.describe_mismatch(store.spec)
    if mismatch:
        raise SpecMismatchError(
            f"{store.root} was made with another preprocessing spec than {where} ({mismatch}); "
            "convert the data again with the checkpoint's windows and size"
        )


def store_identity(store: Store) -> str:
    """sha256 of the store's manifest: names exactly the cache a run trained on."""
    return store.root.sha256(MANIFEST)


def check_resume(checkpoint: Checkpoint, cfg: TrainConfig, identity: str) -> None:
    """Refuse ``--resume`` with options (RESUME_FIXED) or a store other than the checkpoint's run."""
    saved = checkpoint.config
    changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(cfg, k)]
    if checkpoint.store_identity != identity:
        changed.append("store (its manifest differs from the one the run trained on)")
    if changed:
        raise CheckpointError(
            f"--resume {cfg.resume}: options differ from the checkpoint's run ({', '.join(changed)}); "
            "resume with the same options and store, or start a new run"
        )
