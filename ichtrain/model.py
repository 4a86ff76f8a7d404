"""torchvision and timm classification models with a multi-label head, wider input, local pretrained weights.

Nothing is downloaded: ``pretrained`` is a path to a torchvision state dict the
user fetched once (see the README), loaded with ``weights_only=True``.  Every
architecture is adapted the same way: its first ``nn.Conv2d`` is widened to the
store's channels and its last ``nn.Linear`` (the ImageNet classifier) is replaced.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from .backbones import TimmNet, create_timm, is_timm, timm_defaults, timm_name
from .checkpoint import safe_load
from .config import ARCHS, TrainConfig
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: torchvision classification models left out of ``config.ARCHS``, and why (tests check the two cover the list).
UNSUPPORTED = {
    **dict.fromkeys(
        ("vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"),
        "takes only the one input size it was built for (its position embeddings are fixed)",
    ),
    "maxvit_t": "takes only the one input size it was built for (224: its attention partitions are fixed)",
    "inception_v3": "needs an input of at least 75 x 75 (every supported arch takes 64)",
    **dict.fromkeys(("squeezenet1_0", "squeezenet1_1"), "classifies with a convolution, not a linear layer"),
}

#: Constructor arguments beyond ``weights=None`` (GoogLeNet's auxiliary heads would make training return a tuple).
_BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}  # init_weights: same init, no warning
#: Tensors of a weights file dropped with the classifier: auxiliary classifiers the built model does not have.
_AUXILIARY = {"googlenet": ("aux1.", "aux2.")}


def load_state_dict(path: str | Path) -> dict:
    """A state dict from a local file (``.safetensors``, or a torch pickle: ``.pth``, ``.pt``, ``.bin``);
    refuses pickles that need code to load."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors(path)
    state = safe_load(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an ichtrain checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _load_safetensors(path: str | Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last ``nn.Linear`` in module order, with its dotted name."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The input convolution: the first ``nn.Conv2d`` in module order (each supported family's stem)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ConfigError(f"{type(model).__name__} has no Conv2d to take the input")


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (the last ``nn.Linear``), whatever the family calls it."""
    name, head = _head(model)
    return {f"{name}.{key}" for key in head.state_dict()}


def _load_backbone(model: nn.Module, state: dict, path, auxiliary: tuple[str, ...] = ()) -> None:
    """Load everything but the classifier (and ``auxiliary`` prefixes), insisting on matching names and shapes."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    head = _head_keys(model)
    current = model.state_dict()
    own = {k: v for k, v in current.items() if k not in head}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) - head if not k.startswith(auxiliary))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            [f"missing {len(missing)} tensors (e.g. {missing[:3]})"] * bool(missing)
            + [f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[:3]})"] * bool(unexpected)
            + [
                f"shape mismatch for {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in wrong[:3]
            ]
        )
        raise CheckpointError(
            f"{path} does not fit this architecture: {detail}; is it a weights file of the same --arch?"
        )
    backbone = OrderedDict((k, state[k]) for k in own)
    # The built model's per-module versions: the names and shapes match it (MNASNet's loader needs a version).
    backbone._metadata = current._metadata
    model.load_state_dict(backbone, strict=False)
    logger.info("loaded %d pretrained tensors from %s (classifier dropped)", len(own), path)


def widen_input(model: nn.Module, windows: int, slices: int = 1) -> None:
    """Replace the first conv by one taking ``windows * slices`` channels (channel = slice * windows + window).

    Window ``w`` starts as pretrained filter ``w % 3`` in every neighbour slice, so a window means the same
    thing at every z offset; all filters are scaled by 3 / channels, which keeps the first layer's
    activations at the pretrained magnitude when the neighbours look alike.  The bias, if any, is kept.
    """
    name, old = first_conv(model)
    in_channels = windows * slices
    if windows == old.in_channels and slices == 1:
        return
    if old.groups != 1:
        raise ConfigError(f"{type(model).__name__}'s first convolution {name} is grouped; it cannot be widened")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        index = (torch.arange(in_channels) % windows) % old.in_channels
        new.weight.copy_(old.weight[:, index] * (old.in_channels / in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.set_submodule(name, new)


def replace_head(model: nn.Module, n_outputs: int) -> None:
    """Replace the classifier (the last ``nn.Linear``) by a new one with ``n_outputs`` logits."""
    name, old = _head(model)
    model.set_submodule(name, nn.Linear(old.in_features, n_outputs, bias=old.bias is not None))


def build_model(
    arch: str = TrainConfig.arch,
    n_outputs: int = 6,
    windows: int = 3,
    slices: int = 1,
    pretrained: str | Path | None = None,
) -> nn.Module:
    """``arch`` (torchvision's, or ``timm:NAME``) for ``windows`` channels x ``slices`` slices (2*context+1),
    with ``n_outputs`` logits."""
    if is_timm(arch):
        return _build_timm(arch, n_outputs, windows, slices, pretrained)
    if arch in UNSUPPORTED:
        raise ConfigError(f"arch {arch!r} is not supported: it {UNSUPPORTED[arch]}; choose one of {', '.join(ARCHS)}")
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if n_outputs < 1 or windows < 1 or slices < 1:
        raise ConfigError("n_outputs, windows and slices must be >= 1")
    model = torchvision.models.get_model(arch, weights=None, **_BUILD_KWARGS.get(arch, {}))
    if pretrained is not None:
        _load_backbone(model, load_state_dict(pretrained), pretrained, auxiliary=_AUXILIARY.get(arch, ()))
    widen_input(model, windows, slices)
    replace_head(model, n_outputs)
    return model


def _build_timm(arch: str, n_outputs: int, windows: int, slices: int, pretrained: str | Path | None) -> nn.Module:
    """A timm backbone adapted as torchvision's are: weights loaded at 3 channels, input widened, head reset."""
    if n_outputs < 1 or windows < 1 or slices < 1:
        raise ConfigError("n_outputs, windows and slices must be >= 1")
    model = create_timm(arch)
    if pretrained is not None:
        _load_backbone(model, load_state_dict(pretrained), pretrained)
    widen_input(model, windows, slices)
    model.reset_classifier(n_outputs)
    return TimmNet(model, timm_defaults(arch), channels=windows * slices)


def classifier(model: nn.Module) -> nn.Linear:
    """The head: the last ``nn.Linear`` in module order; its input is the penultimate feature vector."""
    return _head(model)[1]


def random_init_advice(arch: str) -> str:
    """What to tell a user who trains ``arch`` without ``--pretrained`` (nothing is ever downloaded)."""
    if is_timm(arch):
        name = timm_name(arch)
        return (
            f"training {arch} from random weights; pretrained weights help on CT. Save them once on a machine with "
            f"internet: python -c \"import timm, safetensors.torch as s; s.save_file(timm.create_model('{name}', "
            f"pretrained=True).state_dict(), '{name}.safetensors')\" and pass --pretrained {name}.safetensors"
        )
    return (
        f"training {arch} from random weights; ImageNet weights help on CT. Save them once on a machine "
        f'with internet: python -c "import torch, torchvision; torch.save(torchvision.models.get_model('
        f"'{arch}', weights='DEFAULT').state_dict(), '{arch}.pth')\" and pass --pretrained {arch}.pth"
    )
