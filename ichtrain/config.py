"""The training run's configuration: one frozen, validated dataclass, saved in every checkpoint.

Every choice list, mapping and bound is defined here once; the CLI, the data pipeline and the library
functions take theirs from this module and validate with its helpers (no torch import, so --help is quick).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from ichprep.reading.labels import LABELS, SUBTYPES

from .errors import ConfigError

#: Output columns of each task, in order (``rsna``: Kaggle's order, ``any`` last).
TASKS: dict[str, tuple[str, ...]] = {"rsna": LABELS, "binary": ("any",), "subtypes": SUBTYPES}
#: Every torchvision classification model that takes any square input >= 64 and ends in a linear classifier.
ARCHS = (  # by family; ichtrain.model.UNSUPPORTED lists the others and why, a test keeps both in step with torchvision
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_1_6gf",
    "regnet_x_3_2gf",
    "regnet_x_8gf",
    "regnet_x_16gf",
    "regnet_x_32gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "regnet_y_3_2gf",
    "regnet_y_8gf",
    "regnet_y_16gf",
    "regnet_y_32gf",
    "regnet_y_128gf",
    "swin_t",
    "swin_s",
    "swin_b",
    "swin_v2_t",
    "swin_v2_s",
    "swin_v2_b",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "googlenet",
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
)
#: --context N stacks 2N+1 slices; 8 (17 slices, half of a typical 35-slice RSNA study) is the most accepted.
MAX_CONTEXT = 8
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("plateau", "cosine")
#: hybrid: undersample negatives and repeat positives (:mod:`ichtrain.data.balance`); none: every candidate once.
BALANCES = ("hybrid", "none")
#: platt: a slope and intercept per label fitted on the validation patients (:mod:`ichtrain.evaluation.recalibrate`).
CALIBRATIONS = ("platt", "none")
#: Splits that keep each group's slices on one side (the folds' only choices).
GROUPINGS = ("patient", "study")
SPLITS = (*GROUPINGS, "slice")  # slice: the reference method's leaky random split of slices
#: The two sides of a run's split.
SPLIT_PARTS = ("train", "val")
DEVICES = ("auto", "cpu", "cuda")
#: Decoded shards a loader worker mixes into its batches (how 23 was chosen: BENCHMARKS.md, ``buffer_shards``).
BUFFER_SHARDS = 23
MIN_FOLDS = 2
MAX_FOLDS = 20
#: How slice probabilities become one study score (ichtrain.evaluation.studylevel.study_scores); max first: the default.
STUDY_RULES: tuple[str, ...] = ("max", "top3", "noisy_or")
EVAL_SPLITS = ("val", "all")  # evaluate: the run's validation patients, or every labelled slice
#: Each stage-2 model's own defaults of the settings left unset (how they were chosen: BENCHMARKS.md, "Stage 2").
#: The window model has about a hundred weights and fits to convergence; the recurrent and attention models
#: overfit a few dozen studies, so a held-out share of the training studies picks their epoch.
SEQ_MODEL_DEFAULTS = {
    "gru": {"hidden": 64, "epochs": 15, "lr": 3e-3, "holdout": 0.2},
    "transformer": {"hidden": 64, "epochs": 15, "lr": 3e-3, "holdout": 0.2},
    "window": {"hidden": 8, "epochs": 120, "lr": 1e-2, "holdout": 0.0},
}
# stage 2: a bidirectional GRU, a transformer encoder, or a small network over each label's neighbouring logits
SEQ_MODELS = tuple(SEQ_MODEL_DEFAULTS)
SEQ_INPUTS = ("features", "logits")  # stage 2 reads stage 1's penultimate features or its logits
#: Attention heads of the stage-2 transformer; its ``hidden`` must be a multiple of this.
HEADS = 4
#: Test-time augmentation: the views averaged per choice (True = flipped left-right).
TTA_VIEWS: dict[str, tuple[bool, ...]] = {"none": (False,), "flip": (False, True)}
TTAS = tuple(TTA_VIEWS)
#: Evaluation and prediction: samples per batch and loader workers (no dataclass holds these).
INFER_BATCH_SIZE = 64
INFER_WORKERS = 2
SELECTION_FORMS = "'all' or 'middle:K' (K >= 1: the K slices around each study's middle slice)"


# ---------------------------------------------------------------- validation helpers


def check_arch(arch: str) -> None:
    """One of :data:`ARCHS` or ``timm:NAME`` with a NAME timm knows (:mod:`ichtrain.backbones`)."""
    from .backbones import check_timm, is_timm

    if is_timm(arch):
        check_timm(arch)
    else:
        check_choice("arch", arch, ARCHS)


def check_choice(name: str, value, choices) -> None:
    """Refuse a value that is not one of ``choices`` (a tuple, or a dict's keys), listing them."""
    if value not in choices:
        raise ConfigError(f"invalid {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_int(name: str, value, low: int = 0) -> int:
    """``value`` as an int, refused unless it is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Interval:
    """The range of a float setting; an open end is left out."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


#: val_fraction, pos_fraction: both sides of the split (both classes of the mix) keep something.
FRACTION = Interval(0, 1, low_open=True, high_open=True)
#: holdout, dropout: 0 turns it off, 1 would leave nothing to fit.
OFF_OR_FRACTION = Interval(0, 1, low_open=False, high_open=True)


def check_fraction(name: str, value, interval: Interval = FRACTION) -> float:
    """``value`` as a float, refused unless it is a number in ``interval``."""
    if is_number(value) and float(value) in interval:
        return float(value)
    ends = ((interval.low, interval.low_open), (interval.high, interval.high_open))
    excluded = " and ".join(f"{end:g}" for end, is_open in ends if is_open)
    raise ConfigError(
        f"{name} must be in {interval}, a number between {interval.low:g} and {interval.high:g}"
        f"{f' ({excluded} excluded)' if excluded else ''}, got {value!r}"
    )


def middle_count(selection) -> int | None:
    """K of a ``'middle:K'`` slice selection, None for ``'all'``; anything else is refused."""
    match = re.fullmatch(r"all|middle:([1-9][0-9]*)", selection) if isinstance(selection, str) else None
    if match is None:
        raise ConfigError(f"invalid slice selection {selection!r}; use {SELECTION_FORMS}")
    return None if match.group(1) is None else int(match.group(1))


#: Smallest accepted value of TrainConfig's integer settings (the CLI's IntRange takes the same).
TRAIN_MINIMUMS = {
    "image_size": 16,
    "epochs": 1,
    "batch_size": 1,
    "buffer_shards": 1,
    "workers": 0,
    "bn_refresh_batches": 0,
    "max_steps": 1,
}
#: Smallest accepted value of SeqConfig's integer settings.
SEQ_MINIMUMS = {"hidden": 1, "layers": 1, "epochs": 1, "batch_studies": 1}


def _check_minimums(cfg, minimums: dict[str, int]) -> None:
    for name, low in minimums.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


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
    calibration: str = "platt"
    val_fraction: float = 0.2
    split_by: str = "patient"
    folds: int | None = None  # K patient folds; fold ``fold`` validates (replaces val_fraction)
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
    ema_decay: float = 0.999  # > 0: evaluate and save an exponential moving average of the weights (0: off)
    skip_damaged: bool = False  # leave out the slots of damaged shard files (ichprep.storage.store.open_store)
    tb: bool = True  # write RUN/tb, a TensorBoard log (ichtrain.tblog)

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_arch(self.arch)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_choice("balance", self.balance, BALANCES)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("split_by", self.split_by, SPLITS)
        check_choice("device", self.device, DEVICES)
        if isinstance(self.context, bool) or not isinstance(self.context, int) or not 0 <= self.context <= MAX_CONTEXT:
            raise ConfigError(
                f"context must be an integer from 0 to {MAX_CONTEXT} (neighbour slices on each side; "
                f"{MAX_CONTEXT} already stacks {2 * MAX_CONTEXT + 1} slices), got {self.context!r}"
            )
        middle_count(self.slice_selection)
        _check_minimums(self, TRAIN_MINIMUMS)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        check_fraction("val_fraction", self.val_fraction)
        check_fraction("pos_fraction", self.pos_fraction)
        check_fraction("ema_decay", self.ema_decay, OFF_OR_FRACTION)
        if (self.folds is None) != (self.fold is None):
            raise ConfigError("give --folds K and --fold k together (k in 0 .. K-1), or neither")
        if self.folds is not None and not (MIN_FOLDS <= self.folds <= MAX_FOLDS and 0 <= self.fold < self.folds):
            raise ConfigError(
                f"need {MIN_FOLDS} <= folds <= {MAX_FOLDS} and 0 <= fold < folds, got "
                f"folds={self.folds}, fold={self.fold}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, **overrides})


@dataclass(frozen=True)
class SeqConfig:
    """Stage-2 training settings (how the defaults were chosen: BENCHMARKS.md, "Stage 2").

    ``hidden``, ``epochs``, ``lr`` and ``holdout`` left as None take the model's own defaults
    (``SEQ_MODEL_DEFAULTS``); ``dataclasses.replace`` keeps them as resolved, so build a new config to
    change the model.
    """

    model: str = "window"
    hidden: int | None = None
    layers: int = 2
    dropout: float = 0.2
    epochs: int | None = None
    batch_studies: int = 32
    lr: float | None = None
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    concat_logits: bool = True  # stage-1 logits appended to the standardised input
    holdout: float | None = None  # share of the training studies that picks the epoch (0 = keep the last epoch)

    def __post_init__(self) -> None:
        check_choice("model", self.model, SEQ_MODELS)
        for name, value in SEQ_MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, here
        check_choice("device", self.device, DEVICES)
        _check_minimums(self, SEQ_MINIMUMS)
        if self.model == "transformer" and self.hidden % HEADS:
            raise ConfigError(f"transformer hidden must be a multiple of {HEADS} (attention heads), got {self.hidden}")
        check_fraction("dropout", self.dropout, OFF_OR_FRACTION)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        check_fraction("holdout", self.holdout, OFF_OR_FRACTION)

    def to_dict(self) -> dict:
        return asdict(self)


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
