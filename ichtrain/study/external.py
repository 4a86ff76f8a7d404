"""Study-level scores and external validation, the way the papers report it.

Every evaluation and prediction of a MODEL (a run's checkpoint or an experiment) gives one score per study and
label by one rule (:data:`ichtrain.evaluation.studylevel.STUDY_RULES`; ``max`` by default, the best of the
measured rules on out-of-fold studies: BENCHMARKS.md).  Operating points are fixed before the test: on the
MODEL's own validation (a run's ``val_predictions.parquet``, an experiment's out-of-fold table), per label, the
study-level thresholds at sensitivity >= 0.95, at the Youden point and at any target a user adds; an outside
store is then scored at those thresholds unchanged, against its study labels (the readers' majority where it has
readers, each reader beside the model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ichprep.storage.store import Store

from ..config import STUDY_RULES
from ..evaluation.studylevel import (
    external_table,
    format_external_table,
    operating_points,
    readers_of,
    study_scores,
)
from ..evaluation.studyplots import plot_study_roc, plot_worst_studies
from ..files import OOF, OPERATING_POINTS, STAGE2_DIR, VAL_PREDICTIONS, is_experiment, recorded_path

logger = logging.getLogger(__name__)

DEFAULT_RULE = STUDY_RULES[0]
#: The operating points every evaluation fixes on validation; ``--operating-point`` adds to them.
DEFAULT_TARGETS: tuple[str, ...] = ("sens=0.95", "youden")
STUDY_METRICS = "study_metrics.json"
STUDY_PREDICTIONS = "study_predictions.csv"
STUDY_ROC_PLOT = "study_roc.png"
WORST_STUDIES_PLOT = "worst_studies.png"


class Reference(NamedTuple):
    """Operating points fixed on a MODEL's validation studies."""

    rule: str
    thresholds: dict[str, dict[str, float | None]]  # label -> point name -> threshold
    source: str  # the validation table they come from
    n_studies: int


def validation_table(model: str | Path, *, staged: bool) -> Path:
    """The MODEL's validation predictions: a run's best epoch's, an experiment's out of fold (stage 2's if used)."""
    model = Path(model)
    if is_experiment(model):
        seq = model / STAGE2_DIR / OOF
        return seq if staged and seq.exists() else model / OOF
    run = model if model.is_dir() else model.parent
    return run / VAL_PREDICTIONS


def reference_points(
    model: str | Path, *, rule: str = DEFAULT_RULE, targets: tuple[str, ...] = DEFAULT_TARGETS, staged: bool = True
) -> Reference:
    """Per label, the study-level thresholds of ``targets`` on the MODEL's validation studies."""
    return reference_from(validation_table(model, staged=staged), rule=rule, targets=targets)


def reference_from(path: Path, *, rule: str = DEFAULT_RULE, targets: tuple[str, ...] = DEFAULT_TARGETS) -> Reference:
    """Per label, the study-level thresholds of ``targets`` on one validation table (``prob_``/``true_`` columns)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: operating points are fixed on the MODEL's validation predictions")
    slices = pd.read_parquet(path)
    labels = [c[len("prob_") :] for c in slices.columns if c.startswith("prob_")]
    studies = study_scores(slices, rule=rule, labels=labels)
    thresholds = {}
    for label in labels:
        y, s = studies[f"true_{label}"].to_numpy(float), studies[f"prob_{label}"].to_numpy(float)
        known = ~np.isnan(y)
        thresholds[label] = operating_points(y[known], s[known], sensitivities=(), youden=False, targets=targets)
    return Reference(rule=rule, thresholds=thresholds, source=str(path), n_studies=len(studies))


def write_reference(path: Path) -> Path:
    """The default operating points of a validation table, written beside it (``operating_points.json``)."""
    reference = reference_from(path)._replace(source=path.name)  # the table beside it, by name alone
    out = path.parent / OPERATING_POINTS
    out.write_text(json.dumps(reference._asdict(), indent=2) + "\n")
    return out


def slice_table(store: Store, slots: np.ndarray, probs: np.ndarray, names: tuple[str, ...]) -> pd.DataFrame:
    """One row per scored slot: study, z, ``prob_<label>`` and the slice truth ``true_<label>`` where it exists."""
    rows = store.slices.iloc[slots]
    frame = pd.DataFrame({"study_uid": rows["study_uid"].to_numpy(), "z": rows["z"].to_numpy(float, na_value=np.nan)})
    for j, name in enumerate(names):
        frame[f"prob_{name}"] = probs[:, j]
        frame[f"true_{name}"] = rows[name].to_numpy(float, na_value=np.nan) if name in rows else np.nan
    return frame


def study_truth(store: Store, names: tuple[str, ...]) -> pd.DataFrame:
    """Each study's labels (slice maxima, or the study labels ``convert --study-labels`` wrote) and readers."""
    studies = store.studies.set_index("study_uid")
    readers = readers_of(studies.columns, labels=names)
    columns = {f"true_{n}": studies[n].to_numpy(float, na_value=np.nan) for n in names if n in studies}
    reads = {f"{r}:{n}": studies[f"{r}:{n}"] for r in readers for n in names if f"{r}:{n}" in studies}
    return pd.DataFrame({**columns, **reads}, index=studies.index)


def evaluate_studies(
    slices: pd.DataFrame,
    store: Store,
    out: str | Path,
    *,
    names: tuple[str, ...],
    reference: Reference,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Study scores, the external table at the reference's thresholds, figures and ``study_metrics.json``.

    ``slices``: :func:`slice_table` of the scored slots.  Studies without a label are scored but not counted.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = study_scores(slices, rule=reference.rule, labels=names)
    truth = study_truth(store, names)
    studies = scores[[f"prob_{n}" for n in names]].join(truth, how="left")
    table = external_table(studies, labels=names, thresholds=reference.thresholds, n_boot=n_boot, seed=seed)
    table["rule"] = reference.rule
    table["operating_points_from"] = {"table": recorded_path(reference.source, out), "studies": reference.n_studies}
    (out / STUDY_METRICS).write_text(json.dumps(table, indent=2) + "\n")
    _long(scores, names).to_csv(out / STUDY_PREDICTIONS, index=False)
    points = {  # a point fixed on a one-class validation has no rates to draw
        n: {k: v for k, v in table["labels"][n]["operating_points"].items() if v.get("sensitivity") is not None}
        for n in names
    }
    readers = {n: table["labels"][n].get("readers") for n in names}
    plot_study_roc(studies, labels=names, points=points, readers=readers, path=out / STUDY_ROC_PLOT)
    label = "any" if "any" in names else names[0]
    plot_worst_studies(
        slices, studies, label=label, thresholds=reference.thresholds.get(label), path=out / WORST_STUDIES_PLOT
    )
    return table


def write_study_csv(
    probs: np.ndarray, store: Store, path: str | Path, *, names: tuple[str, ...], rule: str = DEFAULT_RULE
) -> pd.DataFrame:
    """``predict --study-csv``: one row per study and label (study_uid, label, probability) by ``rule``."""
    ok = np.flatnonzero(~np.isnan(probs).any(axis=1))
    slices = slice_table(store, ok, probs[ok], names)
    frame = _long(study_scores(slices, rule=rule, labels=names), names)
    frame.to_csv(path, index=False)
    return frame


def _long(scores: pd.DataFrame, names: tuple[str, ...]) -> pd.DataFrame:
    """Study scores as rows (study_uid, label, probability), studies in store order, labels in ``names``' order."""
    wide = scores[[f"prob_{n}" for n in names]].rename(columns=lambda c: c[len("prob_") :])
    return wide.stack().rename_axis(["study_uid", "label"]).rename("probability").reset_index()


def format_studies(table: dict) -> str:
    """The printed table, with the rule and where the thresholds came from."""
    source = table["operating_points_from"]
    head = (
        f"study level ({table['rule']} over slices; {table['n_studies']} studies; operating points fixed on "
        f"{source['studies']} validation studies of {source['table']})"
    )
    return head + "\n" + format_external_table(table)
