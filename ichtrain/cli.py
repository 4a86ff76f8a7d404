"""``ichtrain`` command line: thin click commands that build a config and call one function."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from ichprep.cli import SourceParam, StoreParam

from . import config
from .backbones import FIND_NAMES, is_timm, timm_defaults
from .config import SeqConfig, TrainConfig
from .errors import IchtrainError
from .files import check_out_folder

logger = logging.getLogger("ichtrain")


def _fail(exc: Exception) -> None:
    text = str(exc)
    if "Original Traceback" in text:  # raised again from a DataLoader worker: its own message is the last line
        text = re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1])
    raise click.ClickException(text) from exc


def _bar_factory(desc: str, total: int):
    """A progress callback for train_one_epoch: steps, loss and images/s in the bar (rank 0 only)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=None, file=sys.stderr, leave=False)

    def log(steps: int, loss: float, images_per_s: float) -> None:
        bar.update(steps)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
        if bar.n >= bar.total:
            bar.close()

    return log


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Debug log output.")
@click.version_option(package_name="ichkit")
def main(verbose: int) -> None:
    """Train hemorrhage detectors from an ichprep Zarr cache."""
    # INFO by default: the per-epoch log line is part of the output.
    before = set(logging.getLogger().handlers)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in set(logging.getLogger().handlers) - before:  # only the console handler made here
        handler.addFilter(WarnOnce())


class WarnOnce(logging.Filter):
    """Lets a warning through the first time its text is seen: a condition that holds every epoch is said once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


STORE = StoreParam()  # a folder or an s3://... URL
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _fraction(interval: config.Interval) -> click.FloatRange:
    """The CLI's check of a fraction: the bounds the config itself enforces."""
    return click.FloatRange(interval.low, interval.high, min_open=interval.low_open, max_open=interval.high_open)


def _at_least(minimums: dict[str, int], name: str) -> click.IntRange:
    return click.IntRange(min=minimums[name])


def _train_choice(field: str, choices, help: str | None = None):
    """``--FIELD`` with the config's choice list and TrainConfig's default (one definition of each)."""
    flag = "--" + field.replace("_", "-")
    return click.option(
        flag, type=click.Choice(tuple(choices)), default=getattr(TrainConfig, field), show_default=True, help=help
    )


def _model_defaults(name: str) -> str:
    """Help text for a stage-2 setting whose default depends on --model, e.g. "[default: window 120, gru 15]"."""
    return "[default: " + ", ".join(f"{m} {d[name]:g}" for m, d in config.SEQ_MODEL_DEFAULTS.items()) + "]."


def _off_or_fraction(flag: str, default: float, help: str):
    """A setting in [0, 1) where 0 turns something off (config.OFF_OR_FRACTION)."""
    return click.option(flag, type=_fraction(config.OFF_OR_FRACTION), default=default, show_default=True, help=help)


def _device_option():
    return click.option("--device", type=click.Choice(config.DEVICES), default=TrainConfig.device, show_default=True)


def _inference_options(command):
    """--device, --batch-size and --workers of evaluate and predict."""
    for option in reversed(
        (
            _device_option(),
            click.option(
                "--batch-size",
                type=_at_least(config.TRAIN_MINIMUMS, "batch_size"),
                default=config.INFER_BATCH_SIZE,
                show_default=True,
            ),
            click.option(
                "--workers",
                type=_at_least(config.TRAIN_MINIMUMS, "workers"),
                default=config.INFER_WORKERS,
                show_default=True,
            ),
        )
    ):
        command = option(command)
    return command


_overwrite_any_option = click.option(
    "--overwrite-any",
    is_flag=True,
    help="Write into --out even where it holds files that are not ichtrain's (a run, experiment or evaluation).",
)

_skip_damaged_option = click.option(
    "--skip-damaged",
    is_flag=True,
    help="Use the rest of a store whose shard files do not all match its manifest (missing, cut or altered: "
    "every shard is hashed first), with a warning listing what is left out; without it such a store is "
    "refused, naming the files and the fix.",
)


class ArchParam(click.ParamType):
    """--arch: one of torchvision's (config.ARCHS) or timm:NAME; a wrong name fails listing what is valid."""

    name = "arch"
    choices = config.ARCHS  # torchvision's; timm:NAME is checked against timm's registry

    def convert(self, value, param, ctx):
        try:
            config.check_arch(value)
        except IchtrainError as exc:
            self.fail(str(exc), param, ctx)
        return value


TRAIN_OPTIONS = (  # what `train` and `cv` share; everything but --out, --resume and the fold options
    click.option(
        "--task",
        type=click.Choice(tuple(config.TASKS)),
        default=TrainConfig.task,
        show_default=True,
        help="rsna: any + 5 subtypes; binary: any; subtypes: 5 subtypes on positive slices only.",
    ),
    click.option(
        "--arch",
        type=ArchParam(),
        default=TrainConfig.arch,
        show_default=True,
        metavar="NAME|timm:NAME",
        help="Any torchvision classification model that takes a 64+ pixel input: resnet*, resnext*, "
        "wide_resnet*, densenet*, efficientnet_b0-b7/v2_*, convnext_*, regnet_*, swin_*, mobilenet_*, "
        "mnasnet*, shufflenet_v2_*, googlenet, alexnet, vgg* (a wrong name lists them all); or any timm "
        f"model as timm:NAME (e.g. timm:seresnext26d_32x4d; list names with {FIND_NAMES}), at its own "
        "default input size unless --image-size. Its first convolution is widened to the store's channels "
        "and its classifier replaced.",
    ),
    click.option(
        "--pretrained", type=FILE, help="Local torchvision state dict (e.g. ImageNet weights); never downloaded."
    ),
    click.option(
        "--image-size",
        type=_at_least(config.TRAIN_MINIMUMS, "image_size"),
        default=None,
        help="The network's input size, in training and evaluation alike: evaluation resizes the whole "
        "stored image to it; training resizes the same way, then takes a random crop of 80-100% of the "
        f"area (aspect kept) with a flip and a small rotation [default: {TrainConfig.image_size}; a timm "
        "model's own default input size].",
    ),
    # No upper bound here: TrainConfig's error says why 8 is the most.
    click.option(
        "--context",
        type=click.IntRange(min=0),
        default=TrainConfig.context,
        show_default=True,
        metavar="N",
        help="2.5D: stack N neighbour slices on each side of the slice (same study, clamped at its ends), "
        "(2N+1) x windows input channels (9 for N=1, 15 for N=2 with 3 windows); at most 8. Each "
        "sample carries 2N+1 slices, so loader copies, host-to-GPU transfer, augmentation and the "
        "first convolution cost 2N+1 times as much; the rest of the network does not grow.",
    ),
    click.option(
        "--epochs", type=_at_least(config.TRAIN_MINIMUMS, "epochs"), default=TrainConfig.epochs, show_default=True
    ),
    click.option(
        "--batch-size",
        type=_at_least(config.TRAIN_MINIMUMS, "batch_size"),
        default=TrainConfig.batch_size,
        show_default=True,
    ),
    click.option("--lr", type=float, default=TrainConfig.lr, show_default=True),
    _train_choice(
        "optimizer", config.OPTIMIZERS, help=f"sgd uses momentum {TrainConfig.momentum} (the reference method)."
    ),
    _train_choice("scheduler", config.SCHEDULERS),
    _train_choice(
        "balance",
        config.BALANCES,
        help="hybrid: undersample negatives and repeat positives (the reference method), with each sample's "
        "loss weighted by 1 / its expected repeats so that probabilities stay calibrated.",
    ),
    click.option(
        "--pos-fraction",
        type=_fraction(config.FRACTION),
        default=TrainConfig.pos_fraction,
        show_default=True,
        help="Target share of positive slices per epoch with --balance hybrid.",
    ),
    _off_or_fraction(
        "--ema-decay",
        TrainConfig.ema_decay,
        help="Evaluate and save an exponential moving average of the weights, updated after step t with "
        "decay min(D, (1 + t) / (10 + t)) (0 = off); training continues from the raw weights.",
    ),
    _train_choice(
        "calibration",
        config.CALIBRATIONS,
        help="platt: a slope and intercept per label fitted on the validation patients and stored in the "
        "checkpoint (evaluate and predict apply it; validation figures are cross-fitted over its patients). "
        "none: the network's own probabilities.",
    ),
    click.option(
        "--val-fraction", type=_fraction(config.FRACTION), default=TrainConfig.val_fraction, show_default=True
    ),
    _train_choice(
        "split_by",
        config.SPLITS,
        help="slice reproduces the reference method's random slice split, which leaks patients (do not "
        "report it as a result).",
    ),
    click.option(
        "--slice-selection",
        default=TrainConfig.slice_selection,
        show_default=True,
        metavar="all|middle:K",
        help="Training slices only: middle:K keeps the K slices around each study's middle (the reference "
        "method). Validation always covers every labelled slice; middle-slice figures are added.",
    ),
    click.option("--seed", type=int, default=TrainConfig.seed, show_default=True),
    click.option(
        "--workers",
        type=_at_least(config.TRAIN_MINIMUMS, "workers"),
        default=TrainConfig.workers,
        show_default=True,
        help="DataLoader workers.",
    ),
    click.option(
        "--buffer-shards",
        type=_at_least(config.TRAIN_MINIMUMS, "buffer_shards"),
        default=TrainConfig.buffer_shards,
        show_default=True,
        help="Decoded shards each loader worker mixes samples from (more: more studies per batch). Memory per "
        "worker: this x shard slices x channels x size^2 bytes (default store: 12.6 MB a shard, 290 MB "
        "for 23).",
    ),
    _device_option(),
    click.option(
        "--amp/--no-amp",
        default=TrainConfig.amp,
        show_default=True,
        help="bf16 autocast on CUDA (fp16 + scaler on old GPUs).",
    ),
    click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model."),
    click.option(
        "--max-steps",
        type=_at_least(config.TRAIN_MINIMUMS, "max_steps"),
        default=TrainConfig.max_steps,
        help="Cap training steps per epoch.",
    ),
    click.option(
        "--bn-refresh-batches",
        type=_at_least(config.TRAIN_MINIMUMS, "bn_refresh_batches"),
        default=TrainConfig.bn_refresh_batches,
        show_default=True,
        help="After each epoch, recompute BatchNorm statistics over this many training batches with the "
        "epoch's final weights (0: keep the running averages, which lag behind at a high lr).",
    ),
    _skip_damaged_option,
    click.option(
        "--tb/--no-tb",
        default=TrainConfig.tb,
        show_default=True,
        help="Write RUN/tb, a TensorBoard log (tensorboard --logdir RUN): training loss, lr and samples/s; "
        "each epoch's validation metrics per label with intervals, PR and ROC curves, and validation slices.",
    ),
)


def train_options(command):
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


def _train_config(store, out, options: dict, **extra) -> TrainConfig:
    """A TrainConfig from the shared options' values (click names -> config fields)."""
    options = dict(options)
    pretrained = options.pop("pretrained")
    if options["image_size"] is None:
        arch = options["arch"]
        options["image_size"] = timm_defaults(arch).input_size if is_timm(arch) else TrainConfig.image_size
    return TrainConfig(
        store=str(store),
        out=str(out),
        pretrained=str(pretrained) if pretrained else None,
        compile=options.pop("compile_model"),
        **options,
        **extra,
    )


#: train's click parameter names that are not TrainConfig fields, and the field each sets.
_CLICK_TO_FIELD = {"compile_model": "compile", "config_file": None, "overwrite_any": None}


def _rerun_config(ctx, config_file: Path, store, out, options: dict, extra: dict) -> TrainConfig:
    """RUN/config.json's settings (its paths recorded relative to RUN), with the options given on this
    command line in their place."""
    import json

    from click.core import ParameterSource

    from .files import PATH_FIELDS, resolved_path

    saved = json.loads(config_file.read_text())
    folder = config_file.parent
    settings = {**saved, **{k: resolved_path(saved.get(k), folder) for k in PATH_FIELDS if k in saved}}
    given = {**options, **extra, "store": store, "out": out}
    for name, value in given.items():
        field = _CLICK_TO_FIELD.get(name, name)
        if field is not None and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            settings[field] = str(value) if isinstance(value, Path) else value
    if ctx.get_parameter_source("resume") != ParameterSource.COMMANDLINE:
        settings["resume"] = None  # a rerun starts afresh unless told to resume
    return TrainConfig.from_dict(settings)


@main.command()
@click.argument("store", type=STORE, required=False)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder to write (required unless --config)."
)
@click.option(
    "--config",
    "config_file",
    type=FILE,
    help="Rerun a run: every option (STORE and --out too) from its RUN/config.json; any given here overrides it.",
)
@click.option("--resume", type=FILE, help="Continue from this checkpoint (e.g. RUN/last.pt).")
@click.option(
    "--folds",
    type=click.IntRange(config.MIN_FOLDS, config.MAX_FOLDS),
    default=TrainConfig.folds,
    help="Split the patients into K folds (grouped, stratified by bleeding; fixed by --seed) ...",
)
@click.option("--fold", type=click.IntRange(min=0), default=None, help="... and validate on fold k (0 .. K-1).")
@_overwrite_any_option
@train_options
@click.pass_context
def train(ctx, store, out, config_file, resume, folds, fold, overwrite_any, **options) -> None:
    """Train a torchvision or timm model on STORE; checkpoints, metrics and plots go to --out.

    `ichtrain train --config RUN/config.json --out RUN2` reruns RUN with every option it had.
    """
    from .evaluation.metrics import format_metrics
    from .train import train as run_train

    try:
        extra = {"resume": str(resume) if resume else None, "folds": folds, "fold": fold}
        if config_file is not None:
            cfg = _rerun_config(ctx, config_file, store, out, options, extra)
        elif store is None or out is None:
            raise click.UsageError("give STORE and --out (or --config RUN/config.json)")
        else:
            cfg = _train_config(store, out, options, **extra)
        out = Path(cfg.out)
        check_out_folder(out, overwrite_any)
        metrics = run_train(cfg, progress=_bar_factory)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            f"best epoch {metrics['best_epoch']} of {cfg.epochs} (best.pt, roc.png, calibration.png, "
            "val_predictions.parquet; validation on every labelled slice of the validation patients):"
        )
        click.echo(format_metrics(metrics))
        click.echo(
            f"run folder: {out} (best.pt, last.pt, metrics.json, metrics.jsonl, loss.png, roc.png, "
            "calibration.png, val_predictions.parquet, split.parquet)"
        )


@main.command()
@click.argument("store", type=STORE)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Experiment folder: folds.parquet, fold0 .. fold{K-1} (each a train run), oof.parquet, metrics.json.",
)
@click.option(
    "--folds",
    type=click.IntRange(config.MIN_FOLDS, config.MAX_FOLDS),
    default=5,
    show_default=True,
    help="Patient folds (grouped, stratified by bleeding, fixed by --seed); fold k's model scores fold k.",
)
@click.option(
    "--tta",
    type=click.Choice(config.TTAS),
    default="none",
    show_default=True,
    help="Test-time augmentation for the out-of-fold outputs (flip: average with the mirrored slice).",
)
@_overwrite_any_option
@train_options
def cv(store, out, folds, tta, overwrite_any, **options) -> None:
    """Train every fold of STORE in turn into --out, then export and score the out-of-fold outputs.

    A fold whose run finished (fold{k}/metrics.json) is kept and one that was interrupted resumes from its
    last.pt, so `cv` can be rerun after a crash or after folds were trained elsewhere with `train --folds --fold`.
    """
    from .evaluation.metrics import format_metrics
    from .study.experiment import cross_validate

    try:
        check_out_folder(out, overwrite_any)
        summary = cross_validate(_train_config(store, out, options), folds, tta=tta, progress=_bar_factory)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    for fold in summary["folds"]:
        click.echo(
            f"fold {fold['fold']}: best epoch {fold['best_epoch']}, weighted log loss "
            f"{fold['weighted_log_loss']:.4f}, mean AUC {fold['mean_auc']}"
        )
    click.echo(f"out-of-fold, every labelled slice of {store} scored by the fold that did not train on it:")
    click.echo(format_metrics(summary["oof"]))
    click.echo(f"experiment folder: {out} (folds.parquet, fold0 .. fold{folds - 1}, oof.parquet, metrics.json)")


@main.command()
@click.argument("exp", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Stage-2 folder (seq.pt, oof.parquet, metrics.json); default EXP/seq.",
)
@click.option(
    "--model",
    type=click.Choice(config.SEQ_MODELS),
    default=SeqConfig.model,
    show_default=True,
    help="window: a small network over each label's logits on the neighbouring slices and the study's top; "
    "gru: a bidirectional GRU over the study's slices; transformer: an encoder with z positions.",
)
@click.option(
    "--inputs",
    type=click.Choice(config.SEQ_INPUTS),
    default="logits",
    show_default=True,
    help="Per slice, stage 1's logits or its penultimate features (the logits are the residual base either "
    "way; the window model reads the logits only). Features only mean the same thing across folds when "
    "every fold started from the same --pretrained weights.",
)
@click.option(
    "--epochs",
    type=_at_least(config.SEQ_MINIMUMS, "epochs"),
    default=None,
    help="Stage-2 epochs (with --holdout, the best is kept) " + _model_defaults("epochs"),
)
@click.option(
    "--hidden",
    type=_at_least(config.SEQ_MINIMUMS, "hidden"),
    default=None,
    help="Hidden units " + _model_defaults("hidden"),
)
@click.option(
    "--layers",
    type=_at_least(config.SEQ_MINIMUMS, "layers"),
    default=SeqConfig.layers,
    show_default=True,
    help="Recurrent or encoder layers.",
)
@click.option("--lr", type=float, default=None, help="AdamW learning rate " + _model_defaults("lr"))
@click.option(
    "--holdout",
    type=_fraction(config.OFF_OR_FRACTION),
    default=None,
    help="Share of each fold's training studies that picks the epoch, the untrained model (= stage 1) "
    "included; 0 keeps the last epoch " + _model_defaults("holdout"),
)
@click.option(
    "--batch-studies",
    type=_at_least(config.SEQ_MINIMUMS, "batch_studies"),
    default=SeqConfig.batch_studies,
    show_default=True,
    help="Studies per batch.",
)
@click.option("--seed", type=int, default=None, help="Default: the experiment's seed.")
# Stage 2 runs where stage 1 did (auto); SeqConfig's own default, the CPU, is for deterministic library use.
@_device_option()
@_overwrite_any_option
def seq(exp, out, model, inputs, overwrite_any, **options) -> None:
    """Stage 2: a sequence model over each study's z-ordered slices, cross-fitted on EXP's folds.

    Fold k's stage-2 model trains on the out-of-fold stage-1 outputs of the other folds and predicts fold k,
    so no slice's prediction comes from a model (stage 1 or 2) that trained on its patient.
    """
    from .study.experiment import open_experiment
    from .study.stage2 import compare_table, run_seq

    try:
        if out is not None:
            check_out_folder(out, overwrite_any)
        given = {k: v for k, v in options.items() if v is not None}
        given.setdefault("seed", open_experiment(exp).cfg.seed)
        summary = run_seq(exp, out, SeqConfig(model=model, **given), kind=inputs)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    click.echo(f"out of fold, every labelled slice; stage 1 = the fold CNNs, stage 2 = {model} on {inputs}:")
    click.echo(compare_table(summary["stage1"], summary["oof"], tuple(summary["oof"]["names"])))
    ratio = summary["oof"]["weighted_log_loss"] / summary["stage1"]["weighted_log_loss"]
    click.echo(
        f"weighted log loss: stage 1 {summary['stage1']['weighted_log_loss']:.4f}, stage 2 "
        f"{summary['oof']['weighted_log_loss']:.4f} ({ratio:.2f}x)"
    )
    click.echo(
        f"wrote {out or Path(exp) / 'seq'} (seq.pt, oof.parquet, metrics.json), {exp}/compare.png and a "
        f"{exp}/study_<uid>.png"
    )


MODEL = click.Path(exists=True, path_type=Path)  # a checkpoint file or an experiment folder
_study_rule_option = click.option(
    "--study-rule",
    type=click.Choice(config.STUDY_RULES),
    default=config.STUDY_RULES[0],
    show_default=True,
    help="How slice probabilities become a study's score (max measured best on out-of-fold studies: BENCHMARKS.md).",
)


@main.command()
@click.argument("model", type=MODEL)
@click.option("--store", required=True, type=STORE)
@click.option(
    "--split",
    type=click.Choice(config.EVAL_SPLITS),
    default="val",
    show_default=True,
    help="For a checkpoint: val = every labelled slice of the run's validation patients; all = every "
    "labelled slice of STORE (e.g. a held-out archive). An experiment always scores every one. A store "
    "with study labels only (convert --study-labels) is scored by study on every slice.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tta", type=click.Choice(config.TTAS), default="none", show_default=True)
@_study_rule_option
@click.option(
    "--operating-point",
    "targets",
    multiple=True,
    metavar="sens=S|spec=S",
    help="Another study-level operating point to fix on MODEL's validation and apply unchanged here "
    "(repeat); sens>=0.95 and the Youden point are always reported.",
)
@_inference_options
@_skip_damaged_option
@_overwrite_any_option
def evaluate(
    model, store, split, out, tta, study_rule, targets, device, batch_size, workers, skip_damaged, overwrite_any
) -> None:
    """Slice and study-level metrics of MODEL (RUN/best.pt or an experiment) on STORE, with figures.

    Slice metrics, predictions, ROC and calibration plots where STORE has slice labels; then per label the
    study AUC [95 % CI] and sensitivity/specificity at operating points fixed on MODEL's own validation,
    with every reader beside the model where STORE has readers (study_metrics.json, study_roc.png,
    worst_studies.png). An experiment is scored as its folds' mean (stage 1) and, when EXP/seq exists,
    through stage 2.
    """
    from ichprep.storage.store import open_store

    from .evaluation.metrics import format_metrics
    from .study.external import DEFAULT_TARGETS, format_studies, reference_points

    try:
        check_out_folder(out, overwrite_any)
        opened = open_store(store, skip_damaged=skip_damaged)
        reference = reference_points(model, rule=study_rule, targets=DEFAULT_TARGETS + tuple(targets))
        if _has_slice_labels(opened):
            metrics = _evaluate_slices(model, opened, split, out, tta, device, batch_size, workers)
        else:
            metrics = {}
            click.echo(f"{store} has no slice labels: scored by study only")
        table = _evaluate_by_study(model, opened, out, reference, bool(metrics), tta, device, batch_size, workers)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    for stage in ("stage1", "stage2"):
        if stage in metrics:
            click.echo(
                f"{stage.replace('stage', 'stage ')} (mean of the folds):"
                if stage == "stage1"
                else "stage 2 (each fold's sequence model on its stage 1, averaged):"
            )
            click.echo(format_metrics(metrics[stage]))
    if metrics and "stage1" not in metrics:
        click.echo(format_metrics(metrics["final"]))
    click.echo(format_studies(table))
    wrote = "predictions.parquet, roc.png, calibration.png, " if metrics else ""
    click.echo(
        f"wrote {out}: metrics.json, {wrote}study_metrics.json, study_predictions.csv, study_roc.png, worst_studies.png"
    )


def _has_slice_labels(store) -> bool:
    """Whether any readable slice of the store carries a label (a store made with --study-labels has none)."""
    labelled = store.slices[list(config.LABELS)].notna().any(axis=1).to_numpy()
    return bool((labelled & store.slices["ok"].to_numpy(bool)).any())


def _evaluate_slices(model, store, split, out, tta, device, batch_size, workers) -> dict:
    from .evaluation.evaluate import evaluate_checkpoint
    from .study.experiment import is_experiment
    from .study.submit import evaluate_experiment

    if is_experiment(model):
        return evaluate_experiment(model, store, out, tta=tta, device=device, batch_size=batch_size, workers=workers)
    final = evaluate_checkpoint(
        model, store, out, split=split, device=device, batch_size=batch_size, workers=workers, tta=tta
    )
    return {"final": final}


def _evaluate_by_study(model, store, out, reference, scored, tta, device, batch_size, workers) -> dict:
    """The study-level block: from the slice evaluation's predictions where it ran (``scored``), else every slice."""
    import json

    import numpy as np
    import pandas as pd

    from .files import METRICS, PREDICTIONS
    from .study.external import evaluate_studies, slice_table
    from .study.submit import model_probs

    if scored:
        preds = pd.read_parquet(Path(out) / PREDICTIONS)
        names = tuple(c[len("prob_") :] for c in preds.columns if c.startswith("prob_"))
        slots = preds["slot"].to_numpy()
        probs = preds[[f"prob_{n}" for n in names]].to_numpy()
    else:
        found = model_probs(model, store, tta=tta, device=device, batch_size=batch_size, workers=workers)
        names = found.names
        slots = np.flatnonzero(~np.isnan(found.probs).any(axis=1))
        probs = found.probs[slots]
    table = evaluate_studies(slice_table(store, slots, probs, names), store, out, names=names, reference=reference)
    summary = Path(out) / METRICS  # metrics.json holds everything: slice blocks where they exist, then studies
    merged = json.loads(summary.read_text()) if scored else {}
    summary.write_text(json.dumps({**merged, "studies": table}, indent=2) + "\n")
    return table


@main.command()
@click.argument("models", nargs=-1, required=True, type=MODEL)
@click.option("--store", type=STORE, help="Predict every slice of this store.")
@click.option(
    "--dicom-dir",
    type=SourceParam(),
    help="Predict DICOMs directly (converted with the first model's spec first): a folder, a zip "
    "(rsna.zip::rsna-intracranial-hemorrhage-detection/stage_2_test) or a URL.",
)
@click.option(
    "--sample-submission",
    metavar="CSV",
    help="Kaggle's stage_2_sample_submission.csv (a file, URL or ZIP::PATH): write exactly its rows, in its order.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kaggle-format CSV (ID,Label) to write; probabilities clipped to [1e-6, 1 - 1e-6].",
)
@click.option(
    "--tta",
    type=click.Choice(config.TTAS),
    default="none",
    show_default=True,
    help="flip: average each slice with its mirror image.",
)
@click.option("--no-seq", is_flag=True, help="Experiments: stage 1 only (the folds' mean), even when EXP/seq exists.")
@click.option(
    "--raw-any",
    is_flag=True,
    help="Write the model's own 'any'; by default it is raised to the largest subtype probability.",
)
@_inference_options
@click.option(
    "--allow-subtypes-only",
    is_flag=True,
    help="Write predictions of a --task subtypes checkpoint (its 'any' is the max subtype of a model that "
    "never saw a normal slice).",
)
@click.option(
    "--study-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write one score per study and label (study_uid, label, probability) here, by --study-rule.",
)
@_study_rule_option
@_skip_damaged_option
def predict(
    models,
    store,
    dicom_dir,
    sample_submission,
    output,
    tta,
    no_seq,
    raw_any,
    device,
    batch_size,
    workers,
    allow_subtypes_only,
    study_csv,
    study_rule,
    skip_damaged,
) -> None:
    """Write Kaggle-format probabilities (six rows per image) for a store or a DICOM folder.

    MODELS are checkpoints (RUN/best.pt) and experiment folders (ichtrain cv [+ seq]); several are averaged.
    """
    from ichprep.storage.store import open_store

    from .study.submit import predict_dicoms, predict_store

    if (store is None) == (dicom_dir is None):
        raise click.UsageError("give exactly one of --store STORE or --dicom-dir SOURCE")
    options = {
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "tta": tta,
        "use_seq": not no_seq,
        "any_at_least_subtypes": not raw_any,
        "allow_subtypes_only": allow_subtypes_only,
        "sample_submission": sample_submission,
        "study_csv": study_csv,
        "study_rule": study_rule,
    }
    try:
        if store is not None:
            frame = predict_store(models, open_store(store, skip_damaged=skip_damaged), output, **options)
        else:
            frame = predict_dicoms(models, dicom_dir, output, **options)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {len(frame)} rows ({len(frame) // 6} images, {len(models)} model(s)) to {output}")
    if study_csv:
        click.echo(f"wrote study scores ({study_rule} over slices) to {study_csv}")


@main.command()
@click.argument("submission", type=FILE)
@click.option("--labels", "labels_csv", required=True, type=FILE, help="Kaggle label CSV (stage_2_train.csv format).")
def score(submission, labels_csv) -> None:
    """The competition's weighted log loss of a Kaggle-format SUBMISSION against a label CSV."""
    from .study.submit import score_submission

    try:
        result = score_submission(submission, labels_csv)
    except (IchtrainError, ValueError, OSError) as exc:
        _fail(exc)
    for name, value in result["per_label_log_loss"].items():
        click.echo(f"{name:18s} log loss {value:.4f}")
    click.echo(
        f"weighted log loss {result['weighted_log_loss']:.5f} on {result['n_images']} labelled images "
        f"(best constant submission: {result['constant_weighted_log_loss']:.5f})"
    )
