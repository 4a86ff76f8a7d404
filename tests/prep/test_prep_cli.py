"""ichprep.cli: every command through the command line, its options, messages and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner
from conftest import ichprep_command as _ichprep

from ichprep.cli import main
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, open_store, shard_path
from ichprep.synth import KAGGLE_TOP as TOP


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
    assert "truncated: 1" in result.output
    assert "slices/s" in result.output
    assert "x the source files" in result.output
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest_copy.read_text() == (store / MANIFEST).read_text()
    assert [w["name"] for w in manifest["spec"]["windows"]] == ["brain", "stroke"]

    assert invoke("verify", store, "--manifest", manifest_copy).exit_code == 0
    result = invoke("info", store)
    assert result.exit_code == 0
    assert "stroke" in result.output
    assert "64 x 64" in result.output
    details = json.loads(invoke("info", store, "--json").output)
    assert details["counts"]["slices"] == manifest["counts"]["slices"]
    result = invoke("show", store, "--slot", 0, "-o", tmp_path / "montage.png")
    assert result.exit_code == 0
    assert (tmp_path / "montage.png").stat().st_size > 1000
    assert invoke("show", store, "--index", 0, "-o", tmp_path / "montage2.png").exit_code == 0  # the older name
    result = invoke("show", store, "-o", tmp_path / "montage.png")
    assert result.exit_code != 0
    assert "exactly one of --study UID or --slot SLOT" in result.output
    result = invoke("show", store, "--study", "1.2.3", "-o", tmp_path / "montage.png")
    assert result.exit_code != 0
    assert "no study '1.2.3'" in result.output
    (store / shard_path(0)).unlink()
    result = invoke("verify", store)
    assert result.exit_code == 1
    assert f"missing    {shard_path(0)}" in result.output


def test_bad_options_fail_with_clear_messages(tmp_path, synth_dataset):
    dicoms = synth_dataset / "stage_2_train"
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--window", "lung")
    assert result.exit_code != 0
    assert "unknown window 'lung'; choose one of brain, subdural, soft, bone" in result.output
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--workers", 1, "--scheduler", "tcp://x:1")
    assert result.exit_code != 0
    assert "not both" in result.output
    result = invoke("convert", dicoms, "-o", tmp_path / "s.zarr", "--compressor", "gzip")
    assert result.exit_code != 0
    assert "'zstd', 'blosc-lz4'" in result.output
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("ID,Label\nID_12_any,1\nID_12_lung,0\n")
    result = invoke("scan", dicoms, "--labels", bad_csv, "-o", tmp_path / "x.parquet", "--workers", 1)
    assert result.exit_code != 0
    assert "malformed ID at line 3" in result.output


def test_convert_refuses_a_table_that_is_not_a_scan(tmp_path, synth_dataset):
    bogus = tmp_path / "bogus.parquet"
    pd.DataFrame({"image_id": ["x"], "ok": [True]}).to_parquet(bogus)
    result = invoke("convert", synth_dataset / "stage_2_train", "-o", tmp_path / "s.zarr", "--scan", bogus)
    assert result.exit_code != 0
    assert "is not an `ichprep scan` table" in result.output


def test_cli_synth_zip(tmp_path):
    out = tmp_path / "rsna.zip"
    args = ["synth", out, "--zip", "--studies", 2, "--seed", 0, "--test-studies", 1, "--zip-method", "stored"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"to {out}::{TOP}/stage_2_train\nlabels: {out}::{TOP}/stage_2_train.csv\n" in result.output
    assert (
        f"in {out}::{TOP}/stage_2_test\nsample submission: {out}::{TOP}/stage_2_sample_submission.csv" in result.output
    )
    assert f"zip: {out} (" in result.output
    assert "stored" in result.output
    with zipfile.ZipFile(out) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}
        assert f"{TOP}/stage_2_sample_submission.csv" in zf.namelist()
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code != 0
    assert "already exists" in result.output


def test_cli_says_completed_with_rejections(hostile, tmp_path):
    folder, csv, expected, _ = hostile
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(folder),
            "--labels",
            str(csv),
            "-o",
            str(tmp_path / "c.zarr"),
            "--workers",
            "1",
            "--size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"completed with {len(expected) + 1} rejected" in result.output


def test_subset_of_studies_is_resharded_with_its_own_manifest(store6, tmp_path):
    source = open_store(store6)
    wanted = list(source.studies["study_uid"].iloc[[4, 1]])  # order in the file does not matter
    listing = tmp_path / "studies.txt"
    listing.write_text("# studies for a collaborator\n" + "\n".join(wanted) + "\n\n")
    dest = tmp_path / "subset.zarr"
    result = CliRunner().invoke(
        main, ["export", str(store6), str(dest), "--studies", str(listing), "--shard-slices", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "ichprep verify" in result.output
    assert verify_store(dest).ok
    copy = open_store(dest)
    assert set(copy.studies["study_uid"]) == set(wanted)
    assert copy.images.shards[0] == 8
    for row in copy.studies.itertuples():
        src_row = source.studies.set_index("study_uid").loc[row.study_uid]
        np.testing.assert_array_equal(copy.images[row.start : row.stop], source.images[src_row.start : src_row.stop])
        assert (
            copy.slices.iloc[row.start : row.stop]["image_id"].to_numpy()
            == source.slices.iloc[src_row.start : src_row.stop]["image_id"].to_numpy()
        ).all()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["counts"]["studies"] == 2
    assert len(manifest["source"]["export_of"]) == 64


def test_convert_on_an_external_dask_cluster(synth_dataset6, store6, tmp_path):
    """A `dask scheduler` + 2 `dask worker` processes on 127.0.0.1, joined with --scheduler."""
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [dask, "worker", address, "--nthreads", "1", "--no-dashboard"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        root = tmp_path / "cluster.zarr"
        result = subprocess.run(
            [
                _ichprep(),
                "convert",
                str(synth_dataset6 / "stage_2_train"),
                "--labels",
                str(synth_dataset6 / "stage_2_train.csv"),
                "-o",
                str(root),
                "--shard-slices",
                "16",
                "--scheduler",
                address,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
