"""Predictions of runs and experiments on a store or a DICOM folder: averaged, scored, or written for Kaggle.

``--dicom-dir`` converts the folder into a temporary store with the model's own preprocessing spec, through
the converter's code (same HU, windows, resize, study grouping and z order that ``--context`` and stage 2
need), then predicts from that store: there is one preprocessing path, not two.

A MODEL is a checkpoint (``RUN/best.pt``) or an experiment folder (``ichtrain cv``): an experiment averages
its K fold models, each followed by its own stage-2 model when ``EXP/seq`` exists (unless ``use_seq=False``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ichprep.cluster import OnDemand
from ichprep.convert import convert
from ichprep.reading.labels import LABELS, read_labels
from ichprep.reading.source import read_csv
from ichprep.spec import PreprocessSpec
from ichprep.storage.store import REJECTED, Store

from ..checkpoint import Checkpoint
from ..config import INFER_BATCH_SIZE, INFER_WORKERS, STUDY_RULES, TrainConfig
from ..data.tables import targets
from ..engine import Predictions, sigmoid
from ..errors import ConfigError, DataError
from ..evaluation.evaluate import Loaded, as_store, load_for_store
from ..evaluation.metrics import per_class_log_loss, weighted_log_loss
from ..evaluation.plots import plot_compare
from ..evaluation.report import write_report
from ..files import BEST, COMPARE_PLOT, STAGE2_DIR, STAGE2_MODEL
from . import sequence
from .experiment import Inferred, fold_dir, infer_slots, is_experiment, oof_block, open_experiment, scored_slots
from .external import write_study_csv
from .stage2 import any_max, seq_inputs

logger = logging.getLogger(__name__)


class ModelProbs(NamedTuple):
    """One model's probabilities for every slot of a store (NaN where a slot has no pixels)."""

    probs: np.ndarray  # float32 (N, K): the final stage (stage 2 when used)
    stage1: np.ndarray  # float32 (N, K): stage 1 alone (== probs for a checkpoint)
    names: tuple[str, ...]
    prevalence: dict[str, float]  # training prevalence per label: the answer for a slot without pixels
    staged: bool  # True when ``probs`` came from stage 2


class Stage1(NamedTuple):
    """A checkpoint's outputs on every slot of its store."""

    inferred: Inferred  # features and logits of the readable slots, as the network made them
    mapped: Inferred  # the same with the logits through the checkpoint's Platt map (the identity without one)
    probs: np.ndarray  # float32 (N, K) of the mapped logits, NaN where a slot has no pixels
    prevalence: list[float]  # the checkpoint's training prevalence per output


def stage1(loaded: Loaded, *, tta: str, batch_size: int, workers: int) -> Stage1:
    n, k = len(loaded.store.slices), len(loaded.names)
    inferred = infer_slots(loaded, np.ones(n, bool), tta=tta, batch_size=batch_size, workers=workers)
    mapped = inferred._replace(logits=loaded.platt(inferred.logits))
    probs = np.full((n, k), np.nan, np.float32)
    probs[inferred.slots] = sigmoid(mapped.logits)
    prevalence = loaded.checkpoint.train_prevalence
    return Stage1(
        inferred=inferred, mapped=mapped, probs=probs, prevalence=[0.5] * k if prevalence is None else prevalence
    )


def checkpoint_probs(
    checkpoint: str | Path,
    store: Store | str | Path,
    *,
    tta: str = "none",
    device: str = TrainConfig.device,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
    allow_subtypes_only: bool = False,
) -> ModelProbs:
    loaded = load_for_store(checkpoint, store, device)
    check_task(loaded, checkpoint, allow_subtypes_only)
    stage = stage1(loaded, tta=tta, batch_size=batch_size, workers=workers)
    return ModelProbs(
        probs=stage.probs,
        stage1=stage.probs,
        names=loaded.names,
        prevalence=dict(zip(loaded.names, stage.prevalence)),
        staged=False,
    )


def experiment_probs(
    exp: str | Path,
    store: Store | str | Path,
    *,
    tta: str = "none",
    use_seq: bool = True,
    device: str = TrainConfig.device,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
) -> ModelProbs:
    """The mean over folds of stage-1 probabilities and, with EXP/seq, of each fold's stage-2 probabilities."""
    experiment = open_experiment(exp)
    store = as_store(store)
    seq_path = experiment.path / STAGE2_DIR / STAGE2_MODEL
    staged = use_seq and seq_path.exists()
    if use_seq and not staged:
        logger.warning(
            "%s has no stage 2 (%s); predicting with stage 1 only (run `ichtrain seq %s`)", exp, seq_path, exp
        )
    seq = sequence.load_seq(seq_path) if staged else None
    first, second, prevalence = [], [], []
    for k in range(experiment.folds):
        loaded = load_for_store(fold_dir(experiment.path, k) / BEST, store, device)
        stage = stage1(loaded, tta=tta, batch_size=batch_size, workers=workers)
        first.append(stage.probs)
        prevalence.append(stage.prevalence)
        if seq is not None:
            inputs = seq_inputs(
                store,
                stage.mapped if seq.calibrated else stage.inferred,
                kind=seq.inputs_kind,
                task=experiment.cfg.task,
                slot_fold=np.zeros(len(store.slices), np.int64),
            )
            staged_probs = sequence.predict(seq.fitted[k], inputs, np.arange(len(inputs.starts)))
            staged_probs[~store.slices["ok"].to_numpy(bool)] = np.nan
            second.append(staged_probs.astype(np.float32))
    mean1 = np.mean(first, axis=0)
    return ModelProbs(
        probs=np.mean(second, axis=0) if staged else mean1,
        stage1=mean1,
        names=experiment.names,
        prevalence=dict(zip(experiment.names, np.mean(prevalence, axis=0))),
        staged=staged,
    )


def model_probs(model: str | Path, store: Store | str | Path, **options) -> ModelProbs:
    if is_experiment(model):
        options.pop("allow_subtypes_only", None)
        return experiment_probs(model, store, **options)
    options.pop("use_seq", None)
    return checkpoint_probs(model, store, **options)


class KaggleTable(NamedTuple):
    table: np.ndarray  # (N, 6) in Kaggle's label order; a slot without pixels has the training prevalence
    fallback: np.ndarray  # (6,) the answer for an image without pixels


def _kaggle_table(probs: ModelProbs) -> KaggleTable:
    fallback = np.array([probs.prevalence.get(n, 0.5) for n in probs.names])
    filled = np.where(np.isnan(probs.probs), fallback, probs.probs)
    return KaggleTable(
        table=six_columns(filled, probs.names, probs.prevalence),
        fallback=six_columns(fallback[None], probs.names, probs.prevalence)[0],
    )


def predict_store(
    models: str | Path | Sequence[str | Path],
    store_path: Store | str | Path,
    out_csv,
    *,
    device: str = TrainConfig.device,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
    tta: str = "none",
    use_seq: bool = True,
    any_at_least_subtypes: bool = True,
    unreadable: list[str] | None = None,
    allow_subtypes_only: bool = False,
    sample_submission: str | Path | None = None,
    study_csv: str | Path | None = None,
    study_rule: str = STUDY_RULES[0],
) -> pd.DataFrame:
    """Write a Kaggle-format CSV for every slice of a store: the mean of the models' probabilities.

    ``any_at_least_subtypes`` raises ``any`` to the largest subtype probability (a bleed of any kind is a
    bleed).  Unreadable slices get the training prevalence.  Raises ConfigError for a ``--task subtypes``
    checkpoint unless ``allow_subtypes_only``.  ``sample_submission`` (a file, URL or ``ZIP::PATH``): write
    exactly its rows, in its order (see :func:`follow_sample`).  ``study_csv``: also one score per study and
    label by ``study_rule`` (:func:`ichtrain.study.external.write_study_csv`).
    """
    models = [models] if isinstance(models, (str, Path)) else list(models)
    store = as_store(store_path)
    tables = [
        _kaggle_table(
            model_probs(
                s,
                store,
                tta=tta,
                use_seq=use_seq,
                device=device,
                batch_size=batch_size,
                workers=workers,
                allow_subtypes_only=allow_subtypes_only,
            )
        )
        for s in models
    ]
    table = np.mean([t.table for t in tables], axis=0)
    if any_at_least_subtypes:
        table = any_max(table, LABELS)
    ok = store.slices["ok"].to_numpy(bool)
    if study_csv is not None:  # study scores from the readable slices only
        write_study_csv(np.where(ok[:, None], table, np.nan), store, study_csv, names=LABELS, rule=study_rule)
    image_ids = store.slices["image_id"].astype(str).tolist()
    extra = list(unreadable or [])
    if extra:
        image_ids += extra
        table = np.vstack([table, np.tile(np.mean([t.fallback for t in tables], axis=0), (len(extra), 1))])
    no_pixels = store.slices.loc[~ok, "image_id"].astype(str).tolist() + extra
    if no_pixels:
        logger.warning(
            "%d images have no readable pixels and get the training prevalence: %s",
            len(no_pixels),
            ", ".join(no_pixels),
        )
    frame = kaggle_rows(image_ids, np.clip(table, CLIP, 1 - CLIP))
    if sample_submission is not None:
        frame = follow_sample(frame, sample_submission, np.mean([t.fallback for t in tables], axis=0))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False, float_format="%.6f")
    logger.info(
        "wrote %d predictions (%d images, %d models, %d without readable pixels) to %s",
        len(frame),
        len(image_ids),
        len(models),
        len(no_pixels),
        out_csv,
    )
    return frame


def follow_sample(frame: pd.DataFrame, sample_submission: str | Path, fallback: np.ndarray) -> pd.DataFrame:
    """``frame``'s rows in the order of Kaggle's sample submission, exactly its IDs.

    An ID the predictions lack (its file was missing from the archive) gets its label's training
    prevalence (``fallback``, in LABELS order), with a warning; predicted images the sample does not list are
    left out, with a warning.
    """
    sample = read_csv(sample_submission, dtype={"ID": str})
    if list(sample.columns) != ["ID", "Label"]:
        raise DataError(
            f"{sample_submission}: expected the columns ID,Label of Kaggle's sample submission, "
            f"got {list(sample.columns)}"
        )
    label = sample["ID"].str.rsplit("_", n=1).str[1]
    unknown = ~label.isin(LABELS)
    if unknown.any():
        raise DataError(
            f"{sample_submission}: ID {sample['ID'][unknown].iloc[0]!r} does not end in one of {', '.join(LABELS)}"
        )
    predicted = frame.set_index("ID")["Label"]
    values = predicted.reindex(sample["ID"])
    missing = values.isna().to_numpy()
    if missing.any():
        logger.warning(
            "%d rows of the sample submission have no prediction (no such file in the archive) and "
            "get the training prevalence, e.g. %s",
            int(missing.sum()),
            sample["ID"][missing].iloc[0],
        )
        values[missing] = fallback[label[missing].map(LABELS.index).to_numpy()]
    left_out = len(predicted) - int((~missing).sum())
    if left_out:
        logger.warning("%d predicted rows are not in the sample submission and are left out", left_out)
    return pd.DataFrame({"ID": sample["ID"].to_numpy(), "Label": np.clip(values.to_numpy(float), CLIP, 1 - CLIP)})


def model_spec(model: str | Path) -> PreprocessSpec:
    """The preprocessing a model was trained on (an experiment's: its first fold's)."""
    checkpoint = fold_dir(model, 0) / BEST if is_experiment(model) else model
    return PreprocessSpec.from_attrs(Checkpoint.load(checkpoint).spec)


def predict_dicoms(
    models: str | Path | Sequence[str | Path], dicom_dir, out_csv, *, client=None, **options
) -> pd.DataFrame:
    """Convert ``dicom_dir`` (a folder, zip or URL: :mod:`ichprep.reading.source`) with the first model's spec into a
    temporary store, then predict from it.  Without a ``client`` a local cluster converts where the files are
    many enough to pay for it (:class:`ichprep.cluster.OnDemand`)."""
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if options.get("sample_submission") is not None:
        read_csv(options["sample_submission"], nrows=1)  # a wrong path fails before the conversion
    with tempfile.TemporaryDirectory(prefix="ichtrain-predict-") as tmp:
        store = Path(tmp) / "cache.zarr"
        with OnDemand() if client is None else nullcontext(client) as on_demand:  # closed before inference
            convert(dicom_dir, store, model_spec(models[0]), client=on_demand)
        rejected = pd.read_csv(store / REJECTED, dtype=str)
        unreadable = rejected.loc[rejected["stage"] == "header", "image_id"].tolist()
        return predict_store(models, store, out_csv, unreadable=unreadable, **options)


def evaluate_experiment(
    exp: str | Path,
    store_path: Store | str | Path,
    out: str | Path,
    *,
    tta: str = "none",
    device: str = TrainConfig.device,
    batch_size: int = INFER_BATCH_SIZE,
    workers: int = INFER_WORKERS,
) -> dict:
    """Stage 1 (mean of the folds) and stage 2 on every labelled slice of a store; the final stage's figures."""
    experiment = open_experiment(exp)
    store = as_store(store_path)
    probs = experiment_probs(
        experiment, store, tta=tta, use_seq=True, device=device, batch_size=batch_size, workers=workers
    )
    task, names, seed = experiment.cfg.task, experiment.names, experiment.cfg.seed
    slots = scored_slots(store, task)
    metrics = {"stage1": oof_block(store, slots, probs.stage1[slots], names=names, task=task, seed=seed)}
    if probs.staged:
        metrics["stage2"] = oof_block(store, slots, probs.probs[slots], names=names, task=task, seed=seed)
    metrics["final"] = metrics["stage2" if probs.staged else "stage1"]
    preds = Predictions(probs=probs.probs[slots], targets=targets(store.slices, task)[slots], slots=slots)
    out = write_report(out, preds, metrics, names=names, store=store)
    if probs.staged:
        plot_compare(metrics["stage1"], metrics["stage2"], names, out / COMPARE_PLOT)
    return metrics


def read_submission(path: str | Path) -> pd.DataFrame:
    """A Kaggle-format CSV (``ID_<image>_<label>,p``) as one row per image, six columns in Kaggle's order."""
    raw = pd.read_csv(path, dtype={"ID": str, "Label": float})
    if list(raw.columns) != ["ID", "Label"]:
        raise DataError(f"{path}: expected the columns ID,Label of a Kaggle submission, got {list(raw.columns)}")
    parts = raw["ID"].str.rsplit("_", n=1, expand=True)
    table = raw.assign(image_id=parts[0], label=parts[1]).pivot(index="image_id", columns="label", values="Label")
    missing = [n for n in LABELS if n not in table.columns]
    if missing:
        raise DataError(f"{path}: no rows for label(s) {', '.join(missing)}")
    return table[list(LABELS)]


def score_submission(submission: str | Path, labels_csv: str | Path) -> dict:
    """The competition's weighted log loss of a submission on the labelled images it covers.

    Also the score of the best constant submission (each label's prevalence in these labels), the floor any
    model must beat.
    """
    predicted = read_submission(submission)
    truth = read_labels(labels_csv).dropna()
    common = truth.index.intersection(predicted.index)
    if not len(common):
        raise DataError(f"{submission} and {labels_csv} share no image ids")
    y = truth.loc[common, list(LABELS)].to_numpy(np.float64)
    p = np.clip(predicted.loc[common].to_numpy(np.float64), CLIP, 1 - CLIP)
    constant = np.broadcast_to(y.mean(axis=0), y.shape)
    return {
        "weighted_log_loss": weighted_log_loss(y, p, LABELS),
        "per_label_log_loss": per_class_log_loss(y, p, LABELS),
        "constant_weighted_log_loss": weighted_log_loss(y, constant, LABELS),
        "n_images": len(common),
        "n_submitted": len(predicted),
        "n_labelled": len(truth),
    }


#: Submitted probabilities stay inside [CLIP, 1 - CLIP]: written with 6 decimals, a smaller one would read as 0.
CLIP = 1e-6


def kaggle_rows(image_ids: list[str], table: np.ndarray) -> pd.DataFrame:
    """Kaggle's submission format: ``ID_<image>_<label>``, six rows per image in LABELS order."""
    ids = [f"{image_id}_{name}" for image_id in image_ids for name in LABELS]
    return pd.DataFrame({"ID": ids, "Label": table.reshape(-1)})


def six_columns(probs: np.ndarray, names: tuple[str, ...], prevalence: dict[str, float]) -> np.ndarray:
    """Fill all six Kaggle labels: the model's outputs where it has them, else derived or prevalence.

    A binary model has no subtype outputs (they get the training prevalence); a subtype model has no
    ``any`` output (it gets the maximum subtype probability, since any = OR of the subtypes).
    """
    table = np.empty((len(probs), len(LABELS)), np.float64)
    for j, name in enumerate(LABELS):
        if name in names:
            table[:, j] = probs[:, names.index(name)]
        elif name == "any":
            table[:, j] = probs.max(axis=1) if len(names) else prevalence.get("any", 0.5)
        else:
            table[:, j] = prevalence.get(name, 0.0)
    return table


def check_task(loaded: Loaded, checkpoint, allow_subtypes_only: bool) -> None:
    """A subtypes-only model never saw a normal slice: its ``any`` (the max subtype) is not a detector."""
    if "any" in loaded.names:
        return
    message = (
        f"checkpoint {checkpoint} was trained with --task {loaded.cfg.task} on bleeding slices only, so it "
        "never learned to reject normal slices and its 'any' (max subtype) is not a hemorrhage detector"
    )
    if not allow_subtypes_only:
        raise ConfigError(
            f"{message}; predict with an rsna or binary checkpoint, or pass --allow-subtypes-only "
            "to write these probabilities anyway"
        )
    logger.warning("%s; writing them anyway (--allow-subtypes-only)", message)
