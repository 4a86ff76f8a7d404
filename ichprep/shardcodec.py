"""Whole shards without zarr's per-chunk overhead: the same bytes, written and read directly.

A shard of the ``images`` array (zarr v3 ``sharding_indexed``; inner chunk = one slice, codecs
``bytes`` + ``zstd``; index at the end with ``bytes`` + ``crc32c``) is the slices' zstd frames one
after another, then an index of (offset, nbytes) little-endian uint64 pairs, one per slot, with
(2^64-1, 2^64-1) for a slot left out because it is all zeros (the fill value), then the index's
crc32c.  zarr-python spends ~0.3 ms per slice around a 0.2 ms zstd call when writing (0.15 ms
here, with a reused context) and ~0.12 ms around a 0.07 ms decode when reading (BENCHMARKS.md);
encoding and decoding here gives the same bytes (tested against zarr) at the cost of the codec alone.  zarr still reads and writes these
stores: the format is the standard one, only the code path is shorter.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zstandard
from numcodecs import Zstd

from . import scratch
from .errors import StoreError
from .location import Location

EMPTY = 0xFFFF_FFFF_FFFF_FFFF
_ENTRY = 16  # bytes per index entry: offset and nbytes, uint64 each


def _index_bytes(shard_slices: int) -> int:
    return _ENTRY * shard_slices + 4  # + crc32c


#: stream_writer's output buffer: below glibc's 128 kB mmap threshold, so it comes from the heap.
_WRITE_SIZE = 1 << 16


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One reused compression context per thread and level.

    numcodecs' ``Zstd.encode`` (what zarr calls) sets up a fresh context per call: 0.22 ms per 256² slice
    at level 1, against 0.13 ms for the same frame from a reused context (BENCHMARKS.md).  Contexts are
    not thread-safe, hence one per thread (Dask workers may run tasks in several threads).
    """
    return scratch.reused(f"zstd-compressor-{level}", lambda: zstandard.ZstdCompressor(level=level))


def _compress_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the most bytes a zstd frame of ``n`` input bytes can take."""
    return n + (n >> 8) + ((128 * 1024 - n) >> 11 if n < 128 * 1024 else 0)


class _Sink:
    """The file-like ``stream_writer`` writes compressed bytes to: appends into a preallocated buffer."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def write(self, data) -> int:
        n = len(data)
        self.buffer[self.pos : self.pos + n] = data
        self.pos += n
        return n


def encode_shard(buffer: np.ndarray, shard_slices: int, level: int) -> memoryview:
    """The bytes zarr writes for ``buffer`` (the first len(buffer) slots of a shard) with ZstdCodec(level).

    The frames go straight into this thread's scratch buffer (:mod:`ichprep.scratch`) through a small
    write buffer: ``ZstdCompressor.compress`` allocates its worst-case output (197 kB for a 256² slice)
    per call, which glibc mmaps and the kernel faults in each time (~30 page faults a slice, with the
    final join).  The view returned is valid until the next encode_shard in this thread.
    """
    codec = _compressor(level)
    slice_bytes = buffer[0].nbytes if len(buffer) else 0
    out = scratch.byte_buffer("shard", len(buffer) * _compress_bound(slice_bytes) + _index_bytes(shard_slices))
    index = np.full((shard_slices, 2), EMPTY, "<u8")
    sink = _Sink(out)
    for i, image in enumerate(buffer):
        if not image.any():  # zarr leaves all-fill-value chunks out (write_empty_chunks=False)
            continue
        start = sink.pos
        # size= puts the content size in the frame header, as zarr's one-shot compress does: same bytes.
        with codec.stream_writer(sink, size=image.nbytes, write_size=_WRITE_SIZE, closefd=False) as writer:
            writer.write(np.ascontiguousarray(image))
        index[i] = (start, sink.pos - start)
    raw = index.tobytes()
    sink.write(raw)
    sink.write(np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes())
    return out[: sink.pos]


def _parse_index(tail: bytes, shard_slices: int, where: str) -> np.ndarray:
    raw, crc = tail[:-4], int.from_bytes(tail[-4:], "little")
    if len(raw) != _ENTRY * shard_slices or google_crc32c.value(raw) != crc:
        raise StoreError(f"{where}: shard index is damaged (crc32c mismatch); run `ichprep verify`")
    return np.frombuffer(raw, "<u8").reshape(shard_slices, 2)


class ShardReader:
    """``reader[a:b]`` -> uint8 (b-a, C, H, W), reading shard files directly (local or object store).

    A slot range covering a whole shard reads the file once; a partial range (a 2.5D neighbour in
    the next shard) reads the index and then only the bytes of the frames it needs.
    """

    def __init__(self, root: Location, shape: tuple[int, ...], shard_slices: int):
        self.root, self.shape, self.shard_slices = root, tuple(shape), shard_slices
        self._codec = Zstd()

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardReader takes a contiguous slice of slots, e.g. reader[a:b]")
        a, b, _ = key.indices(self.shape[0])
        out = np.zeros((max(b - a, 0),) + self.shape[1:], np.uint8)
        s = self.shard_slices
        for k in range(a // s, (b - 1) // s + 1) if b > a else ():
            lo, hi = max(a, k * s), min(b, (k + 1) * s)
            self._read_into(k, lo - k * s, hi - k * s, out[lo - a : hi - a])
        return out

    def _read_into(self, k: int, first: int, stop: int, out: np.ndarray) -> None:
        name = f"images/c/{k}/0/0/0"
        try:
            handle = self.root.open(name)
        except FileNotFoundError:
            return  # a shard zarr never wrote is all fill value (zeros)
        with handle:
            whole = first == 0 and stop >= min(self.shard_slices, self.shape[0] - k * self.shard_slices)
            if whole:
                data = handle.read()
                index = _parse_index(data[-_index_bytes(self.shard_slices):], self.shard_slices, name)
                base = 0
            else:
                size = handle.seek(0, 2)
                handle.seek(size - _index_bytes(self.shard_slices))
                index = _parse_index(handle.read(), self.shard_slices, name)
                used = [int(o) for o, _ in index[first:stop] if o != EMPTY]
                if not used:
                    return
                base = min(used)
                end = max(int(o + n) for o, n in index[first:stop] if o != EMPTY)
                handle.seek(base)
                data = handle.read(end - base)
        for j, (offset, nbytes) in enumerate(index[first:stop].tolist()):
            if offset != EMPTY:
                offset -= base
                self._codec.decode(data[offset : offset + nbytes], out=out[j])
