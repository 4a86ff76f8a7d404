from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from ichtrain.checkpoint import load_checkpoint
from ichtrain.config import TrainConfig
from ichtrain.errors import CheckpointError, ConfigError, SpecMismatchError
from ichtrain.train import train


def test_learning_is_real(easy_store, tmp_path):
    """A short CPU run of a small ResNet separates bleeding from normal slices on the easy set."""
    out = tmp_path / "run"
    metrics = train(TrainConfig(store=str(easy_store), out=str(out), task="binary", arch="resnet18", image_size=64,
                                epochs=5, batch_size=32, lr=3e-3, optimizer="adamw", scheduler="cosine",
                                workers=1, device="cpu"))
    assert metrics["per_class"]["any"]["roc_auc"] > 0.9
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["history"]) == 5 and saved["final"]["per_class"]["any"]["roc_auc"] > 0.9
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    for name in ("best.pt", "last.pt", "loss.png", "roc.png", "val_predictions.parquet", "split.parquet"):
        assert (out / name).stat().st_size > 0, name


def test_patients_never_in_both_splits(tiny_run):
    import pandas as pd

    split = pd.read_parquet(tiny_run / "split.parquet")
    per_patient = split.groupby(split["patient_id"].fillna(split["study_uid"]))["split"].nunique()
    assert (per_patient == 1).all()
    assert set(split["split"]) == {"train", "val"}


def test_checkpoint_carries_config_and_spec_and_loads_weights_only(tiny_run, easy_store):
    state = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["arch"] == "resnet18" and state["epoch"] == 0
    assert [w["name"] for w in state["spec"]["windows"]] == ["brain", "subdural", "soft"]
    assert state["names"] == ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    for key in ("optimizer", "scheduler", "scaler", "rng", "history"):
        assert key in state


def test_resume_gives_the_same_next_epoch(easy_store, tmp_path):
    common = dict(store=str(easy_store), arch="resnet18", image_size=48, batch_size=8, workers=0, max_steps=3,
                  device="cpu", seed=3)
    train(TrainConfig(out=str(tmp_path / "straight"), epochs=2, **common))
    train(TrainConfig(out=str(tmp_path / "split"), epochs=1, **common))
    train(TrainConfig(out=str(tmp_path / "split"), epochs=2, resume=str(tmp_path / "split" / "last.pt"), **common))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-5)


def test_resume_with_other_options_is_refused(tiny_run, easy_store, tmp_path):
    with pytest.raises(CheckpointError, match=r"options differ from the checkpoint's run \(arch\)"):
        train(TrainConfig(store=str(easy_store), out=str(tmp_path), arch="resnet34", image_size=48, epochs=2, workers=0,
                          resume=str(tiny_run / "last.pt")))


def test_store_with_another_spec_is_refused(tiny_run, tmp_path, synth_dataset):
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec
    from ichprep.windows import parse_windows
    from ichtrain.predict import predict_store

    other = tmp_path / "other.zarr"
    convert(synth_dataset / "stage_2_train", other, PreprocessSpec(windows=parse_windows(["brain", "bone", "soft"]),
                                                                   size=64))
    with pytest.raises(SpecMismatchError, match="another preprocessing spec.*windows"):
        predict_store(tiny_run / "best.pt", other, tmp_path / "sub.csv", workers=0)


@pytest.mark.parametrize("field, value, message", [
    ("task", "segment", "invalid task 'segment'; choose one of rsna, binary, subtypes"),
    ("optimizer", "lbfgs", "choose one of sgd, adamw"),
    ("slice_selection", "middle", "use 'all' or 'middle:K'"),
    ("context", 2, "choose one of 0, 1"),
])
def test_invalid_config_lists_choices(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(store="s", out="o", **{field: value})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_run(easy_store, tmp_path):
    """torchrun with 2 CPU processes: the run completes, rank 0 alone writes, metrics cover the val split."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ichtrain", "train", str(easy_store), "--out", str(out),
           "--arch", "resnet18", "--image-size", "48", "--epochs", "1", "--batch-size", "8", "--workers", "1",
           "--max-steps", "2", "--device", "cpu", "--task", "binary"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    final = json.loads((out / "metrics.json").read_text())["final"]
    import pandas as pd

    split = pd.read_parquet(out / "split.parquet")
    from ichprep.store import open_store

    slices = open_store(easy_store).slices
    n_val = int(((split["split"] == "val") & slices["ok"] & slices["any"].notna()).sum())
    assert n_val - 2 < final["n_images"] <= n_val  # gathered from both ranks (fewer than 2 dropped for equal lengths)


def test_checkpoint_with_code_in_it_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match=r"weights_only=True.*(GLOBAL|operand).*pickled code"):
        load_checkpoint(path)
