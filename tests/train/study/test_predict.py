from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichprep.reading.labels import LABELS
from ichprep.storage.store import open_store
from ichtrain.checkpoint import load_checkpoint
from ichtrain.cli import main
from ichtrain.study.submit import predict_dicoms, predict_store


def _check_kaggle(frame: pd.DataFrame, image_ids: list[str]) -> None:
    assert list(frame.columns) == ["ID", "Label"]
    assert len(frame) == 6 * len(image_ids)
    expected = [f"{i}_{name}" for i in image_ids for name in LABELS]
    assert frame["ID"].tolist() == expected
    assert frame["Label"].between(0, 1).all()


def test_predict_store_writes_kaggle_format(tiny_run, easy_store, tmp_path):
    out = tmp_path / "submission.csv"
    predict_store(tiny_run / "best.pt", easy_store, out, workers=0)
    frame = pd.read_csv(out)
    slices = open_store(easy_store).slices
    _check_kaggle(frame, slices["image_id"].tolist())
    # The slice whose pixels did not decode gets the training prevalence, not a guess from zeros.
    state = load_checkpoint(tiny_run / "best.pt")
    bad = slices.loc[~slices["ok"], "image_id"].iloc[0]
    got = frame.set_index("ID").loc[[f"{bad}_{n}" for n in LABELS], "Label"].to_numpy()
    np.testing.assert_allclose(got, state["train_prevalence"], atol=1e-6)


def test_any_is_raised_to_the_largest_subtype_unless_raw(tiny_run, easy_store, tmp_path):
    tables = {}
    for raw in (False, True):
        predict_store(
            tiny_run / "best.pt", easy_store, tmp_path / f"{raw}.csv", workers=0, any_at_least_subtypes=not raw
        )
        frame = pd.read_csv(tmp_path / f"{raw}.csv")
        tables[raw] = frame["Label"].to_numpy().reshape(-1, len(LABELS))
    subtypes = tables[False][:, :-1].max(axis=1)
    assert (tables[False][:, -1] >= subtypes - 1e-6).all()
    np.testing.assert_allclose(tables[False][:, :-1], tables[True][:, :-1])
    np.testing.assert_allclose(
        tables[False][:, -1], np.maximum(tables[True][:, -1], tables[True][:, :-1].max(axis=1)), atol=1e-6
    )


def test_predict_dicoms_equals_predict_store_and_lists_unreadable(tiny_run, easy_store, tmp_path):
    dicoms = easy_store.parent / "data" / "stage_2_train"
    folder = tmp_path / "dicoms"
    shutil.copytree(dicoms, folder)
    (folder / "ID_garbage00.dcm").write_bytes(b"\x00" * 300)
    from_dicoms = predict_dicoms(tiny_run / "best.pt", folder, tmp_path / "a.csv", workers=0)
    from_store = pd.read_csv(tmp_path / "a.csv")
    predict_store(tiny_run / "best.pt", easy_store, tmp_path / "b.csv", workers=0)
    store_frame = pd.read_csv(tmp_path / "b.csv")
    # Same preprocessing path: identical probabilities for every image of the store.
    assert from_store.iloc[: len(store_frame)].equals(store_frame)
    assert from_dicoms["ID"].iloc[-6:].tolist() == [f"ID_garbage00_{n}" for n in LABELS]


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
    assert "weighted log loss" in result.output and "any" in result.output
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
    assert result.exit_code != 0 and "exactly one of --store STORE or --dicom-dir SOURCE" in result.output


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


def test_submission_probabilities_are_clipped(tiny_run, easy_store, tmp_path, monkeypatch):
    """A probability of 3e-7 must not be written as 0 (or 1 - 3e-7 as 1): log loss would be infinite."""
    import ichtrain.study.submit as submit_module

    real = submit_module.infer_slots

    def extreme(*args, **kwargs):
        out = real(*args, **kwargs)
        logits = np.where(np.arange(out.logits.size).reshape(out.logits.shape) % 2, -15.0, 15.0)  # p = 3e-7, 1 - 3e-7
        return out._replace(logits=logits.astype(np.float32))

    monkeypatch.setattr(submit_module, "infer_slots", extreme)
    predict_store(tiny_run / "best.pt", easy_store, tmp_path / "sub.csv", workers=0, any_at_least_subtypes=False)
    labels = pd.read_csv(tmp_path / "sub.csv")["Label"]
    assert labels.min() == pytest.approx(1e-6) and labels.max() == pytest.approx(1 - 1e-6)


def test_subtypes_only_checkpoint_is_refused_unless_allowed(easy_store, tiny_config, tmp_path, caplog):
    from ichtrain.errors import ConfigError
    from ichtrain.train import train

    out = tmp_path / "subtypes"
    train(tiny_config(out, task="subtypes", max_steps=1))
    with pytest.raises(ConfigError, match="never learned to reject normal slices.*--allow-subtypes-only"):
        predict_store(out / "best.pt", easy_store, tmp_path / "a.csv", workers=0)
    with caplog.at_level("WARNING", logger="ichtrain.study.submit"):
        frame = predict_store(out / "best.pt", easy_store, tmp_path / "b.csv", workers=0, allow_subtypes_only=True)
    assert len(frame) == 6 * len(open_store(easy_store).slices)
    assert any("--allow-subtypes-only" in r.getMessage() for r in caplog.records)
