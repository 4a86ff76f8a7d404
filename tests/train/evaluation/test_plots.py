"""ichtrain.evaluation.plots: PNGs are written, readable, sensibly sized, and no figure is left open."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import random_scores
from matplotlib._pylab_helpers import Gcf

from ichprep.reading.labels import LABELS
from ichtrain.evaluation.metrics import compute_metrics
from ichtrain.evaluation.plots import plot_calibration, plot_compare, plot_loss_curves, plot_roc_curves, plot_study


def _read_png(path):
    assert path.is_file()
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    height, width = image.shape[:2]
    assert 400 <= width <= 2000
    assert 300 <= height <= 2000
    # not a blank canvas: a plot has plenty of non-white pixels
    assert (image < 200).any(axis=2).mean() > 0.01
    return image


def _history(epochs):
    return [
        {"epoch": e, "train_loss": 0.3 / e + 0.05, "val_loss": 0.25 / e + 0.08, "val_weighted_log_loss": 0.2 / e + 0.07}
        for e in range(1, epochs + 1)
    ]


def _case(n=500, seed=0):
    return random_scores(n, seed, rate=0.1, signal=0.5, noise=0.6)


def test_loss_curves(tmp_path):
    out = plot_loss_curves(_history(8), tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    _read_png(out)


def test_loss_curves_one_epoch(tmp_path):
    _read_png(plot_loss_curves(_history(1), tmp_path / "loss1.png"))


def test_loss_curves_tolerate_missing_values(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.4}, {"epoch": 2, "train_loss": 0.3, "val_loss": None}]
    _read_png(plot_loss_curves(history, tmp_path / "train_only.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_loss_curves([], tmp_path / "none.png")


def test_roc_curves(tmp_path):
    y, p = _case()
    out = plot_roc_curves(y, p, LABELS, tmp_path / "roc.png")
    assert out == tmp_path / "roc.png"
    _read_png(out)


def test_roc_curves_skip_single_label_class(tmp_path):
    y, p = _case()
    y[:, 0] = 0  # no epidural positives
    y[:10, 1] = np.nan  # missing labels are dropped, not plotted
    _read_png(plot_roc_curves(y, p, LABELS, tmp_path / "roc_skip.png"))
    _read_png(plot_roc_curves(y[:, 5], p[:, 5], ("any",), tmp_path / "roc_any.png"))


def test_calibration_plot(tmp_path):
    y, p = _case()
    out = plot_calibration(y, p, LABELS, tmp_path / "plots" / "calibration.png")
    assert out == tmp_path / "plots" / "calibration.png"
    six = _read_png(out)
    _read_png(plot_calibration(y[:, 5], p[:, 5], ("any",), tmp_path / "calibration_any.png"))
    # Skipped classes (no positives, no labels) take no panel: two rows of three become one.
    y[:, 0] = 0
    y[:, 1] = np.nan
    y[:, 2] = 0
    four = _read_png(plot_calibration(y, p, LABELS, tmp_path / "calibration_skip.png"))
    assert four.shape[0] < 0.8 * six.shape[0]


def test_calibration_plot_without_positives_and_bad_input(tmp_path):
    out = plot_calibration(np.zeros((20, 2)), np.full((20, 2), 0.1), ("epidural", "any"), tmp_path / "none.png")
    assert out.stat().st_size > 0
    assert cv2.imread(str(out)) is not None
    with pytest.raises(ValueError, match="columns"):
        plot_calibration(np.zeros((20, 2)), np.zeros((20, 2)), LABELS, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="sigmoid"):
        plot_calibration(np.zeros((20, 1)), np.full((20, 1), 2.0), ("any",), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_no_pyplot_figures_left_open(tmp_path):
    before = Gcf.get_num_fig_managers()
    y, p = _case()
    for i in range(5):
        plot_loss_curves(_history(3), tmp_path / f"l{i}.png")
        plot_roc_curves(y, p, LABELS, tmp_path / f"r{i}.png")
        plot_calibration(y, p, LABELS, tmp_path / f"c{i}.png")
    assert Gcf.get_num_fig_managers() == before


def _stages(y, p):
    """compute_metrics blocks of a weaker stage 1 and a sharper stage 2 on the same rows."""
    sharper = np.clip(0.5 * p + 0.45 * np.nan_to_num(y), 0, 1)
    return compute_metrics(y, p, LABELS, bootstrap=0), compute_metrics(y, sharper, LABELS, bootstrap=0)


def test_compare_plot(tmp_path):
    y, p = _case()
    stage1, stage2 = _stages(y, p)
    out = plot_compare(stage1, stage2, LABELS, tmp_path / "plots" / "compare.png")
    assert out == tmp_path / "plots" / "compare.png"
    _read_png(out)
    y[:, 0] = 0  # epidural AUC undefined (None) in both blocks: no bar, no error
    stage1, stage2 = _stages(y, p)
    assert stage1["per_class"]["epidural"]["roc_auc"] is None
    _read_png(plot_compare(stage1, stage2, LABELS, tmp_path / "compare_none.png"))
    one = [compute_metrics(y[:, 5], q[:, 5], ("any",), bootstrap=0) for q in (p, np.clip(p + 0.1 * y, 0, 1))]
    _read_png(plot_compare(*one, ("any",), tmp_path / "compare_any.png"))


def _study(t=34, seed=2):
    rng = np.random.default_rng(seed)
    truth = np.zeros((t, 6))
    truth[8:17, 1] = truth[20:24, 4] = 1
    truth[:, 5] = truth[:, :5].max(axis=1)
    truth[:3] = np.nan  # unlabelled slices
    stage1 = np.clip(0.6 * np.nan_to_num(truth) + 0.4 * rng.random(truth.shape), 0, 1)
    stage2 = np.clip(0.85 * np.nan_to_num(truth) + 0.1 * rng.random(truth.shape), 0, 1)
    return stage1, stage2, truth


def test_study_plot(tmp_path):
    stage1, stage2, truth = _study()
    out = plot_study(stage1, stage2, truth, LABELS, "study ID_0001 (34 slices)", tmp_path / "plots" / "study.png")
    assert out == tmp_path / "plots" / "study.png"
    _read_png(out)
    _read_png(plot_study(stage1[:, 5], stage2[:, 5], truth[:, 5], ("any",), "any only", tmp_path / "study_any.png"))
    with pytest.raises(ValueError, match=r"must all be \(T, 6\)"):
        plot_study(stage1[:-1], stage2, truth, LABELS, "bad", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_stage_plots_leave_no_figure_open(tmp_path):
    before = Gcf.get_num_fig_managers()
    y, p = _case()
    stage1, stage2 = _stages(y, p)
    for i in range(2):
        plot_compare(stage1, stage2, LABELS, tmp_path / f"s{i}.png")
        plot_study(*_study(), LABELS, "study", tmp_path / f"t{i}.png")
    assert Gcf.get_num_fig_managers() == before
