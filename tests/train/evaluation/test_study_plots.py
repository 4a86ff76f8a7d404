"""ichtrain.evaluation.studyplots: study-level ROC with bootstrap band, worst studies, and their PNGs."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib._pylab_helpers import Gcf
from sklearn.metrics import roc_auc_score, roc_curve

from ichtrain.evaluation.studyplots import (
    plot_study_roc,
    plot_worst_studies,
    roc_band,
    study_roc_figure,
    worst_studies,
    worst_studies_figure,
)

# The six labels in the order of the figure; epidural is made single-class below.
LABELS = ("any", "intraparenchymal", "intraventricular", "subdural", "epidural", "subarachnoid")
SUBTYPES = LABELS[1:]


def _uid(i: int) -> str:
    return f"1.2.840.113619.2.55.3.{1000 + i}"


def _tables(n_studies=60, n_slices=20, seed=0, slice_truth=True):
    """(studies, slices): scores track truth, epidural has no positives, a few studies lack ``intraventricular``."""
    rng = np.random.default_rng(seed)
    any_ = rng.random(n_studies) < 0.4
    sub = {name: any_ & (rng.random(n_studies) < 0.5) for name in SUBTYPES}
    sub["epidural"][:] = False
    sub["intraparenchymal"] |= any_ & ~np.any([sub[s] for s in SUBTYPES], axis=0)  # any = max of subtypes
    truth = {"any": any_, **sub}
    rows, study_rows = [], []
    for i in range(n_studies):
        first = rng.integers(2, n_slices - 8)
        run = np.zeros(n_slices, bool)
        run[first : first + rng.integers(2, 7)] = True
        z = 5.0 * np.arange(n_slices) + rng.normal(0, 0.1)  # mm, ascending; rows shuffled below
        probs = {}
        for name in LABELS:
            pos = truth[name][i]
            base = rng.beta(1.5, 6, n_slices)
            probs[name] = np.clip(base + (0.05 + 0.5 * rng.random()) * (run & pos), 0, 1)
        for j in rng.permutation(n_slices):
            row = {"study_uid": _uid(i), "z": z[j], "slot": i * n_slices + j}
            for name in LABELS:
                row[f"prob_{name}"] = probs[name][j]
                row[f"true_{name}"] = float(truth[name][i] and run[j]) if slice_truth else np.nan
            rows.append(row)
        study = {"study_uid": _uid(i)}
        for name in LABELS:
            study[f"true_{name}"] = int(truth[name][i])
            study[f"prob_{name}"] = float(probs[name].max())
        study_rows.append(study)
    studies = pd.DataFrame(study_rows)
    for name in LABELS:
        studies[f"true_{name}"] = studies[f"true_{name}"].astype("Int8")
    studies.loc[:4, "true_intraventricular"] = pd.NA
    return studies, pd.DataFrame(rows)


POINTS = {
    name: {
        "youden": {"sensitivity": 0.85, "specificity": 0.8, "threshold": 0.31},
        "high sensitivity": {"sensitivity": 0.95, "specificity": 0.6, "threshold": 0.18},
    }
    for name in LABELS
}
READERS = {
    name: {f"R{r}": {"sensitivity": 0.8 + 0.05 * r, "specificity": 0.97 - 0.02 * r} for r in (1, 2, 3)}
    for name in LABELS
    if name != "epidural"
}


def _read_png(path, fig_size_px):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    height, width = image.shape[:2]
    assert abs(width - fig_size_px[0]) <= 1 and abs(height - fig_size_px[1]) <= 1
    assert (image < 200).any(axis=2).mean() > 0.02  # not a blank canvas
    return image


def _size_px(fig):
    return tuple(fig.get_size_inches() * fig.dpi)


def _texts(ax):
    return [t.get_text() for t in ax.texts]


# --------------------------------------------------------------------------- worst_studies


def test_worst_studies_picks_lowest_positives_and_highest_negatives():
    studies = pd.DataFrame(
        {
            "study_uid": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
            "true_any": pd.array([1, 1, 1, 1, 0, 0, 0, 0, pd.NA, 1], dtype="Int8"),
            "prob_any": [0.9, 0.2, 0.05, 0.2, 0.1, 0.8, 0.95, 0.8, 0.0, np.nan],
        }
    )
    picked = worst_studies(studies, "any", 6)
    # i (no truth) and j (no score) are ignored; the tie b/d goes by uid.
    assert picked.misses == ("c", "b", "d")
    assert picked.false_alarms == ("g", "f", "h")
    assert worst_studies(studies, "any", 2) == (("c",), ("g",))
    assert worst_studies(studies.set_index("study_uid"), "any", 6) == picked  # studylevel's tables are indexed
    # n // 2 of each, even when one side has fewer.
    assert worst_studies(studies, "any", 10).misses == ("c", "b", "d", "a")


def test_worst_studies_checks_its_input():
    studies = pd.DataFrame({"study_uid": ["a", "a"], "true_any": [1, 0], "prob_any": [0.1, 0.2]})
    with pytest.raises(ValueError, match="repeated study_uid"):
        worst_studies(studies, "any", 4)
    with pytest.raises(ValueError, match="n must be"):
        worst_studies(studies.iloc[:1], "any", 1)
    with pytest.raises(ValueError, match="lacks column"):
        worst_studies(studies.iloc[:1], "subdural", 4)


# --------------------------------------------------------------------------- roc_band


def _scores(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    y[:2] = (0, 1)
    return y, rng.normal(1.2 * y, 1.0)


def test_roc_band_matches_sklearn_and_contains_the_curve():
    y, p = _scores(60, seed=1)
    band = roc_band(y, p, n_boot=400, seed=0)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(band.tpr, np.interp(band.fpr_grid, fpr, tpr), atol=1e-12)
    assert band.auc == pytest.approx(roc_auc_score(y, p))
    assert band.auc_ci[0] < band.auc < band.auc_ci[1]
    inside = (band.low <= band.tpr + 1e-12) & (band.tpr <= band.high + 1e-12)
    assert inside.mean() >= 0.9
    for curve in (band.tpr, band.low, band.high):
        assert (np.diff(curve) >= -1e-12).all()  # a TPR band never decreases with FPR
        assert curve.min() >= 0 and curve.max() <= 1
    assert band.high[-1] == band.low[-1] == 1.0
    middle = (band.fpr_grid > 0.1) & (band.fpr_grid < 0.6)
    assert (band.high - band.low)[middle].min() > 0.02  # 60 studies leave real uncertainty


def test_roc_band_is_reproducible_and_narrows_with_more_studies():
    y, p = _scores(60, seed=2)
    a, b = roc_band(y, p, 200, 7), roc_band(y, p, 200, 7)
    np.testing.assert_array_equal(a.low, b.low)
    np.testing.assert_array_equal(a.high, b.high)
    assert not np.array_equal(a.low, roc_band(y, p, 200, 8).low)
    y_big, p_big = _scores(600, seed=2)
    big = roc_band(y_big, p_big, 200, 7)
    assert np.mean(big.high - big.low) < 0.6 * np.mean(a.high - a.low)


def test_roc_band_equals_a_replicate_by_replicate_bootstrap():
    """The vectorised band against sklearn on each resampled table, drawn with the same multinomial counts."""
    y, p = _scores(40, seed=3)
    p = np.round(p, 1)  # ties between positives and negatives
    band = roc_band(y, p, n_boot=150, seed=5)
    counts = np.random.default_rng(5).multinomial(y.size, np.full(y.size, 1 / y.size), size=150)
    curves = []
    for c in counts:
        yr, pr = np.repeat(y, c), np.repeat(p, c)
        if 0 < yr.sum() < yr.size:
            fpr, tpr, _ = roc_curve(yr, pr, drop_intermediate=False)
            curves.append(np.interp(band.fpr_grid, fpr, tpr))
    low, high = np.percentile(curves, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(band.low, low, atol=1e-9)
    np.testing.assert_allclose(band.high, high, atol=1e-9)


def test_roc_band_leaves_out_replicates_without_both_classes():
    y = np.zeros(60)
    y[[3, 30]] = 1  # two positives: about one replicate in eight draws neither
    p = np.linspace(0, 1, 60)
    band = roc_band(y, p, n_boot=300, seed=0)
    assert np.isnan(band.low).all() and np.isnan(band.high).all() and band.auc_ci is None
    assert np.isfinite(band.tpr).all()
    y[[10, 50, 55]] = 1  # five positives: few replicates lack one, the band is computed from the others
    band = roc_band(y, p, n_boot=300, seed=0)
    assert np.isfinite(band.low).all() and band.auc_ci is not None


def test_roc_band_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_band(np.zeros(10), np.linspace(0, 1, 10), 50, 0)
    with pytest.raises(ValueError, match="n_boot"):
        roc_band(np.r_[0, 1], np.r_[0.2, 0.8], 0, 0)


# --------------------------------------------------------------------------- ROC figure


def test_study_roc_figure_has_one_panel_per_label_and_survives_one_class():
    studies, _ = _tables()
    fig = study_roc_figure(studies, labels=LABELS, points=POINTS, readers=READERS, n_boot=100, seed=0)
    axes = fig.axes
    assert len(axes) == 6
    rows = {round(ax.get_position().y0, 3) for ax in axes}
    cols = {round(ax.get_position().x0, 3) for ax in axes}
    assert len(rows) == 2 and len(cols) == 3
    titles = [ax.get_title() for ax in axes]
    for short, title in zip(("ICH", "IPH", "IVH", "SDH", "EDH", "SAH"), titles):
        assert title.startswith(short)
    assert "n=60" in titles[0] and "AUC" in titles[0] and "positive" in titles[0]
    assert "n=55" in titles[2]  # five studies have no intraventricular truth
    epidural = axes[4]
    assert any("one class: no ROC" in t for t in _texts(epidural))
    assert epidural.get_legend() is None and "AUC" not in titles[4]
    for ax in axes[:4] + axes[5:]:
        assert not any("no ROC" in t for t in _texts(ax))
        assert {"R1", "R2", "R3"} <= set(_texts(ax))  # readers coded by their order
        entries = [t.get_text() for t in ax.get_legend().get_texts()]
        assert entries[0].startswith("youden t=0.31: se 0.85, sp 0.80")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "youden" in legend and "high sensitivity" in legend and "readers (R1, R2, R3)" in legend


def test_study_roc_figure_grid_follows_the_label_count():
    studies, _ = _tables(n_studies=30)
    fig = study_roc_figure(studies, labels=LABELS[:4], points=None, readers=None, n_boot=50)
    assert len(fig.axes) == 4  # 2 x 3 grid, the two empty cells removed
    assert len({round(ax.get_position().y0, 3) for ax in fig.axes}) == 2
    undefined = {"any": {"R1": {"sensitivity": None, "specificity": 0.9}}}  # a rate with no denominator
    one = study_roc_figure(studies, labels=("any",), points={}, readers=undefined, n_boot=50)
    assert len(one.axes) == 1 and one.axes[0].get_legend() is None and "R1" not in _texts(one.axes[0])
    with pytest.raises(ValueError, match="lacks column"):
        study_roc_figure(studies.drop(columns="prob_any"), labels=("any",), points=None, readers=None)
    with pytest.raises(ValueError, match="not in"):
        study_roc_figure(
            studies, labels=("any",), points={"any": {"x": {"sensitivity": 1.5, "specificity": 0.5}}}, readers=None
        )


def test_plot_study_roc_writes_a_png_of_the_figure_size(tmp_path):
    studies, _ = _tables()
    size = _size_px(study_roc_figure(studies, labels=LABELS, points=POINTS, readers=READERS, n_boot=50))
    out = plot_study_roc(
        studies, labels=LABELS, points=POINTS, readers=READERS, path=tmp_path / "sub" / "roc.png", n_boot=100
    )
    assert out == tmp_path / "sub" / "roc.png"
    _read_png(out, size)
    assert 1000 <= size[0] <= 1400 and 800 <= size[1] <= 1100
    assert not Gcf.get_all_fig_managers()  # no pyplot figure left open


# --------------------------------------------------------------------------- worst studies figure


def test_worst_studies_figure_shows_the_picked_studies(tmp_path):
    studies, slices = _tables()
    picked = worst_studies(studies, "any", 6)
    assert len(picked.misses) == len(picked.false_alarms) == 3
    fig = worst_studies_figure(slices, studies, label="any", thresholds={"youden": 0.31, "rule-out": 0.18}, n=6)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 6
    titles = [ax.get_title() for ax in axes]
    for title, uid in zip(titles, picked.misses + picked.false_alarms):
        assert title.startswith("…" + uid[-12:])
    assert all("true 1" in t for t in titles[:3]) and all("true 0" in t for t in titles[3:])
    for ax, uid in zip(axes, picked.misses + picked.false_alarms):
        z = np.sort(slices.loc[slices["study_uid"] == uid, "z"].to_numpy())
        line = next(line for line in ax.get_lines() if line.get_label() == "slice probability")
        np.testing.assert_allclose(line.get_xdata(), z)  # drawn along z, sorted
        assert ax.get_xlabel() == "z"
    score_lines = [line for line in axes[0].get_lines() if line.get_label() == "study score"]
    score = studies.set_index("study_uid").loc[picked.misses[0], "prob_any"]
    assert score_lines and score_lines[0].get_ydata()[0] == pytest.approx(score)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"youden 0.31", "rule-out 0.18", "study score", "positive slice"} <= set(legend)

    size = _size_px(fig)
    out = plot_worst_studies(
        slices, studies, label="any", thresholds={"youden": 0.31}, path=tmp_path / "worst.png", n=6
    )
    _read_png(out, size)


def test_a_threshold_that_could_not_be_fixed_is_not_drawn():
    studies, slices = _tables()
    fig = worst_studies_figure(slices, studies, label="any", thresholds={"sens>=0.95": 0.4, "youden": None}, n=4)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "sens>=0.95 0.40" in legend and not any(t.startswith("youden") for t in legend)


def test_worst_studies_without_slice_truth_z_or_misses(tmp_path):
    studies, slices = _tables(n_studies=12, slice_truth=False)
    slices = slices.drop(columns=["z", "true_any"])
    studies["true_any"] = 0  # nothing positive: no miss to show
    fig = worst_studies_figure(slices, studies, label="any", thresholds=None, n=4)
    top, bottom = fig.subfigs
    assert "no miss: no study has true_any = 1" in [t.get_text() for t in top.texts]
    assert not any(t.get_text().startswith("no ") for t in bottom.texts)
    assert not any(ax.axison for ax in top.axes)
    drawn = [ax for ax in fig.axes if ax.get_lines()]
    assert len(drawn) == 2 and all(ax.get_xlabel() == "slice index (z order)" for ax in drawn)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "no slice truth (study-level labels only)" in legend and "positive slice" not in legend
    out = plot_worst_studies(slices, studies, label="any", thresholds=None, path=tmp_path / "w.png", n=4)
    _read_png(out, _size_px(fig))
