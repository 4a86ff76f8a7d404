"""Class balancing and the importance weights that keep a balanced run's probabilities calibrated.

``--balance hybrid`` shows each positive slice ``r_pos`` times and each negative with probability
``p_neg`` per epoch.  Weighting every sample's loss by ``1 / E[count]`` makes the epoch's mean loss an
unbiased estimate of the loss on the data's own distribution, so its minimiser is the calibrated
probability of every label (a logit shift after training would only fix ``any``).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from ..config import BALANCES, TrainConfig, check_choice, check_fraction, check_int
from ..errors import DataError

logger = logging.getLogger(__name__)


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


def epoch_plan(
    candidates: np.ndarray,
    positive: np.ndarray,
    balance: str = TrainConfig.balance,
    pos_fraction: float = TrainConfig.pos_fraction,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """int64 (N,) repeat counts of one epoch: 0 for non-candidates, N = ``len(positive)``.

    ``"none"``: every candidate once.  ``"hybrid"`` (the reference method's mix of under- and
    over-sampling): each negative kept with probability ``p_neg``, each positive repeated ``r_pos`` times
    on average (integer part always, fractional part by a coin flip), with
    ``n_pos*r_pos + n_neg*p_neg = n`` and ``n_pos*r_pos = pos_fraction * n``: the epoch keeps about its
    length and gets about ``pos_fraction`` positives.  If positives already make ``pos_fraction`` nothing
    changes; with no positives or no negatives it falls back to "none" (with a warning).
    Random draws depend on (seed, epoch) only.
    """
    check_choice("balance", balance, BALANCES)
    check_fraction("pos_fraction", pos_fraction)
    seed, epoch = check_int("seed", seed), check_int("epoch", epoch)
    positive = np.asarray(positive)
    if positive.ndim != 1 or positive.dtype != bool:
        raise DataError(
            f"positive must be a 1-D bool array (one entry per slot), got {positive.dtype} {positive.shape}"
        )
    candidates = np.asarray(candidates)
    if candidates.ndim != 1 or (candidates.size and not np.issubdtype(candidates.dtype, np.integer)):
        raise DataError(f"candidates must be a 1-D integer array of slots, got {candidates.dtype} {candidates.shape}")
    n_slots = len(positive)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n_slots):
        raise DataError(f"candidates must be slots in [0, {n_slots})")
    if len(np.unique(candidates)) != len(candidates):
        raise DataError("candidates holds a slot twice; repeats are the plan's job")

    counts = np.zeros(n_slots, np.int64)
    counts[candidates] = 1
    if balance == "none" or len(candidates) == 0:
        return counts
    pos = positive[candidates]
    n, n_pos = len(candidates), int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        logger.warning("balance 'hybrid' needs positives and negatives (have %d and %d); using 'none'", n_pos, n_neg)
        return counts
    r_pos, p_neg = sampling_rates(n_pos, n_neg, balance, pos_fraction)
    if r_pos == 1.0:  # positives already make pos_fraction
        return counts
    rng = np.random.default_rng([seed, epoch])
    pos_slots, neg_slots = candidates[pos], candidates[~pos]
    whole = int(np.floor(r_pos))
    counts[pos_slots] = whole + (rng.random(n_pos) < r_pos - whole)
    counts[neg_slots] = rng.random(n_neg) < p_neg
    logger.info(
        "epoch %d plan: %d candidates (%.3f positive) -> %d samples (%.3f positive; r_pos %.2f, p_neg %.3f)",
        epoch,
        n,
        n_pos / n,
        int(counts.sum()),
        counts[pos_slots].sum() / max(1, counts.sum()),
        r_pos,
        p_neg,
    )
    return counts
