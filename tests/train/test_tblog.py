"""RUN/tb: TensorBoard's own reader finds what the run logged, with the values of metrics.json."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ichtrain.train import train


@pytest.fixture(scope="module")
def logged(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb_run")
    train(tiny_config(out, epochs=2, max_steps=2))
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return out, events


def test_every_epoch_logs_training_and_validation_scalars(logged):
    out, events = logged
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/weighted_log_loss", "val/mean_auc"} <= tags
    assert {"any/roc_auc", "any/log_loss", "any/ece", "any/mean_prob", "any/prevalence"} <= tags
    history = json.loads((out / "metrics.json").read_text())["history"]
    logged_loss = [e.value for e in events.Scalars("val/weighted_log_loss")]
    assert logged_loss == pytest.approx([h["val_weighted_log_loss"] for h in history], rel=1e-6)
    assert [e.step for e in events.Scalars("val/weighted_log_loss")] == [1, 2]
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(steps) and len(steps) == 2  # one progress point per 2-step epoch, counted across epochs


def test_curves_and_figures_are_logged(logged):
    _, events = logged
    assert "any/pr" in events.Tags()["tensors"]  # add_pr_curve writes a tensor summary
    assert {"val/roc", "val/slices"} <= set(events.Tags()["images"])


def test_no_tb_writes_no_log(tiny_config, tmp_path):
    train(tiny_config(tmp_path, tb=False, max_steps=1))
    assert not (tmp_path / "tb").exists() and (tmp_path / "best.pt").exists()
