"""From an ichprep store to training samples: targets, splits, slice selection, epoch plans, a shard stream.

Everything but :class:`ShardStream` works without I/O (pure functions of the store's tables, and the
stream's shuffle orders of sample counts and an rng), so the trainer can log, test and checkpoint the
decisions (split, candidates, per-epoch repeat counts) separately from I/O.

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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.utils.data

from ichprep.location import as_location
from ichprep.store import open_reader

from .balance import sampling_rates
from .config import BALANCES, SPLIT_PARTS, TASKS, TrainConfig, check_choice, check_fraction, check_int, middle_count
from .errors import ConfigError, DataError
from .ring import Batch, BatchRing, WorkerSlots, shared_empty

logger = logging.getLogger(__name__)


def _check_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)}; is it an ichprep store table?")


def targets(slices: pd.DataFrame, task: str) -> np.ndarray:
    """float32 (N, K) targets of ``task``; an unlabelled slice (null label) gives NaN there (a NaN row)."""
    check_choice("task", task, TASKS)
    columns = TASKS[task]
    _check_columns(slices, columns, "slices")
    return slices[list(columns)].to_numpy(dtype=np.float32, na_value=np.nan)


def is_positive(slices: pd.DataFrame) -> np.ndarray:
    """bool (N,): the slice is labelled ``any == 1`` (nulls count as not positive)."""
    _check_columns(slices, ["any"], "slices")
    return slices["any"].eq(1).fillna(False).to_numpy(dtype=bool)


def select_slices(slices: pd.DataFrame, studies: pd.DataFrame, selection: str = "all") -> np.ndarray:
    """bool (N,): the slots a selection keeps.

    ``"all"`` keeps every slot; ``"middle:K"`` keeps, per study, the K slices centred on its middle slice
    ``start + n // 2`` (the reference method trains on these), the whole study when it has fewer than K.
    """
    n = len(slices)
    k = middle_count(selection)
    if k is None:
        return np.ones(n, bool)
    start, stop = study_bounds(studies, n)
    # Per study the window is [mid - k//2, mid - k//2 + k); it only leaves the study when n_study < k.
    mid = start + (stop - start) // 2
    lo = np.maximum(start, mid - k // 2)
    hi = np.minimum(stop, mid - k // 2 + k)
    slot = np.arange(n)
    return (slot >= lo) & (slot < hi)


def study_bounds(studies: pd.DataFrame, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot ``(start, stop)`` of the slot's study, int64 (N,) each; checks the studies tile [0, N)."""
    _check_columns(studies, ["start", "stop"], "studies")
    start = studies["start"].to_numpy(np.int64)
    stop = studies["stop"].to_numpy(np.int64)
    order = np.argsort(start, kind="stable")
    start, stop = start[order], stop[order]
    edges_ok = len(start) > 0 and start[0] == 0 and stop[-1] == n_slices and np.array_equal(start[1:], stop[:-1])
    if not edges_ok or (stop <= start).any():
        raise DataError(
            f"studies do not tile the {n_slices} slots as contiguous [start, stop) runs; "
            "the store's studies.parquet does not match its slices"
        )
    size = stop - start
    return np.repeat(start, size), np.repeat(stop, size)


def train_candidates(
    slices: pd.DataFrame, split: np.ndarray, selection_mask: np.ndarray | None, task: str, part: str = "train"
) -> np.ndarray:
    """Sorted slots eligible for ``part`` of ``task``.

    Eligible: ``ok`` (not zero-filled), every task label present, ``split == part``, selected
    (``selection_mask``; None = all).  Task ``subtypes`` models only bleeding slices, so it also requires
    ``any == 1``.
    """
    check_choice("split part", part, SPLIT_PARTS)
    n = len(slices)
    split = np.asarray(split)
    if split.shape != (n,):
        raise DataError(f"split has shape {split.shape}, expected ({n},) (one entry per slot)")
    mask = np.ones(n, bool) if selection_mask is None else np.asarray(selection_mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise DataError(f"selection_mask must be bool of shape ({n},), got {mask.dtype} {mask.shape}")
    _check_columns(slices, ["ok"], "slices")
    keep = slices["ok"].to_numpy(dtype=bool) & ~np.isnan(targets(slices, task)).any(axis=1) & (split == part) & mask
    if task == "subtypes":
        keep &= is_positive(slices)
    return np.flatnonzero(keep)


def epoch_plan(
    candidates: np.ndarray,
    positive: np.ndarray,
    balance: str = TrainConfig.balance,
    pos_fraction: float = TrainConfig.pos_fraction,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """int64 (N,) repeat counts of one epoch: 0 for non-candidates, N = ``len(positive)``.

    ``"none"``: every candidate once.  ``"hybrid"`` (the reference method's mix of under- and
    over-sampling): each negative kept with probability ``p_neg``, each positive repeated ``r_pos`` times
    on average (integer part always, fractional part by a coin flip), with
    ``n_pos*r_pos + n_neg*p_neg = n`` and ``n_pos*r_pos = pos_fraction * n``: the epoch keeps about its
    length and gets about ``pos_fraction`` positives.  If positives already make ``pos_fraction`` nothing
    changes; with no positives or no negatives it falls back to "none" (with a warning).
    Random draws depend on (seed, epoch) only.
    """
    check_choice("balance", balance, BALANCES)
    check_fraction("pos_fraction", pos_fraction)
    seed, epoch = check_int("seed", seed), check_int("epoch", epoch)
    positive = np.asarray(positive)
    if positive.ndim != 1 or positive.dtype != bool:
        raise DataError(
            f"positive must be a 1-D bool array (one entry per slot), got {positive.dtype} {positive.shape}"
        )
    candidates = np.asarray(candidates)
    if candidates.ndim != 1 or (candidates.size and not np.issubdtype(candidates.dtype, np.integer)):
        raise DataError(f"candidates must be a 1-D integer array of slots, got {candidates.dtype} {candidates.shape}")
    n_slots = len(positive)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n_slots):
        raise DataError(f"candidates must be slots in [0, {n_slots})")
    if len(np.unique(candidates)) != len(candidates):
        raise DataError("candidates holds a slot twice; repeats are the plan's job")

    counts = np.zeros(n_slots, np.int64)
    counts[candidates] = 1
    if balance == "none" or len(candidates) == 0:
        return counts
    pos = positive[candidates]
    n, n_pos = len(candidates), int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        logger.warning("balance 'hybrid' needs positives and negatives (have %d and %d); using 'none'", n_pos, n_neg)
        return counts
    r_pos, p_neg = sampling_rates(n_pos, n_neg, balance, pos_fraction)
    if r_pos == 1.0:  # positives already make pos_fraction
        return counts
    rng = np.random.default_rng([seed, epoch])
    pos_slots, neg_slots = candidates[pos], candidates[~pos]
    whole = int(np.floor(r_pos))
    counts[pos_slots] = whole + (rng.random(n_pos) < r_pos - whole)
    counts[neg_slots] = rng.random(n_neg) < p_neg
    logger.info(
        "epoch %d plan: %d candidates (%.3f positive) -> %d samples (%.3f positive; r_pos %.2f, p_neg %.3f)",
        epoch,
        n,
        n_pos / n,
        int(counts.sum()),
        counts[pos_slots].sum() / max(1, counts.sum()),
        r_pos,
        p_neg,
    )
    return counts


def _open_images(root: Path):
    """The store's image array, read-only (module-level so tests can count the reads)."""
    return open_reader(as_location(root))


class Layout(NamedTuple):
    """One epoch's sample sequence, the same on every rank: the shards read, in order, and their sample counts."""

    order: np.ndarray  # shard numbers in reading order
    totals: np.ndarray  # samples of each of those shards
    ends: np.ndarray  # cumulative totals: shard order[p] holds samples [ends[p] - totals[p], ends[p])
    per_rank: int  # samples of each rank (a tail shorter than world_size is dropped)


def epoch_layout(
    counts: np.ndarray, shard_slices: int, shuffle: bool, seed: int, epoch: int, world_size: int
) -> Layout:
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
    return Layout(order=order, totals=totals[order], ends=ends, per_rank=total // world_size)


class Piece(NamedTuple):
    """One shard's (or shard part's) samples in a worker's range, and the slot range read for them."""

    lo: int  # read images[lo:hi]: the slots, widened to their 2.5D neighbours
    hi: int
    slots: np.ndarray  # int64 (n,), ascending
    neighbours: np.ndarray  # int64 (n, 2*context+1): each slot's stack, the slot itself in the middle
    repeats: np.ndarray  # int64 (n,) >= 1: samples of each slot in this range


class Emission(NamedTuple):
    """Samples to write next, in order: sample ``sample[i]`` of piece number ``piece[i]``."""

    piece: np.ndarray
    sample: np.ndarray


_NOTHING = Emission(np.empty(0, np.int64), np.empty(0, np.int64))


class SequenceOrder:
    """Each piece's samples in sequence as soon as it arrives (evaluation order); no piece is held."""

    window = 1

    def __init__(self):
        self._added = 0

    def add(self, n: int) -> Emission:
        self._added += 1
        return Emission(np.full(n, self._added - 1, np.int64), np.arange(n))

    def rest(self) -> Emission:
        return _NOTHING


class WindowShuffle:
    """Shuffled order over a window of ``window`` pieces, so that exactly that many are ever held.

    Each sample of piece p goes out in one of the rounds p .. p + window - 1 (raised to window - 1:
    nothing goes out before ``window`` pieces are in).  When piece p arrives, round p goes out in random
    order; after the last piece, every later round goes out together in random order.  No sample of piece
    p - window + 1 is due after round p, so a round mixes the ``window`` latest pieces evenly.  Rounds are
    stratified: each run of ``window`` consecutive samples of a piece (neighbouring slices, mostly of one
    study) takes the ``window`` rounds in a random permutation, so a study's slices spread over the
    rounds instead of bunching in one batch.
    """

    def __init__(self, window: int, rng: np.random.Generator):
        self.window, self.rng = window, rng
        self._pending: list[tuple[int, np.ndarray]] = []  # (piece number, round of each of its samples)
        self._added = 0

    def add(self, n: int) -> Emission:
        p = self._added
        self._added += 1
        delays = np.argsort(self.rng.random((-(-n // self.window), self.window)), axis=1).ravel()[:n]
        self._pending.append((p, np.maximum(p + delays, self.window - 1)))
        out = self._due(lambda rounds: rounds == p)
        self._pending = [(q, rounds) for q, rounds in self._pending if q > p - self.window + 1]
        return out

    def rest(self) -> Emission:
        last = self._added - 1
        out = self._due(lambda rounds: rounds > last)
        self._pending = []
        return out

    def _due(self, due) -> Emission:
        picked = [(q, np.flatnonzero(due(rounds))) for q, rounds in self._pending]
        if not picked:
            return _NOTHING
        piece = np.concatenate([np.full(len(samples), q, np.int64) for q, samples in picked])
        sample = np.concatenate([samples for _, samples in picked])
        shuffled = self.rng.permutation(len(sample))
        return Emission(piece[shuffled], sample[shuffled])


class Step(NamedTuple):
    """What to emit after one more piece arrived (or, last, after all of them)."""

    live: dict  # piece number -> piece, for every piece the emission may name
    emission: Emission


def emissions(order, pieces: Iterable, size: Callable[[object], int]) -> Iterator[Step]:
    """Feeds ``pieces`` (taken one at a time, so a lazy iterable loads each when its turn comes) to ``order``.

    ``live`` drops a piece once ``order`` is done with it, right after the step is consumed: use a
    step's emission before asking for the next step.
    """
    live = {}
    for p, piece in enumerate(pieces):
        live[p] = piece
        step = Step(live, order.add(size(piece)))
        del piece  # only ``live`` holds a piece, so it is freed as soon as ``order`` is done with it
        yield step
        live.pop(p - order.window + 1, None)
    yield Step(live, order.rest())


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
        memory: NewMemory | WorkerSlots,
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
            yield from self._run(live[int(emission.piece[a])], emission.sample[a:b])

    def _run(self, loaded: _Loaded, samples: np.ndarray) -> Iterator[Batch]:
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
    shard, each repeated).  The sequence is cut into ``world_size`` equal contiguous pieces (the last
    ``total % world_size`` samples, fewer than ``world_size``, are dropped so that every rank makes the
    same number of steps), and each rank's piece into ``num_workers`` contiguous pieces of
    ``len // num_workers`` (+1 for the first ``len % num_workers``).  Every worker's sample count is
    therefore the same on every rank.  Pieces are disjoint; a shard lies in one piece except where a cut
    falls inside it: then each side reads only its own slot range.

    Each worker batches its own piece: all its batches have ``batch_size`` samples but its last, so
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
    again: a new tensor per batch, or, under :class:`~ichtrain.ring.RingLoader` (the trainer's loader), a
    slot of a :class:`~ichtrain.ring.BatchRing` the worker reuses.  No batch is a view of a block.

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
        """Build from an opened :class:`ichprep.store.Store` (shard size, study bounds and ``ok`` from it)."""
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

    def _worker_memory(self, info) -> NewMemory | WorkerSlots:
        if info is None:
            return NewMemory(shared=False)
        if self._ring is not None:
            return WorkerSlots(self._ring, info.id)
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

    def _plan(self) -> Layout:
        if self._layout is None:
            self._layout = epoch_layout(
                self.counts, self.shard_slices, self.shuffle, self.seed, self.epoch, self.world_size
            )
        return self._layout

    def __len__(self) -> int:
        """Samples this rank yields this epoch, all its workers together."""
        return self._plan().per_rank

    def batches(self, batch_size: int, num_workers: int, drop_last: bool = False) -> int:
        """Batches of ``batch_size`` this rank yields this epoch with ``num_workers`` (each batches its own piece)."""
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
