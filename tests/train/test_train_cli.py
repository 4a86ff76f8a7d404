"""ichtrain.cli: options and their one definition, train, evaluate and predict, torchrun, a killed run, S3 and zips."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import BIN, fake_slices
from conftest import wait_for as _wait_for

from ichprep.reading.labels import LABELS
from ichprep.synth import KAGGLE_TOP
from ichtrain.checkpoint import load_checkpoint
from ichtrain.cli import main
from ichtrain.data import balance, tables
from ichtrain.data.folds import split_slices
from ichtrain.data.tables import select_slices
from ichtrain.errors import ConfigError


def test_choices_bounds_and_defaults_have_one_definition():
    """config holds every choice list and bound; data, the CLI and the library checks take theirs from it."""
    from ichtrain import cli, config
    from ichtrain.config import SeqConfig, TrainConfig

    assert tables.TASKS is config.TASKS
    assert balance.BALANCES is config.BALANCES
    train = {param.name: param for param in cli.train.params}
    for option, choices in (
        ("task", tuple(config.TASKS)),
        ("split_by", config.SPLITS),
        ("balance", config.BALANCES),
        ("calibration", config.CALIBRATIONS),
        ("arch", config.ARCHS),
        ("optimizer", config.OPTIMIZERS),
        ("device", config.DEVICES),
    ):
        assert tuple(train[option].type.choices) == choices, option
    for option in ("val_fraction", "pos_fraction"):
        bounds = train[option].type
        assert (bounds.min, bounds.max, bounds.min_open, bounds.max_open) == (0, 1, True, True)
    # What --help shows is the dataclass's default wherever a dataclass holds one.
    shown = [p for p in cli.train.params if getattr(p, "show_default", False) and hasattr(TrainConfig, p.name)]
    assert len(shown) == 22
    assert all(param.default == getattr(TrainConfig, param.name) for param in shown)
    shown = [p for p in cli.seq.params if getattr(p, "show_default", False) and hasattr(SeqConfig, p.name)]
    assert {p.name for p in shown} == {"model", "layers", "batch_studies", "device"}
    # Except --device: stage 2 runs where stage 1 did (auto), while the library's SeqConfig defaults to the CPU.
    assert all(param.default == getattr(SeqConfig, param.name) for param in shown if param.name != "device")
    # Settings whose default depends on --model: left unset (None), and --help lists each model's from the table.
    per_model = {p.name: p for p in cli.seq.params if p.name in config.SEQ_MODEL_DEFAULTS["window"]}
    assert set(per_model) == {"epochs", "hidden", "lr", "holdout"}
    for name, param in per_model.items():
        assert param.default is None
        assert not param.show_default
        listed = ", ".join(f"{m} {d[name]:g}" for m, d in config.SEQ_MODEL_DEFAULTS.items())
        assert param.help.endswith(f"[default: {listed}].")
    assert set(config.SEQ_MODEL_DEFAULTS) == set(config.SEQ_MODELS)


@pytest.mark.parametrize("bad", [0, 1, 1.5, "0.2", True])
def test_config_and_split_refuse_a_bad_val_fraction_with_one_message(bad):
    """The config, the public library function and its CLI option refuse the same fractions with one message."""
    from ichtrain.config import TrainConfig

    frame = fake_slices(20)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\), a number between 0 and 1"):
        TrainConfig(store="s", out="o", val_fraction=bad)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\), a number between 0 and 1"):
        split_slices(frame, bad)


@pytest.mark.parametrize("bad", ["middle:0", "middle:01", "top:3"])
def test_config_and_select_refuse_a_bad_slice_selection_with_one_message(bad):
    from ichtrain.config import TrainConfig

    frame = fake_slices(20)
    with pytest.raises(ConfigError, match="use 'all' or 'middle:K'"):
        TrainConfig(store="s", out="o", slice_selection=bad)
    with pytest.raises(ConfigError, match="use 'all' or 'middle:K'"):
        select_slices(frame, pd.DataFrame({"start": [0], "stop": [20]}), bad)


def test_cli_context_help_and_bounds(tmp_path):
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["train", "--help"]).output.split())
    assert "--context N" in help_text
    assert "(2N+1) x windows input channels" in help_text
    assert "2N+1 times" in help_text
    negative = runner.invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--context", "-1"])
    assert negative.exit_code == 2
    assert "x>=0" in negative.output
    absurd = runner.invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--context", "9"])
    assert absurd.exit_code != 0
    assert "context must be an integer from 0 to 8" in absurd.output


@pytest.mark.parametrize(
    "extra",
    [
        ["--task", "subtypes", "--balance", "none"],
        ["--task", "binary", "--split-by", "slice", "--slice-selection", "middle:8"],
        ["--context", "1", "--optimizer", "adamw", "--scheduler", "cosine"],
    ],
)
def test_cli_train_variants(easy_store, tmp_path, extra):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(easy_store),
            "--out",
            str(out),
            "--arch",
            "resnet18",
            "--image-size",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "weighted log loss" in result.output
    state = load_checkpoint(out / "last.pt")
    if "--context" in extra:
        assert state["in_channels"] == 9
        result = CliRunner().invoke(
            main,
            [
                "predict",
                str(out / "last.pt"),
                "--store",
                str(easy_store),
                "-o",
                str(tmp_path / "ctx.csv"),
                "--workers",
                "0",
            ],
        )
        assert result.exit_code == 0, result.output
    if "subtypes" in extra:
        assert state["names"] == list(LABELS[:5])
    if "binary" in extra:
        assert "binary at 0.5" in result.output


def test_cli_evaluate_and_predict(tiny_run, easy_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(tiny_run / "best.pt"),
            "--store",
            str(easy_store),
            "--out",
            str(tmp_path / "eval"),
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "weighted log loss" in result.output
    assert "any" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(LABELS)
    # Operating points come from the run's validation split, not re-tuned on the evaluated data.
    val_thresholds = load_checkpoint(tiny_run / "best.pt")["metrics"]["per_class"]["any"]["at_youden"]["threshold"]
    assert metrics["per_class"]["any"]["at_youden"]["source"] == "given"
    assert metrics["per_class"]["any"]["at_youden"]["threshold"] == pytest.approx(val_thresholds)
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0

    result = runner.invoke(
        main,
        [
            "predict",
            str(tiny_run / "best.pt"),
            "--store",
            str(easy_store),
            "-o",
            str(tmp_path / "sub.csv"),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "sub.csv").shape[1] == 2
    result = runner.invoke(main, ["predict", str(tiny_run / "best.pt"), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code != 0
    assert "exactly one of --store STORE or --dicom-dir SOURCE" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_run(easy_store, tmp_path):
    """torchrun with 2 CPU processes: the run completes, rank 0 alone writes, metrics cover the val split."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "ichtrain",
        "train",
        str(easy_store),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--image-size",
        "48",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--max-steps",
        "2",
        "--device",
        "cpu",
        "--task",
        "binary",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    final = json.loads((out / "metrics.json").read_text())["final"]
    import pandas as pd

    split = pd.read_parquet(out / "split.parquet")
    from ichprep.storage.store import open_store

    slices = open_store(easy_store).slices
    n_val = int(((split["split"] == "val") & slices["ok"] & slices["any"].notna()).sum())
    assert n_val - 2 < final["n_images"] <= n_val  # gathered from both ranks (fewer than 2 dropped for equal lengths)


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(easy_store, tmp_path):
    args = [
        "train",
        str(easy_store),
        "--arch",
        "resnet18",
        "--image-size",
        "48",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--max-steps",
        "6",
        "--device",
        "cpu",
        "--seed",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same floating-point sums
    straight = tmp_path / "straight"
    subprocess.run(
        [str(BIN / "ichtrain"), *args, "--out", str(straight)], check=True, capture_output=True, env=env, timeout=600
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(BIN / "ichtrain"), *args, "--out", str(killed)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    # Kill during the second epoch: after the first epoch's checkpoint, before the second's.
    assert _wait_for(lambda: (killed / "last.pt").exists() or proc.poll() is not None, 300)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert epoch_at_kill < 2, "training finished before the kill"
    subprocess.run(
        [str(BIN / "ichtrain"), *args, "--out", str(killed), "--resume", str(killed / "last.pt")],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    history = [h["val_loss"] for h in b["history"]]
    assert history == pytest.approx([h["val_loss"] for h in a["history"]], rel=1e-5)
    assert len(open(killed / "metrics.jsonl").read().splitlines()) >= 3


def test_predict_from_the_zip_follows_the_sample_submission(tiny_run, archives, tmp_path):
    zip_path = archives["deflated"]
    out = tmp_path / "submission.csv"
    result = subprocess.run(
        [
            str(BIN / "ichtrain"),
            "predict",
            str(tiny_run / "best.pt"),
            "--dicom-dir",
            f"{zip_path}::{KAGGLE_TOP}/stage_2_test",
            "--sample-submission",
            f"{zip_path}::{KAGGLE_TOP}/stage_2_sample_submission.csv",
            "-o",
            str(out),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(out)
    sample = pd.read_csv(archives["folder"] / "stage_2_sample_submission.csv")
    assert written["ID"].tolist() == sample["ID"].tolist()
    assert written["Label"].between(0, 1).all()
    assert written["Label"].nunique() > 6
    any_rows = written[written["ID"].str.endswith("_any")]["Label"].to_numpy()
    sub_rows = written[~written["ID"].str.endswith("_any")]["Label"].to_numpy().reshape(-1, len(LABELS) - 1)
    assert (any_rows >= sub_rows.max(axis=1) - 1e-6).all()


def test_cli_convert_on_dask_and_train_from_s3(s3_env, synth_dataset, tmp_path):
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1"}
    url = "s3://ichkit-test/caches/cli.zarr"
    result = subprocess.run(
        [
            str(BIN / "ichprep"),
            "convert",
            str(synth_dataset / "stage_2_train"),
            "--labels",
            str(synth_dataset / "stage_2_train.csv"),
            "-o",
            url,
            "--size",
            "64",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run([str(BIN / "ichprep"), "verify", url], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "ichtrain"),
            "train",
            url,
            "--out",
            str(out),
            "--arch",
            "resnet18",
            "--image-size",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "1",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--val-fraction",
            "0.5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["final"]["n_images"] > 0


def test_a_run_reruns_from_its_config_and_keeps_a_history(easy_store, tmp_path):
    """train --config RUN/config.json gives the run's metrics again; a flag given beside it overrides the file."""
    from ichtrain.cli import main as train_main

    runner, first = CliRunner(), tmp_path / "first"
    tiny = ["--arch", "resnet18", "--image-size", "48", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    args = ["train", str(easy_store), "--out", str(first), *tiny, "--epochs", "2", "--max-steps", "2", "--seed", "3"]
    assert runner.invoke(train_main, args).exit_code == 0
    again = tmp_path / "again"
    rerun = runner.invoke(train_main, ["train", "--config", str(first / "config.json"), "--out", str(again)])
    assert rerun.exit_code == 0, rerun.output
    a, b = (json.loads((run / "metrics.json").read_text())["final"] for run in (first, again))
    assert a["weighted_log_loss"] == pytest.approx(b["weighted_log_loss"], rel=1e-5)
    saved = json.loads((again / "config.json").read_text())
    assert saved["seed"] == 3 and saved["epochs"] == 2 and saved["image_size"] == 48
    history = pd.read_csv(first / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["best"].sum() == 1
    assert {"train_loss", "val_weighted_log_loss", "val_mean_auc", "lr"} <= set(history.columns)
    changed = runner.invoke(
        train_main, ["train", "--config", str(first / "config.json"), "--out", str(tmp_path / "c"), "--epochs", "1"]
    )
    assert changed.exit_code == 0, changed.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["epochs"] == 1
    assert runner.invoke(train_main, ["train", "--out", str(tmp_path / "d")]).exit_code == 2


def test_the_epoch_log_is_rounded_with_a_label_table_and_a_repeated_warning_is_said_once(easy_store, tmp_path):
    import logging

    from ichtrain.cli import WarnOnce

    once = WarnOnce()
    records = [logging.LogRecord("ichtrain", logging.WARNING, __file__, 1, "same thing", None, None) for _ in range(3)]
    assert [once.filter(r) for r in records] == [True, False, False]
    info = logging.LogRecord("ichtrain", logging.INFO, __file__, 1, "same thing", None, None)
    assert once.filter(info) and once.filter(info)  # progress lines are never dropped
    out = subprocess.run(
        [str(BIN / "ichtrain"), "train", str(easy_store), "--out", str(tmp_path / "run"), "--arch", "resnet18"]
        + ["--image-size", "48", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "2"]
        + ["--max-steps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    log = out.stderr
    assert "  label                  AUC  log loss   mean p prevalence   positives" in log
    assert log.count("training resnet18 from random weights") == 1
    epoch_line = next(line for line in log.splitlines() if "epoch 1: train loss" in line)
    loss = epoch_line.split("val weighted log loss ")[1].split(",")[0]
    assert len(loss.replace("0.", "").lstrip("0")) <= 4  # 4 significant digits
