"""ichtrain.train: a short CPU run learns, resumes exactly, balances, calibrates and keeps the best epoch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ichtrain.checkpoint import load_checkpoint
from ichtrain.config import TrainConfig
from ichtrain.errors import ConfigError
from ichtrain.train import train


def test_learning_is_real(easy_store, tmp_path):
    """A short CPU run of a small ResNet separates bleeding from normal slices on the easy set."""
    out = tmp_path / "run"
    metrics = train(
        TrainConfig(
            store=str(easy_store),
            out=str(out),
            task="binary",
            arch="resnet18",
            image_size=64,
            epochs=5,
            batch_size=32,
            lr=3e-3,
            optimizer="adamw",
            scheduler="cosine",
            workers=1,
            device="cpu",
        )
    )
    # The stratified split validates on bleeding patients of every size, the few-slice ones included.  ~150
    # validation slices move AUC by a few hundredths with the CPU's float order, so the bound sits well
    # clear of both that and chance, and the log loss must beat the best constant (the prevalence).
    assert metrics["per_class"]["any"]["roc_auc"] > 0.75
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["history"]) == 5
    assert saved["final"]["per_class"]["any"]["roc_auc"] > 0.75
    truth = pd.read_parquet(out / "val_predictions.parquet")["true_any"]
    p = float(truth.mean())
    constant = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert metrics["per_class"]["any"]["log_loss"] < 0.9 * constant
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    for name in ("best.pt", "last.pt", "loss.png", "roc.png", "val_predictions.parquet", "split.parquet"):
        assert (out / name).stat().st_size > 0, name


def test_patients_never_in_both_splits(tiny_run):
    import pandas as pd

    split = pd.read_parquet(tiny_run / "split.parquet")
    per_patient = split.groupby(split["patient_id"].fillna(split["study_uid"]))["split"].nunique()
    assert (per_patient == 1).all()
    assert set(split["split"]) == {"train", "val"}


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_gives_the_same_next_epoch(easy_store, tmp_path, ema_decay):
    common = dict(
        store=str(easy_store),
        arch="resnet18",
        image_size=48,
        batch_size=8,
        workers=0,
        max_steps=3,
        device="cpu",
        seed=3,
        ema_decay=ema_decay,
    )
    train(TrainConfig(out=str(tmp_path / "straight"), epochs=2, **common))
    train(TrainConfig(out=str(tmp_path / "split"), epochs=1, **common))
    train(TrainConfig(out=str(tmp_path / "split"), epochs=2, resume=str(tmp_path / "split" / "last.pt"), **common))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-5)
    assert ("trained_model" in a) == (ema_decay > 0)  # with an average, "model" is the average, saved beside
    for key in a.get("trained_model", {}):
        torch.testing.assert_close(a["trained_model"][key], b["trained_model"][key], rtol=1e-5, atol=1e-6)


def test_the_weight_average_follows_its_formula_without_touching_the_model():
    from ichtrain.engine import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = [p.detach().clone() for p in model.parameters()]
    fresh, warm = WeightAverage(model, decay=0.75), WeightAverage(model, decay=0.75, updates=30)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    decays = []
    for average in (fresh, warm):
        decays.append(average.current_decay())
        average.update(model)
    assert decays == [0.1, 0.75]  # min(decay, (1 + t) / (10 + t))
    assert (fresh.updates, warm.updates) == (1, 31)
    assert WeightAverage(model, 0.75, updates=WeightAverage.warmed_up(0.75) - 1).current_decay() < 0.75
    for average, decay in zip((fresh, warm), decays):
        for mine, first, now in zip(average.module.parameters(), start, model.parameters()):
            torch.testing.assert_close(mine, decay * first + (1 - decay) * now)
            assert not mine.requires_grad
            assert now.requires_grad
    average = warm
    model[1].running_mean.fill_(5.0)
    average.take_buffers(model)
    assert average.module[1].running_mean.tolist() == [5.0, 5.0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "segment", "invalid task 'segment'; choose one of rsna, binary, subtypes"),
        ("optimizer", "lbfgs", "choose one of sgd, adamw"),
        ("slice_selection", "middle", "use 'all' or 'middle:K'"),
        ("context", 9, "context must be an integer from 0 to 8"),
        ("calibration", "isotonic", "invalid calibration 'isotonic'; choose one of platt, none"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ],
)
def test_invalid_config_lists_choices(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(store="s", out="o", **{field: value})


# ---------------------------------------------------------------- calibration, validation, best epoch


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def balance_runs(easy_store, tmp_path_factory):
    """The same short rsna run with --balance hybrid (the default) and --balance none, same seed."""
    runs = {}
    for balance in ("hybrid", "none"):
        out = tmp_path_factory.mktemp(f"balance_{balance}")
        train(
            TrainConfig(
                store=str(easy_store),
                out=str(out),
                arch="resnet18",
                image_size=64,
                epochs=3,
                batch_size=32,
                lr=3e-3,
                optimizer="adamw",
                scheduler="cosine",
                workers=0,
                device="cpu",
                balance=balance,
                seed=1,
            )
        )
        runs[balance] = out
    return runs


def test_hybrid_balance_is_calibrated_and_no_worse_than_none(balance_runs):
    """Importance weights undo the hybrid plan: no inflated probabilities, no worse competition metric."""
    hybrid = json.loads((balance_runs["hybrid"] / "metrics.json").read_text())["final"]
    plain = json.loads((balance_runs["none"] / "metrics.json").read_text())["final"]
    assert hybrid["weighted_log_loss"] <= plain["weighted_log_loss"] * 1.05
    any_ = hybrid["per_class"]["any"]
    assert any_["mean_prob"] == pytest.approx(any_["prevalence"], rel=0.25)
    assert (
        hybrid["ci95"]["weighted_log_loss"][0] <= hybrid["weighted_log_loss"] <= hybrid["ci95"]["weighted_log_loss"][1]
    )
    assert any_["ece"] is not None
    assert hybrid["mean_ece"] is not None
    assert (balance_runs["hybrid"] / "calibration.png").stat().st_size > 0


def test_the_checkpoint_carries_the_platt_map_that_evaluate_applies(balance_runs, easy_store, tmp_path):
    """Validation is scored cross-fitted (as in training); other data get the map fitted on all of validation."""
    from ichtrain.engine import sigmoid
    from ichtrain.evaluation.evaluate import evaluate_checkpoint, infer_loaded, load_for_store
    from ichtrain.evaluation.recalibrate import Platt

    best = balance_runs["hybrid"] / "best.pt"
    final = json.loads((balance_runs["hybrid"] / "metrics.json").read_text())["final"]
    state = load_checkpoint(best)
    assert state["calibration"]["method"] == "platt"
    assert len(state["calibration"]["slope"]) == 6
    assert set(final["uncalibrated"]["mean_prob"]) == set(final["per_class"])
    again = evaluate_checkpoint(best, easy_store, tmp_path / "val", split="val", workers=0)
    assert again["weighted_log_loss"] == pytest.approx(final["weighted_log_loss"], rel=1e-4)
    evaluate_checkpoint(best, easy_store, tmp_path / "all", split="all", workers=0)
    written = pd.read_parquet(tmp_path / "all" / "predictions.parquet")
    loaded = load_for_store(best, easy_store, "cpu")
    mask = np.zeros(len(loaded.store.slices), bool)
    mask[written["slot"].to_numpy()] = True
    raw = infer_loaded(loaded, mask, workers=0)
    order = np.searchsorted(raw.slots, written["slot"].to_numpy())
    expected = sigmoid(Platt.from_dict(state["calibration"], 6)(raw.logits[order]))
    np.testing.assert_allclose(written[[f"prob_{n}" for n in state["names"]]].to_numpy(), expected, atol=1e-6)


def test_final_metrics_are_the_best_epochs(balance_runs):
    out = balance_runs["hybrid"]
    saved = json.loads((out / "metrics.json").read_text())
    losses = [h["val_weighted_log_loss"] for h in _history(out)]
    best = int(np.argmin(losses))
    assert saved["best_epoch"] == best + 1
    assert saved["final"]["weighted_log_loss"] == pytest.approx(losses[best])
    assert saved["last"]["weighted_log_loss"] == pytest.approx(losses[-1])
    state = load_checkpoint(out / "best.pt")
    assert state["epoch"] == best
    assert state["metrics"]["weighted_log_loss"] == pytest.approx(losses[best])
    val = pd.read_parquet(out / "val_predictions.parquet")
    assert len(val) == saved["final"]["n_images"]


def test_validation_covers_every_labelled_slice_when_training_on_middle_slices(easy_store, tiny_config, tmp_path):
    """--slice-selection middle:K narrows training only; the middle-slice figures come as an extra block."""
    import pandas as pd

    from ichprep.storage.store import open_store
    from ichtrain.data.tables import select_slices

    out = tmp_path / "middle"
    train(tiny_config(out, max_steps=2, slice_selection="middle:4"))
    store = open_store(easy_store)
    split = pd.read_parquet(out / "split.parquet")["split"].to_numpy()
    labelled = store.slices["ok"].to_numpy(bool) & store.slices["any"].notna().to_numpy()
    middle = select_slices(store.slices, store.studies, "middle:4")
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["n_images"] == int((labelled & (split == "val")).sum())
    assert final["middle_slices"]["n_images"] == int((labelled & middle & (split == "val")).sum())
    assert final["middle_slices"]["selection"] == "middle:4"
    assert final["n_images"] > 2 * final["middle_slices"]["n_images"]


def test_training_from_random_weights_says_how_to_get_pretrained_ones(tiny_config, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ichtrain.train"):
        train(tiny_config(tmp_path / "r", max_steps=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("from random weights" in w and "--pretrained resnet18.pth" in w for w in warnings)


@pytest.fixture(scope="module")
def easy_store256(easy_store, tmp_path_factory):
    """The easy set's DICOMs converted at the default 256²."""
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec

    root = tmp_path_factory.mktemp("easy256") / "cache.zarr"
    convert(
        easy_store.parent / "data" / "stage_2_train",
        root,
        PreprocessSpec(shard_slices=32),
        labels_csv=easy_store.parent / "data" / "stage_2_train.csv",
    )
    return root


def test_a_256_store_trained_at_96_learns(easy_store256, tmp_path):
    """--image-size is the network's input everywhere: a 256² store trained and evaluated at 96² learns."""
    metrics = train(
        TrainConfig(
            store=str(easy_store256),
            out=str(tmp_path / "r96"),
            task="binary",
            arch="resnet18",
            image_size=96,
            epochs=4,
            batch_size=32,
            lr=3e-3,
            optimizer="adamw",
            scheduler="cosine",
            workers=1,
            device="cpu",
        )
    )
    assert metrics["per_class"]["any"]["roc_auc"] >= 0.85
