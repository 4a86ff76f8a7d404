"""Evaluation metrics for hemorrhage detectors: pure functions on numpy arrays.

Inputs everywhere are ``y_true`` (N, K) with values 0/1 (NaN = label missing)
and ``y_prob`` (N, K) sigmoid probabilities, with ``names`` giving the K
column names (a subset of ``ichprep.labels.LABELS``, in the model's order).

The headline number is the RSNA 2019 competition metric
(:func:`weighted_log_loss`); everything else (AUC, AP, thresholded confusion
metrics, study-level AUC) comes from scikit-learn so that it matches what
other people compute.  :func:`compute_metrics` returns plain JSON-ready
dicts (floats, ints, strings, ``None`` for undefined values) so the trainer
can write them straight to ``metrics.json``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

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

#: Probabilities are clipped to [EPS, 1 - EPS] before taking logs, as in the
#: competition: one confident wrong answer must cost a lot, but not infinity.
EPS = 1e-7
#: Competition weights: ``any`` counts twice, each subtype once.
ANY_WEIGHT = 2.0
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------- input checks


def _as_float_2d(values, k: int | None, what: str) -> np.ndarray:
    """(N, K) float64 array; accepts pandas (nullable Int8 with <NA> -> NaN) and 1-D for K == 1."""
    if hasattr(values, "to_numpy"):
        # pandas nullable integers (what ichprep.labels returns) refuse a plain
        # np.asarray(float) when <NA> is present; ask pandas for NaN explicitly.
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


def _check(y_true, y_prob, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    names = tuple(names)
    yt = _as_float_2d(y_true, len(names), "y_true")
    yp = _as_float_2d(y_prob, len(names), "y_prob")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true shape {yt.shape} != y_prob shape {yp.shape}")
    known = yt[~np.isnan(yt)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0, 1 or NaN (missing label)")
    # A NaN probability is a bug upstream (diverged model, bad batch); hiding it
    # behind a clip or a dropped row would report a good score for a broken run.
    if not np.isfinite(yp).all():
        raise ValueError("y_prob contains NaN or inf")
    if (yp < 0).any() or (yp > 1).any():
        raise ValueError("y_prob must be probabilities in [0, 1] (apply the sigmoid first)")
    return yt, yp, names


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


def weighted_log_loss(y_true, y_prob, names: Sequence[str]) -> float:
    """RSNA 2019 competition metric.

    Per image: ``sum_j w_j * BCE_j / sum_j w_j`` with ``w = 2`` for ``any`` and
    1 for the subtypes, then the mean over images.  With all labels present
    this equals Kaggle's row-weighted average.  Missing (NaN) labels drop out
    of both the numerator and the denominator of their image; images with no
    label at all are ignored.
    """
    yt, yp, names = _check(y_true, y_prob, names)
    known = ~np.isnan(yt)
    w = np.where(known, label_weights(names)[None, :], 0.0)
    bce = np.where(known, _bce(yt, yp), 0.0)
    denom = w.sum(axis=1)
    keep = denom > 0
    if not keep.any():
        return float("nan")
    return float(np.mean((w * bce)[keep].sum(axis=1) / denom[keep]))


def per_class_log_loss(y_true, y_prob, names: Sequence[str]) -> dict[str, float | None]:
    """Mean (unweighted) binary cross-entropy of each class over its labelled rows."""
    yt, yp, names = _check(y_true, y_prob, names)
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
    # roc_curve starts with threshold +inf (predict nothing positive); that
    # point is never a useful operating threshold, so it is excluded.
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thr[int(np.argmax(j))])  # argmax: ties -> highest threshold


def _at_threshold(yt: np.ndarray, yp: np.ndarray, threshold: float) -> dict:
    """Confusion-matrix metrics with ``prob >= threshold`` counted positive (same rule as roc_curve)."""
    pred = (yp >= threshold).astype(int)
    yt = yt.astype(int)
    tn, fp, fn, tp = confusion_matrix(yt, pred, labels=[0, 1]).ravel()
    # zero_division=nan: e.g. precision with no positive predictions is
    # undefined, not 0; it becomes None in the JSON.
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
        # No ROC on these data: keep the operating point defined (so it can
        # still be reported and passed on) but say where it came from.
        op_threshold, source = DEFAULT_THRESHOLD, "default"
    return {
        "n": int(yt.size),
        "n_pos": n_pos,
        "prevalence": _num(n_pos / yt.size) if yt.size else None,
        "roc_auc": _num(roc_auc_score(yt, yp)) if both else None,
        "average_precision": _num(average_precision_score(yt, yp)) if both else None,
        "log_loss": _num(_bce(yt, yp).mean()) if yt.size else None,
        "youden_threshold": youden,
        "at_0.5": _at_threshold(yt, yp, DEFAULT_THRESHOLD) if yt.size else None,
        "at_youden": ({**_at_threshold(yt, yp, op_threshold), "source": source} if yt.size else None),
    }


def _study_any_auc(yt: np.ndarray, yp: np.ndarray, study_ids) -> dict:
    """Exam-level ``any``: a study is positive if any slice is, and scores its most suspicious slice."""
    frame = pd.DataFrame({"study": np.asarray(study_ids), "y": yt, "p": yp}).dropna(subset=["y"])
    per_study = frame.groupby("study", sort=False).agg(y=("y", "max"), p=("p", "max"))
    y, p = per_study["y"].to_numpy(), per_study["p"].to_numpy()
    both = np.unique(y).size == 2
    return {
        "study_any_auc": _num(roc_auc_score(y, p)) if both else None,
        "study_any_average_precision": _num(average_precision_score(y, p)) if both else None,
        "n_studies": int(len(per_study)),
        "study_any_prevalence": _num(y.mean()) if len(y) else None,
    }


def compute_metrics(
    y_true,
    y_prob,
    names: Sequence[str],
    study_ids=None,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """All evaluation numbers for one prediction set, JSON-serialisable.

    ``thresholds`` (name -> float, e.g. :func:`youden_thresholds` of the
    validation metrics) replaces the Youden threshold of *these* data for the
    ``at_youden`` operating point, so a test set is scored at thresholds
    chosen on validation rather than on itself.  ``study_ids`` (length N)
    adds the exam-level ``any`` AUC.  Rows with NaN truth are dropped per
    class; a class with a single label value gets ``None`` AUC/AP.
    """
    yt, yp, names = _check(y_true, y_prob, names)
    if study_ids is not None and len(study_ids) != len(yt):
        raise ValueError(f"study_ids has length {len(study_ids)}, expected {len(yt)}")
    thresholds = dict(thresholds or {})

    per_class = {}
    for j, name in enumerate(names):
        keep = ~np.isnan(yt[:, j])
        per_class[name] = _class_metrics(yt[keep, j], yp[keep, j], thresholds.get(name))

    aucs = [m["roc_auc"] for m in per_class.values() if m["roc_auc"] is not None]
    out = {
        "n_images": int(len(yt)),
        "names": list(names),
        "weighted_log_loss": _num(weighted_log_loss(yt, yp, names)),
        # Mean over the classes where AUC is defined (a rare class absent from
        # a small split must not turn the whole summary into None).
        "mean_auc": _num(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "study_any_auc": None,
        "n_studies": None,
    }
    if study_ids is not None and "any" in names:
        j = names.index("any")
        out.update(_study_any_auc(yt[:, j], yp[:, j], study_ids))
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


def format_metrics(metrics: Mapping) -> str:
    """Compact text table for the CLI: one row per class, then the summary numbers."""

    def f(x, spec=".4f") -> str:
        return "-" if x is None else format(x, spec)

    header = f"{'class':<17}{'AUC':>7}{'AP':>7}{'sens':>7}{'spec':>7}{'F1':>7}{'thr':>7}{'prev':>8}{'n_pos':>8}"
    lines = [header, "-" * len(header)]
    for name, m in metrics["per_class"].items():
        at = m["at_youden"] or {}
        lines.append(
            f"{name:<17}{f(m['roc_auc']):>7}{f(m['average_precision']):>7}"
            f"{f(at.get('sensitivity'), '.3f'):>7}{f(at.get('specificity'), '.3f'):>7}{f(at.get('f1'), '.3f'):>7}"
            f"{f(at.get('threshold'), '.3f'):>7}{f(m['prevalence'], '.2%'):>8}{m['n_pos']:>8}"
        )
    sources = {(m["at_youden"] or {}).get("source") for m in metrics["per_class"].values()} - {None}
    lines.append("-" * len(header))
    lines.append(f"sens/spec/F1 at thresholds: {', '.join(sorted(sources)) or '-'}")
    lines.append(f"weighted log loss: {f(metrics['weighted_log_loss'], '.5f')}   images: {metrics['n_images']}")
    lines.append(f"mean AUC:          {f(metrics['mean_auc'])}")
    if metrics.get("n_studies") is not None:
        lines.append(f"study any AUC:     {f(metrics['study_any_auc'])}   studies: {metrics['n_studies']}")
    if "reference_table" in metrics:  # the reference thesis reports these for its binary model (F1 0.84)
        ref = metrics["reference_table"]
        lines.append(f"binary at 0.5:     accuracy {f(ref['accuracy'])}  recall {f(ref['recall'])}  "
                     f"F1 {f(ref['f1'])}  ROC AUC {f(ref['roc_auc'])}")
    return "\n".join(lines)
