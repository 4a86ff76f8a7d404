"""torchvision ResNets with a multi-label head, optional wider input, local pretrained weights.

Nothing is downloaded: ``pretrained`` is a path to a torchvision state dict the
user fetched once (see the README), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from .checkpoint import safe_load
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def load_state_dict(path: str | Path) -> dict:
    """A state dict from a local file; refuses pickles that need code to load."""
    state = safe_load(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an ichtrain checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _load_backbone(model: nn.Module, state: dict, path) -> None:
    """Load everything but the classifier, insisting on matching names and shapes."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith("fc."))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            [f"missing {len(missing)} tensors (e.g. {missing[:3]})"] * bool(missing)
            + [f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[:3]})"] * bool(unexpected)
            + [f"shape mismatch for {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:3]]
        )
        raise CheckpointError(f"{path} does not fit this architecture: {detail}; is it a weights file of the same --arch?")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    logger.info("loaded %d pretrained tensors from %s (classifier dropped)", len(own), path)


def widen_input(model: nn.Module, in_channels: int) -> None:
    """Replace conv1 by one taking ``in_channels``; its filters repeat the RGB ones, scaled by 3/in_channels.

    For 2.5D input (3 windows x 3 slices) each new channel starts as the
    matching window's pretrained filter, and the scaling keeps the first
    layer's activations at the pretrained magnitude.
    """
    old = model.conv1
    if in_channels == old.in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        index = torch.arange(in_channels) % old.in_channels
        new.weight.copy_(old.weight[:, index] * (old.in_channels / in_channels))
    model.conv1 = new


def build_model(arch: str = "resnet152", n_outputs: int = 6, in_channels: int = 3,
                pretrained: str | Path | None = None) -> nn.Module:
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if n_outputs < 1 or in_channels < 1:
        raise ConfigError("n_outputs and in_channels must be >= 1")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained is not None:
        _load_backbone(model, load_state_dict(pretrained), pretrained)
    widen_input(model, in_channels)
    model.fc = nn.Linear(model.fc.in_features, n_outputs)
    return model
