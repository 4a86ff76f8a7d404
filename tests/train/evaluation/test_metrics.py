"""ichtrain.evaluation.metrics: the RSNA weighted log loss by hand, and the sklearn-backed summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import random_scores

from ichprep.reading.labels import LABELS, SUBTYPES
from ichtrain.evaluation.metrics import (
    EPS,
    calibration,
    compute_metrics,
    format_metrics,
    per_class_log_loss,
    reference_table,
    weighted_log_loss,
    youden_threshold,
    youden_thresholds,
)


def _random_case(n=400, seed=0):
    return random_scores(n, seed, rate=0.15, signal=0.6, noise=0.5)


# --------------------------------------------------------------------------- weighted log loss


def test_weighted_log_loss_matches_hand_computation():
    # Columns: epidural, intraparenchymal, intraventricular, subarachnoid, subdural, any (weight 2).
    y = np.array([[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=float)
    p = np.array([[0.1, 0.2, 0.1, 0.8, 0.1, 0.9], [0.5, 0.0, 0.0, 0.0, 0.0, 0.2]])
    # Image A: every label is "right with prob 0.9" or "right with prob 0.8":
    #   epidural, intraventricular, subdural: -ln 0.9 each            (3 x weight 1)
    #   intraparenchymal, subarachnoid:       -ln 0.8 each            (2 x weight 1)
    #   any (true, p 0.9):                    -ln 0.9                 (weight 2)
    #   loss_A = -(5 ln 0.9 + 2 ln 0.8) / 7 = (0.52680 + 0.44629) / 7 = 0.13901
    loss_a = -(5 * math.log(0.9) + 2 * math.log(0.8)) / 7
    # Image B (all negative):
    #   epidural p 0.5:                       -ln 0.5 = 0.69315
    #   four subtypes at p 0 -> clipped to 1e-7: -ln(1 - 1e-7) ~ 1e-7 each
    #   any p 0.2, weight 2:                  -2 ln 0.8 = 0.44629
    #   loss_B = (0.69315 + 4e-7 + 0.44629) / 7 = 0.16278
    loss_b = -(math.log(0.5) + 4 * math.log(1 - 1e-7) + 2 * math.log(0.8)) / 7
    expected = (loss_a + loss_b) / 2  # = 0.15089
    assert expected == pytest.approx(0.150895, abs=1e-6)
    assert weighted_log_loss(y, p, LABELS) == pytest.approx(expected, rel=1e-12)


def test_any_counts_twice():
    y = np.zeros((1, 6))
    p = np.array([[0, 0, 0, 0, 0, 0.5]])
    # only the any term is non-zero: 2 * ln 2 / (5 + 2)
    assert weighted_log_loss(y, p, LABELS) == pytest.approx(2 * math.log(2) / 7, rel=1e-6)
    # without "any" all weights are 1
    assert weighted_log_loss(np.zeros((1, 2)), np.array([[0.5, 0]]), SUBTYPES[:2]) == pytest.approx(
        math.log(2) / 2, rel=1e-6
    )


def test_probabilities_are_clipped():
    # A confident wrong answer costs -ln(1e-7) = 16.118, not infinity.
    loss = weighted_log_loss(np.array([[1.0]]), np.array([[0.0]]), ("any",))
    assert loss == pytest.approx(-math.log(EPS), rel=1e-9)
    # float32 input must not defeat the clip (1 - 1e-7 rounds to 1 in float32)
    loss32 = weighted_log_loss(np.array([[0.0]], dtype=np.float32), np.array([[1.0]], dtype=np.float32), ("any",))
    assert math.isfinite(loss32)
    assert loss32 == pytest.approx(-math.log(EPS), rel=1e-6)


def test_missing_labels_drop_out_of_the_image_weights():
    y = np.array([[np.nan, 1.0]])
    p = np.array([[0.01, 0.5]])
    # only "any" is labelled: 2 ln 2 / 2
    assert weighted_log_loss(y, p, ("epidural", "any")) == pytest.approx(math.log(2), rel=1e-9)


def test_per_class_log_loss():
    y = np.array([[1, 0], [0, 0]], dtype=float)
    p = np.array([[0.5, 0.2], [0.5, 0.2]])
    out = per_class_log_loss(y, p, ("subdural", "any"))
    assert out["subdural"] == pytest.approx(math.log(2))
    assert out["any"] == pytest.approx(-math.log(0.8))


# --------------------------------------------------------------------------- compute_metrics


def test_perfect_predictions():
    y, _ = _random_case()
    m = compute_metrics(y, y.copy(), LABELS)
    assert m["weighted_log_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["mean_auc"] == 1.0
    for name in LABELS:
        c = m["per_class"][name]
        assert c["roc_auc"] == 1.0
        assert c["average_precision"] == 1.0
        assert c["at_youden"]["sensitivity"] == 1.0
        assert c["at_youden"]["specificity"] == 1.0
        assert c["at_0.5"]["f1"] == 1.0
        assert c["at_0.5"]["accuracy"] == 1.0


def test_constant_predictions_have_auc_one_half():
    y, _ = _random_case()
    m = compute_metrics(y, np.full(y.shape, 0.3), LABELS)
    assert all(m["per_class"][n]["roc_auc"] == 0.5 for n in LABELS)
    assert m["mean_auc"] == 0.5
    # at 0.5 nothing is called positive: sensitivity 0, precision undefined -> None
    at = m["per_class"]["any"]["at_0.5"]
    assert at["sensitivity"] == 0.0
    assert at["specificity"] == 1.0
    assert at["precision"] is None


def test_single_label_class_gets_none_not_an_error():
    y, p = _random_case()
    y[:, 0] = 0  # no epidural in this split
    m = compute_metrics(y, p, LABELS)
    epi = m["per_class"]["epidural"]
    assert epi["roc_auc"] is None
    assert epi["average_precision"] is None
    assert epi["youden_threshold"] is None
    assert epi["n_pos"] == 0
    assert epi["prevalence"] == 0.0
    assert epi["at_youden"]["source"] == "default"
    assert epi["at_youden"]["sensitivity"] is None
    # the mean is over classes where AUC exists
    others = [m["per_class"][n]["roc_auc"] for n in LABELS[1:]]
    assert m["mean_auc"] == pytest.approx(np.mean(others))


def test_youden_threshold_hand_example():
    y = np.array([0, 0, 0, 0, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9])
    # threshold (score >= t positive):  TPR   FPR   J
    #   0.9                             1/3   0     0.333
    #   0.7                             2/3   0     0.667
    #   0.6                             2/3   1/4   0.417
    #   0.5                             1     1/4   0.750  <- max
    #   0.3                             1     1/2   0.500
    assert youden_threshold(y, p) == 0.5
    m = compute_metrics(y, p, ("any",))
    at = m["per_class"]["any"]["at_youden"]
    assert at["threshold"] == 0.5
    assert at["source"] == "youden"
    assert at["sensitivity"] == 1.0
    assert at["specificity"] == 0.75
    assert at["precision"] == 0.75
    assert at["accuracy"] == pytest.approx(6 / 7)
    assert at["f1"] == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert youden_thresholds(m) == {"any": 0.5}


def test_given_thresholds_are_used():
    y = np.array([0, 0, 0, 0, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9])
    m = compute_metrics(y, p, ("any",), thresholds={"any": 0.8})
    at = m["per_class"]["any"]["at_youden"]
    assert at["threshold"] == 0.8
    assert at["source"] == "given"
    assert at["sensitivity"] == pytest.approx(1 / 3)
    assert at["specificity"] == 1.0
    assert m["per_class"]["any"]["youden_threshold"] == 0.5  # still reported for these data
    assert youden_thresholds(m) == {"any": 0.8}


def test_validation_thresholds_carry_to_another_set():
    yv, pv = _random_case(seed=1)
    yt, pt = _random_case(seed=2)
    val = compute_metrics(yv, pv, LABELS)
    test = compute_metrics(yt, pt, LABELS, thresholds=youden_thresholds(val))
    for name in LABELS:
        assert test["per_class"][name]["at_youden"]["threshold"] == val["per_class"][name]["youden_threshold"]


def test_study_level_auc_uses_max_per_study():
    study = ["A", "A", "B", "B", "C", "C"]
    y = np.array([0, 1, 0, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.6, 0.7, 0.1, 0.95, 0.0])
    # slice level: the positive (0.6) beats 2 of 5 negatives (0.1, 0.0)    -> AUC 0.4
    # study max:   A (pos) 0.9 vs B 0.7 (win), C 0.95 (loss)                -> AUC 0.5
    # study mean:  A 0.75 vs B 0.4, C 0.475 (both wins)                     -> would be 1.0
    m = compute_metrics(y, p, ("any",), study_ids=study)
    assert m["per_class"]["any"]["roc_auc"] == pytest.approx(0.4)
    assert m["study_any_auc"] == pytest.approx(0.5)
    assert m["n_studies"] == 3
    assert m["study_any_prevalence"] == pytest.approx(1 / 3)


def test_study_auc_only_with_any_and_ids():
    y, p = _random_case()
    assert compute_metrics(y, p, LABELS)["study_any_auc"] is None
    sub = compute_metrics(y[:, :5], p[:, :5], SUBTYPES, study_ids=np.arange(len(y)) // 10)
    assert sub["study_any_auc"] is None
    assert sub["n_studies"] is None
    with pytest.raises(ValueError, match="study_ids"):
        compute_metrics(y, p, LABELS, study_ids=[1, 2])


def test_nan_truth_is_dropped_per_class():
    y, p = _random_case(n=200)
    y_nan = y.copy()
    y_nan[:50, 1] = np.nan
    m = compute_metrics(y_nan, p, LABELS)
    ref = compute_metrics(y[50:, 1], p[50:, 1], ("intraparenchymal",))
    assert m["per_class"]["intraparenchymal"]["n"] == 150
    assert m["per_class"]["intraparenchymal"]["roc_auc"] == ref["per_class"]["intraparenchymal"]["roc_auc"]
    assert m["per_class"]["any"]["n"] == 200


def test_accepts_pandas_nullable_labels():
    y, p = _random_case(n=60)
    frame = pd.DataFrame(y, columns=list(LABELS)).astype("Int8")
    frame.iloc[0, 0] = pd.NA
    m = compute_metrics(frame, p, LABELS)
    assert m["per_class"]["epidural"]["n"] == 59


def test_output_is_json_serialisable():
    y, p = _random_case()
    y[:, 0] = 0
    m = compute_metrics(y, p, LABELS, study_ids=np.arange(len(y)) // 8, thresholds={"any": 0.4})
    text = json.dumps(m, allow_nan=False)  # no NaN, no numpy scalars
    assert json.loads(text)["per_class"]["epidural"]["roc_auc"] is None


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="columns"):
        compute_metrics(np.zeros((3, 2)), np.zeros((3, 2)), LABELS)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.zeros((3, 1)), np.full((3, 1), np.nan), ("any",))
    with pytest.raises(ValueError, match="0, 1"):
        compute_metrics(np.full((3, 1), 2.0), np.zeros((3, 1)), ("any",))
    with pytest.raises(ValueError, match="sigmoid"):
        compute_metrics(np.zeros((3, 1)), np.full((3, 1), 3.0), ("any",))


# --------------------------------------------------------------------------- calibration


def test_calibration_by_hand():
    # Ten distinct probabilities: the decile bins hold one row each, so ECE = mean |p - y|.
    p = np.arange(10) / 10 + 0.05
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1], dtype=float)
    # |p - y|: .05 .15 .25 .35 .55 | .55 .35 .25 .15 .05  -> sum 2.7
    calib = calibration(y, p)
    assert calib.ece == pytest.approx(0.27)
    assert calib.mean_prob == pytest.approx(0.5)
    assert [b["n"] for b in calib.reliability] == [1] * 10
    assert calib.reliability[4] == {"mean_prob": pytest.approx(0.45), "observed": 1.0, "n": 1}


def test_calibration_ties_share_a_bin():
    # One tied probability: a single bin, and it is exactly calibrated (3 of 10 positive at p 0.3).
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    calib = calibration(y, np.full(10, 0.3))
    assert calib.reliability == [{"mean_prob": pytest.approx(0.3), "observed": pytest.approx(0.3), "n": 10}]
    assert calib.ece == pytest.approx(0.0)
    assert calibration(np.zeros(0), np.zeros(0)) == (None, None, None)


def test_compute_metrics_reports_calibration():
    y, p = _random_case()
    y[:, 1] = np.nan  # a class without labelled rows
    m = compute_metrics(y, p, LABELS, bootstrap=0)
    for name in ("epidural", "any"):
        c = m["per_class"][name]
        assert c["mean_prob"] == pytest.approx(p[:, LABELS.index(name)].mean())
        assert 1 <= len(c["reliability"]) <= 10
        assert sum(b["n"] for b in c["reliability"]) == len(y)
        assert c["ece"] == pytest.approx(calibration(y[:, LABELS.index(name)], p[:, LABELS.index(name)]).ece)
    empty = m["per_class"]["intraparenchymal"]
    assert empty["mean_prob"] is None
    assert empty["ece"] is None
    assert empty["reliability"] is None
    eces = [c["ece"] for c in m["per_class"].values() if c["ece"] is not None]
    assert len(eces) == 5
    assert m["mean_ece"] == pytest.approx(np.mean(eces))
    # Calibrated scores (p = the true rate of their group) have a small ECE; doubled ones do not.
    rng = np.random.default_rng(0)
    rate = rng.choice([0.05, 0.2, 0.4], size=20_000)
    truth = (rng.random(rate.size) < rate).astype(float)
    good = compute_metrics(truth, rate, ("any",), bootstrap=0)["mean_ece"]
    bad = compute_metrics(truth, np.clip(2 * rate, 0, 1), ("any",), bootstrap=0)["mean_ece"]
    assert good < 0.02
    assert bad > 0.1


# --------------------------------------------------------------------------- bootstrap intervals


def _studies(n_studies, per_study, seed=0, signal=0.35):
    """Slices grouped into studies; a study's lesion sets most of its slices' labels (correlated slices)."""
    rng = np.random.default_rng(seed)
    study = np.repeat(np.arange(n_studies), per_study)
    lesion = rng.random((n_studies, 5)) < 0.3
    sub = (lesion[study] & (rng.random((study.size, 5)) < 0.6)).astype(float)
    y = np.c_[sub, sub.max(axis=1)]
    return y, np.clip(signal * y + (1 - signal) * rng.random(y.shape), 0, 1), study


def _width(interval):
    return interval[1] - interval[0]


def test_intervals_contain_the_point_estimate():
    y, p, study = _studies(60, 10)
    m = compute_metrics(y, p, LABELS, study_ids=study)
    assert m["bootstrap"] == {"replicates": 200, "unit": "study", "units": 60, "seed": 0, "level": 0.95}
    for key in ("weighted_log_loss", "mean_auc", "mean_ece", "study_any_auc"):
        lo, hi = m["ci95"][key]
        assert lo < m[key] < hi, key
    for name in LABELS:
        c = m["per_class"][name]
        for key in ("roc_auc", "average_precision", "log_loss", "mean_prob"):
            lo, hi = c["ci95"][key]
            assert lo < c[key] < hi, (name, key)
        for key in ("sensitivity", "specificity"):
            lo, hi = c["ci95"][key]
            assert lo <= c["at_youden"][key] <= hi, (name, key)


def test_one_study_gives_the_point_estimate_in_every_replicate():
    # A single unit is drawn once per replicate: every weighted formula must reproduce the point value.
    y, p = random_scores(300, 0, rate=0.1, signal=0.3, noise=0.7)
    m = compute_metrics(y, p, LABELS, study_ids=np.zeros(len(y)), thresholds={"any": 0.45}, bootstrap=5)
    for key in ("weighted_log_loss", "mean_auc", "mean_ece"):
        assert m["ci95"][key] == pytest.approx([m[key], m[key]], rel=1e-9), key
    assert m["ci95"]["study_any_auc"] is None  # one study: no study-level AUC
    for name in LABELS:
        c = m["per_class"][name]
        point = {
            **{k: c[k] for k in ("roc_auc", "average_precision", "log_loss", "mean_prob", "ece")},
            "sensitivity": c["at_youden"]["sensitivity"],
            "specificity": c["at_youden"]["specificity"],
        }
        for key, value in point.items():
            assert c["ci95"][key] == pytest.approx([value, value], rel=1e-9), (name, key)


def test_intervals_narrow_with_more_data():
    y, p, study = _studies(50, 8, signal=0.1)
    small = compute_metrics(y, p, LABELS, study_ids=study)
    y, p, study = _studies(800, 8, seed=1, signal=0.1)  # 16x the studies
    large = compute_metrics(y, p, LABELS, study_ids=study)
    for key in ("weighted_log_loss", "mean_auc", "study_any_auc"):
        assert _width(large["ci95"][key]) < 0.5 * _width(small["ci95"][key]), key
    assert _width(large["per_class"]["any"]["ci95"]["roc_auc"]) < 0.5 * _width(
        small["per_class"]["any"]["ci95"]["roc_auc"]
    )


def test_same_seed_same_intervals():
    y, p, study = _studies(40, 6)
    a = compute_metrics(y, p, LABELS, study_ids=study, seed=7)
    b = compute_metrics(y, p, LABELS, study_ids=study, seed=7)
    c = compute_metrics(y, p, LABELS, study_ids=study, seed=8)
    assert a["ci95"] == b["ci95"]
    assert a["per_class"] == b["per_class"]
    assert a["ci95"] != c["ci95"]
    assert c["bootstrap"]["seed"] == 8


def test_study_resampling_is_wider_than_slice_resampling_for_correlated_slices():
    # Each study's slice copied 20 times: 20 slices carry one study's worth of evidence.
    y, p = random_scores(150, 0, rate=0.2, signal=0.3, noise=0.7)
    study = np.repeat(np.arange(150), 20)
    y, p = y[study], p[study]
    by_study = compute_metrics(y, p, LABELS, study_ids=study)
    by_slice = compute_metrics(y, p, LABELS)
    assert by_study["bootstrap"]["unit"] == "study"
    assert by_study["bootstrap"]["units"] == 150
    assert by_slice["bootstrap"]["unit"] == "slice"
    assert by_slice["bootstrap"]["units"] == 3000
    for key in ("weighted_log_loss", "mean_auc"):
        assert _width(by_study["ci95"][key]) > 2.5 * _width(by_slice["ci95"][key]), key


def test_interval_is_none_when_the_metric_is_often_undefined():
    # Epidural positives in one study of 30: a replicate misses it about 1/e of the time.
    y, p, study = _studies(30, 10)
    y[:, 0] = 0
    y[:3, 0] = 1
    m = compute_metrics(y, p, LABELS, study_ids=study)
    epi = m["per_class"]["epidural"]
    assert epi["roc_auc"] is not None
    assert epi["ci95"]["roc_auc"] is None
    assert epi["ci95"]["sensitivity"] is None
    assert epi["ci95"]["log_loss"] is not None
    assert epi["ci95"]["specificity"] is not None


def test_bootstrap_off_and_bad_arguments():
    y, p, study = _studies(20, 5)
    m = compute_metrics(y, p, LABELS, study_ids=study, bootstrap=0)
    assert m["ci95"] is None
    assert m["bootstrap"] is None
    assert all(c["ci95"] is None for c in m["per_class"].values())
    assert "CI" not in format_metrics(m)
    with pytest.raises(ValueError, match="seed"):
        compute_metrics(y, p, LABELS, seed=None)
    with pytest.raises(ValueError, match="missing"):
        compute_metrics(y, p, LABELS, study_ids=np.where(study == 0, np.nan, study))


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bootstrap_must_be_a_count_of_replicates(bad):
    y, p, _ = _studies(20, 5)
    with pytest.raises(ValueError, match="bootstrap"):
        compute_metrics(y, p, LABELS, bootstrap=bad)


def test_format_metrics_prints_intervals_and_calibration():
    y, p, study = _studies(40, 6)
    m = compute_metrics(y, p, LABELS, study_ids=study)
    lines = format_metrics(m).splitlines()
    assert lines[0].split()[-3:] == ["p", "ECE", "n_pos"]
    assert "mean p" in lines[0]
    lo, hi = m["per_class"]["any"]["ci95"]["roc_auc"]
    any_row = next(line for line in lines if line.startswith("any"))
    assert f"{m['per_class']['any']['roc_auc']:.3f} [{lo:.2f}-{hi:.2f}]" in any_row
    assert f"{m['per_class']['any']['ece']:.3f}" in any_row
    lo, hi = m["ci95"]["weighted_log_loss"]
    wll = next(line for line in lines if line.startswith("weighted log loss"))
    assert wll.startswith(
        f"weighted log loss: {m['weighted_log_loss']:.5f} (95% CI {lo:.3f}-{hi:.3f}, 200 study resamples)"
    )
    assert any(line.startswith("mean AUC:") and "(95% CI" in line for line in lines)
    assert any(line.startswith("study any AUC:") and "(95% CI" in line for line in lines)
    assert any(line.startswith("mean ECE:") for line in lines)


# --------------------------------------------------------------------------- reports


def test_reference_table_binary():
    y = np.array([0, 0, 1, 1, 1], dtype=float)
    p = np.array([0.2, 0.6, 0.7, 0.4, 0.9])
    # at 0.5: TP 2 (0.7, 0.9), FN 1 (0.4), FP 1 (0.6), TN 1
    table = reference_table(compute_metrics(y, p, ("any",)))
    assert set(table) == {"accuracy", "recall", "f1", "roc_auc"}
    assert table["accuracy"] == pytest.approx(3 / 5)
    assert table["recall"] == pytest.approx(2 / 3)
    assert table["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert table["roc_auc"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="any"):
        reference_table(compute_metrics(np.c_[y, y], np.c_[p, p], SUBTYPES[:2]))


def test_format_metrics_is_a_readable_table():
    y, p = _random_case()
    y[:, 0] = 0
    m = compute_metrics(y, p, LABELS, study_ids=np.arange(len(y)) // 8)
    text = format_metrics(m)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["class", "AUC", "AP"]
    for name in LABELS:
        assert any(line.startswith(name) for line in lines)
    assert "weighted log loss" in text
    assert "mean AUC" in text
    assert "study any AUC" in text
    assert f"{m['weighted_log_loss']:.5f}" in text
    epi = next(line for line in lines if line.startswith("epidural"))
    assert epi.split()[1] == "-"  # undefined AUC shown as a dash


def test_weighted_log_loss_equals_kaggle_row_weighted_log_loss():
    # Kaggle scores the long CSV (six rows per image) with sample weights 2 for
    # "any", 1 otherwise; with every label present that is the same number.
    from sklearn.metrics import log_loss

    y, p = _random_case(n=300, seed=3)
    p = np.clip(p, 0.01, 0.99)
    w = np.tile([1, 1, 1, 1, 1, 2], (len(y), 1))
    kaggle = log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel(), labels=[0, 1])
    assert weighted_log_loss(y, p, LABELS) == pytest.approx(kaggle, rel=1e-9)
