"""An experiment: K patient folds of stage-1 runs, their out-of-fold outputs, and the metrics of both.

EXP/
  experiment.json        the shared training config, K and the store's identity
  folds.parquet          each slot's fold (image_id, study_uid, patient_id, fold)
  fold{k}/               an ordinary run (best.pt, metrics.json, ...) validated on fold k's patients
  outputs.zarr           every slot through the fold model that did not train on it: ``features`` (float16,
                         the head's input) and ``logits``, row = slot of the store, chunked like its shards
  oof.parquet            every labelled slot's probabilities from the fold model that did not train on it
                         (through a Platt map that did not see its label: :func:`calibrated_oof`)
  metrics.json           {"oof": metrics of oof.parquet, "folds": [each fold's best-epoch metrics]}
  seq/                   stage 2 (``ichtrain seq``)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import zarr

from ichprep.storage.store import Store, open_store, slot_ranges

from ..checkpoint import Checkpoint, store_identity
from ..config import INFER_BATCH_SIZE, RESUME_FIXED, TASKS, TrainConfig
from ..data.folds import assign_folds, folds_table
from ..data.tables import targets, train_candidates
from ..engine import sigmoid
from ..errors import ConfigError, DataError
from ..evaluation.evaluate import Loaded, infer_loaded, load_for_store
from ..evaluation.recalibrate import Platt, cross_fit, cross_fit_parts
from ..evaluation.report import run_metrics, write_predictions
from ..files import (
    BEST,
    CONFIG,
    EXPERIMENT,
    FOLDS,
    LAST,
    METRICS,
    OOF,
    OUTPUTS,
    fold_dir,
    recorded_config,
    resolved_path,
)
from ..files import is_experiment as is_experiment  # re-exported: callers ask the experiment module
from ..train import train
from .external import write_reference

logger = logging.getLogger(__name__)


class Experiment(NamedTuple):
    """An experiment folder as written by :func:`cross_validate`."""

    path: Path
    cfg: TrainConfig  # the shared config (out = EXP, no fold)
    folds: int
    fold: np.ndarray  # int64 (N,): each slot's fold in the training store
    image_ids: pd.Series  # (N,) the training store's slots, for checking it is still the same store
    names: tuple[str, ...]


def open_experiment(exp: Experiment | str | Path) -> Experiment:
    """Read EXP's description (experiment.json and folds.parquet); an open experiment is returned as it is."""
    if isinstance(exp, Experiment):
        return exp
    path = Path(exp)
    if not is_experiment(path):
        raise ConfigError(f"{path} is not an experiment folder (no {EXPERIMENT}); make one with `ichtrain cv`")
    info = json.loads((path / EXPERIMENT).read_text())
    cfg = TrainConfig.from_dict(info["config"])
    cfg = dataclasses.replace(cfg, store=resolved_path(cfg.store, path), out=str(path))  # recorded relative to EXP
    table = pd.read_parquet(path / FOLDS)
    return Experiment(
        path=path,
        cfg=cfg,
        folds=int(info["folds"]),
        fold=table["fold"].to_numpy(np.int64),
        image_ids=table["image_id"].astype(str),
        names=TASKS[cfg.task],
    )


def open_training_store(experiment: Experiment) -> Store:
    """The store the folds were made on, refused when its slots are no longer the ones in folds.parquet."""
    store = open_store(experiment.cfg.store, skip_damaged=experiment.cfg.skip_damaged)
    if not store.slices["image_id"].astype(str).reset_index(drop=True).equals(experiment.image_ids):
        raise DataError(
            f"{experiment.path / FOLDS} does not list the slots of {experiment.cfg.store}; "
            "the store changed since `ichtrain cv`"
        )
    return store


def _shared_config(base: TrainConfig, folds: int, identity: str) -> dict:
    return {
        "config": recorded_config({**base.to_dict(), "resume": None, "folds": None, "fold": None}, base.out),
        "folds": folds,
        "store_identity": identity,
    }


def _check_same(path: Path, new: dict) -> None:
    """A rerun of ``cv`` into an existing EXP must keep what makes its folds comparable."""
    old = json.loads(path.read_text())
    keys = [k for k in RESUME_FIXED if k not in ("folds", "fold")]
    differ = [k for k in keys if old["config"].get(k) != new["config"].get(k)]
    differ += [k for k in ("folds", "store_identity") if old.get(k) != new.get(k)]
    if differ:
        raise ConfigError(
            f"{path.parent} was made with other settings ({', '.join(differ)}: "
            f"{[old['config'].get(k, old.get(k)) for k in differ]}); use a new --out or the same options"
        )


def _check_fold_run(run: Path, base: TrainConfig, *, folds: int, k: int) -> None:
    """A fold trained elsewhere (``train --folds --fold``) must be fold k of this experiment's settings."""
    done = json.loads((run / CONFIG).read_text())
    wanted = {**base.to_dict(), "folds": folds, "fold": k}
    differ = [f for f in RESUME_FIXED if done.get(f) != wanted.get(f)]
    if differ:
        raise ConfigError(
            f"{run} was trained with other settings ({', '.join(f'{f}={done.get(f)!r}' for f in differ)}"
            f"; this experiment has {', '.join(f'{f}={wanted.get(f)!r}' for f in differ)}); "
            "move it away or train the fold with the experiment's options"
        )


def cross_validate(
    base: TrainConfig,
    folds: int,
    *,
    tta: str = "none",
    batch_size: int = INFER_BATCH_SIZE,
    progress: Callable | None = None,
) -> dict:
    """Train every fold into EXP/fold{k} (finished folds are kept, interrupted ones resume), then export and score.

    Returns EXP/metrics.json's content: the out-of-fold block and each fold's best-epoch metrics.
    """
    exp = Path(base.out)
    store = open_store(base.store, skip_damaged=base.skip_damaged)
    shared = _shared_config(base, folds, store_identity(store))
    exp.mkdir(parents=True, exist_ok=True)
    if (exp / EXPERIMENT).exists():
        _check_same(exp / EXPERIMENT, shared)
    fold = assign_folds(store.slices, folds, seed=base.seed, by=base.split_by)
    folds_table(store.slices, fold).to_parquet(exp / FOLDS, index=False)
    (exp / EXPERIMENT).write_text(json.dumps(shared, indent=2) + "\n")
    for k in range(folds):
        run = fold_dir(exp, k)
        if (run / METRICS).exists():
            _check_fold_run(run, base, folds=folds, k=k)
            logger.info("fold %d of %d: finished earlier (%s), kept", k, folds, run / METRICS)
        else:
            last = run / LAST
            logger.info("fold %d of %d: %s", k, folds, f"resuming from {last}" if last.exists() else "training")
            train(
                dataclasses.replace(
                    base, out=str(run), folds=folds, fold=k, resume=str(last) if last.exists() else None
                ),
                progress=progress,
            )
        export_fold(exp, k, fold == k, store=store, device=base.device, tta=tta, batch_size=batch_size)
    return score_experiment(exp)


# ---------------------------------------------------------------- stage-1 outputs


class Inferred(NamedTuple):
    """A model's outputs on chosen slots of a store; rows follow ``slots`` (ascending)."""

    slots: np.ndarray  # int64 (m,)
    logits: np.ndarray  # float32 (m, K)
    features: np.ndarray  # float16 (m, D)


def infer_slots(
    loaded: Loaded, mask: np.ndarray, *, tta: str = "none", batch_size: int = INFER_BATCH_SIZE, workers: int = 0
) -> Inferred:
    """Features and logits of the readable slots in ``mask``, each shard read once in store order."""
    out = infer_loaded(loaded, mask, tta=tta, batch_size=batch_size, workers=workers, features=True)
    order = np.argsort(out.slots, kind="stable")
    return Inferred(slots=out.slots[order], logits=out.logits[order], features=out.features[order])


def _outputs_group(path: Path, *, n_slots: int, shard_slices: int, inferred: Inferred) -> zarr.Group:
    """EXP/outputs.zarr, created on first use: ``features`` and ``logits``, one row per slot, NaN until written."""
    if path.exists():
        return zarr.open_group(str(path), mode="r+")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, values in (("features", inferred.features), ("logits", inferred.logits)):
        group.create_array(
            name,
            shape=(n_slots, values.shape[1]),
            dtype=values.dtype,
            chunks=(shard_slices, values.shape[1]),
            fill_value=np.nan,
            dimension_names=("slice", name),
        )
    group.attrs["folds_done"] = []
    return group


def write_outputs(group: zarr.Group, inferred: Inferred, fold: int) -> None:
    """Write one fold's rows, then record the fold as done (a fold interrupted half-way is redone)."""
    for part in slot_ranges(inferred.slots):
        rows = slice(part.row, part.row + part.stop - part.start)
        group["features"][part.start : part.stop] = inferred.features[rows]
        group["logits"][part.start : part.stop] = inferred.logits[rows]
    group.attrs["folds_done"] = sorted({*group.attrs["folds_done"], fold})


def read_outputs(path: Path, slots: np.ndarray, folds: int) -> Inferred:
    """Rows ``slots`` (ascending) of EXP/outputs.zarr, refused until every fold is in."""
    group = zarr.open_group(str(path), mode="r")
    missing = sorted(set(range(folds)) - set(group.attrs.get("folds_done", [])))
    if missing:
        raise DataError(f"{path} lacks fold(s) {missing}; rerun `ichtrain cv` to export them")
    features = np.empty((len(slots), group["features"].shape[1]), np.float16)
    logits = np.empty((len(slots), group["logits"].shape[1]), np.float32)
    for part in slot_ranges(slots):
        rows = slice(part.row, part.row + part.stop - part.start)
        features[rows] = group["features"][part.start : part.stop]
        logits[rows] = group["logits"][part.start : part.stop]
    return Inferred(slots=slots, logits=logits, features=features)


def export_fold(
    exp: Path,
    k: int,
    mask: np.ndarray,
    *,
    store: Store,
    device: str,
    tta: str = "none",
    batch_size: int = INFER_BATCH_SIZE,
) -> None:
    """Fold k's slots of the (open) training store through fold k's best.pt into EXP/outputs.zarr.

    Skipped when the fold is already there.
    """
    path = exp / OUTPUTS
    if path.exists() and k in zarr.open_group(str(path), mode="r").attrs.get("folds_done", []):
        return
    loaded = load_for_store(fold_dir(exp, k) / BEST, store, device)
    inferred = infer_slots(loaded, mask, tta=tta, batch_size=batch_size)
    group = _outputs_group(path, n_slots=len(store.slices), shard_slices=store.spec.shard_slices, inferred=inferred)
    group.attrs.update({"tta": tta, "names": list(loaded.names)})
    write_outputs(group, inferred, k)
    logger.info(
        "fold %d: %d slots exported to %s (features %d-d)", k, len(inferred.slots), path, inferred.features.shape[1]
    )


def oof_outputs(experiment: Experiment, store: Store) -> Inferred:
    """Every readable slot's stage-1 outputs from the fold model that did not train on it."""
    slots = np.flatnonzero(store.slices["ok"].to_numpy(bool))
    return read_outputs(experiment.path / OUTPUTS, slots, experiment.folds)


def calibrated_oof(experiment: Experiment, store: Store, outputs: Inferred) -> Inferred:
    """Out-of-fold logits through Platt maps that never saw their slice's label (as they are without maps).

    Fold k's labelled slots get the cross-fit its run scored them with (each part by the map of the others);
    its other slots, the map stored in its best.pt (what ``predict`` applies to new data).
    """
    cfg = experiment.cfg
    y = targets(store.slices, cfg.task)
    logits = outputs.logits.copy()
    fold_of = experiment.fold[outputs.slots]
    for k in range(experiment.folds):
        stored = Checkpoint.load(fold_dir(experiment.path, k) / BEST).calibration
        if stored is None:
            continue  # a fold trained without a map (or before maps existed) is read as it is, as predict does
        mine = fold_of == k
        logits[mine] = Platt.from_dict(stored, logits.shape[1])(outputs.logits[mine])
        split = np.where(experiment.fold == k, "val", "train")
        val = train_candidates(store.slices, split, None, task=cfg.task, part="val")
        parts = cross_fit_parts(store.slices, val, seed=cfg.seed, by=cfg.split_by)
        rows = np.searchsorted(outputs.slots, val)
        logits[rows] = cross_fit(outputs.logits[rows], y[val], parts)
    return outputs._replace(logits=logits)


# ---------------------------------------------------------------- scores


def oof_block(
    store: Store, slots: np.ndarray, probs: np.ndarray, *, names: tuple[str, ...], task: str, seed: int
) -> dict:
    """The usual metrics of out-of-fold probabilities, with an ``auc`` {label: value} summary."""
    y = targets(store.slices, task)[slots]
    study = store.slices["study_uid"].to_numpy()[slots]
    metrics = run_metrics(y, probs, names=names, study_ids=study, task=task, seed=seed)
    return {**metrics, "auc": {n: metrics["per_class"][n]["roc_auc"] for n in names}}


def scored_slots(store: Store, task: str) -> np.ndarray:
    """The slots every OOF metric is computed on: labelled and readable (the validation rule of a run)."""
    everything = np.full(len(store.slices), "val")
    return np.sort(train_candidates(store.slices, everything, None, task=task, part="val"))


def score_experiment(exp: str | Path) -> dict:
    """Write EXP/oof.parquet and EXP/metrics.json from the folds' outputs."""
    experiment = open_experiment(exp)
    store = open_training_store(experiment)
    task, names = experiment.cfg.task, experiment.names
    outputs = calibrated_oof(experiment, store, oof_outputs(experiment, store))
    slots = scored_slots(store, task)
    probs = sigmoid(outputs.logits[np.searchsorted(outputs.slots, slots)])
    write_predictions(
        experiment.path / OOF,
        store,
        slots=slots,
        probs=probs,
        truth=targets(store.slices, task)[slots],
        names=names,
        columns={"fold": experiment.fold[slots]},
    )
    write_reference(experiment.path / OOF)
    fold_metrics = []
    for k in range(experiment.folds):
        run = json.loads((fold_dir(experiment.path, k) / METRICS).read_text())
        fold_metrics.append({"fold": k, "best_epoch": run["best_epoch"], **run["final"]})
    summary = {
        "oof": oof_block(store, slots, probs, names=names, task=task, seed=experiment.cfg.seed),
        "folds": fold_metrics,
    }
    (experiment.path / METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
