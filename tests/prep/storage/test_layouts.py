"""ichprep.storage.shardcodec and store: every valid Zarr v3 rewrite of ``images`` reads as zarr-python reads it.

A store converted by ichprep is copied and its ``images`` array rewritten by zarr-python in another
layout (the group's attributes untouched, so they still say zstd). The direct shard codec must be used
only for the layout it implements; everything else goes through zarr.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec, ZstdCodec

from ichprep.errors import StoreError
from ichprep.report import render_montage
from ichprep.spec import PreprocessSpec
from ichprep.storage import store as store_module
from ichprep.storage.export import export_store
from ichprep.storage.shardcodec import FastLayout, Mismatch, ShardReader, fast_layout
from ichprep.storage.store import IMAGES, images_layout, open_reader, open_store, shard_path, write_shard
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import targets

SHARD = 8
FILL_SLOT = 3  # the slot the fill-value variant sets to all 5 (an ok slot of the first study)


def _sharding(inner: tuple[int, ...], codecs=None, index_codecs=None, index_location="end") -> ShardingCodec:
    return ShardingCodec(
        chunk_shape=inner,
        codecs=codecs or [BytesCodec(), ZstdCodec(level=1)],
        index_codecs=index_codecs or [BytesCodec(), Crc32cCodec()],
        index_location=index_location,
    )


def _variant(name: str, shape: tuple[int, ...]) -> tuple[ShardingCodec, int, str]:
    """(sharding codec, fill value, the zarr.json field fast_layout names) of each rewrite."""
    one = (1,) + shape[1:]
    return {
        "index_at_start": (_sharding(one, index_location="start"), 0, "codecs[0].configuration.index_location"),
        "index_without_crc32c": (
            _sharding(one, index_codecs=[BytesCodec()]),
            0,
            "codecs[0].configuration.index_codecs",
        ),
        "two_slices_per_chunk": (_sharding((2,) + shape[1:]), 0, "codecs[0].configuration.chunk_shape"),
        "blosc": (
            _sharding(one, codecs=[BytesCodec(), BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")]),
            0,
            "codecs[0].configuration.codecs",
        ),
        "transpose": (
            _sharding(one, codecs=[TransposeCodec(order=(0, 1, 3, 2)), BytesCodec(), ZstdCodec(level=1)]),
            0,
            "codecs[0].configuration.codecs",
        ),
        "fill_value_5": (_sharding(one), 5, "fill_value"),
    }[name]


VARIANTS = ["index_at_start", "index_without_crc32c", "two_slices_per_chunk", "blosc", "transpose", "fill_value_5"]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """Three synthetic studies converted at 32² in shards of 8 (the fast layout)."""
    from ichprep.convert import convert
    from ichprep.synth import generate

    out = tmp_path_factory.mktemp("layouts")
    generate(out / "data", studies=3, seed=4)
    root = out / "cache.zarr"
    convert(
        out / "data" / "stage_2_train",
        root,
        PreprocessSpec(size=32, shard_slices=SHARD),
        labels_csv=out / "data" / "stage_2_train.csv",
    )
    return root


def _rewrite(src: Path, dest: Path, name: str) -> np.ndarray:
    """Copy the store and rewrite ``images`` with zarr-python in variant ``name``; zarr's own reading of it."""
    shutil.copytree(src, dest)
    pixels = zarr.open_array(str(src / IMAGES), mode="r")[:]
    shutil.rmtree(dest / IMAGES)
    sharding, fill, _ = _variant(name, pixels.shape)
    if fill:
        pixels[FILL_SLOT] = fill  # all fill value: zarr leaves this chunk out of its shard
    array = zarr.create_array(
        str(dest / IMAGES),
        shape=pixels.shape,
        chunks=(SHARD,) + pixels.shape[1:],
        dtype="uint8",
        fill_value=fill,
        serializer=sharding,
        compressors=None,
    )
    array[:] = pixels
    _restate_images(dest)
    return zarr.open_array(str(dest / IMAGES), mode="r")[:]


def _restate_images(root: Path) -> None:
    """The manifest's entries for ``images/`` replaced by the rewritten files (what whoever recodes a store
    publishes with it); readers check the shard files against them."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(IMAGES + "/")}
    for file in sorted((root / IMAGES).rglob("*")):
        if file.is_file():
            data = file.read_bytes()
            files[file.relative_to(root).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.write_text(json.dumps({**manifest, "files": files}, indent=2))


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, original, tmp_path_factory) -> tuple[str, Path, np.ndarray]:
    dest = tmp_path_factory.mktemp(request.param) / "cache.zarr"
    return request.param, dest, _rewrite(original, dest, request.param)


def test_the_converted_store_takes_the_fast_path(original):
    layout = images_layout(original)
    assert isinstance(layout, FastLayout)
    assert layout.shard_slices == SHARD
    assert layout.level == 1
    assert isinstance(open_reader(original), ShardReader)


def test_each_variant_names_the_field_that_differs(variant):
    name, root, _ = variant
    layout = images_layout(root)
    assert isinstance(layout, Mismatch)
    assert layout.zarr_only
    assert layout.field == _variant(name, (0, 3, 32, 32))[2]
    assert layout.field in str(layout)


def test_open_reader_ranges_equal_zarr(variant):
    name, root, expected = variant
    reader = open_reader(root)
    assert not isinstance(reader, ShardReader)
    n = len(expected)
    for a, b in [(0, n), (0, SHARD), (1, SHARD + 3), (FILL_SLOT, FILL_SLOT + 1), (n - 2, n)]:
        np.testing.assert_array_equal(np.asarray(reader[a:b]), expected[a:b], err_msg=f"{name} [{a}:{b}]")


def test_shard_stream_batches_equal_zarr(variant):
    name, root, expected = variant
    store = open_store(root)
    counts = store.slices["ok"].to_numpy(bool).astype(np.int64)
    stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), shuffle=False, batch_size=5)
    seen = []
    for batch in stream:
        for image, slot in zip(batch.images.numpy(), batch.slots.tolist()):
            np.testing.assert_array_equal(image, expected[slot], err_msg=f"{name} slot {slot}")
            seen.append(slot)
    assert sorted(seen) == list(np.flatnonzero(counts))


def _reference(original: Path, dest: Path, pixels: np.ndarray) -> Path:
    """The original layout holding ``pixels``: what a variant must look like to every reader."""
    shutil.copytree(original, dest)
    zarr.open_array(str(dest / IMAGES), mode="r+")[:] = pixels
    _restate_images(dest)
    return dest


def test_show_draws_what_zarr_reads(variant, original, tmp_path):
    name, root, expected = variant
    reference = _reference(original, tmp_path / "reference.zarr", expected)
    study = open_store(root).slices["study_uid"].iloc[FILL_SLOT]
    np.testing.assert_array_equal(
        render_montage(root, study=study, panel=64), render_montage(reference, study=study, panel=64), err_msg=name
    )


def test_export_copies_what_zarr_reads(variant, tmp_path):
    name, root, expected = variant
    source = open_store(root)
    wanted = list(source.studies["study_uid"].iloc[[2, 0]])
    summary = export_store(root, tmp_path / "subset.zarr", studies=wanted, shard_slices=5)
    assert not summary.copied_verbatim
    copy = open_store(tmp_path / "subset.zarr")
    assert isinstance(open_reader(copy.root), ShardReader)  # a store export creates has the fast layout
    slots = np.concatenate([np.arange(r.start, r.stop) for r in source.studies.iloc[[0, 2]].itertuples()])
    np.testing.assert_array_equal(open_reader(copy.root)[0 : len(slots)], expected[slots], err_msg=name)


def test_write_shard_into_a_variant_writes_what_zarr_would(variant):
    """A resumed conversion into a rewritten array: zarr writes the shard, the record names its file."""
    name, root, expected = variant
    spec = PreprocessSpec(size=32, shard_slices=SHARD)
    new = (255 - expected[SHARD : 2 * SHARD]).copy()
    record = write_shard(root, spec, 1, SHARD, new)
    np.testing.assert_array_equal(zarr.open_array(str(root / IMAGES), mode="r")[SHARD : 2 * SHARD], new, err_msg=name)
    assert record["sha256"] == hashlib.sha256((root / shard_path(1)).read_bytes()).hexdigest()
    zarr.open_array(str(root / IMAGES), mode="r+")[SHARD : 2 * SHARD] = expected[SHARD : 2 * SHARD]  # restore


def test_write_shard_refuses_another_shard_size(variant):
    _, root, expected = variant
    with pytest.raises(StoreError, match="slices per shard"):
        write_shard(root, PreprocessSpec(size=32, shard_slices=4), 0, 0, expected[:4])


def test_images_that_are_not_uint8_are_refused_by_name(original, tmp_path):
    root = tmp_path / "wide.zarr"
    shutil.copytree(original, root)
    pixels = zarr.open_array(str(original / IMAGES), mode="r")[:]
    shutil.rmtree(root / IMAGES)
    zarr.create_array(
        str(root / IMAGES), shape=pixels.shape, chunks=(SHARD,) + pixels.shape[1:], dtype="uint16", fill_value=0
    )[:] = pixels
    with pytest.raises(StoreError, match="data_type"):
        open_reader(root)
    with pytest.raises(StoreError, match="data_type"):
        write_shard(root, PreprocessSpec(size=32, shard_slices=SHARD), 0, 0, pixels[:SHARD])


def test_fast_layout_accepts_the_optional_fields_at_their_defaults(original):
    meta = json.loads((original / IMAGES / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    del sharding["index_location"]  # "end" by default
    meta["chunk_key_encoding"].pop("configuration")  # "/" by default
    assert isinstance(fast_layout(meta), FastLayout)
    meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    assert fast_layout(meta).field == "chunk_key_encoding.name"


def test_a_stream_reads_the_array_metadata_once(original, monkeypatch):
    """The layout check is one small read per store open, not one per shard."""
    calls = []
    real = store_module.fast_layout
    monkeypatch.setattr(store_module, "fast_layout", lambda meta: calls.append(1) or real(meta))
    store = open_store(original)
    counts = store.slices["ok"].to_numpy(bool).astype(np.int64)
    stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), shuffle=False, batch_size=4)
    assert sum(len(batch.slots) for batch in stream) == counts.sum()
    assert len(calls) == 1
