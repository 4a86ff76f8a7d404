"""The shard stream: an epoch's samples read from the store shard by shard and written into finished batches.

What to read is decided without I/O elsewhere in this package (candidates in :mod:`.tables`, repeat counts
in :mod:`.balance`, the order in :mod:`.order`), so the trainer can log, test and checkpoint those decisions
separately from I/O.

The stream reads the store the way it is laid out: one ``images[a:b]`` call per shard (each zarr call has a
fixed cost, so per-slice reads would be I/O-bound), shards visited in a shuffled order, the samples of
``buffer_shards`` shards mixed and written straight into finished batches.  An epoch is described by
``counts``: how many times each slot is emitted (0 = not at all, and a shard whose slots are all 0 is
never read).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.utils.data

from ichprep.storage.location import as_location
from ichprep.storage.store import open_reader

from ..config import TrainConfig, check_int
from ..errors import ConfigError, DataError
from .order import Emission, SequenceOrder, WindowShuffle, emissions
from .ring import Batch, BatchRing, WorkerCells, shared_empty
from .tables import study_bounds

logger = logging.getLogger(__name__)


def _open_images(root: Path):
    """The store's image array, read-only (module-level so tests can count the reads)."""
    return open_reader(as_location(root))


class EpochLayout(NamedTuple):
    """One epoch's sample sequence, the same on every rank: the shards read, in order, and their sample counts."""

    order: np.ndarray  # shard numbers in reading order
    totals: np.ndarray  # samples of each of those shards
    ends: np.ndarray  # cumulative totals: shard order[p] holds samples [ends[p] - totals[p], ends[p])
    per_rank: int  # samples of each rank (a tail shorter than world_size is dropped)


def epoch_layout(
    counts: np.ndarray, shard_slices: int, shuffle: bool, seed: int, epoch: int, world_size: int
) -> EpochLayout:
    """Shards holding a slot with count > 0, shuffled per (seed, epoch) or sorted, and each rank's length."""
    totals = np.add.reduceat(counts, np.arange(0, len(counts), shard_slices))
    order = np.flatnonzero(totals > 0)
    if shuffle:
        order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
    ends = np.cumsum(totals[order])
    total = int(ends[-1]) if len(ends) else 0
    if world_size > 1 and total % world_size:
        logger.debug(
            "epoch %d: %d of %d samples dropped to give %d ranks equal length",
            epoch,
            total % world_size,
            total,
            world_size,
        )
    return EpochLayout(order=order, totals=totals[order], ends=ends, per_rank=total // world_size)


class Piece(NamedTuple):
    """One shard's (or shard part's) samples in a worker's range, and the slot range read for them."""

    lo: int  # read images[lo:hi]: the slots, widened to their 2.5D neighbours
    hi: int
    slots: np.ndarray  # int64 (n,), ascending
    neighbours: np.ndarray  # int64 (n, 2*context+1): each slot's stack, the slot itself in the middle
    repeats: np.ndarray  # int64 (n,) >= 1: samples of each slot in this range


class _Loaded(NamedTuple):
    """A piece after its one read: the block as decoded and, per sample (repeats expanded), its rows and slot."""

    block: np.ndarray  # uint8 (hi - lo, C, H, W)
    rows: np.ndarray  # int64 (samples, 2*context+1): rows of block, stacked in this order
    slots: np.ndarray  # int64 (samples,)


class NewMemory(NamedTuple):
    """Batch memory allocated per batch: plain in the main process, shared in a DataLoader worker."""

    shared: bool

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return shared_empty(shape) if self.shared else torch.empty(shape, dtype=torch.uint8)

    def batch(self, images: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> Batch:
        return Batch(images=images, targets=targets, slots=slots)


class _BatchWriter:
    """Writes emitted samples straight into new batch tensors of a worker's sizes; yields each full batch."""

    def __init__(
        self,
        total: int,
        batch_size: int,
        sample_shape: tuple[int, int, int],
        stack: int,
        targets: np.ndarray,
        memory: NewMemory | WorkerCells,
    ):
        self._left, self._batch_size, self._sample_shape = total, batch_size, sample_shape
        self._stack, self._targets, self._memory = stack, targets, memory
        self._start()

    def _start(self) -> None:
        size = min(self._batch_size, self._left)
        self._left -= size
        self._images = self._memory.empty((size, *self._sample_shape))
        # (b, 2*context+1, C, H, W) view: sample j's k-th neighbour is channels [k*C, (k+1)*C) of image j.
        channels, h, w = self._sample_shape
        self._stacked = self._images.numpy().reshape(size, self._stack, channels // self._stack, h, w)
        self._slots = np.empty(size, np.int64)
        self._filled = 0

    def write(self, live: dict, emission: Emission) -> Iterator[Batch]:
        n = len(emission.piece)
        cuts = np.flatnonzero(emission.piece[1:] != emission.piece[:-1]) + 1
        for a, b in zip([0, *cuts], [*cuts, n]) if n else ():
            yield from self._write_piece(live[int(emission.piece[a])], emission.sample[a:b])

    def _write_piece(self, loaded: _Loaded, samples: np.ndarray) -> Iterator[Batch]:
        """Samples of one piece, in order."""
        while len(samples):
            f = self._filled
            k = min(len(samples), len(self._slots) - f)
            take, samples = samples[:k], samples[k:]
            # The one copy of each slice; "clip" (rows are in range) because "raise" copies through a temporary.
            np.take(loaded.block, loaded.rows[take], axis=0, out=self._stacked[f : f + k], mode="clip")
            self._slots[f : f + k] = loaded.slots[take]
            self._filled += k
            if self._filled == len(self._slots):
                yield self._memory.batch(
                    images=self._images,
                    targets=torch.from_numpy(self._targets[self._slots]),
                    slots=torch.from_numpy(self._slots),
                )
                if self._left:
                    self._start()


class ShardStream(torch.utils.data.IterableDataset):
    """Yields :class:`Batch`es of ``batch_size`` samples; slot ``s`` is a sample ``counts[s]`` times per epoch.

    Layout of one epoch, computed identically on every rank from (counts, seed, epoch) by
    :func:`epoch_layout`: shards holding a slot with count > 0 are ordered (shuffled per (seed, epoch), or
    sorted when ``shuffle=False``) and concatenated into one sequence of samples (slots ascending within a
    shard, each repeated).  The sequence is cut into ``world_size`` equal contiguous ranges (the last
    ``total % world_size`` samples, fewer than ``world_size``, are dropped so that every rank makes the
    same number of steps), and each rank's range into ``num_workers`` contiguous ranges of
    ``len // num_workers`` (+1 for the first ``len % num_workers``).  Every worker's sample count is
    therefore the same on every rank.  Ranges are disjoint; a shard lies in one range except where a cut
    falls inside it: then each side reads only its own part of the shard (a :class:`Piece` is a shard, or
    the part of one, in a worker's range).

    Each worker batches its own range: all its batches have ``batch_size`` samples but its last, so
    ``DataLoader(stream, batch_size=None, num_workers=W)`` yields :meth:`batches` ``(batch_size, W)``
    batches, equal on every rank.  ``len(stream)`` counts samples, so such a DataLoader's ``len()`` does
    too: count steps with :meth:`batches`.

    Each shard (or shard part) is read with one ``images[lo:hi]`` call, widened by up to ``context`` slots
    where a 2.5D neighbour lies across the shard edge, so neighbours come from the same read.  Neighbours
    are clamped to the slot's study [start, stop), never taken from another study (and, when ``ok`` is
    given, a zero-filled neighbour is replaced by the slot itself).  The decoded block is kept as read:
    the buffer holds (block, row indices) per sample, never pixels, and each sample's 1 or
    ``2*context+1`` slices are copied once, from the block straight into the batch tensor.  Inside a
    DataLoader worker that tensor is in shared memory, so sending it to the main process does not copy it
    again: a new tensor per batch, or, under :class:`~ichtrain.data.ring.RingLoader` (the trainer's loader), a
    cell of a :class:`~ichtrain.data.ring.BatchRing` the worker reuses.  No batch is a view of a block.

    ``shuffle=True``: each sample goes out in one of the ``buffer_shards`` rounds after its shard is read,
    at random (rng per (seed, epoch, rank, worker); :class:`WindowShuffle`), so a batch mixes the
    ``buffer_shards`` latest shards evenly (the first batch waits for ``buffer_shards`` reads) and a
    worker holds ``buffer_shards`` decoded shards: ``buffer_shards * shard_slices * C * H * W`` bytes (how the
    default was chosen, and what it costs: BENCHMARKS.md, ``buffer_shards``).
    ``shuffle=False`` yields batches in sequence order (evaluation), holding one shard at a time.
    Call :meth:`set_epoch` before each epoch and build the DataLoader without ``persistent_workers``:
    workers get a copy of the stream when they start, so a persistent worker never sees a new epoch.
    """

    #: Allocate batch images in shared memory inside DataLoader workers (a benchmark turns it off to compare).
    _share_in_workers = True
    #: Batch slots the workers write into (set on a copy by :meth:`with_ring`); None: a new tensor per batch.
    _ring: BatchRing | None = None

    def __init__(
        self,
        root,
        counts: np.ndarray,
        targets: np.ndarray,
        shard_slices: int,
        studies_start: np.ndarray,
        studies_stop: np.ndarray,
        context: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = TrainConfig.buffer_shards,
        rank: int = 0,
        world_size: int = 1,
        ok: np.ndarray | None = None,
        batch_size: int = TrainConfig.batch_size,
    ):
        self.root = str(root)  # a folder or an fsspec URL (s3://...); each worker opens it itself
        for name, value, low in (
            ("shard_slices", shard_slices, 1),
            ("context", context, 0),
            ("buffer_shards", buffer_shards, 1),
            ("world_size", world_size, 1),
            ("batch_size", batch_size, 1),
        ):
            check_int(name, value, low)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.shard_slices, self.context, self.buffer_shards = int(shard_slices), int(context), int(buffer_shards)
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), check_int("seed", seed), 0

        images = _open_images(self.root)
        n = images.shape[0]
        if n == 0:
            raise DataError(f"{self.root} holds no slices")
        self.n = n
        self.targets = np.asarray(targets, dtype=np.float32)
        if self.targets.ndim != 2 or len(self.targets) != n:
            raise DataError(f"targets must be (N={n}, K), got {self.targets.shape}")
        self.start = np.asarray(studies_start, dtype=np.int64)
        self.stop = np.asarray(studies_stop, dtype=np.int64)
        slot = np.arange(n)
        if self.start.shape != (n,) or self.stop.shape != (n,) or not ((self.start <= slot) & (slot < self.stop)).all():
            raise DataError(
                f"studies_start/studies_stop must be per-slot study bounds (N={n}) with start <= slot < stop"
            )
        self.ok = None if ok is None else np.asarray(ok, dtype=bool)
        if self.ok is not None and self.ok.shape != (n,):
            raise DataError(f"ok must have shape ({n},), got {self.ok.shape}")
        c, h, w = images.shape[1:]
        #: Shape of every sample of a batch (the model's input channels are sample_shape[0]).
        self.sample_shape = (c * (2 * self.context + 1), h, w)
        self._images, self._images_pid = images, os.getpid()
        self._layout = None
        self.counts = self._check_counts(counts)

    @classmethod
    def from_store(cls, store, counts: np.ndarray, targets: np.ndarray, **kwargs) -> ShardStream:
        """Build from an opened :class:`ichprep.storage.store.Store` (shard size, study bounds and ``ok`` from it)."""
        start, stop = study_bounds(store.studies, len(store.slices))
        kwargs.setdefault("ok", store.slices["ok"].to_numpy(dtype=bool))
        return cls(
            store.root,
            counts=counts,
            targets=targets,
            shard_slices=store.shard_slices,
            studies_start=start,
            studies_stop=stop,
            **kwargs,
        )

    def _check_counts(self, counts) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.shape != (self.n,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise DataError(
                f"counts must be non-negative integers of shape ({self.n},), got {counts.dtype} {counts.shape}"
            )
        if self.ok is not None and (counts[~self.ok] > 0).any():
            raise DataError("counts select zero-filled slots (ok=False); build candidates with train_candidates")
        return counts.astype(np.int64)

    def set_epoch(self, epoch: int, counts: np.ndarray | None = None) -> None:
        """Switch to ``epoch`` (new shard order and buffer draws), optionally with that epoch's plan."""
        self.epoch = check_int("epoch", epoch)
        if counts is not None:
            self.counts = self._check_counts(counts)
        self._layout = None

    def with_ring(self, ring: BatchRing) -> ShardStream:
        """A copy of this stream whose DataLoader workers write their batches into ``ring``."""
        clone = copy.copy(self)
        clone._ring = ring
        return clone

    def _worker_memory(self, info) -> NewMemory | WorkerCells:
        if info is None:
            return NewMemory(shared=False)
        if self._ring is not None:
            return WorkerCells(self._ring, info.id)
        return NewMemory(shared=self._share_in_workers)

    def __getstate__(self):
        # Spawned workers open their own array; never ship an open one.
        state = self.__dict__.copy()
        state["_images"], state["_images_pid"] = None, None
        return state

    def _array(self):
        # Forked workers inherit the parent's array object; reopen once per process to be safe.
        if self._images is None or self._images_pid != os.getpid():
            self._images, self._images_pid = _open_images(self.root), os.getpid()
        return self._images

    def _plan(self) -> EpochLayout:
        if self._layout is None:
            self._layout = epoch_layout(
                self.counts, self.shard_slices, self.shuffle, self.seed, self.epoch, self.world_size
            )
        return self._layout

    def __len__(self) -> int:
        """Samples this rank yields this epoch, all its workers together."""
        return self._plan().per_rank

    def batches(self, batch_size: int, num_workers: int, drop_last: bool = False) -> int:
        """Batches of ``batch_size`` this rank yields this epoch with ``num_workers`` (each batches its own range)."""
        check_int("batch_size", batch_size, 1)
        sizes = [g1 - g0 for g0, g1 in self._worker_ranges(max(1, num_workers))]  # num_workers 0 = main process
        return sum(s // batch_size if drop_last else -(-s // batch_size) for s in sizes)

    def _worker_ranges(self, num_workers: int) -> list[tuple[int, int]]:
        """[g0, g1) positions in the epoch's sample sequence of each worker of this rank."""
        per_rank = self._plan().per_rank
        base, extra = divmod(per_rank, num_workers)
        out, g = [], self.rank * per_rank
        for w in range(num_workers):
            size = base + (w < extra)
            out.append((g, g + size))
            g += size
        return out

    def _pieces(self, g0: int, g1: int) -> Iterator[Piece]:
        """Each shard overlapping samples [g0, g1) of the sequence, in order, as far as it lies in the range."""
        layout = self._plan()
        starts = layout.ends - layout.totals
        first, last = np.searchsorted(layout.ends, g0, side="right"), np.searchsorted(starts, g1, side="left")
        for p in range(first, last):
            a = int(layout.order[p]) * self.shard_slices
            b = min(self.n, a + self.shard_slices)
            counts = self.counts[a:b]
            hi_edge = starts[p] + np.cumsum(counts)
            mine = np.clip(np.minimum(hi_edge, g1) - np.maximum(hi_edge - counts, g0), 0, None)
            local = np.flatnonzero(mine)
            if len(local) == 0:
                continue
            slots = a + local
            # 2.5D neighbours: clamp to the study, never cross into another one.
            nb = slots[:, None] + np.arange(-self.context, self.context + 1)
            nb = np.clip(nb, self.start[slots][:, None], self.stop[slots][:, None] - 1)
            if self.ok is not None:
                nb = np.where(self.ok[nb], nb, slots[:, None])
            lo, hi = int(nb.min()), int(nb.max()) + 1
            if mine.sum() == counts.sum():  # the whole shard is ours: read it as stored
                lo, hi = min(lo, a), max(hi, b)
            yield Piece(lo, hi, slots, nb, mine[local])

    @staticmethod
    def _load(images, piece: Piece) -> _Loaded:
        """One range read; repeats expand rows and slots only, never pixels."""
        sample = np.repeat(np.arange(len(piece.slots)), piece.repeats)
        return _Loaded(
            block=np.asarray(images[piece.lo : piece.hi]),
            rows=(piece.neighbours - piece.lo)[sample],
            slots=piece.slots[sample],
        )

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        g0, g1 = self._worker_ranges(num_workers)[worker]
        if g1 <= g0:
            return
        images = self._array()
        if self.shuffle:
            order = WindowShuffle(self.buffer_shards, np.random.default_rng([self.seed, self.epoch, self.rank, worker]))
        else:
            order = SequenceOrder()
        writer = _BatchWriter(
            total=g1 - g0,
            batch_size=self.batch_size,
            sample_shape=self.sample_shape,
            stack=2 * self.context + 1,
            targets=self.targets,
            memory=self._worker_memory(info),
        )
        loaded = (self._load(images, piece) for piece in self._pieces(g0, g1))
        for step in emissions(order, loaded, lambda piece: len(piece.slots)):
            yield from writer.write(step.live, step.emission)
