from __future__ import annotations

import json

import pandas as pd
from click.testing import CliRunner

from ichprep.cli import main
from ichprep.storage.store import MANIFEST, shard_path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("synth", "scan", "convert", "verify", "info", "show"):
        assert command in result.output


def test_synth_scan_convert_verify(tmp_path):
    data = tmp_path / "data"
    result = invoke("synth", data, "--studies", 2, "--seed", 5)
    assert result.exit_code == 0, result.output
    assert "quirk truncated_pixels: 1" in result.output
    dicoms, labels = data / "stage_2_train", data / "stage_2_train.csv"

    result = invoke("scan", dicoms, "--labels", labels, "-o", tmp_path / "slices.parquet", "--workers", 1)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "slices.parquet")
    assert f"scanned {len(table)} files" in result.output

    store = tmp_path / "cache.zarr"
    manifest_copy = tmp_path / "manifests" / "demo.json"
    result = invoke(
        "convert",
        dicoms,
        "--labels",
        labels,
        "-o",
        store,
        "--scan",
        tmp_path / "slices.parquet",
        "--size",
        64,
        "--window",
        "brain",
        "--window",
        "stroke:32:8",
        "--shard-slices",
        8,
        "--workers",
        1,
        "--manifest-out",
        manifest_copy,
    )
    assert result.exit_code == 0, result.output
    assert "truncated: 1" in result.output and "slices/s" in result.output and "x the source DICOMs" in result.output
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest_copy.read_text() == (store / MANIFEST).read_text()
    assert [w["name"] for w in manifest["spec"]["windows"]] == ["brain", "stroke"]

    assert invoke("verify", store, "--manifest", manifest_copy).exit_code == 0
    result = invoke("info", store)
    assert result.exit_code == 0 and "stroke" in result.output and "64 x 64" in result.output
    details = json.loads(invoke("info", store, "--json").output)
    assert details["counts"]["slices"] == manifest["counts"]["slices"]
    result = invoke("show", store, "--slot", 0, "-o", tmp_path / "montage.png")
    assert result.exit_code == 0 and (tmp_path / "montage.png").stat().st_size > 1000
    assert invoke("show", store, "--index", 0, "-o", tmp_path / "montage2.png").exit_code == 0  # the older name
    result = invoke("show", store, "-o", tmp_path / "montage.png")
    assert result.exit_code != 0 and "exactly one of --study UID or --slot SLOT" in result.output
    result = invoke("show", store, "--study", "1.2.3", "-o", tmp_path / "montage.png")
    assert result.exit_code != 0 and "no study '1.2.3'" in result.output
    (store / shard_path(0)).unlink()
    result = invoke("verify", store)
    assert result.exit_code == 1
    assert f"missing    {shard_path(0)}" in result.output


def test_bad_options_fail_with_clear_messages(tmp_path, synth_dataset):
    dicoms = synth_dataset / "stage_2_train"
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--window", "lung")
    assert result.exit_code != 0 and "unknown window 'lung'; choose one of brain, subdural, soft, bone" in result.output
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--workers", 1, "--scheduler", "tcp://x:1")
    assert result.exit_code != 0 and "not both" in result.output
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--compressor", "gzip")
    assert result.exit_code != 0 and "'zstd', 'blosc-lz4'" in result.output
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("ID,Label\nID_12_any,1\nID_12_lung,0\n")
    result = invoke("scan", dicoms, "--labels", bad_csv, "-o", tmp_path / "x.parquet", "--workers", 1)
    assert result.exit_code != 0 and "malformed ID at line 3" in result.output


def test_convert_refuses_a_table_that_is_not_a_scan(tmp_path, synth_dataset):
    bogus = tmp_path / "bogus.parquet"
    pd.DataFrame({"image_id": ["x"], "ok": [True]}).to_parquet(bogus)
    result = invoke("convert", synth_dataset / "stage_2_train", "-o", tmp_path / "s.zarr", "--scan", bogus)
    assert result.exit_code != 0 and "is not an `ichprep scan` table" in result.output
