"""Bootstrap by resampling units (studies, or slices), vectorised over replicates.

A replicate draws ``n_units`` units with replacement; a unit's draw count is
the weight of every row it holds.  Two kinds of statistic are computed per
replicate, without looping over replicates one by one:

* weighted sums: ``counts @ per-unit sums`` (log loss, mean probability,
  confusion counts, calibration bins are ratios of such sums);
* weighted ROC AUC and average precision: scores are sorted once, tied scores
  merged into groups, and each replicate's weighted positives / negatives per
  group come from one sparse product; AUC and AP are then cumulative sums.

Replicates are processed in chunks so that memory stays bounded for large
validation sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.sparse import csr_matrix

LEVEL = 0.95
#: An interval is reported only when its metric is defined in at least this share of replicates.
MIN_DEFINED = 0.9
#: Cells (score groups x replicates) per dense working array; about ten such arrays live at once.
_CHUNK_CELLS = 1_000_000


class Ranking(NamedTuple):
    """One AUC/AP problem: 0/1 labels and scores of items, and the unit (0 .. n_units-1) each item belongs to."""

    y: np.ndarray
    score: np.ndarray
    unit: np.ndarray


class AucAp(NamedTuple):
    """ROC AUC and average precision (NaN where one label value has no weight)."""

    auc: np.ndarray
    ap: np.ndarray


class Replicates(NamedTuple):
    """Per-replicate results: ``sums`` (B, F) weighted unit sums; ``auc``/``ap`` (B, number of rankings)."""

    sums: np.ndarray
    auc: np.ndarray
    ap: np.ndarray


def _indicator(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> csr_matrix:
    """Sparse count matrix: entry (r, c) = how many items have row r and column c (duplicates add up)."""
    return csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)


def auc_ap_from_groups(pos: np.ndarray, neg: np.ndarray) -> AucAp:
    """AUC and AP from weighted positives/negatives (G, R) per score group (see _score_groups), ascending."""
    tot_pos, tot_neg = pos.sum(axis=0), neg.sum(axis=0)
    defined = (tot_pos > 0) & (tot_neg > 0)
    # Ties count half: a positive beats the negatives below its score and half of those at it.
    neg_below = np.cumsum(neg, axis=0) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=0)
    # Thresholds descend through the groups (sklearn's rule): TP/FP = weight at or above each score.
    tp = np.cumsum(pos[::-1], axis=0)[::-1]
    fp = np.cumsum(neg[::-1], axis=0)[::-1]
    # A group with positive weight has tp > 0, so precision is defined wherever it is used.
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=pos > 0)
    recall_steps = (pos * precision).sum(axis=0)
    safe_pos, safe_neg = np.where(defined, tot_pos, 1.0), np.where(defined, tot_neg, 1.0)
    return AucAp(
        auc=np.where(defined, wins / (safe_pos * safe_neg), np.nan),
        ap=np.where(defined, recall_steps / safe_pos, np.nan),
    )


def _score_groups(score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Group (ascending) of each item of sorted ``score``: tied scores share one, runs of negatives share one.

    A run of negative-only scores between two positive scores acts on AUC and
    AP only through its total weight (cumulative sums at the positive groups),
    so merging it is exact and shrinks the arrays to about twice the number of
    positive scores.
    """
    if score.size == 0:
        return np.zeros(0, dtype=int)
    tie = np.cumsum(np.r_[True, score[1:] != score[:-1]]) - 1
    tie_has_pos = np.bincount(tie, weights=pos) > 0
    # A group starts at every tie group holding a positive, and right after one.
    starts = tie_has_pos | np.r_[True, tie_has_pos[:-1]]
    return (np.cumsum(starts) - 1)[tie]


class _ScoreGroups:
    """A ranking sorted once and grouped: maps unit weights to weighted positives/negatives per group."""

    def __init__(self, ranking: Ranking, n_units: int):
        order = np.argsort(ranking.score, kind="stable")
        pos = np.asarray(ranking.y)[order] == 1
        group = _score_groups(np.asarray(ranking.score)[order], pos)
        self.size = int(group[-1]) + 1 if group.size else 0
        unit = np.asarray(ranking.unit)[order]
        self._pos = _indicator(group[pos], unit[pos], (self.size, n_units))
        self._neg = _indicator(group[~pos], unit[~pos], (self.size, n_units))

    def auc_ap(self, unit_weights: np.ndarray) -> AucAp:
        """``unit_weights`` (n_units, R) -> AUC and AP of shape (R,)."""
        return auc_ap_from_groups(self._pos @ unit_weights, self._neg @ unit_weights)


def weighted_auc_ap(y_true, y_score, sample_weight) -> AucAp:
    """Weighted ROC AUC and average precision of one ranking (floats; the same definitions as sklearn's)."""
    y_true, y_score = np.asarray(y_true, dtype=float), np.asarray(y_score, dtype=float)
    weight = np.asarray(sample_weight, dtype=float)
    if not y_true.shape == y_score.shape == weight.shape or y_true.ndim != 1:
        raise ValueError("y_true, y_score and sample_weight must be 1-D arrays of the same length")
    n = len(y_true)
    result = _ScoreGroups(Ranking(y=y_true, score=y_score, unit=np.arange(n)), n).auc_ap(weight[:, None])
    return AucAp(auc=float(result.auc[0]), ap=float(result.ap[0]))


def _chunk_results(groups: Sequence[_ScoreGroups], counts: np.ndarray) -> AucAp:
    results = [g.auc_ap(counts) for g in groups]
    width = counts.shape[1]
    if not results:
        return AucAp(np.empty((width, 0)), np.empty((width, 0)))
    return AucAp(np.stack([r.auc for r in results], axis=1), np.stack([r.ap for r in results], axis=1))


def resample(unit_sums: np.ndarray, rankings: Sequence[Ranking], replicates: int, seed: int) -> Replicates:
    """``replicates`` bootstrap draws of the units, each unit weighted by how often it was drawn.

    ``unit_sums`` (n_units, F): per-unit sums of row quantities; ``rankings``:
    AUC/AP problems whose ``unit`` indexes the same units.  The same seed
    gives the same replicates.
    """
    unit_sums = np.asarray(unit_sums, dtype=float)
    n_units = unit_sums.shape[0]
    if n_units == 0:
        raise ValueError("nothing to resample: no units")
    groups = [_ScoreGroups(r, n_units) for r in rankings]
    chunk = max(1, _CHUNK_CELLS // max([n_units, *(g.size for g in groups)]))
    rng = np.random.default_rng(seed)
    uniform = np.full(n_units, 1.0 / n_units)
    sums, aucs, aps = [], [], []
    for start in range(0, replicates, chunk):
        # Multinomial counts: n_units draws with replacement, one row per replicate.
        counts = rng.multinomial(n_units, uniform, size=min(chunk, replicates - start)).T.astype(float)
        sums.append(counts.T @ unit_sums)
        ranked = _chunk_results(groups, counts)
        aucs.append(ranked.auc)
        aps.append(ranked.ap)
    return Replicates(sums=np.concatenate(sums), auc=np.concatenate(aucs), ap=np.concatenate(aps))


def percentile_interval(values, level: float = LEVEL, min_defined: float = MIN_DEFINED) -> list[float] | None:
    """Percentile interval ``[lo, hi]`` of the finite replicate values, or None if too few are defined."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < min_defined * values.size:
        return None
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]
