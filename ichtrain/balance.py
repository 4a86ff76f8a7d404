"""Class balancing and the importance weights that keep a balanced run's probabilities calibrated.

``--balance hybrid`` shows each positive slice ``r_pos`` times and each negative with probability
``p_neg`` per epoch.  Weighting every sample's loss by ``1 / E[count]`` makes the epoch's mean loss an
unbiased estimate of the loss on the data's own distribution, so its minimiser is the calibrated
probability of every label (a logit shift after training would only fix ``any``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Rates(NamedTuple):
    """Expected times per epoch a positive (``r_pos``) and a negative (``p_neg``) candidate is shown."""

    r_pos: float
    p_neg: float


def sampling_rates(n_pos: int, n_neg: int, balance: str, pos_fraction: float) -> Rates:
    """Rates giving about ``pos_fraction`` positives per epoch at about the candidates' count.

    Solves ``n_pos*r_pos = pos_fraction*n`` and ``n_neg*p_neg = (1-pos_fraction)*n``; (1, 1) for
    ``"none"``, when one class is missing, or when positives already make ``pos_fraction``.
    """
    n = n_pos + n_neg
    if balance == "none" or n_pos == 0 or n_neg == 0 or n_pos >= pos_fraction * n:
        return Rates(1.0, 1.0)
    return Rates(pos_fraction * n / n_pos, (1.0 - pos_fraction) * n / n_neg)


def importance_weights(candidates: np.ndarray, positive: np.ndarray, rates: Rates) -> np.ndarray:
    """float32 (N,) loss weight per slot: ``1 / r_pos`` for positive, ``1 / p_neg`` for negative candidates.

    Non-candidates get 0 (they are never drawn).  Over an epoch the weights of the drawn samples sum to
    about the number of candidates, so the weighted mean loss keeps the unweighted loss's scale.
    """
    weights = np.zeros(len(positive), np.float32)
    pos = positive[candidates]
    weights[candidates] = np.where(pos, 1.0 / rates.r_pos, 1.0 / rates.p_neg)
    return weights
