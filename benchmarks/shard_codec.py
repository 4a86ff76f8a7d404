"""Prototype, not ichkit code: read and write a store shard without zarr-python, to measure its overhead.

A shard of the store (``sharding_indexed``, inner chunk = 1 slice, codecs ``bytes`` + ``zstd``, index
at the end with ``bytes`` + ``crc32c``) is the inner chunks' zstd frames one after another, then an
index of (offset, nbytes) uint64 little-endian pairs, one per inner chunk ((2^64-1, 2^64-1) for a chunk
left out because it is all fill value), then the index's crc32c.  Decoding and encoding the frames with
numcodecs directly gives the same pixels and, for writing, the same bytes as zarr (checked in every
benchmark run: ``identical_to_zarr``, and ``decoded_equals_zarr`` for reading).  The gap between these
and zarr's own read/write is zarr's per-chunk overhead, which the stage breakdown quantifies.

ichprep does this itself (``ichprep/shardcodec.py``: ``write_shard`` for zstd stores,
``ShardReader`` for ichtrain's ShardStream and ``ichprep export``).  This independent copy stays as a check
and a reference: its write loop is ichprep's shard path without the bookkeeping (atomic write, sha256,
completion marker), its read loop is ShardStream's decode without ShardStream (planning, per-sample copies,
tensors).  See BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import Zstd

from ichprep.errors import DicomReadError
from ichprep.reading.dicomio import read_slice
from ichprep.spec import PreprocessSpec
from ichprep.storage.shardcodec import EMPTY, encode_shard  # the encoder ichprep writes with
from ichprep.storage.store import Store

from .layout import n_shards, root_of, shard_file


def decode_shard(data: bytes, shard_slices: int, item_shape: tuple[int, ...], check: bool = True) -> np.ndarray:
    size = 16 * shard_slices
    raw = data[len(data) - size - 4 : len(data) - 4]
    if check and google_crc32c.value(raw) != int.from_bytes(data[-4:], "little"):
        raise ValueError("shard index checksum mismatch")
    index = np.frombuffer(raw, "<u8").reshape(shard_slices, 2)
    out = np.zeros((shard_slices, *item_shape), np.uint8)
    codec = Zstd()
    for i, (offset, nbytes) in enumerate(index.tolist()):
        if offset != EMPTY:
            codec.decode(data[offset : offset + nbytes], out=out[i])
    return out


def convert_shards_direct(paths: list[str], out_dir: Path, spec: PreprocessSpec) -> int:
    """ichprep's shard loop (read_slice + spec.apply) with the shard encoded here instead of by zarr."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(paths), spec.shard_slices)):
        chunk = paths[start : start + spec.shard_slices]
        buffer = np.zeros((len(chunk), spec.channels, spec.size, spec.size), np.uint8)
        for i, path in enumerate(chunk):
            try:
                buffer[i] = spec.apply(read_slice(path)[1])
            except (DicomReadError, FileNotFoundError):
                pass
        (out_dir / f"{shard}").write_bytes(encode_shard(buffer, spec.shard_slices, spec.compression_level))
    return len(paths)


def identical_to_zarr(direct_dir: Path, store: Store) -> bool:
    root = root_of(store)
    return all(
        (direct_dir / f"{k}").read_bytes() == shard_file(root, k).read_bytes()
        for k in range(n_shards(len(store.slices), store.shard_slices))
    )


def decoded_equals_zarr(store: Store) -> bool:
    """Every shard decoded here equals what zarr returns for the same slots."""
    root, s = root_of(store), store.shard_slices
    item = tuple(store.images.shape[1:])
    for k in range(n_shards(len(store.slices), s)):
        path = shard_file(root, k)
        block = decode_shard(path.read_bytes(), s, item) if path.is_file() else np.zeros((s, *item), np.uint8)
        expected = np.asarray(store.images[k * s : (k + 1) * s])
        if not np.array_equal(block[: len(expected)], expected):
            return False
    return True


def direct_store_images(store: Store, epoch: int, buffer_shards: int = 4) -> Iterator[np.ndarray]:
    """Every ok slot once, shards in random order mixed in a pool of ``buffer_shards`` (as ShardStream)."""
    rng = np.random.default_rng([3, epoch])
    ok = store.slices["ok"].to_numpy(bool)
    s = store.shard_slices
    item = tuple(store.images.shape[1:])
    pool: list[np.ndarray] = []

    def draw():
        j = int(rng.integers(len(pool)))
        pool[j], pool[-1] = pool[-1], pool[j]
        return pool.pop()

    root = root_of(store)
    for loaded, k in enumerate(rng.permutation(n_shards(len(ok), s)), start=1):
        with open(shard_file(root, int(k)), "rb") as f:
            block = decode_shard(f.read(), s, item)
        keep = np.flatnonzero(ok[k * s : (k + 1) * s])
        pool.extend(block[j] for j in keep)
        if loaded >= buffer_shards:
            for _ in range(len(keep)):
                yield draw()
    while pool:
        yield draw()
