"""Evaluation metrics for hemorrhage detectors: pure functions on numpy arrays.

Inputs everywhere are ``y_true`` (N, K) with values 0/1 (NaN = label missing)
and ``y_prob`` (N, K) sigmoid probabilities, with ``names`` giving the K
column names (a subset of ``ichprep.reading.labels.LABELS``, in the model's order).

The headline number is the RSNA 2019 competition metric
(:func:`weighted_log_loss`); the point estimates of AUC, AP, thresholded
confusion metrics and study-level AUC come from scikit-learn so that they
match what other people compute.  Calibration (mean probability vs
prevalence, ECE, reliability bins) shows whether the probabilities can be
trusted after balanced training, and study-level bootstrap intervals
(:mod:`ichtrain.evaluation.bootstrap`, weighted versions checked against scikit-learn)
show how much a small validation set proves.  :func:`compute_metrics`
returns plain JSON-ready dicts (floats, ints, strings, ``None`` for
undefined values) so the trainer can write them straight to ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
    roc_curve,
)

from .bootstrap import LEVEL, Ranking, percentile_interval, resample

#: Probabilities are clipped to [EPS, 1 - EPS] before logs, as in the competition: costly, never infinite.
EPS = 1e-7
#: Competition weights: ``any`` counts twice, each subtype once.
ANY_WEIGHT = 2.0
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------- input checks


def _as_float_2d(values, k: int | None, what: str) -> np.ndarray:
    """(N, K) float64 array; accepts pandas (nullable Int8 with <NA> -> NaN) and 1-D for K == 1."""
    if hasattr(values, "to_numpy"):
        # Nullable integers (ichprep.reading.labels) refuse np.asarray(float) with <NA>: ask pandas for NaN.
        values = values.to_numpy(dtype=float, na_value=np.nan)
    # float64 always: in float32, 1 - 1e-7 rounds to 1.0 and the clip would be useless.
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 1-D or 2-D (N, K), got shape {arr.shape}")
    if k is not None and arr.shape[1] != k:
        raise ValueError(f"{what} has {arr.shape[1]} columns but {k} names were given")
    return arr


class Checked(NamedTuple):
    """Validated metric inputs: float64 (N, K) truth (NaN = missing) and probabilities, and the K names."""

    y_true: np.ndarray
    y_prob: np.ndarray
    names: tuple[str, ...]


def _check(y_true, y_prob, names: Sequence[str]) -> Checked:
    names = tuple(names)
    yt = _as_float_2d(y_true, len(names), "y_true")
    yp = _as_float_2d(y_prob, len(names), "y_prob")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true shape {yt.shape} != y_prob shape {yp.shape}")
    known = yt[~np.isnan(yt)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0, 1 or NaN (missing label)")
    # A NaN probability is a bug upstream (diverged model): a clip or a dropped row would hide a broken run.
    if not np.isfinite(yp).all():
        raise ValueError("y_prob contains NaN or inf")
    if (yp < 0).any() or (yp > 1).any():
        raise ValueError("y_prob must be probabilities in [0, 1] (apply the sigmoid first)")
    return Checked(y_true=yt, y_prob=yp, names=names)


def label_weights(names: Sequence[str]) -> np.ndarray:
    """The competition's weights: ``any`` counts twice, each subtype once."""
    return np.array([ANY_WEIGHT if n == "any" else 1.0 for n in names])


def _bce(yt: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Element-wise binary cross-entropy (NaN where the truth is missing)."""
    p = np.clip(yp, EPS, 1.0 - EPS)
    return -(yt * np.log(p) + (1.0 - yt) * np.log1p(-p))


def _num(x) -> float | None:
    """Plain Python float, with NaN/inf (undefined metric) -> None for JSON."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- log loss


class _ImageLosses(NamedTuple):
    """Per-image competition loss (0 where unlabelled) and which images carry any label."""

    loss: np.ndarray
    labelled: np.ndarray


def _image_losses(yt: np.ndarray, yp: np.ndarray, names: Sequence[str]) -> _ImageLosses:
    known = ~np.isnan(yt)
    w = np.where(known, label_weights(names)[None, :], 0.0)
    bce = np.where(known, _bce(yt, yp), 0.0)
    denom = w.sum(axis=1)
    labelled = denom > 0
    return _ImageLosses(loss=(w * bce).sum(axis=1) / np.where(labelled, denom, 1.0), labelled=labelled)


def weighted_log_loss(y_true, y_prob, names: Sequence[str]) -> float:
    """RSNA 2019 competition metric.

    Per image: ``sum_j w_j * BCE_j / sum_j w_j`` with ``w = 2`` for ``any`` and
    1 for the subtypes, then the mean over images.  With all labels present
    this equals Kaggle's row-weighted average.  Missing (NaN) labels drop out
    of both the numerator and the denominator of their image; images with no
    label at all are ignored.
    """
    checked = _check(y_true, y_prob, names)
    yt, yp, names = checked.y_true, checked.y_prob, checked.names
    images = _image_losses(yt, yp, names)
    if not images.labelled.any():
        return float("nan")
    return float(np.mean(images.loss[images.labelled]))


def per_class_log_loss(y_true, y_prob, names: Sequence[str]) -> dict[str, float | None]:
    """Mean (unweighted) binary cross-entropy of each class over its labelled rows."""
    checked = _check(y_true, y_prob, names)
    yt, yp, names = checked.y_true, checked.y_prob, checked.names
    bce = _bce(yt, yp)
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        col = bce[:, j][~np.isnan(yt[:, j])]
        out[name] = _num(col.mean()) if col.size else None
    return out


# --------------------------------------------------------------------------- thresholds


def youden_threshold(y_true, y_score) -> float | None:
    """Threshold maximising Youden's J = TPR - FPR on these data (``score >= t`` is positive).

    ``None`` when only one label value is present (no ROC curve).
    """
    y_true = np.asarray(y_true, dtype=float)
    y_score = np.asarray(y_score, dtype=float)
    if np.unique(y_true).size < 2:
        return None
    fpr, tpr, thr = roc_curve(y_true, y_score)
    # roc_curve's first threshold, +inf, predicts nothing positive: never a useful operating point.
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thr[int(np.argmax(j))])  # argmax: ties -> highest threshold


def _at_threshold(yt: np.ndarray, yp: np.ndarray, threshold: float) -> dict:
    """Confusion-matrix metrics with ``prob >= threshold`` counted positive (same rule as roc_curve)."""
    pred = (yp >= threshold).astype(int)
    yt = yt.astype(int)
    tn, fp, fn, tp = confusion_matrix(yt, pred, labels=[0, 1]).ravel()
    # zero_division=nan: e.g. precision without positive predictions is undefined (None in the JSON), not 0.
    return {
        "threshold": float(threshold),
        "sensitivity": _num(tp / (tp + fn)) if tp + fn else None,
        "specificity": _num(tn / (tn + fp)) if tn + fp else None,
        "precision": _num(precision_score(yt, pred, labels=[0, 1], zero_division=np.nan)),
        "f1": _num(f1_score(yt, pred, labels=[0, 1], zero_division=np.nan)),
        "accuracy": _num(accuracy_score(yt, pred)),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


# --------------------------------------------------------------------------- calibration

#: Reliability diagrams and ECE use deciles of the predicted probability.
N_BINS = 10


class Calibration(NamedTuple):
    """One class's calibration: ECE, mean predicted probability, reliability bins (None without rows)."""

    ece: float | None
    mean_prob: float | None
    reliability: list[dict] | None


def decile_bins(y_prob) -> np.ndarray:
    """Bin (0 .. 9) of each probability: bin b holds ``q_b <= p < q_b+1``, q the 10 % .. 90 % quantiles.

    Bins hold about equally many rows; tied probabilities always share a bin,
    so heavily tied scores leave some bins empty (merged into a neighbour).
    """
    y_prob = np.asarray(y_prob, dtype=float)
    edges = np.quantile(y_prob, np.arange(1, N_BINS) / N_BINS)
    return np.searchsorted(edges, y_prob, side="right")


def calibration(y_true, y_prob) -> Calibration:
    """ECE and reliability bins (:func:`decile_bins`) of one class's labelled rows (1-D, no NaN).

    ``ECE = sum_b (n_b / n) * |mean_prob_b - observed_b|``; each reliability
    entry is ``{"mean_prob", "observed", "n"}`` for a non-empty bin.
    """
    y_true, y_prob = np.asarray(y_true, dtype=float), np.asarray(y_prob, dtype=float)
    if y_true.size == 0:
        return Calibration(ece=None, mean_prob=None, reliability=None)
    bins = decile_bins(y_prob)
    count = np.bincount(bins, minlength=N_BINS)
    sum_p = np.bincount(bins, weights=y_prob, minlength=N_BINS)
    sum_y = np.bincount(bins, weights=y_true, minlength=N_BINS)
    reliability = [
        {"mean_prob": _num(sum_p[b] / count[b]), "observed": _num(sum_y[b] / count[b]), "n": int(count[b])}
        for b in np.flatnonzero(count)
    ]
    # n_b/n * |sum_p_b/n_b - sum_y_b/n_b| = |sum_p_b - sum_y_b| / n: no division by empty bins.
    ece = np.abs(sum_p - sum_y).sum() / y_true.size
    return Calibration(ece=_num(ece), mean_prob=_num(y_prob.mean()), reliability=reliability)


# --------------------------------------------------------------------------- bootstrap intervals


class _UnitSums:
    """Per-unit sums of row quantities in named column blocks: the input of :func:`bootstrap.resample`."""

    def __init__(self, unit: np.ndarray, n_units: int):
        self._unit, self._n_units = unit, n_units
        self._blocks: list[np.ndarray] = []
        self._index: dict[str, slice] = {}

    def add(self, key: str, values, rows: np.ndarray, bins: np.ndarray | None = None) -> None:
        """Sum ``values`` (one per selected row) per unit; one column per decile bin when ``bins`` is given."""
        width = 1 if bins is None else N_BINS
        cell = self._unit[rows] * width + (0 if bins is None else bins)
        block = np.bincount(cell, weights=np.asarray(values, dtype=float), minlength=self._n_units * width)
        start = sum(b.shape[1] for b in self._blocks)
        self._index[key] = slice(start, start + width)
        self._blocks.append(block.reshape(self._n_units, width))

    def matrix(self) -> np.ndarray:
        return np.hstack(self._blocks)

    def get(self, replicate_sums: np.ndarray, key: str) -> np.ndarray:
        """The block ``key`` of resampled sums: (B,) for plain sums, (B, N_BINS) for binned ones."""
        block = replicate_sums[:, self._index[key]]
        return block[:, 0] if block.shape[1] == 1 else block


class _Units(NamedTuple):
    """Resampling units: index of each row's unit, how many units, and what a unit is."""

    index: np.ndarray
    count: int
    kind: str


def _units(study_codes: np.ndarray | None, n_rows: int) -> _Units:
    if study_codes is None:
        return _Units(index=np.arange(n_rows), count=n_rows, kind="slice")
    if (study_codes < 0).any():
        raise ValueError("study_ids contains missing values: give every slice its study id (or pass bootstrap=0)")
    return _Units(index=study_codes, count=int(study_codes.max()) + 1, kind="study")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where the denominator is 0 (metric undefined in that replicate)."""
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean of the finite entries of each row (replicate), NaN where a row has none."""
    finite = np.isfinite(values)
    return _ratio(np.where(finite, values, 0.0).sum(axis=1), finite.sum(axis=1).astype(float))


def _add_class_sums(
    sums: _UnitSums, name: str, *, rows: np.ndarray, yt: np.ndarray, yp: np.ndarray, threshold: float
) -> None:
    called = yp >= threshold  # same operating rule as _at_threshold
    sums.add(f"{name}/n", np.ones(yt.size), rows)
    sums.add(f"{name}/pos", yt, rows)
    sums.add(f"{name}/bce", _bce(yt, yp), rows)
    sums.add(f"{name}/prob", yp, rows)
    sums.add(f"{name}/tp", called & (yt == 1), rows)
    sums.add(f"{name}/fp", called & (yt == 0), rows)
    # Bins stay those of the full data, so every replicate measures the same reliability curve.
    sums.add(f"{name}/gap", yp - yt, rows, bins=decile_bins(yp) if yt.size else np.zeros(0, dtype=int))


def _class_replicates(sums: _UnitSums, values: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """Per-replicate sum-based metrics of one class (AUC/AP come from the rankings)."""
    n, pos = sums.get(values, f"{name}/n"), sums.get(values, f"{name}/pos")
    return {
        "log_loss": _ratio(sums.get(values, f"{name}/bce"), n),
        "mean_prob": _ratio(sums.get(values, f"{name}/prob"), n),
        "sensitivity": _ratio(sums.get(values, f"{name}/tp"), pos),
        "specificity": _ratio(n - pos - sums.get(values, f"{name}/fp"), n - pos),
        "ece": _ratio(np.abs(sums.get(values, f"{name}/gap")).sum(axis=1), n),
    }


class _Intervals(NamedTuple):
    """Bootstrap output: top-level intervals, per-class intervals, and how they were made."""

    overall: dict
    per_class: dict[str, dict]
    info: dict


def _bootstrap(
    yt: np.ndarray,
    yp: np.ndarray,
    *,
    names: tuple[str, ...],
    units: _Units,
    per_class: Mapping,
    study: _StudyAny | None,
    replicates: int,
    seed: int,
) -> _Intervals:
    """Percentile intervals of the headline metrics over ``replicates`` resamples of the units."""
    sums = _UnitSums(units.index, units.count)
    images = _image_losses(yt, yp, names)
    sums.add("loss", images.loss[images.labelled], images.labelled)
    sums.add("images", np.ones(int(images.labelled.sum())), images.labelled)
    rankings, ranked = [], []
    for j, name in enumerate(names):
        rows = ~np.isnan(yt[:, j])
        at = per_class[name]["at_youden"] or {}
        _add_class_sums(
            sums, name, rows=rows, yt=yt[rows, j], yp=yp[rows, j], threshold=at.get("threshold", DEFAULT_THRESHOLD)
        )
        if per_class[name]["roc_auc"] is not None:
            ranked.append(name)
            rankings.append(Ranking(y=yt[rows, j], score=yp[rows, j], unit=units.index[rows]))
    if study is not None:
        rankings.append(Ranking(y=study.y, score=study.p, unit=study.unit))
    reps = resample(sums.matrix(), rankings, replicates, seed)

    nan = np.full(replicates, np.nan)
    per_rep = {name: _class_replicates(sums, reps.sums, name) for name in names}
    for name in names:
        k = ranked.index(name) if name in ranked else None
        per_rep[name]["roc_auc"] = nan if k is None else reps.auc[:, k]
        per_rep[name]["average_precision"] = nan if k is None else reps.ap[:, k]
    # Means over the classes whose point estimate exists, as for the point estimates themselves.
    with_ece = [n for n in names if per_class[n]["ece"] is not None]
    overall = {
        "weighted_log_loss": _ratio(sums.get(reps.sums, "loss"), sums.get(reps.sums, "images")),
        "mean_auc": _row_nanmean(np.stack([per_rep[n]["roc_auc"] for n in ranked], axis=1)) if ranked else nan,
        "mean_ece": _row_nanmean(np.stack([per_rep[n]["ece"] for n in with_ece], axis=1)) if with_ece else nan,
        "study_any_auc": reps.auc[:, -1] if study is not None else nan,
    }
    return _Intervals(
        overall={key: percentile_interval(v) for key, v in overall.items()},
        per_class={name: {key: percentile_interval(v) for key, v in per_rep[name].items()} for name in names},
        info={
            "replicates": int(replicates),
            "unit": units.kind,
            "units": int(units.count),
            "seed": seed,
            "level": LEVEL,
        },
    )


# --------------------------------------------------------------------------- main entry point


def _class_metrics(yt: np.ndarray, yp: np.ndarray, given: float | None) -> dict:
    n_pos = int(yt.sum())
    both = 0 < n_pos < yt.size  # AUC/AP/Youden need both label values
    youden = youden_threshold(yt, yp) if both else None
    if given is not None:
        op_threshold, source = float(given), "given"
    elif youden is not None:
        op_threshold, source = youden, "youden"
    else:
        # No ROC on these data: an operating point still, to report and pass on, that says where it came from.
        op_threshold, source = DEFAULT_THRESHOLD, "default"
    calib = calibration(yt, yp)
    return {
        "n": int(yt.size),
        "n_pos": n_pos,
        "prevalence": _num(n_pos / yt.size) if yt.size else None,
        "mean_prob": calib.mean_prob,
        "roc_auc": _num(roc_auc_score(yt, yp)) if both else None,
        "average_precision": _num(average_precision_score(yt, yp)) if both else None,
        "log_loss": _num(_bce(yt, yp).mean()) if yt.size else None,
        "ece": calib.ece,
        "reliability": calib.reliability,
        "youden_threshold": youden,
        "at_0.5": _at_threshold(yt, yp, DEFAULT_THRESHOLD) if yt.size else None,
        "at_youden": ({**_at_threshold(yt, yp, op_threshold), "source": source} if yt.size else None),
    }


class _StudyAny(NamedTuple):
    """Exam-level ``any``: per study (unit index), positive if any labelled slice is, scored by its maximum."""

    unit: np.ndarray
    y: np.ndarray
    p: np.ndarray


def _study_any(yt: np.ndarray, yp: np.ndarray, study_codes: np.ndarray) -> _StudyAny:
    frame = pd.DataFrame({"study": study_codes, "y": yt, "p": yp})
    # Code -1 is a missing study id (pandas.factorize): such slices belong to no study.
    frame = frame[(frame["study"] >= 0) & frame["y"].notna()]
    per_study = frame.groupby("study", sort=False).agg(y=("y", "max"), p=("p", "max"))
    return _StudyAny(unit=per_study.index.to_numpy(), y=per_study["y"].to_numpy(), p=per_study["p"].to_numpy())


def _study_any_auc(study: _StudyAny) -> dict:
    """Exam-level ``any`` AUC/AP: a study is positive if any slice is, and scores its most suspicious slice."""
    y, p = study.y, study.p
    both = np.unique(y).size == 2
    return {
        "study_any_auc": _num(roc_auc_score(y, p)) if both else None,
        "study_any_average_precision": _num(average_precision_score(y, p)) if both else None,
        "n_studies": int(len(y)),
        "study_any_prevalence": _num(y.mean()) if len(y) else None,
    }


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_bootstrap(bootstrap, seed) -> None:
    if not _is_int(bootstrap) or bootstrap < 0:
        raise ValueError(
            f"bootstrap must be a whole number of replicates >= 0 (0 turns intervals off), got {bootstrap!r}"
        )
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer (it makes the bootstrap reproducible), got {seed!r}")


def compute_metrics(
    y_true,
    y_prob,
    names: Sequence[str],
    study_ids=None,
    thresholds: Mapping[str, float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """All evaluation numbers for one prediction set, JSON-serialisable.

    ``thresholds`` (name -> float, e.g. :func:`youden_thresholds` of the
    validation metrics) replaces the Youden threshold of *these* data for the
    ``at_youden`` operating point, so a test set is scored at thresholds
    chosen on validation rather than on itself.  ``study_ids`` (length N)
    adds the exam-level ``any`` AUC.  Rows with NaN truth are dropped per
    class; a class with a single label value gets ``None`` AUC/AP.

    Calibration: per class ``mean_prob``, ``ece``, ``reliability`` (see
    :func:`calibration`); ``mean_ece`` over classes.  ``bootstrap``
    replicates (0: off) give 95 % percentile intervals ``[lo, hi]`` in
    ``ci95`` (top level and per class; ``None`` where a metric is undefined
    in over 10 % of replicates; sensitivity/specificity at the fixed
    ``at_youden`` threshold).  Whole studies are resampled when
    ``study_ids`` is given (their slices are correlated), single slices
    otherwise; ``bootstrap`` in the result records which.
    """
    checked = _check(y_true, y_prob, names)
    yt, yp, names = checked.y_true, checked.y_prob, checked.names
    if study_ids is not None and len(study_ids) != len(yt):
        raise ValueError(f"study_ids has length {len(study_ids)}, expected {len(yt)}")
    _check_bootstrap(bootstrap, seed)
    thresholds = dict(thresholds or {})

    per_class = {}
    for j, name in enumerate(names):
        keep = ~np.isnan(yt[:, j])
        per_class[name] = _class_metrics(yt[keep, j], yp[keep, j], thresholds.get(name))

    aucs = [m["roc_auc"] for m in per_class.values() if m["roc_auc"] is not None]
    eces = [m["ece"] for m in per_class.values() if m["ece"] is not None]
    out = {
        "n_images": int(len(yt)),
        "names": list(names),
        "weighted_log_loss": _num(weighted_log_loss(yt, yp, names)),
        # Over the classes with an AUC: a rare class absent from a small split must not make the summary None.
        "mean_auc": _num(np.mean(aucs)) if aucs else None,
        "mean_ece": _num(np.mean(eces)) if eces else None,
        "per_class": per_class,
        "study_any_auc": None,
        "n_studies": None,
        "ci95": None,
        "bootstrap": None,
    }
    study_codes = None if study_ids is None else pd.factorize(np.asarray(study_ids))[0]
    study = None
    if study_codes is not None and "any" in names:
        j = names.index("any")
        study = _study_any(yt[:, j], yp[:, j], study_codes)
        out.update(_study_any_auc(study))
    for m in per_class.values():
        m["ci95"] = None
    if bootstrap and len(yt):
        resampled_study = study if out["study_any_auc"] is not None else None
        intervals = _bootstrap(
            yt,
            yp,
            names=names,
            units=_units(study_codes, len(yt)),
            per_class=per_class,
            study=resampled_study,
            replicates=int(bootstrap),
            seed=int(seed),
        )
        out["ci95"], out["bootstrap"] = intervals.overall, intervals.info
        for name, ci in intervals.per_class.items():
            per_class[name]["ci95"] = ci
    return out


def youden_thresholds(metrics: Mapping) -> dict[str, float]:
    """The operating thresholds of a :func:`compute_metrics` result, to pass to another set."""
    return {name: float(m["at_youden"]["threshold"]) for name, m in metrics["per_class"].items() if m["at_youden"]}


def reference_table(metrics: Mapping) -> dict[str, float | None]:
    """Binary-task numbers in the form the reference thesis reports (at threshold 0.5).

    Uses the ``any`` column (the binary task's only one); the thesis's F1 0.84
    is compared with ``f1`` here.
    """
    per_class = metrics["per_class"]
    if "any" in per_class:
        m = per_class["any"]
    elif len(per_class) == 1:
        m = next(iter(per_class.values()))
    else:
        raise ValueError("reference_table needs an 'any' column (binary task)")
    at = m["at_0.5"] or {}
    return {
        "accuracy": at.get("accuracy"),
        "recall": at.get("sensitivity"),
        "f1": at.get("f1"),
        "roc_auc": m["roc_auc"],
    }


def _ci_text(interval, info: Mapping | None, resamples: bool = False) -> str:
    """`` (95% CI 0.110-0.140[, 200 study resamples])``, or nothing without an interval."""
    if not interval or not info:
        return ""
    tail = f", {info['replicates']} {info['unit']} resamples" if resamples else ""
    return f" ({info['level']:.0%} CI {interval[0]:.3f}-{interval[1]:.3f}{tail})"


def fmt(x: float | None, spec: str = ".4f") -> str:
    """A figure as logs and tables print it ("-" where undefined)."""
    return "-" if x is None else format(x, spec)


def format_metrics(metrics: Mapping) -> str:
    """Compact text table for the CLI: one row per class, then the summary numbers (with intervals if any)."""
    f = fmt

    def auc_cell(m: Mapping) -> str:
        ci = (m.get("ci95") or {}).get("roc_auc")
        return f(m["roc_auc"], ".3f") + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci and m["roc_auc"] is not None else "")

    info = metrics.get("bootstrap")
    ci = metrics.get("ci95") or {}
    wide = 19 if info else 7  # room for "0.912 [0.85-0.96]"
    header = (
        f"{'class':<17}{'AUC':>{wide}}{'AP':>7}{'sens':>7}{'spec':>7}{'F1':>7}"
        f"{'thr':>7}{'prev':>8}{'mean p':>8}{'ECE':>7}{'n_pos':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, m in metrics["per_class"].items():
        at = m["at_youden"] or {}
        lines.append(
            f"{name:<17}{auc_cell(m):>{wide}}{f(m['average_precision'], '.3f'):>7}"
            f"{f(at.get('sensitivity'), '.3f'):>7}{f(at.get('specificity'), '.3f'):>7}{f(at.get('f1'), '.3f'):>7}"
            f"{f(at.get('threshold'), '.3f'):>7}{f(m['prevalence'], '.2%'):>8}{f(m.get('mean_prob'), '.2%'):>8}"
            f"{f(m.get('ece'), '.3f'):>7}{m['n_pos']:>8}"
        )
    sources = {(m["at_youden"] or {}).get("source") for m in metrics["per_class"].values()} - {None}
    lines.append("-" * len(header))
    lines.append(f"sens/spec/F1 at thresholds: {', '.join(sorted(sources)) or '-'}")
    lines.append(
        f"weighted log loss: {f(metrics['weighted_log_loss'], '.5f')}"
        f"{_ci_text(ci.get('weighted_log_loss'), info, resamples=True)}   images: {metrics['n_images']}"
    )
    lines.append(f"mean AUC:          {f(metrics['mean_auc'])}{_ci_text(ci.get('mean_auc'), info)}")
    if "mean_ece" in metrics:
        lines.append(f"mean ECE:          {f(metrics['mean_ece'])}{_ci_text(ci.get('mean_ece'), info)}")
    if metrics.get("n_studies") is not None:
        lines.append(
            f"study any AUC:     {f(metrics['study_any_auc'])}{_ci_text(ci.get('study_any_auc'), info)}"
            f"   studies: {metrics['n_studies']}"
        )
    if metrics.get("uncalibrated"):
        raw = metrics["uncalibrated"]
        lines.append(
            f"before Platt:      weighted log loss {f(raw['weighted_log_loss'], '.5f')}  mean AUC "
            f"{f(raw.get('mean_auc'))}  mean ECE {f(raw['mean_ece'])}  mean p "
            + ", ".join(f"{name} {f(p, '.2%')}" for name, p in raw["mean_prob"].items())
        )
    if "reference_table" in metrics:  # the reference thesis reports these for its binary model (F1 0.84)
        ref = metrics["reference_table"]
        lines.append(
            f"binary at 0.5:     accuracy {f(ref['accuracy'])}  recall {f(ref['recall'])}  "
            f"F1 {f(ref['f1'])}  ROC AUC {f(ref['roc_auc'])}"
        )
    return "\n".join(lines)
