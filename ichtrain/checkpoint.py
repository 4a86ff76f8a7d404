"""Checkpoints: plain tensors and Python values only, loaded with ``weights_only=True``.

A checkpoint carries the model, optimizer, scheduler and scaler state, the
epoch, RNG states, the run config and the store's preprocessing spec, so a
run resumes exactly and ``predict`` knows what input the model expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError

REQUIRED = ("model", "config", "spec", "names", "epoch", "in_channels")


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
