"""ichtrain on a damaged store: refused with the shard, its studies and the fix; --skip-damaged trains on the
rest; run folders replace only their own kind and record paths relative to themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from ichprep.errors import DamagedStoreError
from ichprep.storage.shardcodec import shard_path
from ichprep.storage.store import open_store
from ichtrain.cli import main
from ichtrain.data.tables import train_candidates
from ichtrain.study.experiment import cross_validate

TINY = ["--arch", "resnet18", "--image-size", "48", "--batch-size", "8", "--device", "cpu", "--epochs", "1"]


def _copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "copy.zarr"))


def _break_frames(root: Path) -> None:
    """Every shard's first frame made undecodable (its size unchanged: only decoding finds it)."""
    for shard in sorted((root / "images" / "c").glob("*/0/0/0")):
        data = bytearray(shard.read_bytes())
        for i in range(8, 72):
            data[i] ^= 0xFF
        shard.write_bytes(bytes(data))


def test_train_refuses_a_store_with_a_missing_shard_and_skip_damaged_trains_on_the_rest(easy_store, tmp_path, caplog):
    root = _copy(easy_store, tmp_path)
    (root / shard_path(1)).unlink()
    runner = CliRunner()
    refused = runner.invoke(main, ["train", str(root), "--out", str(tmp_path / "r1"), *TINY, "--workers", "0"])
    assert refused.exit_code == 1
    assert "images/c/1/0/0/0: file not found; slots 32-63" in refused.output and "--skip-damaged" in refused.output
    assert not (tmp_path / "r1" / "best.pt").exists()
    run = tmp_path / "r2"
    args = ["train", str(root), "--out", str(run), *TINY, "--workers", "0", "--max-steps", "2", "--skip-damaged"]
    trained = runner.invoke(main, args)
    assert trained.exit_code == 0, trained.output
    assert "--skip-damaged leaves out 1 shard file(s)" in caplog.text
    split = pd.read_parquet(run / "split.parquet")["split"].to_numpy()
    store = open_store(root, skip_damaged=True)
    for part in ("train", "val"):  # what the run sampled and scored: never a slot of the missing shard
        slots = train_candidates(store.slices, split, None, "rsna", part=part)
        assert len(slots) > 0 and not ((slots >= 32) & (slots < 64)).any(), part
    assert not pd.read_parquet(run / "val_predictions.parquet")["slot"].between(32, 63).any()
    assert json.loads((run / "config.json").read_text())["skip_damaged"] is True


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_that_does_not_decode_stops_training_with_its_name_not_a_traceback(easy_store, tmp_path, workers):
    root = _copy(easy_store, tmp_path)
    _break_frames(root)
    args = ["train", str(root), "--out", str(tmp_path / "run"), *TINY, "--workers", str(workers), "--max-steps", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"Error: {root}/images/c/") and "does not decode" in message
    assert f"ichprep verify {root}" in message and "Traceback" not in result.output


def test_evaluate_predict_and_cv_refuse_a_damaged_store(easy_store, tiny_run, tiny_config, tmp_path):
    root = _copy(easy_store, tmp_path)
    (root / shard_path(0)).unlink()
    runner = CliRunner()
    model = str(tiny_run / "best.pt")
    evaluate = ["evaluate", model, "--store", str(root), "--split", "all", "--workers", "0", "--out"]
    evaluated = runner.invoke(main, [*evaluate, str(tmp_path / "e")])
    assert evaluated.exit_code == 1 and "images/c/0/0/0/0: file not found" in evaluated.output
    predicted = runner.invoke(main, ["predict", model, "--store", str(root), "-o", str(tmp_path / "p.csv")])
    assert predicted.exit_code == 1 and "images/c/0/0/0/0: file not found" in predicted.output
    with pytest.raises(DamagedStoreError, match="images/c/0/0/0/0"):
        cross_validate(tiny_config(tmp_path / "exp", store=str(root)), 2)
    skipped = runner.invoke(main, [*evaluate, str(tmp_path / "e2"), "--skip-damaged"])
    assert skipped.exit_code == 0, skipped.output
    scored = pd.read_parquet(tmp_path / "e2" / "predictions.parquet")
    assert not scored["slot"].between(0, 31).any() and len(scored) > 0


def test_a_run_folder_is_never_a_users_folder(easy_store, tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("mine")
    runner = CliRunner()
    args = ["train", str(easy_store), "--out", str(folder), *TINY, "--workers", "0", "--max-steps", "1"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1
    assert "is not an ichtrain run folder and is not empty (1 entry: thesis.txt)" in refused.output
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    forced = runner.invoke(main, [*args, "--overwrite-any"])
    assert forced.exit_code == 0, forced.output
    again = runner.invoke(main, args)  # now a run folder: written again, as before
    assert again.exit_code == 0, again.output


def test_run_folders_record_paths_relative_to_themselves(tiny_run, easy_store):
    config = json.loads((tiny_run / "config.json").read_text())
    assert not Path(config["store"]).is_absolute() and config["out"] == "."
    assert (tiny_run / config["store"]).resolve() == Path(easy_store).resolve()
    points = json.loads((tiny_run / "operating_points.json").read_text())
    assert points["source"] == "val_predictions.parquet"
    for name in ("config.json", "operating_points.json", "metrics.json"):
        assert str(tiny_run.parent) not in (tiny_run / name).read_text(), name
