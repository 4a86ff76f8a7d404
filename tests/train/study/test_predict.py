"""ichtrain.study.submit: Kaggle submissions from a store or DICOMs, any raised to the subtypes, clipped."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from ichprep.reading.labels import LABELS
from ichprep.storage.store import open_store
from ichtrain.checkpoint import load_checkpoint
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
    assert labels.min() == pytest.approx(1e-6)
    assert labels.max() == pytest.approx(1 - 1e-6)


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
