"""--arch timm:NAME: small timm models built offline, weight files from disk, through train, evaluate, predict,
cv and seq, and a checkpoint round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ichtrain.backbones import IMAGENET_MEAN, TimmNet, create_timm, timm_defaults
from ichtrain.checkpoint import Checkpoint
from ichtrain.cli import main
from ichtrain.config import SeqConfig
from ichtrain.errors import CheckpointError, ConfigError
from ichtrain.model import build_model, classifier, first_conv
from ichtrain.study.experiment import cross_validate
from ichtrain.study.stage2 import run_seq

SMALL = ("timm:resnet10t", "timm:efficientnet_b0", "timm:seresnext26d_32x4d")


@pytest.mark.parametrize("arch", SMALL)
def test_a_timm_model_takes_the_stores_channels_and_gives_the_tasks_outputs(arch):
    model = build_model(arch, n_outputs=6, windows=3, slices=3).eval()
    assert isinstance(model, TimmNet)
    assert first_conv(model)[1].in_channels == 9 and classifier(model).out_features == 6
    with torch.no_grad():
        assert model(torch.randn(2, 9, 64, 64)).shape == (2, 6)
    assert torch.equal(model.scale, torch.ones_like(model.scale))  # ImageNet statistics: the identity
    assert torch.equal(model.shift, torch.zeros_like(model.shift))


def test_a_model_with_its_own_statistics_gets_them_through_its_input_layer():
    defaults = timm_defaults("timm:vit_tiny_patch16_224")
    assert defaults.mean == (0.5, 0.5, 0.5) and defaults.input_size == 224
    model = build_model("timm:vit_tiny_patch16_224", n_outputs=1, windows=3)
    x = torch.randn(1, 3, 1, 1)
    imagenet = x * torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    own = (imagenet - 0.5) / 0.5  # what the model was trained on, from the same pixels
    torch.testing.assert_close(x * model.scale + model.shift, own)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weights_are_read_from_a_file_in_any_of_timms_forms(tmp_path, suffix):
    source = create_timm("timm:resnet10t")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"resnet10t{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model("timm:resnet10t", n_outputs=6, windows=3, slices=1, pretrained=path)
    loaded = model.backbone.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.0.bn2.running_var", "conv1.0.weight"):
        torch.testing.assert_close(loaded[key], state[key])
    assert loaded["fc.weight"].shape == (6, 512)  # the head is the task's, not ImageNet's


def test_a_file_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in create_timm("timm:efficientnet_b0").state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"does not fit this architecture: missing \d+ tensors \(e\.g\. \['"):
        build_model("timm:resnet10t", pretrained=path)


def test_an_unknown_timm_name_is_refused_with_the_nearest_and_how_to_list_them():
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet10'; nearest: .*resnet10t.*timm\.list_models"):
        build_model("timm:resnet10")
    result = CliRunner().invoke(main, ["train", "x", "--out", "y", "--arch", "timm:resnet10"])
    assert result.exit_code == 2 and "nearest" in result.output
    assert "timm:NAME" in CliRunner().invoke(main, ["train", "--help"]).output


def test_train_evaluate_predict_and_a_checkpoint_round_trip(easy_store, tmp_path):
    runner, run = CliRunner(), tmp_path / "run"
    tiny = ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1", "--max-steps", "2"]
    trained = runner.invoke(main, ["train", str(easy_store), "--out", str(run), "--arch", "timm:resnet10t", *tiny])
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "timm:resnet10t" and config["image_size"] == 176  # the model's own default size
    saved = Checkpoint.load(run / "best.pt")
    assert saved.backbone["name"] == "resnet10t" and saved.backbone["input_size"] == 176
    assert saved.backbone["mean"] == list(IMAGENET_MEAN) or tuple(saved.backbone["mean"]) == IMAGENET_MEAN
    rebuilt = build_model(saved.config["arch"], n_outputs=len(saved.names), windows=3)
    rebuilt.load_state_dict(saved.model)  # strict: every key of the saved model, scale and shift included
    evaluated = runner.invoke(
        main,
        ["evaluate", str(run / "best.pt"), "--store", str(easy_store), "--split", "all", "--out", str(tmp_path / "e")]
        + ["--workers", "0"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    predictions = pd.read_parquet(tmp_path / "e" / "predictions.parquet")
    predicted = runner.invoke(
        main, ["predict", str(run / "best.pt"), "--store", str(easy_store), "-o", str(tmp_path / "p.csv")]
    )
    assert predicted.exit_code == 0, predicted.output
    rows = pd.read_csv(tmp_path / "p.csv")
    assert len(rows) % 6 == 0 and rows["Label"].between(0, 1).all() and len(predictions) > 0


def test_cv_and_seq_on_a_timm_backbone(easy_store, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "exp", arch="timm:resnet10t", image_size=48, max_steps=2)
    summary = cross_validate(cfg, 2)
    assert len(summary["folds"]) == 2 and np.isfinite(summary["oof"]["weighted_log_loss"])
    staged = run_seq(tmp_path / "exp", None, SeqConfig(seed=0, epochs=2))
    assert (tmp_path / "exp" / "seq" / "oof.parquet").exists() and staged is not None
    # one TensorBoard log per fold (each a train run) and per stage-2 fold
    assert all((tmp_path / "exp" / f"fold{k}" / "tb").is_dir() for k in range(2))
    assert all(any((tmp_path / "exp" / "seq" / "tb" / f"fold{k}").iterdir()) for k in range(2))
