"""ichtrain.evaluation.studylevel: pooling rules, operating points, exact intervals, study AUC, readers, the table."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ichtrain.evaluation.studylevel import (
    STUDY_RULES,
    AucInterval,
    Target,
    apply_threshold,
    exact_interval,
    external_table,
    fleiss_kappa,
    format_external_table,
    operating_points,
    parse_operating_point,
    reader_agreement,
    readers_of,
    study_auc,
    study_aucs,
    study_scores,
)

# --------------------------------------------------------------------------- study scores


def _slices() -> pd.DataFrame:
    # Rows interleaved: the output must follow first appearance (B, A, C), not sorted order.
    return pd.DataFrame(
        {
            "study_uid": ["B", "A", "B", "A", "C", "A", "A"],
            "prob_any": [0.2, 0.1, 0.4, 0.9, 1.0, 0.5, 0.7],
            "true_any": pd.array([pd.NA, 0, pd.NA, 1, 0, pd.NA, 0], dtype="Int8"),
        }
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("max", {"B": 0.4, "A": 0.9, "C": 1.0}),
        # A: mean of 0.9, 0.7, 0.5; B has two slices: mean of both.
        ("top3", {"B": 0.3, "A": 0.7, "C": 1.0}),
        # A: 1 - 0.9*0.1*0.5*0.3; C: p = 1 clipped to 1 - 1e-6.
        ("noisy_or", {"B": 1 - 0.8 * 0.6, "A": 1 - 0.9 * 0.1 * 0.5 * 0.3, "C": 1 - 1e-6}),
    ],
)
def test_study_scores_rules_exact(rule, expected):
    out = study_scores(_slices(), rule=rule, labels=("any",))
    assert list(out.index) == ["B", "A", "C"]
    assert out.index.name == "study_uid"
    np.testing.assert_allclose(out["prob_any"].to_numpy(), [expected[k] for k in "BAC"], rtol=0, atol=1e-12)
    # Truth: max of the slice truths; B has none labelled.
    truth = out["true_any"].to_numpy(dtype=float)
    assert np.isnan(truth[0]) and truth[1] == 1 and truth[2] == 0


def test_study_scores_several_labels_and_no_truth_columns():
    rng = np.random.default_rng(0)
    n = 500
    slices = pd.DataFrame({"study_uid": rng.integers(0, 40, n).astype(str)})
    for label in ("any", "subdural"):
        slices[f"prob_{label}"] = rng.random(n)
    out = study_scores(slices, rule="top3", labels=("any", "subdural"))
    assert list(out.columns) == ["prob_any", "prob_subdural"]
    want = slices.groupby("study_uid", sort=False)["prob_subdural"].apply(lambda p: p.nlargest(3).mean())
    np.testing.assert_allclose(out["prob_subdural"].to_numpy(), want.loc[out.index].to_numpy(), atol=1e-12)


def test_study_scores_rejects_unknown_rule_and_missing_columns():
    with pytest.raises(ValueError, match="max, top3, noisy_or"):
        study_scores(_slices(), rule="mean", labels=("any",))
    with pytest.raises(ValueError, match="prob_subdural"):
        study_scores(_slices(), rule="max", labels=("any", "subdural"))
    assert STUDY_RULES == ("max", "top3", "noisy_or")


# --------------------------------------------------------------------------- operating points

# Positives 0.9, 0.8, 0.6, 0.3; negatives 0.7, 0.5, 0.4, 0.2, 0.1, 0.05.
Y = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=float)
S = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])


def test_operating_points_exact_thresholds():
    got = operating_points(
        Y, S, sensitivities=(0.5, 0.75, 0.95), targets=("spec=1", "spec=0.8", "spec>=0.5"), youden=True
    )
    assert got == {
        "sens>=0.5": 0.8,
        "sens>=0.75": 0.6,
        "sens>=0.95": 0.3,  # needs all 4 positives
        "spec>=1": 0.8,
        "spec>=0.8": 0.6,  # at most 1 false positive of 6
        "spec>=0.5": 0.3,  # at most 3 false positives
        "youden": 0.6,  # J = 3/4 - 1/6
    }
    for name, threshold in got.items():
        at = apply_threshold(Y, S, threshold)
        target = parse_operating_point(name)
        if target.kind == "sens":
            assert at.sensitivity >= target.value
        elif target.kind == "spec":
            assert at.specificity >= target.value


def test_operating_point_is_the_largest_or_smallest_that_qualifies():
    # The next larger score misses the sensitivity target; the next smaller misses the specificity one.
    assert apply_threshold(Y, S, 0.7).sensitivity < 0.75
    assert apply_threshold(Y, S, 0.5).specificity < 0.8


def test_youden_ties_go_to_the_larger_threshold():
    # J = 0.5 at 0.9 (1/2 - 0) and at 0.7 (1 - 1/2).
    got = operating_points([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], sensitivities=())
    assert got == {"youden": 0.9}


def test_specificity_out_of_reach_goes_just_above_the_top_score():
    got = operating_points([0, 1], [0.9, 0.1], sensitivities=(), targets=("spec=1",), youden=False)
    assert got["spec>=1"] > 0.9
    assert apply_threshold([0, 1], [0.9, 0.1], got["spec>=1"]).specificity == 1.0


def test_operating_points_single_class_and_missing_truth():
    got = operating_points([0, 0, np.nan], [0.1, 0.2, 0.9], targets=("spec=0.5",))
    assert got == {"sens>=0.95": None, "spec>=0.5": 0.2, "youden": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sens=0.9", ("sens>=0.9", 0.9)),
        ("SENS = 0.90", ("sens>=0.9", 0.9)),
        ("sens>=0.95", ("sens>=0.95", 0.95)),
        ("spec=0.9", ("spec>=0.9", 0.9)),
        ("spec=1", ("spec>=1", 1.0)),
        ("youden", ("youden", None)),
    ],
)
def test_parse_operating_point(text, expected):
    assert parse_operating_point(text) == expected


@pytest.mark.parametrize("text", ["", "sens", "sens=", "sens=abc", "sens=0", "sens=1.5", "ppv=0.9", "sens<0.9", 0.9])
def test_parse_operating_point_rejects_bad_text(text):
    with pytest.raises(ValueError, match="operating point"):
        parse_operating_point(text)


def test_parse_operating_point_kind():
    assert parse_operating_point("spec=0.8").kind == "spec"
    assert Target("youden", None).kind == "youden"


# --------------------------------------------------------------------------- exact intervals and confusion


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.3085), (5, 10, 0.1871, 0.8129), (10, 10, 0.6915, 1.0), (1, 4, 0.0063, 0.8059)],
)
def test_clopper_pearson_known_values(k, n, low, high):
    got = exact_interval(k, n)
    assert got.low == pytest.approx(low, abs=5e-5)
    assert got.high == pytest.approx(high, abs=5e-5)


def test_exact_interval_edge_cases():
    assert exact_interval(0, 0) is None
    with pytest.raises(ValueError, match="exceed"):
        exact_interval(3, 2)
    with pytest.raises(ValueError, match="level"):
        exact_interval(1, 2, level=1.5)


def test_apply_threshold_counts_and_rates():
    at = apply_threshold(Y, S, 0.6)
    assert (at.tp, at.fp, at.tn, at.fn) == (3, 1, 5, 1)
    assert at.sensitivity == 0.75 and at.specificity == 5 / 6
    assert at.ppv == 0.75 and at.npv == 5 / 6
    assert at.sens_ci == exact_interval(3, 4) and at.spec_ci == exact_interval(5, 6)
    none = apply_threshold([0, 0], [0.1, 0.9], 0.5)
    assert none.sensitivity is None and none.sens_ci is None and none.specificity == 0.5


# --------------------------------------------------------------------------- study AUC


def _random_studies(seed: int, n: int = 400, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.2).astype(float)
    s = np.round(np.clip(rng.random((n, k)) * 0.8 + 0.3 * y, 0, 1), 2)  # some ties
    return y, s


@pytest.mark.parametrize("seed", range(3))
def test_study_auc_matches_sklearn_and_interval_contains_it(seed):
    y, s = _random_studies(seed)
    got = study_auc(y[:, 0], s[:, 0], n_boot=300, seed=seed)
    assert got.auc == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]), abs=1e-12)
    assert got.low < got.auc < got.high
    assert got.high - got.low < 0.3
    assert (got.n, got.n_pos) == (len(y), int(y[:, 0].sum()))


def test_study_aucs_share_replicates_and_are_reproducible():
    y, s = _random_studies(0)
    together = study_aucs(y, s, n_boot=200, seed=1)
    for j in range(y.shape[1]):
        assert together[j] == study_auc(y[:, j], s[:, j], n_boot=200, seed=1)
    assert study_aucs(y, s, n_boot=200, seed=2) != together


def test_study_auc_single_class_and_missing_truth():
    got = study_auc([0, 0, 0, np.nan], [0.1, 0.5, 0.2, 0.9], n_boot=50)
    assert got == AucInterval(auc=None, low=None, high=None, n=3, n_pos=0)
    no_boot = study_auc([0, 1, 1], [0.1, 0.5, 0.2], n_boot=0)
    assert no_boot.auc == 1.0 and no_boot.low is None


# --------------------------------------------------------------------------- readers


def _reads() -> pd.DataFrame:
    na = pd.NA
    return pd.DataFrame(
        {
            "R1:any": pd.array([1, 1, 0, 0, 1, na], dtype="Int8"),
            "R2:any": pd.array([1, 0, 0, 1, 1, 1], dtype="Int8"),
            "R3:any": pd.array([1, 1, 0, 0, na, 0], dtype="Int8"),
            "R1:subdural": pd.array([0, 0, 0, 0, 0, 0], dtype="Int8"),
            "R4:Fracture": [0, 0, 0, 0, 0, 0],
        }
    )


def test_readers_of():
    assert readers_of(_reads().columns) == ("R1", "R2", "R3")
    assert readers_of(["study_uid", "prob_any", "R2:any", "R1:any"]) == ("R2", "R1")


def test_reader_agreement_by_hand():
    stats = reader_agreement(_reads(), label="any")
    assert tuple(stats.readers) == ("R1", "R2", "R3")
    r1, r2, r3 = (stats.readers[r] for r in ("R1", "R2", "R3"))
    # R1 vs (R2, R3): study 1 TP; 2 tie -> positive, TP; 3 TN; 4 tie -> positive, FN; 5 only R2 (1), TP; 6 unread.
    assert (r1.confusion.tp, r1.confusion.fp, r1.confusion.tn, r1.confusion.fn) == (3, 0, 1, 1)
    assert (r1.n, r1.left_out, r1.ties) == (5, 1, 2)
    assert r1.confusion.sensitivity == 0.75 and r1.confusion.sens_ci == exact_interval(3, 4)
    # R2 vs (R1, R3): TP, FN, TN, FP, TP (R1 only), FP (R3 only).
    assert (r2.confusion.tp, r2.confusion.fp, r2.confusion.tn, r2.confusion.fn) == (2, 2, 1, 1)
    assert (r2.n, r2.left_out, r2.ties) == (6, 0, 0)
    # R3 vs (R1, R2): TP, tie TP, TN, tie FN, unread, FN (R2 only).
    assert (r3.confusion.tp, r3.confusion.fp, r3.confusion.tn, r3.confusion.fn) == (2, 0, 1, 2)
    assert (r3.n, r3.left_out, r3.ties) == (5, 1, 2)
    # Fleiss over studies 1-4 (5 and 6 have a missing read): counts (0,3), (1,2), (3,0), (2,1) -> (2/3 - 1/2) / (1/2).
    assert stats.kappa == pytest.approx(1 / 3, abs=1e-12)
    assert (stats.kappa_n, stats.kappa_left_out) == (4, 2)


def test_reader_agreement_excluding_ties():
    r1 = reader_agreement(_reads(), label="any", ties="exclude").readers["R1"]
    assert (r1.confusion.tp, r1.confusion.fp, r1.confusion.tn, r1.confusion.fn) == (2, 0, 1, 0)
    assert (r1.n, r1.left_out, r1.ties) == (3, 3, 2)
    with pytest.raises(ValueError, match="positive, exclude"):
        reader_agreement(_reads(), label="any", ties="negative")
    with pytest.raises(ValueError, match=">= 2 reader"):
        reader_agreement(_reads(), label="subdural")


# Fleiss (1971); the worked example of Wikipedia's "Fleiss' kappa" article: 10 subjects, 14 raters, 5 categories.
WIKIPEDIA_FLEISS = np.array(
    [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
)


def test_fleiss_kappa_wikipedia_example():
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)
    assert np.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category only: chance agreement 1
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[3, 0], [1, 1]])


@pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None, reason="statsmodels not installed")
def test_fleiss_kappa_matches_statsmodels():
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

    rng = np.random.default_rng(0)
    counts = rng.multinomial(5, [0.5, 0.3, 0.2], size=30)
    assert fleiss_kappa(counts) == pytest.approx(sm_fleiss_kappa(counts, method="fleiss"), abs=1e-12)
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(sm_fleiss_kappa(WIKIPEDIA_FLEISS), abs=1e-12)


# --------------------------------------------------------------------------- the external table


def _external_studies() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 120
    truth = (rng.random(n) < 0.3).astype(int)
    frame = pd.DataFrame(
        {
            "true_any": truth,
            "prob_any": np.clip(rng.random(n) * 0.7 + 0.3 * truth, 0, 1),
            "true_epidural": np.zeros(n, dtype=int),  # single class: AUC and sensitivity undefined
            "prob_epidural": rng.random(n) * 0.2,
        }
    )
    for reader in ("R1", "R2", "R3"):
        flip = rng.random(n) < 0.1
        frame[f"{reader}:any"] = np.where(flip, 1 - truth, truth)
    return frame


def test_external_table_values_and_json():
    studies = _external_studies()
    thresholds = {"any": {"sens>=0.9": 0.4, "youden": 0.5}, "epidural": {"youden": 0.15}}
    table = external_table(studies, labels=("any", "epidural"), thresholds=thresholds, n_boot=100, seed=0)
    json.dumps(table, allow_nan=False)  # plain values only, None for undefined

    any_ = table["labels"]["any"]
    assert any_["n"] == 120 and any_["n_pos"] == int(studies["true_any"].sum())
    assert any_["auc"] == pytest.approx(roc_auc_score(studies["true_any"], studies["prob_any"]))
    assert any_["auc_low"] < any_["auc"] < any_["auc_high"]
    at = any_["operating_points"]["sens>=0.9"]
    called = studies["prob_any"] >= 0.4
    assert at["tp"] == int((called & (studies["true_any"] == 1)).sum())
    assert at["sens_low"] <= at["sensitivity"] <= at["sens_high"]
    assert set(any_["readers"]) == {"R1", "R2", "R3"}
    assert any_["fleiss_kappa"] is not None and any_["kappa_n"] == 120

    epi = table["labels"]["epidural"]
    assert (epi["auc"], epi["auc_low"], epi["auc_high"]) == (None, None, None)
    assert epi["n_pos"] == 0 and epi["prevalence"] == 0.0
    youden = epi["operating_points"]["youden"]
    assert youden["sensitivity"] is None and youden["sens_low"] is None
    assert youden["specificity"] is not None
    assert epi["readers"] == {} and epi["fleiss_kappa"] is None


def test_external_table_requires_columns():
    with pytest.raises(ValueError, match="true_subdural"):
        external_table(_external_studies(), labels=("subdural",), thresholds={}, n_boot=0)


def test_format_external_table_rows():
    table = external_table(
        _external_studies(),
        labels=("epidural", "any"),
        thresholds={"any": {"sens>=0.9": 0.4}, "epidural": {"sens>=0.9": 0.1}},
        n_boot=50,
    )
    text = format_external_table(table)
    for expected in ("Finding", "AUC (95% CI)", "sens>=0.9", "Sensitivity (95% CI)", "Specificity (95% CI)"):
        assert expected in text
    lines = text.splitlines()
    rows = [line.split()[0] for line in lines[2:4]]
    assert rows == ["ICH", "EDH"]  # Lancet order: ICH (any) first
    assert "ICH (any)" in lines[2] and "/120" in lines[2]
    readers = lines[lines.index("") + 3 :]  # after the blank line, the readers' title and header
    assert [line.split()[0] for line in readers] == ["ICH", "R2", "R3"]
    assert "R1" in readers[0] and "(n=120)" in readers[0]
    assert "Fleiss' kappa" in text
