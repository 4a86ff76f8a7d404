"""Whole shards without zarr's per-chunk overhead: the same bytes, written and read directly.

A shard of the ``images`` array (zarr v3 ``sharding_indexed``; inner chunk = one slice, codecs
``bytes`` + ``zstd``; index at the end with ``bytes`` + ``crc32c``) is the slices' zstd frames one
after another, then an index of (offset, nbytes) little-endian uint64 pairs, one per slot, with
(2^64-1, 2^64-1) for a slot left out because it is all zeros (the fill value), then the index's
crc32c.  zarr-python runs its codec pipeline around every one-slice chunk; encoding and decoding whole
shards here gives the same bytes (tested against zarr) at the cost of the codec alone (figures in
BENCHMARKS.md).  zarr still reads and writes these stores: the format is the standard one, only the
code path is shorter.

This is one layout among the valid Zarr v3 ones: :func:`fast_layout` checks an array's own ``zarr.json``
against it (index position, index codecs, inner chunk shape, codecs, fill value, key encoding), and
ichprep's readers and writers use this module only where it matches, zarr everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import google_crc32c
import numpy as np
import zstandard
from numcodecs import Zstd

from .. import scratch
from ..errors import DamagedShardError, repair_hint
from .location import Location

EMPTY = 0xFFFF_FFFF_FFFF_FFFF
_ENTRY = 16  # bytes per index entry: offset and nbytes, uint64 each

#: The images array's folder in a store, its metadata file and the folder of its shard files
#: (:mod:`ichprep.storage.store` re-exports them).
IMAGES = "images"
IMAGES_META = f"{IMAGES}/zarr.json"
SHARD_DIR = f"{IMAGES}/c"


def shard_path(shard: int) -> str:
    """Relative path of shard number ``shard`` in a store (default v3 chunk key encoding, '/' separator)."""
    return f"{SHARD_DIR}/{shard}/0/0/0"


@dataclass(frozen=True)
class FastLayout:
    """The one ``images`` layout this module reads and writes; anything else goes through zarr."""

    shape: tuple[int, ...]  # (N, C, H, W)
    shard_slices: int
    level: int  # zstd level of the inner chunks (the encoder writes the same frames as zarr)


class Mismatch(NamedTuple):
    """Where an array's metadata leaves the fast layout: ``field`` (a path in zarr.json), what it is, what is needed."""

    field: str
    found: object
    expected: object

    @property
    def zarr_only(self) -> bool:
        """Whether zarr still reads this as ichkit images (uint8, 4-D); False: no reader in ichkit can use it."""
        return self.field not in _NOT_IMAGES

    def __str__(self) -> str:
        return f"{IMAGES_META} {self.field} is {self.found!r}, the direct shard codec needs {self.expected!r}"


#: Fields whose mismatch makes the array unusable as ichkit images whichever library reads it.
_NOT_IMAGES = frozenset({"zarr_format", "node_type", "data_type", "shape"})
_ABSENT = "(absent)"


def _first_mismatch(checks) -> Mismatch | None:
    return next((Mismatch(field, found, expected) for field, found, expected in checks if found != expected), None)


def _array_mismatch(meta: dict) -> Mismatch | None:
    """The array-level fields: format, type, shape, fill value, key encoding, grid, transformers."""
    shape = meta.get("shape", [])
    keys = meta.get("chunk_key_encoding", {})
    grid = meta.get("chunk_grid", {})
    shard_shape = grid.get("configuration", {}).get("chunk_shape", [])
    return _first_mismatch(
        [
            ("zarr_format", meta.get("zarr_format"), 3),
            ("node_type", meta.get("node_type"), "array"),
            ("data_type", meta.get("data_type"), "uint8"),
            ("shape", len(shape), 4),  # found/expected: the number of axes (slice, channel, y, x)
            ("fill_value", meta.get("fill_value"), 0),
            ("chunk_key_encoding.name", keys.get("name"), "default"),
            # The v3 default chunk key encoding's separator is "/" unless configured otherwise.
            ("chunk_key_encoding.configuration.separator", keys.get("configuration", {}).get("separator", "/"), "/"),
            ("chunk_grid.name", grid.get("name"), "regular"),
            ("chunk_grid.configuration.chunk_shape[1:]", list(shard_shape[1:]), list(shape[1:])),
            ("chunk_grid.configuration.chunk_shape[0] >= 1", len(shard_shape) == 4 and shard_shape[0] >= 1, True),
            ("storage_transformers", meta.get("storage_transformers", []), []),
        ]
    )


def _codecs_mismatch(codecs: list, shape: list) -> Mismatch | None:
    """The codec chain: one ``sharding_indexed`` of one-slice ``bytes`` + ``zstd`` chunks, index at the end."""
    names = [c.get("name") for c in codecs]
    if names != ["sharding_indexed"]:
        return Mismatch("codecs", names, ["sharding_indexed"])
    config = codecs[0].get("configuration", {})
    inner, index = config.get("codecs", []), config.get("index_codecs", [])
    zstd = inner[1].get("configuration", {}) if len(inner) == 2 else {}
    endian = index[0].get("configuration", {}).get("endian", _ABSENT) if index else _ABSENT
    return _first_mismatch(
        [
            ("codecs[0].configuration.chunk_shape", list(config.get("chunk_shape", [])), [1, *shape[1:]]),
            ("codecs[0].configuration.codecs", [c.get("name") for c in inner], ["bytes", "zstd"]),
            ("codecs[0].configuration.codecs[1].configuration.checksum", zstd.get("checksum", False), False),
            ("codecs[0].configuration.index_codecs", [c.get("name") for c in index], ["bytes", "crc32c"]),
            ("codecs[0].configuration.index_codecs[0].configuration.endian", endian, "little"),
            # index_location is optional in the sharding spec, "end" by default.
            ("codecs[0].configuration.index_location", config.get("index_location", "end"), "end"),
        ]
    )


def fast_layout(meta: dict) -> FastLayout | Mismatch:
    """``images/zarr.json`` (parsed) -> its :class:`FastLayout`, or the first field that differs from it.

    The decision rests on the array's own metadata only: a group attribute can say zstd while the
    array was recoded since.  ``dimension_names`` and ``attributes`` do not change the bytes and are not checked.
    """
    shape = meta.get("shape", [])
    mismatch = _array_mismatch(meta) or _codecs_mismatch(meta.get("codecs", []), shape)
    if mismatch is not None:
        return mismatch
    shard_slices = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    level = meta["codecs"][0]["configuration"]["codecs"][1].get("configuration", {}).get("level", 0)
    return FastLayout(tuple(shape), int(shard_slices), int(level))


def _index_bytes(shard_slices: int) -> int:
    return _ENTRY * shard_slices + 4  # + crc32c


#: stream_writer's output buffer: below glibc's 128 kB mmap threshold, so it comes from the heap.
_WRITE_SIZE = 1 << 16


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One reused compression context per thread and level.

    numcodecs' ``Zstd.encode`` (what zarr calls) sets up a fresh context per call; a reused one writes
    the same frame without that setup.  Contexts are not thread-safe, hence one per thread (Dask
    workers may run tasks in several threads).
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
    per call, which glibc mmaps and the kernel faults in afresh each time.  The view returned is valid
    until the next encode_shard in this thread.
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


def _parse_index(tail: bytes, shard_slices: int) -> np.ndarray | None:
    """The shard's (offset, nbytes) pairs; None where the index does not match its crc32c."""
    raw, crc = tail[:-4], int.from_bytes(tail[-4:], "little")
    if len(raw) != _ENTRY * shard_slices or google_crc32c.value(raw) != crc:
        return None
    return np.frombuffer(raw, "<u8").reshape(shard_slices, 2)


class ShardReader:
    """``reader[a:b]`` -> uint8 (b-a, C, H, W), reading shard files directly (local or object store).

    A slot range covering a whole shard reads the file once; a partial range (a 2.5D neighbour in
    the next shard) reads the index and then only the bytes of the frames it needs.  A shard in
    ``expected`` (the manifest's shard files) that is absent, or any shard whose index or frames do not
    decode, raises :class:`DamagedShardError` naming the file, its slots and studies; a shard not in
    ``expected`` (None: no manifest to tell) that is absent reads as the fill value, as zarr's reader does.
    """

    def __init__(
        self,
        root: Location,
        shape: tuple[int, ...],
        shard_slices: int,
        expected: frozenset[int] | None = None,
        studies_of: Callable[[int, int], list[str]] | None = None,
    ):
        self.root, self.shape, self.shard_slices = root, tuple(shape), shard_slices
        self.expected, self.studies_of = expected, studies_of  # studies_of(start, stop): the study uids there
        self._codec = Zstd()

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardReader takes a contiguous slice of slots, e.g. reader[a:b]")
        a, b, _ = key.indices(self.shape[0])
        out = np.zeros((max(b - a, 0),) + self.shape[1:], np.uint8)
        s = self.shard_slices
        for shard in range(a // s, (b - 1) // s + 1) if b > a else ():
            lo, hi = max(a, shard * s), min(b, (shard + 1) * s)
            self._read_into(shard, lo - shard * s, hi - shard * s, out[lo - a : hi - a])
        return out

    def _read_into(self, shard: int, first: int, stop: int, out: np.ndarray) -> None:
        name = shard_path(shard)
        try:
            handle = self.root.open(name)
        except FileNotFoundError:
            if self.expected is not None and shard in self.expected:
                raise self._damaged(shard, "the file is missing") from None
            return  # a shard zarr never wrote is all fill value (zeros)
        span = _index_bytes(self.shard_slices)
        with handle:
            whole = first == 0 and stop >= min(self.shard_slices, self.shape[0] - shard * self.shard_slices)
            if whole:  # one read of the file (one GET on an object store)
                data = handle.read()
                tail = data[-span:]
            else:
                handle.seek(max(handle.seek(0, 2) - span, 0))
                tail = handle.read()
            index = _parse_index(tail, self.shard_slices)
            if index is None:
                raise self._damaged(shard, "shard index is damaged (crc32c mismatch: the file is cut or altered)")
            base = 0
            if not whole:
                used = [(int(o), int(o + n)) for o, n in index[first:stop] if o != EMPTY]
                if not used:
                    return
                base, end = min(a for a, _ in used), max(b for _, b in used)
                handle.seek(base)
                data = handle.read(end - base)
        for j, (offset, nbytes) in enumerate(index[first:stop].tolist()):
            if offset == EMPTY:
                continue
            offset -= base
            try:
                self._codec.decode(data[offset : offset + nbytes], out=out[j])
            except (RuntimeError, ValueError) as exc:  # numcodecs' zstd errors; a frame cut by a short file
                slot = shard * self.shard_slices + first + j
                raise self._damaged(shard, f"slot {slot} does not decode ({exc})") from exc

    def _damaged(self, shard: int, why: str) -> DamagedShardError:
        """The error for shard ``shard``: the file, why, its slots and (read from the store now) its studies."""
        start = shard * self.shard_slices
        stop = min(start + self.shard_slices, self.shape[0])
        uids = self.studies_of(start, stop) if self.studies_of is not None else []
        studies = f", studies {name_studies(uids)}" if uids else ""
        return DamagedShardError(
            f"{self.root}/{shard_path(shard)} (shard {shard}, slots {start}-{stop - 1}{studies}) is damaged: {why}. "
            f"To repair: {repair_hint(self.root)}; or pass --skip-damaged to leave the damaged shards out"
        )


def name_studies(uids: list[str], shown: int = 3) -> str:
    """The first ``shown`` study uids, and how many more, for a message."""
    more = f" (+{len(uids) - shown} more)" if len(uids) > shown else ""
    return ", ".join(uids[:shown]) + more
