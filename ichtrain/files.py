"""The file names of a run folder (``ichtrain train --out RUN``) and of an experiment (``ichtrain cv --out EXP``).

Like the store's names in :mod:`ichprep.storage.store`: one definition each, read by every module that
writes or opens these folders.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- a run (also each fold of an experiment)
CONFIG = "config.json"  # the run's TrainConfig
COMPUTE = "compute.json"  # threads, CPU kernels and device the run computed with (ichtrain.device.compute_facts)
SPLIT = "split.parquet"  # every slot's part: train, val or unused
METRICS_LOG = "metrics.jsonl"  # one record per epoch, with the full metrics
METRICS = "metrics.json"  # a run's final/best_epoch/last/history; an experiment's and evaluate's blocks
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


def is_experiment(path: str | Path) -> bool:
    """Whether ``path`` is an experiment folder (``ichtrain cv --out EXP``) rather than a run or a checkpoint."""
    return (Path(path) / EXPERIMENT).is_file()


def fold_dir(exp: str | Path, k: int) -> Path:
    """Fold ``k``'s run folder inside an experiment."""
    return Path(exp) / f"fold{k}"


def study_plot(study_uid: str) -> str:
    """The figure of one study's probabilities along z (stage 1 against stage 2)."""
    return f"study_{study_uid}.png"
