"""ichtrain.evaluation.bootstrap: weighted AUC/AP equal sklearn's, replicates are reproducible, intervals need data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ichtrain.evaluation.bootstrap import Ranking, percentile_interval, resample, weighted_auc_ap


@pytest.mark.parametrize("seed", range(8))
def test_weighted_auc_ap_match_sklearn_with_ties_and_integer_weights(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = (rng.random(n) < 0.2).astype(float)
    # Few distinct scores: many ties, some mixing positives and negatives.
    score = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 1)
    weight = rng.integers(0, 4, n).astype(float)  # 0 drops a row, as in a bootstrap replicate
    got = weighted_auc_ap(y, score, weight)
    assert got.auc == pytest.approx(roc_auc_score(y, score, sample_weight=weight), abs=1e-12)
    assert got.ap == pytest.approx(average_precision_score(y, score, sample_weight=weight), abs=1e-12)


def test_weighted_auc_ap_unweighted_continuous_scores():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.05).astype(float)
    score = rng.random(1000) + 0.5 * y
    got = weighted_auc_ap(y, score, np.ones(1000))
    assert got.auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert got.ap == pytest.approx(average_precision_score(y, score), abs=1e-12)


def test_weighted_auc_ap_undefined_without_both_labels():
    y = np.array([1.0, 1.0, 0.0])
    got = weighted_auc_ap(y, np.array([0.9, 0.5, 0.1]), np.array([1.0, 2.0, 0.0]))  # the negative has weight 0
    assert np.isnan(got.auc)
    assert np.isnan(got.ap)
    with pytest.raises(ValueError, match="same length"):
        weighted_auc_ap(y, np.array([0.9, 0.5]), np.ones(3))


def _problem(seed=0, n_units=40, per_unit=5):
    rng = np.random.default_rng(seed)
    unit = np.repeat(np.arange(n_units), per_unit)
    y = (rng.random(unit.size) < 0.3).astype(float)
    score = rng.random(unit.size) + 0.4 * y
    unit_sums = np.c_[np.bincount(unit, minlength=n_units), np.bincount(unit, weights=y, minlength=n_units)]
    return unit_sums, Ranking(y, score, unit)


def test_resample_is_reproducible_and_chunked_consistently(monkeypatch):
    unit_sums, ranking = _problem()
    a = resample(unit_sums, [ranking], replicates=50, seed=3)
    b = resample(unit_sums, [ranking], replicates=50, seed=3)
    c = resample(unit_sums, [ranking], replicates=50, seed=4)
    assert a.sums.shape == (50, 2)
    assert a.auc.shape == (50, 1)
    assert a.ap.shape == (50, 1)
    np.testing.assert_array_equal(a.auc, b.auc)
    np.testing.assert_array_equal(a.sums, b.sums)
    assert not np.array_equal(a.auc, c.auc)
    # Every replicate draws as many units as there are: the row count stays 200.
    np.testing.assert_array_equal(a.sums[:, 0], 200)
    # Small chunks (as for a large validation set) give the same replicates.
    import ichtrain.evaluation.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "_CHUNK_CELLS", 1)
    small = resample(unit_sums, [ranking], replicates=50, seed=3)
    np.testing.assert_allclose(small.auc, a.auc, rtol=0, atol=1e-12)


def test_resample_replicate_equals_weighted_sklearn():
    _, ranking = _problem(seed=1)
    # One identity column per unit: the resampled sums are each replicate's unit counts.
    reps = resample(np.eye(40), [ranking], replicates=5, seed=0)
    counts = reps.sums
    np.testing.assert_array_equal(counts.sum(axis=1), 40)
    assert np.array_equal(counts, np.round(counts))
    assert (counts >= 0).all()
    for r in range(5):
        w = counts[r][ranking.unit]
        assert reps.auc[r, 0] == pytest.approx(roc_auc_score(ranking.y, ranking.score, sample_weight=w), abs=1e-12)
        assert reps.ap[r, 0] == pytest.approx(
            average_precision_score(ranking.y, ranking.score, sample_weight=w), abs=1e-12
        )


def test_percentile_interval():
    values = np.arange(1001, dtype=float)
    assert percentile_interval(values) == pytest.approx([25.0, 975.0])
    assert percentile_interval(np.r_[values[:95], [np.nan] * 5]) is not None  # 95 % defined
    assert percentile_interval(np.r_[values[:85], [np.nan] * 15]) is None  # 85 % defined
    assert percentile_interval(np.full(10, np.nan)) is None
    assert all(isinstance(x, float) for x in percentile_interval(values))
