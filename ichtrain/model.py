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
from .config import ARCHS
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)



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


def widen_input(model: nn.Module, windows: int, slices: int = 1) -> None:
    """Replace conv1 by one taking ``windows * slices`` channels (slice-major: channel = slice * windows + window).

    Window ``w`` starts as pretrained filter ``w % 3`` in every neighbour slice, so a window means the same
    thing at every z offset; all filters are scaled by 3 / channels, which keeps the first layer's
    activations at the pretrained magnitude when the neighbours look alike.
    """
    old = model.conv1
    in_channels = windows * slices
    if windows == old.in_channels and slices == 1:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        index = (torch.arange(in_channels) % windows) % old.in_channels
        new.weight.copy_(old.weight[:, index] * (old.in_channels / in_channels))
    model.conv1 = new


def build_model(arch: str = "resnet152", n_outputs: int = 6, windows: int = 3, slices: int = 1,
                pretrained: str | Path | None = None) -> nn.Module:
    """A torchvision ResNet for ``windows`` channels per slice and ``slices`` slices (2.5D: 3), ``n_outputs`` logits."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if n_outputs < 1 or windows < 1 or slices < 1:
        raise ConfigError("n_outputs, windows and slices must be >= 1")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained is not None:
        _load_backbone(model, load_state_dict(pretrained), pretrained)
    widen_input(model, windows, slices)
    model.fc = nn.Linear(model.fc.in_features, n_outputs)
    return model


def classifier(model: nn.Module) -> nn.Linear:
    """The head: the last ``nn.Linear`` in module order; its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]


def random_init_advice(arch: str) -> str:
    """What to tell a user who trains ``arch`` without ``--pretrained`` (nothing is ever downloaded)."""
    return (f"training {arch} from random weights; ImageNet weights help on CT. Save them once on a machine "
            f"with internet: python -c \"import torch, torchvision; torch.save(torchvision.models.{arch}"
            f"(weights='DEFAULT').state_dict(), '{arch}.pth')\" and pass --pretrained {arch}.pth")
