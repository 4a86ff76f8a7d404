"""Post-hoc Platt scaling: each label's logit becomes ``slope * logit + intercept``, fitted on held-out slices.

Trained to a low loss on its own patients, a network is over-confident on patients it has not seen (a
bleed it misses gets a probability near 0), so its mean probability falls short of the prevalence and
the log loss suffers.  A slope and an intercept per label, fitted by log loss on the validation patients,
undo that without changing any ranking (AUC is the same).  The validation figures come from a cross-fit
over the validation patients (each part scored by the map fitted on the others), so no map is scored on
the slices that fitted it; the map stored in the checkpoint is fitted on all of them.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..config import GROUPINGS
from ..data.folds import assign_folds, groups_of

logger = logging.getLogger(__name__)

#: A label is fitted only with at least this many positive and negative slices; otherwise it is left as is.
MIN_CLASS = 5
#: Weight of the prior (slope - 1)^2 + intercept^2, in slices' log loss: a handful of positives cannot pull far.
PRIOR = 1.0
#: Parts of the validation patients in the cross-fit.
CROSS_FOLDS = 2
_ITERATIONS = 50


class Platt(NamedTuple):
    """Per-label ``slope * logit + intercept``; slope 1 and intercept 0 leave a label as it is."""

    slope: np.ndarray  # float64 (K,)
    intercept: np.ndarray  # float64 (K,)

    @classmethod
    def identity(cls, k: int) -> Platt:
        return cls(slope=np.ones(k), intercept=np.zeros(k))

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """The recalibrated logits, float32 like the model's."""
        return (np.asarray(logits, np.float64) * self.slope + self.intercept).astype(np.float32)

    def to_dict(self) -> dict:
        return {"method": "platt", "slope": self.slope.tolist(), "intercept": self.intercept.tolist()}

    @classmethod
    def from_dict(cls, stored: dict | None, k: int) -> Platt:
        """A map as :meth:`to_dict` stored it; the identity for None (``--calibration none``)."""
        if stored is None:
            return cls.identity(k)
        return cls(slope=np.asarray(stored["slope"], np.float64), intercept=np.asarray(stored["intercept"], np.float64))


def _objective(theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    """Log loss summed over slices plus the prior pulling (slope, intercept) toward (1, 0)."""
    t = theta[0] * z + theta[1]
    # log(1 + e^t) - y t, written to stay finite for large |t|
    loss = np.logaddexp(0.0, t) - y * t
    return float(loss.sum() + PRIOR * ((theta[0] - 1.0) ** 2 + theta[1] ** 2))


def _fit_label(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Newton's method with step halving on the strictly convex penalised log loss of one label."""
    theta = np.array([1.0, 0.0])
    x = np.stack([z, np.ones_like(z)], axis=1)
    current = _objective(theta, z, y)
    for _ in range(_ITERATIONS):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (p - y) + 2 * PRIOR * (theta - [1.0, 0.0])
        hess = (x * (p * (1 - p))[:, None]).T @ x + 2 * PRIOR * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6 and _objective(theta - scale * step, z, y) > current:
            scale /= 2
        theta = theta - scale * step
        previous, current = current, _objective(theta, z, y)
        if previous - current < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def fit_platt(logits: np.ndarray, targets: np.ndarray) -> Platt:
    """The per-label map that minimises the (penalised) log loss of ``logits`` against ``targets`` (NaN: unlabelled)."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    platt = Platt.identity(logits.shape[1])
    for j in range(logits.shape[1]):
        known = np.isfinite(targets[:, j])
        z, y = logits[known, j], targets[known, j]
        positives = int(y.sum())
        if min(positives, len(y) - positives) < MIN_CLASS:
            continue  # too few of one class to fit two parameters: the label stays as trained
        platt.slope[j], platt.intercept[j] = _fit_label(z, y)
    return platt


def cross_fit_parts(slices: pd.DataFrame, slots: np.ndarray, *, seed: int, by: str) -> np.ndarray | None:
    """Each of ``slots``' part (0 .. CROSS_FOLDS-1) for the cross-fit, grouped like the split, stratified by bleeding.

    A slice-level split is cross-fitted by patient.  None when the slots hold fewer groups than parts
    (then nothing can be fitted on held-out patients).
    """
    subset = slices.iloc[slots].reset_index(drop=True)
    by = by if by in GROUPINGS else "patient"
    if len(groups_of(subset, by).keys) < CROSS_FOLDS:
        return None
    return assign_folds(subset, folds=CROSS_FOLDS, seed=seed, by=by)


def cross_fit(logits: np.ndarray, targets: np.ndarray, parts: np.ndarray | None) -> np.ndarray:
    """``logits`` recalibrated part by part, each with the map fitted on the other parts (as is without parts)."""
    if parts is None:
        return np.asarray(logits, np.float32)
    out = np.empty_like(logits, dtype=np.float32)
    for part in np.unique(parts):
        mine = parts == part
        out[mine] = fit_platt(logits[~mine], targets[~mine])(logits[mine])
    return out
