"""Study-level statistics for external validation (CQ500-style archives), as pure functions.

An external archive labels whole studies, often by several readers, so a
detector's slice probabilities are first pooled per study
(:func:`study_scores`, one of :data:`STUDY_RULES`), then judged as
Chilamkurthy et al. (2018, Lancet, Table 2) do:

* **AUC** with a 95 % percentile interval from resampling studies
  (:func:`study_auc`, :func:`study_aucs`; the vectorised replicates of
  :mod:`ichtrain.evaluation.bootstrap`, shared by all labels of one call);
* **operating points** chosen on a validation set (:func:`operating_points`,
  targets such as ``sens>=0.95``, ``spec>=0.9``, ``youden``; see
  :func:`parse_operating_point`) and applied to the external set
  (:func:`apply_threshold`: counts, sensitivity and specificity with exact
  Clopper-Pearson intervals, :func:`exact_interval`);
* **readers** (:func:`reader_agreement`): each reader's sensitivity and
  specificity against the majority of the *other* readers, and Fleiss' kappa
  (:func:`fleiss_kappa`) over all of them.

:func:`external_table` puts it all together per label as plain JSON values
(``None`` where undefined) and :func:`format_external_table` prints it.
A score is called positive where ``score >= threshold`` throughout, the rule
of :mod:`ichtrain.evaluation.metrics` and of ``sklearn.metrics.roc_curve``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

from ichprep.reading.labels import LABELS
from ichprep.reading.studylabels import SHORT_NAMES

from ..config import STUDY_RULES as STUDY_RULES  # re-exported: the rules are applied here
from ..config import check_choice, check_int
from .bootstrap import LEVEL, Ranking, percentile_interval, resample
from .metrics import _num, fmt, youden_threshold

logger = logging.getLogger(__name__)

#: Slices averaged by the ``top3`` rule (:data:`ichtrain.config.STUDY_RULES`; a study with fewer averages all).
TOP_K = 3
#: ``noisy_or`` clips p to [NOISY_OR_EPS, 1 - NOISY_OR_EPS]: one p = 1 would make every study certain.
NOISY_OR_EPS = 1e-6
#: Column prefixes of study and slice tables: ``prob_any``, ``true_any``.
PROB, TRUE = "prob_", "true_"
STUDY_COLUMN = "study_uid"

#: Operating-point targets: a minimum sensitivity or specificity (``sens>=0.95``), or Youden's J.
TARGET_KINDS: tuple[str, ...] = ("sens", "spec")
YOUDEN = "youden"
_TARGET_TEXT = re.compile(r"^\s*(?P<kind>[a-z]+)\s*(?:>=|=)\s*(?P<value>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*$")

#: How a tie among an even number of other readers counts: positive (as ichprep's ``majority``) or left out.
TIE_RULES: tuple[str, ...] = ("positive", "exclude")

#: Printed finding names, in Chilamkurthy et al.'s row order (ichprep's CQ500 abbreviations).
FINDING_NAMES: dict[str, str] = {
    label: ("ICH (any)" if label == "any" else short.upper()) for short, label in SHORT_NAMES.items()
}


# --------------------------------------------------------------------------- input helpers


def _floats(values, what: str) -> np.ndarray:
    """float64 array, NA (pandas nullable, None) -> NaN."""
    if hasattr(values, "to_numpy"):
        # Nullable Int8 (ichprep's labels) refuses a plain float cast with <NA>: ask pandas for NaN.
        values = values.to_numpy(dtype=float, na_value=np.nan)
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numeric: {exc}") from exc


def _binary(values, what: str) -> np.ndarray:
    """0/1 values with NaN for missing, as float64."""
    arr = _floats(values, what)
    known = arr[~np.isnan(arr)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError(f"{what} must contain only 0, 1 or missing values")
    return arr


def _pair(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """1-D truth (0/1) and finite scores of equal length, rows with missing truth dropped."""
    y, s = _binary(y_true, "y_true"), _floats(score, "score")
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true and score must be 1-D of the same length, got shapes {y.shape} and {s.shape}")
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    if not np.isfinite(s).all():
        raise ValueError("score contains NaN or inf where the truth is known")
    return y, s


def _columns(frame: pd.DataFrame, prefix: str, labels: Sequence[str], what: str) -> list[str]:
    columns = [f"{prefix}{label}" for label in labels]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, frame.columns))}")
    return columns


# --------------------------------------------------------------------------- 1. study scores


def _top_k_mean(codes: np.ndarray, p: np.ndarray, n_studies: int) -> np.ndarray:
    """Mean of the TOP_K highest ``p`` of each study (all of them when it has fewer)."""
    order = np.lexsort((-p, codes))  # by study, highest first within a study
    c, ps = codes[order], p[order]
    start = np.r_[True, c[1:] != c[:-1]]
    index = np.arange(c.size)
    # Rank within the study: distance to the start of its run.
    rank = index - np.maximum.accumulate(np.where(start, index, 0))
    top = rank < TOP_K
    return np.bincount(c[top], weights=ps[top], minlength=n_studies) / np.bincount(c[top], minlength=n_studies)


def study_scores(slices: pd.DataFrame, *, rule: str, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """One row per study (index ``study_uid``, first-appearance order) from slice rows.

    ``slices``: ``study_uid`` and ``prob_<label>`` columns, optionally
    ``true_<label>`` slice truths (0/1, NA allowed).  The output has
    ``prob_<label>`` pooled by ``rule`` (:data:`STUDY_RULES`): ``max``;
    ``top3``, the mean of the 3 highest slice probabilities (all slices when
    fewer); ``noisy_or``, ``1 - prod(1 - p)`` with p clipped to
    ``[1e-6, 1 - 1e-6]``.  ``true_<label>`` (where the input has it) is the
    highest slice truth, NaN where all of a study's slices are unlabelled.
    """
    check_choice("study rule", rule, STUDY_RULES)
    labels = tuple(labels)
    if STUDY_COLUMN not in slices.columns:
        raise ValueError(f"slices lacks column {STUDY_COLUMN!r}")
    prob_columns = _columns(slices, PROB, labels, "slices")
    codes, uniques = pd.factorize(slices[STUDY_COLUMN], sort=False)
    if (codes < 0).any():
        raise ValueError(f"{int((codes < 0).sum())} slice(s) have no {STUDY_COLUMN}")
    n_studies = len(uniques)
    probs = _floats(slices[prob_columns], "slice probabilities")
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise ValueError("slice probabilities must be finite and in [0, 1]")

    if rule == "max":
        pooled = pd.DataFrame(probs).groupby(codes, sort=True).max().to_numpy()
    elif rule == "top3":
        pooled = np.column_stack([_top_k_mean(codes, probs[:, j], n_studies) for j in range(len(labels))])
    else:
        log_miss = np.log1p(-np.clip(probs, NOISY_OR_EPS, 1.0 - NOISY_OR_EPS))
        sums = np.column_stack(
            [np.bincount(codes, weights=log_miss[:, j], minlength=n_studies) for j in range(len(labels))]
        )
        pooled = -np.expm1(sums)  # 1 - exp(sum log(1 - p)), exact near 0
    out = pd.DataFrame(pooled.reshape(n_studies, len(labels)), columns=prob_columns)

    true_columns = [f"{TRUE}{label}" for label in labels if f"{TRUE}{label}" in slices.columns]
    if true_columns:
        truths = _binary(slices[true_columns], "slice truths")
        # groupby max skips NaN and gives NaN where a study's slices are all unlabelled.
        out[true_columns] = pd.DataFrame(truths).groupby(codes, sort=True).max().to_numpy()
    out.index = pd.Index(uniques, name=STUDY_COLUMN)
    return out


# --------------------------------------------------------------------------- 2. operating points


class Target(NamedTuple):
    """An operating-point target: its name (``sens>=0.95``, ``youden``) and minimum rate (None for Youden)."""

    name: str
    value: float | None

    @property
    def kind(self) -> str:
        """``sens``, ``spec`` or ``youden``."""
        return self.name.partition(">=")[0]


def _target(kind: str, value: float) -> Target:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"operating point {kind}>={value}: the rate must be in (0, 1]")
    return Target(name=f"{kind}>={value:g}", value=float(value))


def parse_operating_point(text: str) -> Target:
    """``"sens=0.9"`` -> ``Target("sens>=0.9", 0.9)``; also ``spec=0.9``, ``sens>=0.9`` and ``youden``.

    ``sens>=s``: the largest threshold whose sensitivity is at least s;
    ``spec>=s``: the smallest threshold whose specificity is at least s;
    ``youden``: the threshold maximising sensitivity + specificity - 1.
    """
    if isinstance(text, Target):
        return text
    if not isinstance(text, str):
        raise ValueError(f"operating point must be text such as 'sens=0.95', got {text!r}")
    if text.strip().lower() == YOUDEN:
        return Target(name=YOUDEN, value=None)
    match = _TARGET_TEXT.match(text.lower())
    if not match or match["kind"] not in TARGET_KINDS:
        raise ValueError(
            f"operating point {text!r} not understood; write "
            + ", ".join(f"{kind}=<rate>" for kind in TARGET_KINDS)
            + f" (rate in (0, 1], e.g. sens=0.95) or {YOUDEN}"
        )
    return _target(match["kind"], float(match["value"]))


class _Sweep(NamedTuple):
    """Every distinct score as a threshold (descending) and the positives / negatives called at each."""

    threshold: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int


def _sweep(y: np.ndarray, s: np.ndarray) -> _Sweep:
    threshold = np.unique(s)[::-1]
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    # Called positive: score >= threshold, i.e. everything from the left insertion point on.
    tp = pos.size - np.searchsorted(pos, threshold, side="left")
    fp = neg.size - np.searchsorted(neg, threshold, side="left")
    return _Sweep(threshold=threshold, tp=tp, fp=fp, n_pos=int(pos.size), n_neg=int(neg.size))


def _threshold_for(target: Target, y: np.ndarray, s: np.ndarray, sweep: _Sweep) -> float | None:
    if target.kind == YOUDEN:
        return youden_threshold(y, s)  # metrics' rule: ties go to the larger threshold
    if target.kind == "sens":
        if sweep.n_pos == 0:
            return None
        # Sensitivity only grows as the threshold falls, and reaches 1 at the lowest score.
        return float(sweep.threshold[np.flatnonzero(sweep.tp / sweep.n_pos >= target.value)[0]])
    if sweep.n_neg == 0:
        return None
    ok = np.flatnonzero(1.0 - sweep.fp / sweep.n_neg >= target.value)
    if ok.size == 0:
        # Not even the top score reaches it: just above the top score, nothing is called positive (spec 1).
        return float(np.nextafter(sweep.threshold[0], np.inf))
    return float(sweep.threshold[ok[-1]])


def operating_points(
    y_true,
    score,
    *,
    sensitivities: Iterable[float] = (0.95,),
    youden: bool = True,
    targets: Iterable[str | Target] = (),
) -> dict[str, float | None]:
    """Thresholds chosen on a validation set, by name: ``{"sens>=0.95": t, "youden": t}``.

    Candidate thresholds are the observed scores.  ``sens>=s`` (one per
    ``sensitivities`` entry): the largest threshold with sensitivity >= s;
    ``targets``: more texts for :func:`parse_operating_point` (``spec=0.9``:
    the smallest threshold with specificity >= 0.9, or just above the top
    score when none has); ``youden``: Youden's J, ties to the larger
    threshold.  Rows with missing truth are dropped; a target that needs
    positives (negatives) which are absent gets ``None``.
    """
    y, s = _pair(y_true, score)
    wanted = [_target("sens", float(v)) for v in sensitivities] + [parse_operating_point(t) for t in targets]
    if youden:
        wanted.append(Target(name=YOUDEN, value=None))
    sweep = _sweep(y, s)
    return {t.name: _threshold_for(t, y, s, sweep) for t in wanted}


class Interval(NamedTuple):
    low: float
    high: float


def exact_interval(k: int, n: int, level: float = LEVEL) -> Interval | None:
    """Clopper-Pearson exact interval of a proportion k/n (``None`` for n = 0)."""
    k, n = check_int("k", k), check_int("n", n)
    if k > n:
        raise ValueError(f"k ({k}) must not exceed n ({n})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n == 0:
        return None
    alpha = 1.0 - level
    # The beta quantiles are undefined at the ends, where the bound is exactly 0 or 1.
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(low=low, high=high)


class Confusion(NamedTuple):
    """Counts, rates (None where the denominator is 0) and exact 95 % intervals of sensitivity / specificity."""

    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    sens_ci: Interval | None
    spec_ci: Interval | None


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def confusion(y_true, called) -> Confusion:
    """The confusion counts of 0/1 truths (no missing) against boolean calls."""
    y, c = np.asarray(y_true) == 1, np.asarray(called, dtype=bool)
    tp, fp = int((y & c).sum()), int((~y & c).sum())
    tn, fn = int((~y & ~c).sum()), int((y & ~c).sum())
    return Confusion(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=_rate(tp, tp + fn),
        specificity=_rate(tn, tn + fp),
        ppv=_rate(tp, tp + fp),
        npv=_rate(tn, tn + fn),
        sens_ci=exact_interval(tp, tp + fn),
        spec_ci=exact_interval(tn, tn + fp),
    )


def apply_threshold(y_true, score, threshold: float) -> Confusion:
    """Confusion at ``score >= threshold`` (rows with missing truth dropped)."""
    y, s = _pair(y_true, score)
    if not np.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return confusion(y, s >= float(threshold))


# --------------------------------------------------------------------------- 3. study AUC


class AucInterval(NamedTuple):
    """ROC AUC and its bootstrap interval (None where undefined), over n studies with n_pos positive."""

    auc: float | None
    low: float | None
    high: float | None
    n: int
    n_pos: int


def study_aucs(y_true, score, *, n_boot: int = 2000, seed: int = 0) -> tuple[AucInterval, ...]:
    """AUC of each column of (N, K) study truths (0/1, NaN missing) and scores, with study-bootstrap intervals.

    The point estimate is sklearn's ``roc_auc_score``.  All columns share the
    same ``n_boot`` resamples of the studies that have any known truth
    (one multinomial draw per replicate, :func:`bootstrap.resample`), so K
    labels cost little more than one; the interval is the 95 % percentile
    interval, ``None`` when the AUC is undefined in over 10 % of replicates.
    """
    n_boot, seed = check_int("n_boot", n_boot), check_int("seed", seed)
    y, s = _binary(y_true, "y_true"), _floats(score, "score")
    y, s = (y[:, None], s[:, None]) if y.ndim == 1 else (y, s)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and score must have the same (N, K) shape, got {y.shape} and {s.shape}")
    known = ~np.isnan(y)
    if not np.isfinite(s[known]).all():
        raise ValueError("score contains NaN or inf where the truth is known")
    # Studies without any truth carry no information: resampling them would only shrink the others' share.
    units = known.any(axis=1)
    y, s, known = y[units], s[units], known[units]
    unit_of = np.arange(len(y))

    points, rankings = [], []
    for j in range(y.shape[1]):
        yj, sj = y[known[:, j], j], s[known[:, j], j]
        n_pos = int(yj.sum())
        both = 0 < n_pos < yj.size
        points.append((float(roc_auc_score(yj, sj)) if both else None, int(yj.size), n_pos))
        if both:
            rankings.append(Ranking(y=yj, score=sj, unit=unit_of[known[:, j]]))
    intervals: list[list[float] | None] = [None] * len(rankings)
    if n_boot and rankings:
        reps = resample(np.ones((len(y), 1)), rankings, n_boot, seed)
        intervals = [percentile_interval(reps.auc[:, k]) for k in range(len(rankings))]
    out, k = [], 0
    for auc, n, n_pos in points:
        ci = None
        if auc is not None:
            ci, k = intervals[k], k + 1
        out.append(AucInterval(auc=auc, low=ci[0] if ci else None, high=ci[1] if ci else None, n=n, n_pos=n_pos))
    return tuple(out)


def study_auc(y_true, score, *, n_boot: int = 2000, seed: int = 0) -> AucInterval:
    """AUC of one label's study truths and scores with a 95 % study-bootstrap interval (see :func:`study_aucs`)."""
    y = _floats(y_true, "y_true")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (use study_aucs for several labels), got shape {y.shape}")
    return study_aucs(y, score, n_boot=n_boot, seed=seed)[0]


# --------------------------------------------------------------------------- 4. readers


def readers_of(columns: Iterable, *, labels: Sequence[str] = LABELS) -> tuple[str, ...]:
    """Reader names of ``<reader>:<label>`` columns (``R1:any``), in first-appearance order."""
    found: dict[str, None] = {}
    for column in columns:
        reader, sep, label = str(column).partition(":")
        if sep and reader and label in labels:
            found.setdefault(reader)
    return tuple(found)


class ReaderResult(NamedTuple):
    """One reader against the majority of the others: the confusion over ``n`` studies.

    ``left_out``: studies without this reader's read or without any other
    read (plus the ties, when ties are excluded); ``ties``: studies read by
    this reader where the others split evenly.
    """

    confusion: Confusion
    n: int
    left_out: int
    ties: int


class ReaderStats(NamedTuple):
    """Per-reader agreement with the others, and Fleiss' kappa over all readers (None if undefined)."""

    label: str
    readers: dict[str, ReaderResult]
    kappa: float | None
    kappa_n: int
    kappa_left_out: int
    tie_rule: str


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an (n_subjects, n_categories) matrix: how many raters put each subject in each category.

    Every subject needs the same number (>= 2) of ratings.  NaN when all
    ratings fall in one category (chance agreement 1: kappa undefined).
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] < 2:
        raise ValueError(f"counts must be (n_subjects >= 1, n_categories >= 2), got shape {counts.shape}")
    if (counts < 0).any() or (counts != np.round(counts)).any():
        raise ValueError("counts must be whole numbers >= 0")
    raters = counts.sum(axis=1)
    if (raters != raters[0]).any() or raters[0] < 2:
        raise ValueError("every subject needs the same number (>= 2) of ratings")
    n = raters[0]
    agreement = ((counts**2).sum(axis=1) - n) / (n * (n - 1))  # P_i: agreeing rater pairs per subject
    share = counts.sum(axis=0) / counts.sum()  # p_j
    chance = float((share**2).sum())
    if chance >= 1.0:
        return float("nan")
    return float((agreement.mean() - chance) / (1.0 - chance))


def reader_agreement(reads: pd.DataFrame, *, label: str, ties: str = "positive") -> ReaderStats:
    """Each reader's sensitivity / specificity against the majority of the other readers, and Fleiss' kappa.

    ``reads``: ``<reader>:<label>`` columns, 0/1 with NA, one row per study.
    The others' majority is taken over the others who read the study; an
    even split (1 of 2) counts as **positive** with ``ties="positive"``
    (ichprep's ``majority`` rule, the screening-side choice) or leaves the
    study out with ``ties="exclude"``; studies the reader did not read, or
    no other reader read, are left out; both are counted.  Fleiss' kappa
    uses the studies every reader read (the others are counted as left out).
    """
    check_choice("tie rule", ties, TIE_RULES)
    readers = readers_of(reads.columns, labels=(label,))
    if len(readers) < 2:
        raise ValueError(f"reader agreement on {label!r} needs >= 2 reader columns '<reader>:{label}', got {readers}")
    values = _binary(reads[[f"{r}:{label}" for r in readers]], f"reads of {label}")
    known = ~np.isnan(values)
    ones = np.where(known, values, 0.0)
    results = {}
    for i, reader in enumerate(readers):
        others = np.arange(len(readers)) != i
        votes, voters = ones[:, others].sum(axis=1), known[:, others].sum(axis=1)
        usable = known[:, i] & (voters > 0)
        tied = usable & (2 * votes == voters)
        if ties == "exclude":
            usable &= ~tied
        majority = 2 * votes >= voters  # a tie is positive where it is still in
        results[reader] = ReaderResult(
            confusion=confusion(majority[usable], values[usable, i] == 1),  # the reader judged by the others
            n=int(usable.sum()),
            left_out=int(len(values) - usable.sum()),
            ties=int(tied.sum()),
        )
    complete = known.all(axis=1)
    kappa = None
    if complete.any():
        positives = ones[complete].sum(axis=1)
        kappa = _num(fleiss_kappa(np.column_stack([len(readers) - positives, positives])))
    logger.info(
        "readers on %s: Fleiss' kappa over %d studies read by all (%d left out)",
        label,
        int(complete.sum()),
        int((~complete).sum()),
    )
    return ReaderStats(
        label=label,
        readers=results,
        kappa=kappa,
        kappa_n=int(complete.sum()),
        kappa_left_out=int((~complete).sum()),
        tie_rule=ties,
    )


# --------------------------------------------------------------------------- 5. the label table


def _rates(c: Confusion) -> dict:
    """A confusion as plain JSON values."""
    return {
        "sensitivity": _num(c.sensitivity),
        "sens_low": c.sens_ci.low if c.sens_ci else None,
        "sens_high": c.sens_ci.high if c.sens_ci else None,
        "specificity": _num(c.specificity),
        "spec_low": c.spec_ci.low if c.spec_ci else None,
        "spec_high": c.spec_ci.high if c.spec_ci else None,
        "ppv": _num(c.ppv),
        "npv": _num(c.npv),
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
    }


_NO_RATES = ("sensitivity", "sens_low", "sens_high", "specificity", "spec_low", "spec_high", "ppv", "npv")


def _readers_entry(studies: pd.DataFrame, label: str, ties: str) -> dict:
    if len(readers_of(studies.columns, labels=(label,))) < 2:
        return {"readers": {}, "fleiss_kappa": None, "kappa_n": 0, "kappa_left_out": 0, "tie_rule": None}
    stats = reader_agreement(studies, label=label, ties=ties)
    return {
        "readers": {
            reader: {**_rates(r.confusion), "n": r.n, "left_out": r.left_out, "ties": r.ties}
            for reader, r in stats.readers.items()
        },
        "fleiss_kappa": stats.kappa,
        "kappa_n": stats.kappa_n,
        "kappa_left_out": stats.kappa_left_out,
        "tie_rule": stats.tie_rule,
    }


def external_table(
    studies: pd.DataFrame,
    *,
    labels: Sequence[str] = LABELS,
    thresholds: Mapping[str, Mapping[str, float]],
    n_boot: int = 2000,
    seed: int = 0,
    ties: str = "positive",
) -> dict:
    """Per-label external-validation numbers, JSON-serialisable (plain Python values, None where undefined).

    ``studies``: one row per study with ``true_<label>`` (the reference, e.g.
    the readers' majority; NA = unknown, dropped per label) and
    ``prob_<label>``, optionally reader columns ``<reader>:<label>``.
    ``thresholds``: label -> {operating-point name: threshold}, chosen on a
    validation set (:func:`operating_points`).  Returns ``{"labels": {label:
    {n, n_pos, prevalence, auc, auc_low, auc_high, operating_points: {name:
    {threshold, sensitivity, sens_low, sens_high, specificity, spec_low,
    spec_high, ppv, npv, tp, fp, tn, fn}}, readers: {R1: {...}},
    fleiss_kappa, ...}}, "bootstrap": {...}}``.  AUC intervals of all labels
    come from the same study resamples.
    """
    labels = tuple(labels)
    check_choice("tie rule", ties, TIE_RULES)
    unknown = sorted(set(thresholds) - set(labels))
    if unknown:
        logger.warning("thresholds for label(s) not in the table ignored: %s", ", ".join(unknown))
    y = _binary(studies[_columns(studies, TRUE, labels, "studies")], "study truths")
    s = _floats(studies[_columns(studies, PROB, labels, "studies")], "study scores")
    aucs = study_aucs(y, s, n_boot=n_boot, seed=seed)
    per_label = {}
    for j, label in enumerate(labels):
        auc = aucs[j]
        points = {}
        for name, threshold in (thresholds.get(label) or {}).items():
            if threshold is None:  # validation had one class for this label: no point was fixed
                points[name] = dict.fromkeys(("threshold", *_NO_RATES))
                continue
            at = apply_threshold(y[:, j], s[:, j], threshold)
            points[name] = {"threshold": float(threshold), **_rates(at)}
        per_label[label] = {
            "n": auc.n,
            "n_pos": auc.n_pos,
            "prevalence": _rate(auc.n_pos, auc.n),
            "auc": auc.auc,
            "auc_low": auc.low,
            "auc_high": auc.high,
            "operating_points": points,
            **_readers_entry(studies, label, ties),
        }
    return {
        "labels": per_label,
        "n_studies": int(len(studies)),
        "bootstrap": {"replicates": n_boot, "seed": seed, "unit": "study", "level": LEVEL},
    }


def _with_ci(value, low, high) -> str:
    """``0.942 (0.931-0.953)``; ``-`` where undefined."""
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else "")


def _finding(label: str) -> str:
    return FINDING_NAMES.get(label, label)


def _in_finding_order(labels: Iterable[str]) -> list[str]:
    order = list(FINDING_NAMES)
    return sorted(labels, key=lambda label: (order.index(label) if label in order else len(order), label))


def _layout(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_external_table(table: Mapping) -> str:
    """The table laid out like Chilamkurthy et al. (2018, Lancet) Table 2, then the readers' agreement.

    One row per finding (ICH (any), IPH, IVH, SDH, EDH, SAH): AUC (95% CI),
    for each operating point sensitivity (95% CI) and specificity (95% CI),
    and prevalence n/N; below, each reader against the others' majority and
    Fleiss' kappa.
    """
    per_label = table["labels"]
    labels = _in_finding_order(per_label)
    names: dict[str, None] = {}
    for label in labels:
        names.update(dict.fromkeys(per_label[label]["operating_points"]))
    top = ["", ""] + [cell for name in names for cell in (name, "")] + [""]
    head = ["Finding", "AUC (95% CI)"]
    head += [cell for _ in names for cell in ("Sensitivity (95% CI)", "Specificity (95% CI)")] + ["Prevalence n/N"]
    rows = [top, head]
    for label in labels:
        m = per_label[label]
        row = [_finding(label), _with_ci(m["auc"], m["auc_low"], m["auc_high"])]
        for name in names:
            at = m["operating_points"].get(name)
            row += (
                [
                    _with_ci(at["sensitivity"], at["sens_low"], at["sens_high"]),
                    _with_ci(at["specificity"], at["spec_low"], at["spec_high"]),
                ]
                if at
                else ["-", "-"]
            )
        row.append(f"{m['n_pos']}/{m['n']} ({fmt(m['prevalence'], '.1%')})")
        rows.append(row)
    info = table.get("bootstrap") or {}
    lines = _layout(rows)
    lines.append(
        f"AUC intervals: {info.get('replicates', '?')} study resamples (percentile); "
        "sensitivity / specificity intervals: exact (Clopper-Pearson)."
    )

    reader_rows = [["Finding", "Reader", "Sensitivity (95% CI)", "Specificity (95% CI)", "n", "Fleiss' kappa"]]
    for label in labels:
        m = per_label[label]
        for i, (reader, r) in enumerate(m["readers"].items()):
            reader_rows.append(
                [
                    _finding(label) if i == 0 else "",
                    reader,
                    _with_ci(r["sensitivity"], r["sens_low"], r["sens_high"]),
                    _with_ci(r["specificity"], r["spec_low"], r["spec_high"]),
                    str(r["n"]),
                    f"{fmt(m['fleiss_kappa'], '.3f')} (n={m['kappa_n']})" if i == 0 else "",
                ]
            )
    if len(reader_rows) > 1:
        rule = next(per_label[label]["tie_rule"] for label in labels if per_label[label]["readers"])
        lines += ["", f"Readers against the majority of the other readers (even splits: {rule})"]
        lines += _layout(reader_rows)
    return "\n".join(lines)
