"""The file names of a run folder (``ichtrain train --out RUN``) and of an experiment (``ichtrain cv --out EXP``).

Like the store's names in :mod:`ichprep.storage.store`: one definition each, read by every module that
writes or opens these folders.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---------------------------------------------------------------- a run (also each fold of an experiment)
CONFIG = "config.json"  # the run's TrainConfig
COMPUTE = "compute.json"  # threads, CPU kernels and device the run computed with (ichtrain.device.compute_facts)
SPLIT = "split.parquet"  # every slot's part: train, val or unused
METRICS_LOG = "metrics.jsonl"  # one record per epoch, with the full metrics
METRICS = "metrics.json"  # a run's final/best_epoch/last/history; an experiment's and evaluate's blocks
HISTORY = "history.csv"  # one row per epoch, the columns people plot (like timm's summary.csv)
BEST = "best.pt"  # the checkpoint of the lowest validation weighted log loss: what evaluate and predict load
LAST = "last.pt"  # the checkpoint of the last finished epoch: what --resume continues
LOSS_PLOT = "loss.png"
ROC_PLOT = "roc.png"
CALIBRATION_PLOT = "calibration.png"
VAL_PREDICTIONS = "val_predictions.parquet"  # the best epoch's validation predictions
PREDICTIONS = "predictions.parquet"  # ichtrain evaluate's predictions
OPERATING_POINTS = "operating_points.json"  # study-level thresholds fixed on the validation table beside it

# ---------------------------------------------------------------- an experiment
EXPERIMENT = "experiment.json"  # the options every fold shares
FOLDS = "folds.parquet"  # every slot's fold
OUTPUTS = "outputs.zarr"  # stage-1 features and logits of every slot, out of fold
OOF = "oof.parquet"  # out-of-fold predictions (stage 1 in EXP, stage 2 in EXP/seq)
STAGE2_DIR = "seq"  # stage 2's folder inside the experiment (``ichtrain seq``)
STAGE2_MODEL = "seq.pt"  # stage 2's models, one per fold
COMPARE_PLOT = "compare.png"  # stage 1 against stage 2, per label


#: TrainConfig fields that name files: a run records them relative to its own folder.
PATH_FIELDS = ("store", "out", "resume", "pretrained")


def recorded_path(path: str | None, folder: str | Path) -> str | None:
    """``path`` as a folder records it: a local path relative to ``folder`` (a shared run carries no local
    paths, and the two can move together); a URL as given."""
    from ichprep.storage.location import is_url

    if path is None or is_url(path):
        return path
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def resolved_path(path: str | None, folder: str | Path) -> str | None:
    """A path :func:`recorded_path` wrote in ``folder``, as a path to open from here (absolute or a URL as is)."""
    from ichprep.storage.location import is_url

    if path is None or is_url(path) or os.path.isabs(path):
        return path
    return os.path.normpath(Path(folder) / path)


def recorded_config(config: dict, folder: str | Path) -> dict:
    """A TrainConfig's dict as ``folder`` records it (config.json, experiment.json, a checkpoint)."""
    return {**config, **{k: recorded_path(config.get(k), folder) for k in PATH_FIELDS if k in config}}


def is_experiment(path: str | Path) -> bool:
    """Whether ``path`` is an experiment folder (``ichtrain cv --out EXP``) rather than a run or a checkpoint."""
    return (Path(path) / EXPERIMENT).is_file()


#: Files only ichtrain writes: a folder holding one of them is a run, an experiment or an evaluation.
_OURS = (CONFIG, METRICS, METRICS_LOG, HISTORY, EXPERIMENT, STAGE2_MODEL, OPERATING_POINTS)


def check_out_folder(path: str | Path, overwrite_any: bool) -> None:
    """``--out`` is missing, empty or ichtrain's own folder (a run, experiment or evaluation), or the user
    said ``--overwrite-any``; raises ichprep's StoreExistsError listing what a foreign folder holds."""
    from ichprep.outdir import check_output_folder

    path = Path(path)
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    ours = any((path / name).exists() for name in _OURS)
    check_output_folder(path, entries, ours=ours, kind="an ichtrain run folder", overwrite_any=overwrite_any)


def fold_dir(exp: str | Path, k: int) -> Path:
    """Fold ``k``'s run folder inside an experiment."""
    return Path(exp) / f"fold{k}"


def study_plot(study_uid: str) -> str:
    """The figure of one study's probabilities along z (stage 1 against stage 2)."""
    return f"study_{study_uid}.png"
