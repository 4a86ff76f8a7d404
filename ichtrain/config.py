"""The training run's configuration: one frozen, validated dataclass, saved in every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from .balance import BALANCES
from .errors import ConfigError

# One definition of every choice; the CLI builds its options from these (no torch import needed for --help).
TASKS = ("rsna", "binary", "subtypes")
#: Every torchvision classification model that takes any square input >= 64 and ends in a linear classifier,
#: grouped by family (ichtrain.model.UNSUPPORTED lists the others and why; a test keeps both in step with torchvision).
ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m",
    "efficientnet_v2_l",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_x_16gf",
    "regnet_x_32gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
    "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "googlenet", "alexnet",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
)
#: --context N stacks 2N+1 slices; 8 (17 slices, half of a typical 35-slice RSNA study) is the most accepted.
MAX_CONTEXT = 8
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("plateau", "cosine")
SPLITS = ("patient", "study", "slice")
DEVICES = ("auto", "cpu", "cuda")
#: Decoded shards a loader worker mixes: a batch of 32 then spans a median of >= 25 studies at RSNA scale.
BUFFER_SHARDS = 23
MAX_FOLDS = 20
EVAL_SPLITS = ("val", "all")  # evaluate: the run's validation patients, or every labelled slice
SEQ_MODELS = ("gru", "transformer")   # stage 2: a bidirectional GRU or a transformer encoder over a study's slices
SEQ_INPUTS = ("features", "logits")   # stage 2 reads stage 1's penultimate features or its logits
#: Attention heads of the stage-2 transformer; its ``hidden`` must be a multiple of this.
HEADS = 4
TTAS = ("none", "flip")               # test-time augmentation: flip averages the horizontally flipped image


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {name} {value!r}; choose one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class TrainConfig:
    store: str
    out: str
    task: str = "rsna"
    arch: str = "resnet152"
    pretrained: str | None = None
    image_size: int = 224
    context: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    scheduler: str = "plateau"
    balance: str = "hybrid"
    pos_fraction: float = 0.5
    val_fraction: float = 0.2
    split_by: str = "patient"
    folds: int | None = None   # K patient folds; fold ``fold`` validates (replaces val_fraction)
    fold: int | None = None
    slice_selection: str = "all"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    resume: str | None = None
    max_steps: int | None = None  # per epoch; for smoke runs and benchmarks
    bn_refresh_batches: int = 20
    buffer_shards: int = BUFFER_SHARDS

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("arch", self.arch, ARCHS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("balance", self.balance, BALANCES)
        _choice("split_by", self.split_by, SPLITS)
        _choice("device", self.device, DEVICES)
        if isinstance(self.context, bool) or not isinstance(self.context, int) or not 0 <= self.context <= MAX_CONTEXT:
            raise ConfigError(f"context must be an integer from 0 to {MAX_CONTEXT} (neighbour slices on each side; "
                              f"{MAX_CONTEXT} already stacks {2 * MAX_CONTEXT + 1} slices), got {self.context!r}")
        if not re.fullmatch(r"all|middle:[1-9][0-9]*", self.slice_selection):
            raise ConfigError(f"invalid slice selection {self.slice_selection!r}; use 'all' or 'middle:K' (K >= 1)")
        for name, low in (("image_size", 16), ("epochs", 1), ("batch_size", 1), ("buffer_shards", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.bn_refresh_batches < 0:
            raise ConfigError(f"bn_refresh_batches must be >= 0, got {self.bn_refresh_batches}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if (self.folds is None) != (self.fold is None):
            raise ConfigError("give --folds K and --fold k together (k in 0 .. K-1), or neither")
        if self.folds is not None and not (2 <= self.folds <= MAX_FOLDS and 0 <= self.fold < self.folds):
            raise ConfigError(f"need 2 <= folds <= {MAX_FOLDS} and 0 <= fold < folds, got folds={self.folds}, "
                              f"fold={self.fold}")
        if not 0 < self.pos_fraction < 1:
            raise ConfigError(f"pos_fraction must be in (0, 1), got {self.pos_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, **overrides})


@dataclass(frozen=True)
class SeqConfig:
    """Stage-2 training settings (how the defaults were chosen: BENCHMARKS.md, "Stage 2")."""

    model: str = "gru"
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.2
    epochs: int = 15
    batch_studies: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    concat_logits: bool = True  # stage-1 logits appended to the standardised input
    holdout: float = 0.2        # share of the training studies that picks the epoch (0 = keep the last epoch)

    def __post_init__(self) -> None:
        _choice("model", self.model, SEQ_MODELS)
        _choice("device", self.device, DEVICES)
        for name, low in (("hidden", 1), ("layers", 1), ("epochs", 1), ("batch_studies", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.model == "transformer" and self.hidden % HEADS:
            raise ConfigError(f"transformer hidden must be a multiple of {HEADS} (attention heads), got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")

    def to_dict(self) -> dict:
        return asdict(self)
