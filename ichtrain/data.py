"""From an ichprep store to training samples: targets, splits, slice selection, epoch plans, a shard stream.

Everything but :class:`ShardStream` is a pure function of the store's tables, so the trainer can log,
test and checkpoint the decisions (split, candidates, per-epoch repeat counts) separately from I/O.

The stream reads the store the way it is laid out: one ``images[a:b]`` call per shard (a zarr call costs
about 1 ms, so per-slice reads would be I/O-bound), shards visited in a shuffled order, samples mixed across
a few shards in a buffer.  An epoch is described by ``counts``: how many times each slot is emitted (0 = not
at all, and a shard whose slots are all 0 is never read).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.utils.data

from ichprep.labels import LABELS, SUBTYPES
from ichprep.location import as_location
from ichprep.store import open_reader

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Output columns of each task, in order (``rsna``: Kaggle's order, ``any`` last).
TASKS: dict[str, tuple[str, ...]] = {"rsna": LABELS, "binary": ("any",), "subtypes": SUBTYPES}
SPLIT_BY = ("patient", "study", "slice")
BALANCE = ("hybrid", "none")
SPLIT_PARTS = ("train", "val")
SELECTION_FORMS = "'all' or 'middle:K' (K >= 1: the K slices around each study's middle slice)"


def _task_columns(task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)}; is it an ichprep store table?")


def targets(slices: pd.DataFrame, task: str) -> np.ndarray:
    """float32 (N, K) targets of ``task``; an unlabelled slice (null label) gives NaN there (a NaN row)."""
    columns = _task_columns(task)
    _check_columns(slices, columns, "slices")
    return slices[list(columns)].to_numpy(dtype=np.float32, na_value=np.nan)


def is_positive(slices: pd.DataFrame) -> np.ndarray:
    """bool (N,): the slice is labelled ``any == 1`` (nulls count as not positive)."""
    _check_columns(slices, ["any"], "slices")
    return slices["any"].eq(1).fillna(False).to_numpy(dtype=bool)


def split_slices(slices: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, by: str = "patient") -> np.ndarray:
    """``"train"``/``"val"`` for every slot, holding out about ``val_fraction`` of the slices.

    ``by="patient"`` (default) keeps each patient on one side (a study without patient_id is its own
    group), ``by="study"`` each study.  Groups are shuffled with ``default_rng(seed)`` after sorting their
    keys, so the split depends on the seed and the data, not on row order, and val takes the shuffled
    prefix of groups whose slice count is nearest ``val_fraction * N`` (at least one group on each side).
    Every row counts, zero-filled and unlabelled ones included, so the fraction is one of slots.

    ``by="slice"`` is the reference method's random slice-level split (a permutation of row positions).
    It is *leaky*: neighbouring, nearly identical slices of one study land on both sides, so validation
    scores are optimistic.  It exists only to reproduce the reference numbers.
    """
    if not _is_number(val_fraction) or not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    if by not in SPLIT_BY:
        raise ConfigError(f"unknown split {by!r}; choose one of {', '.join(SPLIT_BY)}")
    n = len(slices)
    seed = _check_int("seed", seed)
    rng = np.random.default_rng(seed)
    if by == "slice":
        if n < 2:
            raise DataError(f"cannot split {n} slice(s) into train and val")
        is_val = np.zeros(n, bool)
        is_val[rng.permutation(n)[: min(n - 1, max(1, round(val_fraction * n)))]] = True
        return np.where(is_val, "val", "train")

    _check_columns(slices, ["study_uid", "patient_id"], "slices")
    study = slices["study_uid"].astype(object)
    if study.isna().any():
        raise DataError("slices has rows without study_uid; the store is broken")
    if by == "patient":
        # Prefixes keep a patient id from colliding with a study uid that happens to be the same string.
        patient = slices["patient_id"].astype(object)
        keys = np.where(patient.isna(), "study:" + study.astype(str), "patient:" + patient.astype(str))
    else:
        keys = study.to_numpy(dtype=str)
    groups, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)  # sorted keys
    if len(groups) < 2:
        raise DataError(f"cannot split by {by}: the store has {len(groups)} {by}(s); use more data or by='slice'")
    order = rng.permutation(len(groups))
    cum = np.cumsum(sizes[order])[:-1]           # slices in val if the first k+1 shuffled groups go there
    k = int(np.argmin(np.abs(cum - val_fraction * n))) + 1
    is_val = np.zeros(len(groups), bool)
    is_val[order[:k]] = True
    split = np.where(is_val[inverse], "val", "train")
    logger.info("split by %s (seed %d): %d of %d groups, %d of %d slices (%.3f) in val", by, seed, k, len(groups),
                int(cum[k - 1]), n, cum[k - 1] / n)
    return split


def select_slices(slices: pd.DataFrame, studies: pd.DataFrame, selection: str = "all") -> np.ndarray:
    """bool (N,): the slots a selection keeps.

    ``"all"`` keeps every slot; ``"middle:K"`` keeps, per study, the K slices centred on its middle slice
    ``start + n // 2`` (the reference method trains on these), the whole study when it has fewer than K.
    """
    n = len(slices)
    if selection == "all":
        return np.ones(n, bool)
    match = re.fullmatch(r"middle:(\d+)", selection) if isinstance(selection, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"unknown slice selection {selection!r}; use {SELECTION_FORMS}")
    k = int(match.group(1))
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
        raise DataError(f"studies do not tile the {n_slices} slots as contiguous [start, stop) runs; "
                        "the store's studies.parquet does not match its slices")
    size = stop - start
    return np.repeat(start, size), np.repeat(stop, size)


def train_candidates(slices: pd.DataFrame, split: np.ndarray, selection_mask: np.ndarray | None, task: str,
                     part: str = "train") -> np.ndarray:
    """Sorted slot indices eligible for ``part`` of ``task``.

    Eligible: ``ok`` (not zero-filled), every task label present, ``split == part``, selected
    (``selection_mask``; None = all).  Task ``subtypes`` models only bleeding slices, so it also requires
    ``any == 1``.
    """
    if part not in SPLIT_PARTS:
        raise ConfigError(f"unknown split part {part!r}; choose one of {', '.join(SPLIT_PARTS)}")
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


def _check_int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def epoch_plan(candidates: np.ndarray, positive: np.ndarray, balance: str = "hybrid", pos_fraction: float = 0.5,
               seed: int = 0, epoch: int = 0) -> np.ndarray:
    """int64 (N,) repeat counts of one epoch: 0 for non-candidates, N = ``len(positive)``.

    ``"none"``: every candidate once.  ``"hybrid"`` (the reference method's mix of under- and
    over-sampling): each negative kept with probability ``p_neg``, each positive repeated ``r_pos`` times
    on average (integer part always, fractional part by a coin flip), with
    ``n_pos*r_pos + n_neg*p_neg = n`` and ``n_pos*r_pos = pos_fraction * n``: the epoch keeps about its
    length and gets about ``pos_fraction`` positives.  If positives already make ``pos_fraction`` nothing
    changes; with no positives or no negatives it falls back to "none" (with a warning).
    Random draws depend on (seed, epoch) only.
    """
    if balance not in BALANCE:
        raise ConfigError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE)}")
    if not _is_number(pos_fraction) or not 0.0 < float(pos_fraction) < 1.0:
        raise ConfigError(f"pos_fraction must be a number strictly between 0 and 1, got {pos_fraction!r}")
    seed, epoch = _check_int("seed", seed), _check_int("epoch", epoch)
    positive = np.asarray(positive)
    if positive.ndim != 1 or positive.dtype != bool:
        raise DataError(f"positive must be a 1-D bool array (one entry per slot), "
                        f"got {positive.dtype} {positive.shape}")
    candidates = np.asarray(candidates)
    if candidates.ndim != 1 or (candidates.size and not np.issubdtype(candidates.dtype, np.integer)):
        raise DataError(f"candidates must be a 1-D array of slot indices, got {candidates.dtype} {candidates.shape}")
    n_slots = len(positive)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n_slots):
        raise DataError(f"candidates must be slot indices in [0, {n_slots})")
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
    if n_pos >= pos_fraction * n:
        return counts
    r_pos = pos_fraction * n / n_pos               # > 1 here
    p_neg = (1.0 - pos_fraction) * n / n_neg       # < 1 here
    rng = np.random.default_rng([seed, epoch])
    pos_slots, neg_slots = candidates[pos], candidates[~pos]
    whole = int(np.floor(r_pos))
    counts[pos_slots] = whole + (rng.random(n_pos) < r_pos - whole)
    counts[neg_slots] = rng.random(n_neg) < p_neg
    logger.info("epoch %d plan: %d candidates (%.3f positive) -> %d samples (%.3f positive; r_pos %.2f, p_neg %.3f)",
                epoch, n, n_pos / n, int(counts.sum()), counts[pos_slots].sum() / max(1, counts.sum()), r_pos, p_neg)
    return counts


def _open_images(root: Path):
    """The store's image array, read-only (module-level so tests can count the reads)."""
    return open_reader(as_location(root))


class ShardStream(torch.utils.data.IterableDataset):
    """Yields ``(image uint8 (C*(2*context+1), H, W), target float32 (K,), slot)``, each slot ``counts[slot]`` times.

    Layout of one epoch, computed identically on every rank from (counts, seed, epoch): shards holding a
    slot with count > 0 are ordered (shuffled per (seed, epoch), or sorted when ``shuffle=False``) and
    concatenated into one sequence of samples (slots ascending within a shard, each repeated).  The
    sequence is cut into ``world_size`` equal contiguous pieces (the last ``total % world_size`` samples,
    fewer than ``world_size``, are dropped so that every rank makes the same number of steps), and each
    rank's piece into ``num_workers`` contiguous pieces of ``len // num_workers`` (+1 for the first
    ``len % num_workers``).  Every worker's sample count is therefore the same on every rank, which keeps
    DDP step counts equal even though DataLoader batches per worker.  Pieces are disjoint; a shard lies in
    one piece except where a cut falls inside it: then each side reads only its own slot range.

    Each shard (or shard part) is read with one ``images[lo:hi]`` call, widened by up to ``context`` slots
    where a 2.5D neighbour lies across the shard edge, so neighbours come from the same read.  Neighbours
    are clamped to the slot's study [start, stop), never taken from another study (and, when ``ok`` is
    given, a zero-filled neighbour is replaced by the slot itself).

    ``shuffle=True`` mixes the samples of about ``buffer_shards`` shards in a buffer (rng per
    (seed, epoch, rank, worker)); ``shuffle=False`` yields in sequence order (evaluation).
    Call :meth:`set_epoch` before each epoch and build the DataLoader without ``persistent_workers``:
    workers get a copy of the stream when they start, so a persistent worker never sees a new epoch.
    """

    def __init__(self, root, counts: np.ndarray, targets: np.ndarray, shard_slices: int, studies_start: np.ndarray,
                 studies_stop: np.ndarray, context: int = 0, shuffle: bool = True, seed: int = 0,
                 buffer_shards: int = 4, rank: int = 0, world_size: int = 1, ok: np.ndarray | None = None):
        self.root = str(root)  # a folder or an fsspec URL (s3://...); each worker opens it itself
        for name, value, low in (("shard_slices", shard_slices, 1), ("context", context, 0),
                                 ("buffer_shards", buffer_shards, 1), ("world_size", world_size, 1)):
            _check_int(name, value, low)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.shard_slices, self.context, self.buffer_shards = int(shard_slices), int(context), int(buffer_shards)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), _check_int("seed", seed), 0

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
            raise DataError(f"studies_start/studies_stop must be per-slot study bounds (N={n}) "
                            "with start <= slot < stop")
        self.ok = None if ok is None else np.asarray(ok, dtype=bool)
        if self.ok is not None and self.ok.shape != (n,):
            raise DataError(f"ok must have shape ({n},), got {self.ok.shape}")
        c, h, w = images.shape[1:]
        #: Shape of every yielded image (the model's input channels are sample_shape[0]).
        self.sample_shape = (c * (2 * self.context + 1), h, w)
        self._images, self._images_pid = images, os.getpid()
        self._layout = None
        self.counts = self._check_counts(counts)

    @classmethod
    def from_store(cls, store, counts: np.ndarray, targets: np.ndarray, **kwargs) -> "ShardStream":
        """Build from an opened :class:`ichprep.store.Store` (shard size, study bounds and ``ok`` from it)."""
        start, stop = study_bounds(store.studies, len(store.slices))
        kwargs.setdefault("ok", store.slices["ok"].to_numpy(dtype=bool))
        return cls(store.root, counts, targets, store.shard_slices, start, stop, **kwargs)

    def _check_counts(self, counts) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.shape != (self.n,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise DataError(f"counts must be non-negative integers of shape ({self.n},), "
                            f"got {counts.dtype} {counts.shape}")
        if self.ok is not None and (counts[~self.ok] > 0).any():
            raise DataError("counts select zero-filled slots (ok=False); build candidates with train_candidates")
        return counts.astype(np.int64)

    def set_epoch(self, epoch: int, counts: np.ndarray | None = None) -> None:
        """Switch to ``epoch`` (new shard order and buffer draws), optionally with that epoch's plan."""
        self.epoch = _check_int("epoch", epoch)
        if counts is not None:
            self.counts = self._check_counts(counts)
        self._layout = None

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

    def _plan(self):
        """(shard order, cumulative sample ends, shard totals, per-rank length) of this epoch; same on every rank."""
        if self._layout is None:
            totals = np.add.reduceat(self.counts, np.arange(0, self.n, self.shard_slices))
            order = np.flatnonzero(totals > 0)
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
            ends = np.cumsum(totals[order])
            total = int(ends[-1]) if len(ends) else 0
            per_rank = total // self.world_size
            if self.world_size > 1 and total % self.world_size:
                logger.debug("epoch %d: %d of %d samples dropped to give %d ranks equal length",
                             self.epoch, total % self.world_size, total, self.world_size)
            self._layout = (order, ends, totals[order], per_rank)
        return self._layout

    def __len__(self) -> int:
        """Samples this rank yields this epoch, all its workers together."""
        return self._plan()[3]

    def batches(self, batch_size: int, num_workers: int, drop_last: bool = False) -> int:
        """Batches a DataLoader over this stream yields this epoch (each worker batches its own piece)."""
        _check_int("batch_size", batch_size, 1)
        sizes = [g1 - g0 for g0, g1 in self._worker_ranges(max(1, num_workers))]  # num_workers 0 = main process
        return sum(s // batch_size if drop_last else -(-s // batch_size) for s in sizes)

    def _worker_ranges(self, num_workers: int) -> list[tuple[int, int]]:
        """[g0, g1) positions in the epoch's sample sequence of each worker of this rank."""
        per_rank = self._plan()[3]
        base, extra = divmod(per_rank, num_workers)
        out, g = [], self.rank * per_rank
        for w in range(num_workers):
            size = base + (w < extra)
            out.append((g, g + size))
            g += size
        return out

    def _pieces(self, g0: int, g1: int):
        """(read lo, read hi, slots, neighbour slots, repeats) per shard overlapping samples [g0, g1), in order."""
        order, ends, totals, _ = self._plan()
        starts = ends - totals
        first, last = np.searchsorted(ends, g0, side="right"), np.searchsorted(starts, g1, side="left")
        for p in range(first, last):
            a = int(order[p]) * self.shard_slices
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
            if mine.sum() == counts.sum():       # the whole shard is ours: read it as stored
                lo, hi = min(lo, a), max(hi, b)
            yield lo, hi, slots, nb, mine[local]

    def _load(self, images, lo, hi, slots, nb, repeats):
        """One range read -> [(image array, slot, repeats)] for the shard's slots."""
        block = np.asarray(images[lo:hi])
        c, h, w = self.sample_shape
        # Fancy indexing copies, so each sample owns its memory and the block is freed after this shard.
        return [(block[nb[j] - lo].reshape(c, h, w), int(slots[j]), int(repeats[j])) for j in range(len(slots))]

    def _emit(self, image: np.ndarray, slot: int, shared: bool):
        # A repeated slot's copies must not share memory (a consumer may modify a sample in place).
        image = image.copy() if shared else image
        return torch.from_numpy(image), torch.from_numpy(self.targets[slot].copy()), slot

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        g0, g1 = self._worker_ranges(num_workers)[worker]
        if g1 <= g0:
            return
        images = self._array()
        if not self.shuffle:
            for piece in self._pieces(g0, g1):
                for image, slot, repeats in self._load(images, *piece):
                    for _ in range(repeats):
                        yield self._emit(image, slot, repeats > 1)
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        pool: list[tuple[np.ndarray, int, bool]] = []

        def draw():
            # Swap-remove a random item: O(1), and the pool's order does not matter.
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            return self._emit(*pool.pop())

        for loaded, piece in enumerate(self._pieces(g0, g1), start=1):
            added = 0
            for image, slot, repeats in self._load(images, *piece):
                pool.extend([(image, slot, repeats > 1)] * repeats)
                added += repeats
            if loaded >= self.buffer_shards:
                # Draw as many as were added: the pool stays at ~buffer_shards - 1 shards after warm-up.
                for _ in range(added):
                    yield draw()
        while pool:
            yield draw()
