"""Study-level evaluation end to end: operating points fixed at validation, applied unchanged to an outside store
with study labels only (readers beside the model), and study scores from predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichprep.convert import convert
from ichprep.reading.studylabels import read_study_labels
from ichprep.spec import PreprocessSpec
from ichprep.synthlayouts import generate_hospital
from ichtrain.cli import main
from ichtrain.files import OPERATING_POINTS, VAL_PREDICTIONS
from ichtrain.study.external import (
    DEFAULT_TARGETS,
    STUDY_METRICS,
    STUDY_ROC_PLOT,
    WORST_STUDIES_PLOT,
    reference_points,
)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Four CQ500-style studies with three readers, converted like the easy store (64², 32-slice shards)."""
    out = tmp_path_factory.mktemp("outside")
    archive = generate_hospital(out / "archive", 4, seed=3, size=128, lesion_rate=0.9)
    root = out / "outside.zarr"
    convert(
        archive.out_dir,
        root,
        PreprocessSpec(size=64, shard_slices=32),
        study_labels=read_study_labels(archive.reads_csv),
    )
    return root


def test_a_run_stores_its_study_level_operating_points_at_validation(tiny_run):
    stored = json.loads((tiny_run / OPERATING_POINTS).read_text())
    again = reference_points(tiny_run / "best.pt")
    assert stored["thresholds"] == again.thresholds
    assert stored["source"] == VAL_PREDICTIONS  # the table beside it, by name: no local path
    assert set(stored["thresholds"]["any"]) == {"sens>=0.95", "youden"}


def test_an_outside_store_with_study_labels_only_is_scored_by_study_at_the_validation_thresholds(
    tiny_run, outside, tmp_path
):
    out = tmp_path / "ext"
    result = CliRunner().invoke(
        main,
        ["evaluate", str(tiny_run / "best.pt"), "--store", str(outside), "--out", str(out), "--workers", "0"]
        + ["--operating-point", "spec=0.9"],
    )
    assert result.exit_code == 0, result.output
    assert "has no slice labels: scored by study only" in result.output
    assert "Readers against the majority of the other readers" in result.output
    table = json.loads((out / STUDY_METRICS).read_text())
    reference = reference_points(tiny_run / "best.pt", targets=DEFAULT_TARGETS + ("spec=0.9",))
    any_points = table["labels"]["any"]["operating_points"]
    assert {name: p["threshold"] for name, p in any_points.items()} == reference.thresholds["any"]
    assert table["labels"]["any"]["n"] == 4
    assert set(table["labels"]["any"]["readers"]) == {"R1", "R2", "R3"}
    assert (out / STUDY_ROC_PLOT).stat().st_size > 10_000
    assert (out / WORST_STUDIES_PLOT).stat().st_size > 10_000
    assert not (out / "predictions.parquet").exists()  # no slice labels: no slice evaluation
    assert json.loads((out / "metrics.json").read_text()) == {"studies": table}


def test_predict_writes_one_score_per_study_and_label_the_max_over_its_slices(tiny_run, outside, tmp_path):
    result = CliRunner().invoke(
        main,
        ["predict", str(tiny_run / "best.pt"), "--store", str(outside), "-o", str(tmp_path / "p.csv")]
        + ["--study-csv", str(tmp_path / "s.csv"), "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    studies = pd.read_csv(tmp_path / "s.csv")
    slices = pd.read_parquet(outside / "slices.parquet")
    assert len(studies) == 6 * slices["study_uid"].nunique()
    rows = pd.read_csv(tmp_path / "p.csv")
    rows[["image_id", "label"]] = rows["ID"].str.rsplit("_", n=1, expand=True)
    per_image = rows.merge(slices[["image_id", "study_uid"]], on="image_id")
    expected = per_image.groupby(["study_uid", "label"])["Label"].max()
    got = studies.set_index(["study_uid", "label"])["probability"]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-6)
