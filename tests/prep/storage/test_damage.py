"""A damaged store is noticed by every reader, named with its fix, and `--overwrite` replaces only a store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichprep.cli import main
from ichprep.convert import convert
from ichprep.errors import DamagedShardError, DamagedStoreError, StoreError, StoreExistsError
from ichprep.spec import PreprocessSpec
from ichprep.storage.export import export_store
from ichprep.storage.shardcodec import shard_path
from ichprep.storage.store import open_reader, open_store

SPEC = PreprocessSpec(size=64, shard_slices=16)


@pytest.fixture(scope="module")
def good(synth_dataset6, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "cache.zarr"
    convert(synth_dataset6 / "stage_2_train", root, SPEC, labels_csv=synth_dataset6 / "stage_2_train.csv")
    return root


def _copy(good: Path, tmp_path: Path, name: str = "copy.zarr") -> Path:
    return Path(shutil.copytree(good, tmp_path / name))


def _studies_in(root: Path, start: int, stop: int) -> list[str]:
    studies = pd.read_parquet(root / "studies.parquet")
    return studies.loc[(studies["start"] < stop) & (studies["stop"] > start), "study_uid"].astype(str).tolist()


def _flip(path: Path, at: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_missing_shard_stops_every_reader_naming_it_its_slots_studies_and_the_fix(good, tmp_path):
    root = _copy(good, tmp_path)
    (root / shard_path(1)).unlink()
    with pytest.raises(DamagedStoreError) as raised:
        open_store(root)
    message = str(raised.value)
    assert "images/c/1/0/0/0: file not found; slots 16-31" in message
    for uid in _studies_in(root, 16, 32):
        assert uid[:30] in message
    assert f"ichprep verify {root}" in message and "--skip-damaged" in message
    with pytest.raises(DamagedShardError, match=r"shard 1, slots 16-31, studies .* is damaged: the file is missing"):
        open_reader(root)[10:20]  # the direct reader knows the manifest's shards too: never the fill value
    with pytest.raises(DamagedStoreError):
        export_store(root, tmp_path / "exported.zarr")


def test_skip_damaged_leaves_the_damaged_slots_out_and_says_which(good, tmp_path, caplog):
    root = _copy(good, tmp_path)
    (root / shard_path(1)).unlink()
    store = open_store(root, skip_damaged=True)
    ok, before = store.slices["ok"].to_numpy(bool), open_store(good).slices["ok"].to_numpy(bool)
    assert not ok[16:32].any() and (ok[:16] == before[:16]).all() and (ok[32:] == before[32:]).all()
    assert (store.slices["error"].iloc[16:32] == "damaged shard (--skip-damaged)").all()
    assert "--skip-damaged leaves out 1 shard file(s) and their 16 ok slots" in caplog.text
    assert "images/c/1/0/0/0: file not found" in caplog.text


def test_a_shard_that_does_not_decode_is_named_and_found_by_hash_when_skipping(good, tmp_path):
    root = _copy(good, tmp_path)
    shard = root / shard_path(0)
    index = open_reader(good)  # find a frame to break: the first one's bytes
    assert index[0:1].any()
    _flip(shard, 8)  # inside slot 0's zstd frame header and data: zstd refuses it
    store = open_store(root)  # same size: the cheap check passes
    with pytest.raises(DamagedShardError) as raised:
        open_reader(root)[0:16]
    message = str(raised.value)
    assert "shard 0, slots 0-15" in message and "does not decode" in message and f"ichprep verify {root}" in message
    assert _studies_in(root, 0, 16)[0] in message
    skipping = open_store(root, skip_damaged=True)  # hashes every shard: the altered one is left out
    assert not skipping.slices["ok"].iloc[:16].any()
    assert skipping.slices["ok"].iloc[16:].equals(store.slices["ok"].iloc[16:])


def test_a_cut_shard_index_is_named(good, tmp_path):
    root = _copy(good, tmp_path)
    shard = root / shard_path(2)
    _flip(shard, shard.stat().st_size - 20, 8)
    with pytest.raises(DamagedShardError, match="shard 2, slots 32-47.*shard index is damaged"):
        open_reader(root)[32:48]


def test_info_checks_presence_and_size_and_exits_non_zero(good, tmp_path):
    runner = CliRunner()
    clean = runner.invoke(main, ["info", str(good)])
    assert clean.exit_code == 0, clean.output
    assert "files present, each of its manifest size" in clean.output
    root = _copy(good, tmp_path)
    (root / shard_path(1)).unlink()
    cut = root / shard_path(3)
    cut.write_bytes(cut.read_bytes()[:100])
    result = runner.invoke(main, ["info", str(root)])
    assert result.exit_code == 1
    assert "missing    images/c/1/0/0/0: file not found" in result.output
    assert "size       images/c/3/0/0/0: differs from the manifest (size 100" in result.output
    assert "2 file(s) of" in result.output and "ichprep verify" in result.output
    as_json = runner.invoke(main, ["info", str(root), "--json"])
    assert as_json.exit_code == 1 and '"problems"' in as_json.output


def test_info_names_every_table_that_does_not_read(good, tmp_path):
    root = _copy(good, tmp_path)
    for name in ("slices.parquet", "series.parquet"):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["info", str(root)])
    assert result.exit_code == 1
    for name in ("slices.parquet", "series.parquet"):
        assert f"table      {name}: does not read (" in result.output
    assert "Parquet magic bytes not found" in result.output
    with pytest.raises(StoreError, match=r"slices\.parquet cannot be read \(.*\); run `ichprep verify"):
        open_store(root)


def test_overwrite_replaces_a_store_and_refuses_a_users_folder(synth_dataset, tmp_path):
    source = synth_dataset / "stage_2_train"
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    runner = CliRunner()
    args = ["convert", str(source), "-o", str(folder), "--size", "64", "--shard-slices", "16"]
    refused = runner.invoke(main, [*args, "--overwrite"])
    assert refused.exit_code == 1
    assert "is not an ichprep store and is not empty (1 entry: thesis.txt)" in refused.output
    assert "--overwrite-any" in refused.output
    assert (folder / "thesis.txt").read_text() == "four years of work" and not (folder / ".ichprep").exists()
    store = tmp_path / "store.zarr"
    assert runner.invoke(main, ["convert", str(source), "-o", str(store), "--size", "64"]).exit_code == 0
    replaced = runner.invoke(main, ["convert", str(source), "-o", str(store), "--size", "32", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output  # a store made otherwise: --overwrite replaces it
    forced = runner.invoke(main, [*args, "--overwrite-any"])
    assert forced.exit_code == 0, forced.output
    assert not (folder / "thesis.txt").exists() and (folder / "manifest.json").exists()


def test_export_replaces_only_a_store(good, tmp_path):
    dest = tmp_path / "notes"
    dest.mkdir()
    (dest / "notes.md").write_text("mine")
    with pytest.raises(StoreExistsError, match=r"not an ichprep store .*1 entry: notes\.md"):
        export_store(good, dest, overwrite=True)
    assert (dest / "notes.md").exists()
    export_store(good, tmp_path / "copy.zarr")
    with pytest.raises(StoreExistsError, match="holds a store; use --overwrite"):
        export_store(good, tmp_path / "copy.zarr")
    export_store(good, tmp_path / "copy.zarr", overwrite=True)
    export_store(good, dest, overwrite_any=True)
    assert not (dest / "notes.md").exists() and open_store(dest).slices.equals(open_store(good).slices)


def test_a_duplicate_names_the_kept_file_relative_to_the_source(synth_dataset, tmp_path):
    folder = Path(shutil.copytree(synth_dataset / "stage_2_train", tmp_path / "dicoms"))
    original = sorted(folder.glob("ID_*.dcm"))[4]
    shutil.copy(original, folder / "zz_copy.dcm")
    convert(folder, tmp_path / "s.zarr", SPEC)
    rejected = pd.read_csv(tmp_path / "s.zarr" / "rejected.csv", dtype=str).set_index("path")
    assert rejected.loc["zz_copy.dcm", "reason"] == "duplicate"
    assert rejected.loc["zz_copy.dcm", "detail"].endswith(f"as {original.name} (kept)")
    for name in ("rejected.csv", "manifest.json", "zarr.json"):
        assert str(tmp_path) not in (tmp_path / "s.zarr" / name).read_text(), name
    for name in ("slices.parquet", "series.parquet", "studies.parquet"):
        table = pd.read_parquet(tmp_path / "s.zarr" / name)
        text = json.dumps(table.astype(str).to_numpy().tolist())
        assert str(tmp_path) not in text, name
    assert np.isin(["zz_copy.dcm"], rejected.index).all()
