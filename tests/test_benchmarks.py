"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs and writes sane JSON.

Numbers are never asserted here (timings depend on the machine and its load); only that every section
is there, figures are positive and finite, and targets carry a verdict or n/a.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Targets" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_sections_present(quick_results):
    for key in ("meta", "dataset", "conversion", "size", "loader", "train", "profile", "ratios", "targets"):
        assert key in quick_results, key
    meta = quick_results["meta"]
    assert meta["quick"] is True and meta["cpu_count"] >= 1 and meta["versions"]["zarr"]


def test_conversion_figures_positive(quick_results):
    conv = quick_results["conversion"]
    for key in ("floor_decode", "baseline_png", "ichprep_in_process", "ichprep_shard_path",
                "prototype_direct_shard_write", "ichprep_1_worker", "ichprep_2_workers",
                "prototype_malloc_fix_1_worker", "prototype_malloc_fix_2_workers"):
        fig = conv[key]
        assert _positive(fig["slices_per_s"]) and _positive(fig["ms_per_slice"]), key
        assert len(fig["wall_s"]) == fig["repeats"] == 1
    assert _positive(conv["scan"]["files_per_s"])
    assert conv["prototype_direct_shard_write"]["identical_to_zarr"] is True
    for name, value in conv["ratios"].items():
        assert _positive(value), name


def test_size_figures(quick_results):
    size = quick_results["size"]
    assert size["slices"] > 0 and size["store_shard_files"] >= 1
    for key in ("source_bytes_per_slice", "png_bytes_per_slice", "store_bytes_per_slice"):
        assert _positive(size[key]), key
    assert 0 < size["ratios"]["store_vs_source"] < 1


def test_loader_and_train_figures(quick_results):
    loader = quick_results["loader"]
    for key in ("store", "dicom", "dicom_reference", "png", "store_zarr_batched_prototype", "store_direct_prototype"):
        for mode in ("warm", "cold"):
            assert _positive(loader[key][mode]["slices_per_s"]), (key, mode)
    for mode in ("warm", "cold"):
        assert _positive(loader["store_dataloader"][mode]["slices_per_s"]), mode
    assert len(loader["io_probe"]) == 3
    assert loader["store_direct_prototype"]["identical_to_zarr"] is True
    train = quick_results["train"]
    assert _positive(train["images_per_s"]) and len(train["step_s"]) >= 1
    assert _positive(quick_results["ratios"]["loader_vs_train"])


def test_profile_and_targets(quick_results):
    profile = quick_results["profile"]
    for key in ("convert_shard", "store_loader_epoch"):
        assert profile[key]["by_tottime"], key
    assert all(_positive(v) for v in profile["stages"]["ms_per_slice"].values())
    targets = quick_results["targets"]
    assert len(targets) >= 10
    for t in targets:
        assert t["met"] in (True, False, None), t
        assert (t["met"] is None) == (t["measured"] is None), t
