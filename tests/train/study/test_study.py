"""ichtrain.study end to end: cv (3 patient folds), seq on the out-of-fold outputs, evaluate and predict.

A small synthetic archive (lesions span several slices) trained briefly on the CPU, and a second archive from
another seed as the held-out test.  Stage 2's gain needs a stage 1 of `make demo-study`'s quality (120 studies,
64², 6 epochs), so the issue's conditions (stage 2 at most 0.9x stage 1 out of fold with the
study-level AUC not lower; on a held-out archive, stage 1 + 2 better than stage 1 alone and than the constant) are
checked on that experiment's own stage-1 logits, kept in ``tests/data``; on this test's 24 studies and 2 epochs
stage 2 is held to beating stage 1 out of fold (BENCHMARKS.md, "The window model").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from ichprep.convert import convert
from ichprep.spec import PreprocessSpec
from ichprep.synth import generate
from ichtrain.config import SeqConfig, TrainConfig
from ichtrain.engine import sigmoid
from ichtrain.errors import ConfigError
from ichtrain.evaluation.metrics import compute_metrics, weighted_log_loss
from ichtrain.files import OOF, fold_dir
from ichtrain.study.experiment import cross_validate, open_experiment
from ichtrain.study.sequence import SeqInputs, cross_fit, predict_ensemble
from ichtrain.study.stage2 import any_max, run_seq
from ichtrain.study.submit import evaluate_experiment, predict_store, score_submission

FOLDS = 3
#: make demo-study's stage-1 logits, out of fold and per fold on its held-out archive (tests/data/make_stage1_oof.py).
DEMO_STUDY_STAGE1 = Path(__file__).parents[2] / "data" / "demo_study_stage1.npz"


def _archive(root, studies: int, seed: int):
    generate(root / "data", studies=studies, seed=seed, lesion_rate=0.9, min_lesion_pixels=800)
    store = root / "cache.zarr"
    convert(
        root / "data" / "stage_2_train",
        store,
        PreprocessSpec(size=64, shard_slices=32),
        labels_csv=root / "data" / "stage_2_train.csv",
    )
    return store


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    store = _archive(root, studies=24, seed=11)
    base = TrainConfig(
        store=str(store),
        out=str(root / "exp"),
        arch="resnet18",
        image_size=48,
        epochs=2,
        batch_size=16,
        lr=2e-3,
        optimizer="adamw",
        scheduler="cosine",
        workers=0,
        device="cpu",
        bn_refresh_batches=5,
    )
    summary = cross_validate(base, FOLDS)
    return root / "exp", store, summary


@pytest.fixture(scope="module")
def staged(experiment):
    exp, _, _ = experiment
    return run_seq(exp, None, SeqConfig(seed=0))


def test_cv_writes_folds_oof_and_metrics(experiment):
    exp, store, summary = experiment
    folds = pd.read_parquet(exp / "folds.parquet")
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == list(range(FOLDS))
    oof = pd.read_parquet(exp / OOF)
    for k in range(FOLDS):
        # Each slot's OOF probability comes from the fold that validated on its patient.
        split = pd.read_parquet(fold_dir(exp, k) / "split.parquet")
        val_ids = set(split.loc[split["split"] == "val", "image_id"])
        assert set(oof.loc[oof["fold"] == k, "image_id"]) <= val_ids
        assert (fold_dir(exp, k) / "best.pt").exists()
    on_disk = json.loads((exp / "metrics.json").read_text())
    assert set(on_disk) == {"oof", "folds"}
    assert len(on_disk["folds"]) == FOLDS
    assert on_disk["oof"]["weighted_log_loss"] == pytest.approx(summary["oof"]["weighted_log_loss"])
    assert set(on_disk["oof"]["auc"]) == set(open_experiment(exp).names)
    assert on_disk["oof"]["n_images"] == len(oof)


def test_oof_stage1_is_what_each_fold_scored_its_validation_with(experiment):
    """Out of fold, each slice passes through the Platt map its fold's run cross-fitted (never its own label)."""
    exp, _, _ = experiment
    oof = pd.read_parquet(exp / OOF).set_index("slot")
    probs = [c for c in oof.columns if c.startswith("prob_")]
    for k in range(FOLDS):
        val = pd.read_parquet(fold_dir(exp, k) / "val_predictions.parquet").set_index("slot")
        mine = oof[oof["fold"] == k]
        assert sorted(mine.index) == sorted(val.index)
        np.testing.assert_allclose(mine.loc[val.index, probs].to_numpy(), val[probs].to_numpy(), atol=1e-6)
    raw = json.loads((fold_dir(exp, 0) / "metrics.json").read_text())["final"]["uncalibrated"]
    assert raw["weighted_log_loss"] > 0  # the maps were fitted: the network's own figures are kept beside


def test_cv_rerun_keeps_finished_folds_and_refuses_other_settings(experiment):
    exp, store, _ = experiment
    stamp = (fold_dir(exp, 0) / "best.pt").stat().st_mtime_ns
    cfg = open_experiment(exp).cfg
    cross_validate(cfg, FOLDS)
    assert (fold_dir(exp, 0) / "best.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="image_size"):
        cross_validate(TrainConfig.from_dict(cfg.to_dict(), image_size=64), FOLDS)


def test_stage2_scores_the_same_slices_and_beats_stage1_out_of_fold(experiment, staged):
    exp, _, _ = experiment
    stage1, stage2 = staged["stage1"], staged["oof"]
    assert stage2["n_images"] == stage1["n_images"]
    assert stage2["weighted_log_loss"] < stage1["weighted_log_loss"]
    oof = pd.read_parquet(exp / "seq" / "oof.parquet")
    assert oof["image_id"].tolist() == pd.read_parquet(exp / OOF)["image_id"].tolist()
    assert set(staged["any_max"]) == {"stage1", "stage2"}
    assert (exp / "compare.png").stat().st_size > 10_000
    assert len(list(exp.glob("study_*.png"))) == 1


def _study_any_auc(inputs: SeqInputs, probs: np.ndarray, names: tuple[str, ...]) -> float:
    """The metrics' study-level ``any`` AUC over the labelled slots."""
    study = np.repeat(np.arange(len(inputs.starts)), inputs.stops - inputs.starts)  # studies tile the slots in order
    labelled = ~np.isnan(inputs.targets).any(axis=1)
    metrics = compute_metrics(inputs.targets[labelled], probs[labelled], names, study_ids=study[labelled], bootstrap=0)
    return metrics["study_any_auc"]


class DemoStudy(NamedTuple):
    names: tuple[str, ...]
    oof: SeqInputs  # the experiment's store, out-of-fold logits
    held: list[SeqInputs]  # the held-out archive, one per fold: that fold's logits


@pytest.fixture(scope="module")
def demo_study() -> DemoStudy:
    with np.load(DEMO_STUDY_STAGE1) as saved:
        arrays = dict(saved)

    def inputs(part: str, logits: np.ndarray, fold: np.ndarray) -> SeqInputs:
        return SeqInputs(
            x=logits,
            logits=logits,
            targets=arrays[f"{part}_targets"],
            starts=arrays[f"{part}_starts"],
            stops=arrays[f"{part}_stops"],
            study_fold=fold,
        )

    held_fold = np.zeros(len(arrays["held_starts"]), np.int64)
    return DemoStudy(
        names=tuple(arrays["names"].tolist()),
        oof=inputs("oof", arrays["oof_logits"], arrays["oof_fold"]),
        held=[inputs("held", logits, held_fold) for logits in arrays["held_logits"]],
    )


@pytest.fixture(scope="module")
def demo_study_stage2(demo_study):
    return cross_fit(demo_study.oof, SeqConfig(seed=0), demo_study.names)


def test_stage2_on_make_demo_study_stage1_is_at_most_0_9x_and_keeps_study_auc(demo_study, demo_study_stage2):
    """The issue's condition, out of fold, on the 120-study experiment `make demo-study` trains."""
    oof, names = demo_study.oof, demo_study.names
    assert len(oof.starts) == 120
    assert sorted(set(oof.study_fold.tolist())) == [0, 1, 2]
    stage1, stage2 = sigmoid(oof.logits), demo_study_stage2.probs
    labelled = ~np.isnan(oof.targets).any(axis=1)
    loss1 = weighted_log_loss(oof.targets[labelled], stage1[labelled], names)
    loss2 = weighted_log_loss(oof.targets[labelled], stage2[labelled], names)
    assert loss2 <= 0.9 * loss1, (loss1, loss2)
    assert _study_any_auc(oof, stage2, names) >= _study_any_auc(oof, stage1, names)


def test_stage2_folds_beat_stage1_and_the_constant_on_the_held_out_archive(demo_study, demo_study_stage2):
    """What `ichtrain predict EXP` averages, with and without `--no-seq`, on `make demo-study`'s seed-21 archive."""
    held, names = demo_study.held, demo_study.names
    every = np.arange(len(held[0].starts))
    stage1 = any_max(np.mean([sigmoid(h.logits) for h in held], axis=0), names)
    stage2 = any_max(predict_ensemble(demo_study_stage2.fitted, held, every), names)
    targets = held[0].targets
    labelled = ~np.isnan(targets).any(axis=1)
    constant = np.broadcast_to(np.nanmean(targets, axis=0), targets.shape)
    loss1, loss2, loss0 = (weighted_log_loss(targets[labelled], p[labelled], names) for p in (stage1, stage2, constant))
    assert labelled.sum() > 800
    assert loss2 < loss1 < loss0, (loss2, loss1, loss0)


def test_window_model_refuses_feature_inputs(experiment):
    exp, _, _ = experiment
    with pytest.raises(ConfigError, match="logits only"):
        run_seq(exp, exp / "never", SeqConfig(model="window"), kind="features")
    assert not (exp / "never").exists()


def test_predict_experiment_on_another_archive(experiment, staged, tmp_path):
    exp, _, _ = experiment
    held = _archive(tmp_path, studies=12, seed=12)
    labels = tmp_path / "data" / "stage_2_train.csv"
    options = {"workers": 0, "device": "cpu"}
    predict_store(exp, held, tmp_path / "both.csv", **options)
    predict_store(exp, held, tmp_path / "first.csv", use_seq=False, **options)
    both, first = (score_submission(tmp_path / name, labels) for name in ("both.csv", "first.csv"))
    assert both["weighted_log_loss"] < both["constant_weighted_log_loss"]
    assert first["weighted_log_loss"] < first["constant_weighted_log_loss"]
    # --no-seq is exactly the mean of the fold checkpoints' own predictions.
    folds = [fold_dir(exp, k) / "best.pt" for k in range(FOLDS)]
    predict_store(folds, held, tmp_path / "folds.csv", **options)
    a, b = pd.read_csv(tmp_path / "first.csv"), pd.read_csv(tmp_path / "folds.csv")
    assert a["ID"].tolist() == b["ID"].tolist()
    assert np.allclose(a["Label"], b["Label"], atol=2e-6)
    metrics = evaluate_experiment(exp, held, tmp_path / "eval", **options)
    assert metrics["final"] is metrics["stage2"]
    assert metrics["stage1"]["n_images"] == metrics["stage2"]["n_images"] <= both["n_images"]
    assert (tmp_path / "eval" / "compare.png").exists()
    assert (tmp_path / "eval" / "calibration.png").exists()
