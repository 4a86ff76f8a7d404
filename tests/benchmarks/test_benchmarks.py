"""benchmarks: smoke test of the suite, ``python -m benchmarks --quick`` runs and writes sane JSON.

Numbers are never asserted here (timings depend on the machine and its load); only that every section
is there, figures are positive and finite, and targets carry a verdict or n/a.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Targets" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_sections_present(quick_results):
    for key in ("meta", "dataset", "conversion", "size", "loader", "batches", "train", "profile", "ratios", "targets"):
        assert key in quick_results, key
    meta = quick_results["meta"]
    assert meta["quick"] is True
    assert meta["cpu_count"] >= 1
    assert meta["versions"]["zarr"]


def test_conversion_figures_positive(quick_results):
    conv = quick_results["conversion"]
    for key in (
        "floor_decode",
        "baseline_png",
        "ichprep_in_process",
        "ichprep_shard_path",
        "prototype_direct_shard_write",
        "ichprep_1_worker",
        "ichprep_2_workers",
        "prototype_malloc_fix_1_worker",
        "prototype_malloc_fix_2_workers",
    ):
        fig = conv[key]
        assert _positive(fig["slices_per_s"]), key
        assert _positive(fig["ms_per_slice"]), key
        assert len(fig["wall_s"]) == fig["repeats"] == 1
    assert _positive(conv["scan"]["files_per_s"])
    assert conv["prototype_direct_shard_write"]["identical_to_zarr"] is True
    for name, value in conv["ratios"].items():
        assert _positive(value), name


def test_size_figures(quick_results):
    size = quick_results["size"]
    assert size["slices"] > 0
    assert size["store_shard_files"] >= 1
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
    assert _positive(train["images_per_s"])
    assert len(train["step_s"]) >= 1
    assert _positive(quick_results["ratios"]["loader_vs_train"])


def test_batch_figures(quick_results):
    batches = quick_results["batches"]
    rows = batches["rows"]
    assert {(r["context"], r["batch"], r["where"]) for r in rows} == {
        (c, 32, w) for c in (0, 1) for w in ("in process", "DataLoader, 1 worker")
    }  # --quick: batch 32 only
    for r in rows:
        assert _positive(r["samples_per_s"]), r["contender"]
        assert len(r["wall_s"]) == r["repeats"] == 1, r["contender"]
        assert _positive(r["cpu_ms_per_sample"]), r["contender"]
        assert (r["where"] != "in process") == ("first_batch_s" in r) == ("main_cpu_ms_per_sample" in r)
    former = sum(r["contender"].startswith("former") for r in rows)
    assert former == 4
    assert len(batches["ratios"]) == len(rows) - former
    assert all(_positive(v) for v in batches["ratios"].values())
    assert all(_positive(v) for v in batches["allocation"]["ms"].values())
    mix = batches["buffer_mix"]
    assert [r["buffer_shards"] for r in mix["rows"]] == [4, 23]
    assert all(1 <= r["median_distinct_studies"] <= mix["batch"] for r in mix["rows"])
    assert mix["rows"][0]["median_distinct_studies"] < mix["rows"][1]["median_distinct_studies"]
    assert mix["rows"][1]["decoded_bytes_per_worker"] == 23 * 64 * 3 * 256 * 256


def test_buffer_simulation_is_rsna_like():
    """The simulated table has the RSNA shape the buffer_shards default was chosen on."""
    from benchmarks.batch_bench import emitted_slots, rsna_like

    table = rsna_like(studies=2000, seed=1)
    sizes = np.bincount(table.study)
    assert 24 <= sizes.min()
    assert sizes.max() <= 60
    assert abs(sizes.mean() - 35) < 1.5
    assert abs(table.positive.mean() - 0.14) < 0.02
    bleeding = np.bincount(table.study, weights=table.positive) > 0
    assert abs(bleeding.mean() - 0.41) < 0.04
    assert abs(table.counts[table.positive].sum() / table.counts.sum() - 0.5) < 0.02  # the hybrid plan
    slots = emitted_slots(table.counts, 64, 5, seed=1)
    assert np.array_equal(np.bincount(slots, minlength=len(table.counts)), table.counts)  # every sample once


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


def test_seq_bench_tiny(tmp_path, capsys):
    """Stage-2 speed benchmark at a tiny size: every row present, figures positive, the extrapolation said."""
    import torch

    from benchmarks import seq_bench

    lengths = seq_bench.study_lengths(500, 17_311, seed=3)
    assert lengths.sum() == 17_311
    assert lengths.min() >= 20
    assert lengths.max() <= 60
    out = tmp_path / "seq.json"
    threads = torch.get_num_threads()
    try:  # one thread: never stalled by a core another job holds
        assert (
            seq_bench.main(["--studies", "80", "--dims", "8,24", "--batches", "2", "--threads", "1", "--out", str(out)])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "2 of 3 batches, extrapolated" in printed
    assert "read + standardise" in printed
    section = json.loads(out.read_text())
    assert section["studies"] == 80
    assert section["slots"] == round(80 * 752_803 / 21_744)
    rows = section["rows"]
    assert [(r["dim"], r["contender"]) for r in rows] == [
        (d, c) for d in (8, 24) for c in ("read + standardise", "gru", "transformer", "window")
    ]
    for r in rows:
        assert _positive(r["epoch_s"])
        assert _positive(r["slots_per_s"])
        assert _positive(r["epoch_vs_baseline"])
        assert r["peak_extra_mib"] >= 0
        assert r["extrapolated"] == (r["contender"] != "read + standardise")
    positive = np.asarray(seq_bench.simulate(400, 13_849, 4, seed=1).targets)[:, 5]
    assert abs(positive.mean() - 0.14) < 0.04


def test_archive_bench_quick(tmp_path, capsys):
    """Archive benchmark at --quick: old and new code each from where it should be, every figure positive."""
    from benchmarks import archive_bench

    out = tmp_path / "archive.json"
    archive_bench.main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert "series decisions, large table" in printed
    assert "Note: the old code on the hospital archive writes every file" in printed
    results = json.loads(out.read_text())
    imported = results["meta"]["ichprep_imported_from"]
    assert Path(imported["old"]).is_relative_to(tmp_path / "work" / "base")
    assert Path(imported["new"]).is_relative_to(ROOT)
    figures = results["figures"]
    expected = {
        f"{step}_{layout}_{figure}_{code}"
        for layout in ("kaggle", "hospital")
        for step, figure in (("scan", "files_per_s"), ("convert", "slices_per_s"), ("convert", "input_files_per_s"))
        for code in ("old", "new")
    }
    expected |= {f"decisions_{t}_{f}" for t in ("hospital", "large") for f in ("s", "share_of_scan")}
    expected |= {f"slab_{s}_{f}" for s in ("auto", "off") for f in ("s", "input_files_per_s")}
    assert set(figures) == expected | {"slab_auto_vs_off_time"}
    for name, value in figures.items():
        assert _positive(value), name
    for layout in ("kaggle", "hospital"):
        for section in ("scan", "convert"):
            for code in ("old", "new"):
                assert len(results[section][layout][code]["wall_s"]) == 1, (section, layout, code)
            assert _positive(results[section][layout]["new_vs_old"]), (section, layout)
    assert results["slab"]["auto"]["last_run"]["n_slabs"] > 0  # the thin-only studies were slabbed
    assert results["slab"]["off"]["last_run"]["n_slabs"] == 0
    assert results["decisions"]["large"]["rows"] >= archive_bench.LARGE_ROWS
    assert [t["met"] in (True, False) for t in results["targets"]] == [True] * 3


def test_study_bench_times_the_table_and_every_rule(capsys):
    from benchmarks.study_bench import main as study_main
    from ichtrain.config import STUDY_RULES

    result = study_main(["--studies", "300", "--slices", "3000", "--resamples", "50"])
    assert result["external_table_s"] > 0
    assert set(result["study_scores_s"]) == set(STUDY_RULES)
    assert "external_table, 300 studies" in capsys.readouterr().out


def test_limits_bench_quick(tmp_path, capsys):
    """Limits benchmark at --quick: old and new code timed on one zip; the hostile copy rejected in bounded memory."""
    from benchmarks import limits_bench

    out = tmp_path / "limits.json"
    limits_bench.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| + 2 GiB bomb + lying member |" in printed
    results = json.loads(out.read_text())
    for op in ("scan", "convert"):
        assert _positive(results[op]["new_over_old"]), op
    hostile = results["hostile"]
    assert hostile["rejected"] == {"size_mismatch": 1, "too_large": 1}
    assert hostile["hostile_peak_rss_mib"] < hostile["ordinary_peak_rss_mib"] + 100  # never the 2 GiB member
