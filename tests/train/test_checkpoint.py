"""ichtrain.checkpoint: what a checkpoint carries, and the checkpoints, resumes and stores it refuses."""

from __future__ import annotations

import os

import pytest
import torch

from ichtrain.checkpoint import load_checkpoint
from ichtrain.config import TrainConfig
from ichtrain.errors import CheckpointError, SpecMismatchError
from ichtrain.train import train


def test_checkpoint_carries_config_and_spec_and_loads_weights_only(tiny_run, easy_store):
    state = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["arch"] == "resnet18"
    assert state["epoch"] == 0
    assert [w["name"] for w in state["spec"]["windows"]] == ["brain", "subdural", "soft"]
    assert state["names"] == ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    for key in ("optimizer", "scheduler", "scaler", "rng", "history"):
        assert key in state


def test_checkpoint_with_code_in_it_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match=r"weights_only=True.*(GLOBAL|operand).*pickled code"):
        load_checkpoint(path)


def test_resume_with_other_options_is_refused(tiny_run, easy_store, tmp_path):
    with pytest.raises(CheckpointError, match=r"options differ from the checkpoint's run \(arch\)"):
        train(
            TrainConfig(
                store=str(easy_store),
                out=str(tmp_path),
                arch="resnet34",
                image_size=48,
                epochs=2,
                workers=0,
                resume=str(tiny_run / "last.pt"),
            )
        )


def test_resume_on_another_store_is_refused(tiny_run, easy_store, tiny_config, tmp_path):
    """Same spec, other content (here: another manifest): the run's store identity does not match."""
    import shutil

    other = tmp_path / "other.zarr"
    shutil.copytree(easy_store, other)
    with open(other / "manifest.json", "a") as f:
        f.write("\n")
    with pytest.raises(CheckpointError, match=r"options differ.*store \(its manifest differs"):
        train(tiny_config(tmp_path / "r", store=str(other), epochs=2, resume=str(tiny_run / "last.pt")))


def test_store_with_another_spec_is_refused(tiny_run, tmp_path, synth_dataset):
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec
    from ichprep.windows import parse_windows
    from ichtrain.study.submit import predict_store

    other = tmp_path / "other.zarr"
    convert(
        synth_dataset / "stage_2_train",
        other,
        PreprocessSpec(windows=parse_windows(["brain", "bone", "soft"]), size=64),
    )
    with pytest.raises(SpecMismatchError, match="another preprocessing spec.*windows"):
        predict_store(tiny_run / "best.pt", other, tmp_path / "sub.csv", workers=0)
