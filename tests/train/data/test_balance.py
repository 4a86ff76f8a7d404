"""ichtrain.data.balance: the hybrid plan's rates, and importance weights that undo it."""

from __future__ import annotations

import numpy as np
import pytest

from ichtrain.data.balance import Rates, epoch_plan, importance_weights, sampling_rates


def _slots(n=5000, prevalence=0.14, seed=0):
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < prevalence
    candidates = np.flatnonzero(rng.random(n) < 0.9)  # some slots are not candidates (val, zero-filled)
    return candidates, positive


def test_rates_match_what_the_epoch_plan_draws():
    candidates, positive = _slots()
    n_pos = int(positive[candidates].sum())
    rates = sampling_rates(n_pos, len(candidates) - n_pos, "hybrid", 0.5)
    counts = np.mean([epoch_plan(candidates, positive, "hybrid", 0.5, seed=1, epoch=e) for e in range(40)], axis=0)
    pos, neg = candidates[positive[candidates]], candidates[~positive[candidates]]
    assert counts[pos].mean() == pytest.approx(rates.r_pos, rel=0.02)
    assert counts[neg].mean() == pytest.approx(rates.p_neg, rel=0.02)
    # RSNA-like prevalence: a strong shift to undo.
    assert rates.r_pos > 3
    assert rates.p_neg < 0.6


@pytest.mark.parametrize(
    "n_pos, n_neg, balance", [(10, 90, "none"), (0, 100, "hybrid"), (100, 0, "hybrid"), (60, 40, "hybrid")]
)
def test_no_rebalancing_means_unit_rates(n_pos, n_neg, balance):
    assert sampling_rates(n_pos, n_neg, balance, 0.5) == Rates(1.0, 1.0)


def test_weighted_epoch_estimates_the_datas_own_mean():
    """Weighted by 1/E[count], a balanced epoch's mean of any per-slot value is the candidates' plain mean."""
    candidates, positive = _slots()
    value = np.where(positive, 2.0, 0.1) + np.random.default_rng(3).random(len(positive))  # e.g. a per-slot loss
    rates = sampling_rates(int(positive[candidates].sum()), int((~positive[candidates]).sum()), "hybrid", 0.5)
    weights = importance_weights(candidates, positive, rates)
    estimates, unweighted = [], []
    for epoch in range(30):
        counts = epoch_plan(candidates, positive, "hybrid", 0.5, seed=2, epoch=epoch)
        estimates.append((counts * weights * value).sum() / counts.sum())
        unweighted.append((counts * value).sum() / counts.sum())
    truth = value[candidates].mean()
    assert np.mean(estimates) == pytest.approx(truth, rel=0.02)
    assert np.mean(unweighted) > 1.5 * truth  # what the unweighted balanced loss estimates instead
    assert weights[np.setdiff1d(np.arange(len(positive)), candidates)].max() == 0
