"""ichtrain.evaluation.recalibrate: Platt scaling of logits, its guards, the cross-fit that keeps validation honest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ichtrain.engine import sigmoid
from ichtrain.evaluation.recalibrate import MIN_CLASS, Platt, cross_fit, cross_fit_parts, fit_platt


def log_loss(y, logits) -> float:
    p = np.clip(sigmoid(logits).astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def overconfident(n: int, seed: int, *, slope: float = 0.4, intercept: float = -1.5):
    """Logits z whose labels follow sigmoid(slope * z + intercept): a network too sure of itself (slope < 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.0, 4.0, n)
    y = (rng.random(n) < sigmoid(slope * z + intercept)).astype(np.float64)
    return z[:, None].astype(np.float32), y[:, None]


def test_fit_recovers_the_map_that_made_the_labels():
    z, y = overconfident(40_000, seed=0)
    platt = fit_platt(z, y)
    assert platt.slope[0] == pytest.approx(0.4, abs=0.03)
    assert platt.intercept[0] == pytest.approx(-1.5, abs=0.08)


def test_on_new_data_it_lowers_the_log_loss_and_brings_the_mean_to_the_prevalence():
    z_fit, y_fit = overconfident(20_000, seed=1)
    z_new, y_new = overconfident(20_000, seed=2)
    platt = fit_platt(z_fit, y_fit)
    before, after = sigmoid(z_new).mean(), sigmoid(platt(z_new)).mean()
    assert abs(before / y_new.mean() - 1) > 0.3  # the network's own mean is far off
    assert abs(after / y_new.mean() - 1) < 0.1
    assert log_loss(y_new, platt(z_new)) < 0.85 * log_loss(y_new, z_new)
    assert roc_auc_score(y_new[:, 0], platt(z_new)[:, 0]) == pytest.approx(roc_auc_score(y_new[:, 0], z_new[:, 0]))


def test_labels_with_too_few_of_a_class_or_no_labels_stay_as_trained():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 3)).astype(np.float32)
    y = np.zeros((500, 3))
    y[: MIN_CLASS - 1, 0] = 1  # too few positives
    y[:, 1] = rng.random(500) < 0.3
    y[:, 2] = np.nan  # unlabelled
    y[:250, 1] = np.nan  # half unlabelled: fitted on the other half
    platt = fit_platt(z, y)
    assert (platt.slope[[0, 2]].tolist(), platt.intercept[[0, 2]].tolist()) == ([1, 1], [0, 0])
    assert platt.slope[1] < 0.5  # labels independent of z: the slope shrinks toward 0
    np.testing.assert_array_equal(Platt.identity(3)(z), z)


def test_checkpoints_without_a_map_are_read_as_the_identity():
    assert Platt.from_dict(None, 2).slope.tolist() == [1.0, 1.0]
    stored = Platt(slope=np.array([0.5]), intercept=np.array([-1.0])).to_dict()
    assert stored["method"] == "platt"
    assert Platt.from_dict(stored, 1)(np.array([[2.0]]))[0, 0] == pytest.approx(0.0)


def test_cross_fit_scores_each_part_with_the_map_of_the_others():
    z, y = overconfident(2_000, seed=4)
    parts = np.arange(2_000) % 2
    out = cross_fit(z, y, parts)
    for part in (0, 1):
        mine = parts == part
        np.testing.assert_allclose(out[mine], fit_platt(z[~mine], y[~mine])(z[mine]), rtol=1e-6)
    np.testing.assert_array_equal(cross_fit(z, y, None), z)


def test_cross_fit_parts_keep_patients_whole_and_need_two():
    slices = pd.DataFrame(
        {
            "study_uid": [f"s{i // 5}" for i in range(40)],
            "patient_id": [f"p{i // 10}" for i in range(40)],
            "any": [float(i % 10 < 3) for i in range(40)],
        }
    )
    parts = cross_fit_parts(slices, np.arange(40), seed=0, by="patient")
    assert set(parts) == {0, 1}
    assert all(len(set(parts[slices["patient_id"] == p])) == 1 for p in slices["patient_id"].unique())
    assert cross_fit_parts(slices, np.arange(10), seed=0, by="patient") is None  # one patient
    assert set(cross_fit_parts(slices, np.arange(10), seed=0, by="study")) == {0, 1}
    assert set(cross_fit_parts(slices, np.arange(40), seed=0, by="slice")) == {0, 1}  # leaky split: by patient
