"""benchmarks.driver_bench: at 20,000 simulated slices on 1 worker, the simulation, the store it writes
and the stages it reports. No timing is asserted (the figures depend on the machine and its load)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from benchmarks import driver_bench as bench
from ichprep.reading.labels import LABELS
from ichprep.reading.scan import OK, SCAN_DTYPES
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, REJECTED, SLICES, STUDIES

SLICES_N = 20_000


@pytest.fixture(scope="module")
def sim() -> bench.Simulated:
    return bench.simulate(slices=SLICES_N, seed=0)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One benchmark run, through its command-line entry point: (report, work folder)."""
    work = tmp_path_factory.mktemp("driver-bench")
    report = bench.main(["--slices", str(SLICES_N), "--workers", "1", "--work", str(work)])
    return report, work


# ---------------------------------------------------------------- the simulated archive


def test_simulated_table_has_the_scan_schema(sim):
    assert dict(sim.table.dtypes.astype(str)) == {k: str(pd.Series(dtype=v).dtype) for k, v in SCAN_DTYPES.items()}
    ok = sim.table[sim.table["status"] == OK]
    assert ok["image_id"].str.fullmatch(r"ID_[0-9a-f]{9}").all()
    assert sim.table["image_id"].is_unique
    assert (ok["sop_uid"] == ok["image_id"]).all()
    assert sim.table["path"].is_monotonic_increasing  # as the scan's batches arrive: by path
    assert (ok[["rows", "cols"]] == 512).all().all()
    assert (ok["slope"] == 1).all()
    assert (ok["intercept"] == -1024).all()
    assert ok["file_size"].between(524_988, 525_788).all()


def test_simulated_archive_matches_rsna_figures(sim):
    expected = bench.expected_of(sim)
    assert expected.n_files == SLICES_N
    assert expected.n_rejected == round(SLICES_N * bench.BAD_FRACTION)
    assert expected.n_studies == round(SLICES_N * bench.RSNA_STUDIES / bench.RSNA_SLICES)
    assert expected.n_patients == round(expected.n_studies * bench.RSNA_PATIENTS / bench.RSNA_STUDIES)
    assert abs(expected.study_sizes["mean"] - bench.RSNA_SLICES / bench.RSNA_STUDIES) < 0.1
    ok = sim.table[sim.table["status"] == OK]
    assert ok.groupby("patient_id")["study_uid"].nunique().between(1, 3).all()
    assert (ok.groupby("study_uid")["series_uid"].nunique() == 1).all()


def test_simulated_labels(sim):
    subtypes, positive = sim.labels[:, :5], sim.labels[:, 5]
    assert (subtypes.max(axis=1) == positive).all()  # a subtype implies any, and any has a subtype
    rates = dict(zip(LABELS, sim.labels.mean(axis=0)))
    wanted = {**bench.SUBTYPE_RATES, "any": bench.ANY_RATE}
    for name in LABELS:  # binomial: 5 standard errors at 20,000 slices
        assert abs(rates[name] - wanted[name]) < 5 * math.sqrt(wanted[name] / SLICES_N), name


def test_simulation_is_deterministic_by_seed():
    a, b = bench.simulate(slices=2_000, seed=3), bench.simulate(slices=2_000, seed=3)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert np.array_equal(a.labels, b.labels)
    assert not bench.simulate(slices=2_000, seed=4).table["image_id"].equals(a.table["image_id"])


# ---------------------------------------------------------------- the store convert() wrote


def test_slices_hold_every_simulated_ok_row(ran):
    report, work = ran
    raw = pd.read_parquet(work / "raw_scan.parquet")
    slices = pd.read_parquet(work / "cache.zarr" / SLICES)
    assert len(slices) == report.expected.n_ok
    assert set(slices["image_id"]) == set(raw.loc[raw["status"] == OK, "image_id"])
    assert slices["ok"].all()
    assert slices["any"].notna().all()


def test_studies_and_rejected(ran):
    report, work = ran
    studies = pd.read_parquet(work / "cache.zarr" / STUDIES)
    assert len(studies) == report.expected.n_studies
    assert studies["n_slices"].sum() == report.expected.n_ok
    rejected = pd.read_csv(work / "cache.zarr" / REJECTED)
    assert len(rejected) == report.expected.n_rejected
    assert set(rejected["stage"]) == {"header"}
    assert set(rejected["reason"]) == {"truncated"}


def test_manifest_counts_and_verify(ran):
    report, work = ran
    store = work / "cache.zarr"
    manifest = json.loads((store / MANIFEST).read_text())
    e = report.expected
    assert manifest["counts"]["slices"] == manifest["counts"]["slices_ok"] == e.n_ok
    assert manifest["counts"]["header_failures"] == e.n_rejected
    assert manifest["counts"]["studies"] == e.n_studies
    assert manifest["counts"]["patients"] == e.n_patients
    assert manifest["counts"]["shards"] == report.n_shards == -(-e.n_ok // 64)
    assert manifest["source"]["n_files"] == e.n_files
    assert not [name for name in manifest["files"] if name.startswith("images/c/")]  # no-op shards: no file
    assert not list((store / "images").rglob("c/*"))
    assert verify_store(store).ok


# ---------------------------------------------------------------- what it reports


def test_every_stage_reported_with_positive_figures(ran):
    report, _ = ran
    names = [s.name for s in report.stages]
    for prefix in (
        "scan: read_labels",
        "scan: concat",
        "scan: attach_labels",
        "scan: flag_duplicates",
        "scan: order_slices",
        "scan: summarize",
        "scan: write_scan",
        "convert: read_scan",
        "convert: call → first task submitted",
        "convert: task submission",
        "convert: gathering results",
        "convert: slices/studies/rejected tables",
        "convert: manifest",
        "convert: lock release",
    ):
        assert sum(n.startswith(prefix) for n in names) == 1, prefix
    for stage in report.stages:
        assert stage.wall_s > 0, stage
        assert stage.peak_rss_mib > 0, stage
        assert stage.high_water_mib > 0, stage
    assert report.total_s == pytest.approx(sum(s.wall_s for s in report.stages if s.counted))
    assert report.peak_rss_mib >= max(s.high_water_mib for s in report.stages)


def test_counts_reported(ran):
    report, work = ran
    assert report.n_tasks == -(-report.n_shards // max(1, min(8, report.n_shards // 4)))  # shards_per_task, 1 worker
    assert report.scan_summary["n_ok"] == report.scan_summary["n_labelled"] == report.expected.n_ok
    assert report.scan_summary["rejected"] == {"truncated": report.expected.n_rejected}
    with open(work / "stage_2_train.csv") as f:
        assert sum(1 for _ in f) - 1 == report.expected.label_rows
    assert report.convert_summary["n_slices"] == report.expected.n_ok


def test_table_and_verdict(ran):
    report, _ = ran
    text = bench.table(report)
    assert all(s.name in text for s in report.stages)
    assert "total (driver)" in text
    assert bench.verdict(report).startswith("Verdict: driver ")
