"""timm backbones: ``--arch timm:NAME``, built offline, with weight files read from disk only.

A timm model is created with ``pretrained=False`` (timm never fetches from a hub here), its first
convolution widened to the store's channels and ``--context`` slices (:func:`ichtrain.model.widen_input`, the
same rule as timm's ``adapt_input_conv``: filters repeated over the channels and scaled by 3 / channels) and
its classifier reset to the task's outputs.  ichtrain's input pipeline normalises with ImageNet's mean and
std; a model whose own statistics differ gets them through :class:`TimmNet`'s affine input layer, whose
buffers are saved with its weights, so evaluate, predict and cv rebuild exactly what was trained.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

import torch
from torch import nn

from .errors import ConfigError

TIMM_PREFIX = "timm:"
#: ImageNet statistics: what ichtrain's input pipeline normalises with (ichtrain.data.augment).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: How to find names, for help texts and errors.
FIND_NAMES = "python -c \"import timm; print(timm.list_models('*resnet*'))\""


class TimmDefaults(NamedTuple):
    """What a timm model was made for: its default square input size and its normalisation."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def is_timm(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX) :]


def check_timm(arch: str) -> None:
    """Refuse a ``timm:NAME`` whose NAME timm does not know, with the nearest names and how to list them."""
    import timm

    name = timm_name(arch)
    if timm.models.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=5)
    nearest = f"; nearest: {', '.join(near)}" if near else ""
    raise ConfigError(f"timm has no model {name!r}{nearest}. List names with {FIND_NAMES}")


def timm_defaults(arch: str) -> TimmDefaults:
    """The model's default input size and mean/std from timm's pretrained config (no download)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name(arch))
    size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    mean = tuple(float(x) for x in (cfg.mean if cfg is not None and cfg.mean else IMAGENET_MEAN))
    std = tuple(float(x) for x in (cfg.std if cfg is not None and cfg.std else IMAGENET_STD))
    return TimmDefaults(size, mean[:3], std[:3])


def backbone_record(arch: str) -> dict | None:
    """What a checkpoint records of a timm backbone: its name, default input size, mean and std."""
    if not is_timm(arch):
        return None
    import timm

    return {
        "library": "timm",
        "timm_version": timm.__version__,
        "name": timm_name(arch),
        **timm_defaults(arch)._asdict(),
    }


def create_timm(arch: str) -> nn.Module:
    """The bare timm model of ``timm:NAME`` (ImageNet's 3 channels and 1000 classes), random weights."""
    import timm

    check_timm(arch)
    return timm.create_model(timm_name(arch), pretrained=False)


class TimmNet(nn.Module):
    """A timm backbone behind an affine input layer that turns ImageNet-normalised input into its own.

    ``(x * std_in + mean_in - mean) / std`` per channel (channels repeat the three statistics, as windows
    repeat over 2.5D slices); the identity for a model trained on ImageNet's statistics.
    """

    def __init__(self, backbone: nn.Module, defaults: TimmDefaults, channels: int):
        super().__init__()
        self.backbone = backbone
        pick = [i % 3 for i in range(channels)]
        mean_in, std_in = torch.tensor(IMAGENET_MEAN)[pick], torch.tensor(IMAGENET_STD)[pick]
        mean, std = torch.tensor(defaults.mean)[pick], torch.tensor(defaults.std)[pick]
        self.register_buffer("scale", (std_in / std).view(1, channels, 1, 1))
        self.register_buffer("shift", ((mean_in - mean) / std).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * self.scale + self.shift)
