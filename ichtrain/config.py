"""The training run's configuration: one frozen, validated dataclass, saved in every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from .balance import BALANCES
from .errors import ConfigError

# One definition of every choice; the CLI builds its options from these (no torch import needed for --help).
TASKS = ("rsna", "binary", "subtypes")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
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
        _choice("context", self.context, (0, 1))
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
