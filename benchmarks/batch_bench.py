"""Finished uint8 batches per loader process: ShardStream's batches against its former per-sample path.

``python -m benchmarks.batch_bench --store cache.zarr [--repeats 3] [--min-samples 8000] [--out FILE.json]``

Contenders, for ``--context`` 0 and 1 and batches of 32 and 64, on a store tiled from ``--store`` until one
epoch holds at least ``--min-samples`` slices (:mod:`benchmarks.tiled_store`), every ok slot once, shuffled,
warm page cache (one untimed epoch first):

* ``former``: the baseline, ShardStream's per-sample iteration before it yielded batches, kept here as
  :class:`FormerSampleStream` (same plan and reads; a fancy-index copy per sample out of its shard block,
  another per repeat), stacked by ``torch.utils.data.default_collate``;
* ``batches``: :class:`~ichtrain.data.stream.ShardStream` itself, yielding finished
  :class:`~ichtrain.data.ring.Batch`es;
* each in this process (one torch thread, as in a DataLoader worker), then through a DataLoader with
  1 and with 2 workers (the transfer to this process included; samples/s counted from the first batch
  on, worker start-up and buffer fill reported apart; CPU per sample of the workers and of this process
  over the whole epoch), and the stream once more with plain batch tensors in the workers (moved to
  shared memory when sent: one copy more, done by the queue's feeder thread) to show what allocating
  them in shared memory up front does;
* ``ring``: the trainer's own loader (:func:`ichtrain.data.loader.batch_loader`), whose workers reuse batch cells
  of one shared segment (:mod:`ichtrain.data.ring`) instead of fresh shared memory per batch (``--ring-only``:
  just these DataLoader rows and the fresh-memory ones beside them).

:func:`buffer_mix` simulates how many studies a batch mixes for several ``buffer_shards``, with the stream's
own epoch layout and shuffle on an RSNA-sized table (no I/O).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.utils.data

from ichprep.storage.store import Store, open_store
from ichtrain.data import ring
from ichtrain.data.balance import epoch_plan
from ichtrain.data.loader import batch_loader
from ichtrain.data.order import WindowShuffle, emissions
from ichtrain.data.stream import ShardStream, epoch_layout
from ichtrain.data.tables import targets

from . import layout, tiled_store
from .measure import Run, Stopwatch, ratio, summarize

BATCHES = (32, 64)
CONTEXTS = (0, 1)
FORMER_BUFFER_SHARDS = 4  # the stream's default before the buffer simulation


# ---------------------------------------------------------------- the baseline


class FormerSampleStream(torch.utils.data.IterableDataset):
    """Baseline: ShardStream's iteration before batches, one ``(image, target, slot)`` at a time (shuffle mode).

    Same plan, worker pieces and one read per piece as the wrapped stream; each sample is copied out of
    its block by fancy indexing and again per repeat, and a random pool item is swap-removed per draw.
    """

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def _samples(self, images, piece) -> list[tuple[np.ndarray, int, int]]:
        block = np.asarray(images[piece.lo : piece.hi])
        shape = self.stream.sample_shape
        return [
            (block[piece.neighbours[j] - piece.lo].reshape(shape), int(piece.slots[j]), int(piece.repeats[j]))
            for j in range(len(piece.slots))
        ]

    def _emit(self, image: np.ndarray, slot: int, repeated: bool):
        image = image.copy() if repeated else image
        return torch.from_numpy(image), torch.from_numpy(self.stream.targets[slot].copy()), slot

    def __iter__(self):
        s = self.stream
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        g0, g1 = s._worker_ranges(num_workers)[worker]
        images = s._array()
        rng = np.random.default_rng([s.seed, s.epoch, s.rank, worker])
        pool: list[tuple[np.ndarray, int, bool]] = []

        def draw():
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            return self._emit(*pool.pop())

        for loaded, piece in enumerate(s._pieces(g0, g1) if g1 > g0 else (), start=1):
            added = 0
            for image, slot, repeats in self._samples(images, piece):
                pool.extend([(image, slot, repeats > 1)] * repeats)
                added += repeats
            if loaded >= s.buffer_shards:
                for _ in range(added):
                    yield draw()
        while pool:
            yield draw()


def collated(samples: Iterable, batch_size: int) -> Iterator:
    """``default_collate`` every ``batch_size`` samples (the last batch may be short), as a DataLoader does."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield torch.utils.data.default_collate(batch)
            batch = []
    if batch:
        yield torch.utils.data.default_collate(batch)


class PlainBatchStream(ShardStream):
    """ShardStream with plain batch tensors in DataLoader workers (pickling moves them to shared memory)."""

    _share_in_workers = False


# ---------------------------------------------------------------- timing


def in_process(batches: Iterable) -> Run:
    """Every batch of one epoch in this process, with one torch thread as in a DataLoader worker."""
    watch, n, threads = Stopwatch(), 0, torch.get_num_threads()
    torch.set_num_threads(1)  # default_collate's stack would otherwise use every core, and stall when they are busy
    try:
        with watch.timing():
            for batch in batches:
                n += len(batch[0])
    finally:
        torch.set_num_threads(threads)
    return watch.run(n)


class LoaderRun(NamedTuple):
    steady: Run  # samples after the first batch, from its arrival to the end (whole epoch if one batch)
    first_batch_s: float  # worker start-up and buffer fill
    worker_cpu_ms: float  # CPU of all workers per sample, whole epoch (start-up included)
    main_cpu_ms: float  # CPU of this process per sample, whole epoch


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (DataLoader workers count once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def through_loader(dataset, batch_size: int | None, workers: int) -> LoaderRun:
    """One epoch through ``DataLoader(num_workers=workers)`` (no pinning on CPU)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=4)
    return timed_pass(loader)


def through_trainer_loader(stream: ShardStream, workers: int) -> LoaderRun:
    """One epoch through the trainer's own loader (:func:`ichtrain.data.loader.batch_loader`: reused batch cells)."""
    return timed_pass(batch_loader(stream, workers, torch.device("cpu")))


def timed_pass(loader) -> LoaderRun:
    """One pass over ``loader``; steady rate from the first batch's arrival on."""
    children, main, started = _children_cpu_s(), time.process_time(), time.perf_counter()
    batches = iter(loader)
    arrivals = [(time.perf_counter(), len(batch[0])) for batch in batches]
    end = time.perf_counter()
    del batches  # joins the workers, so that their CPU time is counted
    n = sum(k for _, k in arrivals)
    cpu = LoaderRun(
        Run(0, 0.0, 0.0),
        arrivals[0][0] - started,
        1e3 * (_children_cpu_s() - children) / n,
        1e3 * (time.process_time() - main) / n,
    )
    if len(arrivals) == 1:
        return cpu._replace(steady=Run(n, end - started, 0.0))
    return cpu._replace(steady=Run(n - arrivals[0][1], end - arrivals[0][0], 0.0))


class Contender(NamedTuple):
    name: str
    where: str  # "in process" or "DataLoader, N worker(s)"
    workers: int
    epoch: Callable[[int], object]  # epoch number -> a Run or LoaderRun


def contenders(store: Store, context: int, batch: int, loader_workers: tuple[int, ...] = (1, 2)) -> list[Contender]:
    ok = store.slices["ok"].to_numpy(bool).astype(np.int64)
    y = targets(store.slices, "rsna")

    def stream(cls=ShardStream, **kwargs) -> ShardStream:
        return cls.from_store(store, ok, y, context=context, batch_size=batch, shuffle=True, **kwargs)

    former, new4, new, plain = (
        stream(buffer_shards=FORMER_BUFFER_SHARDS),
        stream(buffer_shards=FORMER_BUFFER_SHARDS),
        stream(),
        stream(PlainBatchStream),
    )

    def at(s: ShardStream, epoch: int) -> ShardStream:
        s.set_epoch(epoch)
        return s

    out = [
        Contender(
            "former: per-sample + default_collate",
            "in process",
            1,
            lambda e: in_process(collated(FormerSampleStream(at(former, e)), batch)),
        ),
        Contender(f"batches, buffer_shards {FORMER_BUFFER_SHARDS}", "in process", 1, lambda e: in_process(at(new4, e))),
        Contender(
            f"batches, buffer_shards {new.buffer_shards} (default)", "in process", 1, lambda e: in_process(at(new, e))
        ),
    ]
    for w in loader_workers:
        where = f"DataLoader, {w} worker{'s' if w > 1 else ''}"
        out += [
            Contender(
                "former: per-sample, DataLoader(batch_size)",
                where,
                w,
                lambda e, w=w: through_loader(FormerSampleStream(at(former, e)), batch, w),
            ),
            Contender(
                f"batches, buffer_shards {new.buffer_shards} (default), DataLoader(None)",
                where,
                w,
                lambda e, w=w: through_loader(at(new, e), None, w),
            ),
            Contender(
                "batches, reused slots: the trainer's loader (ring)",
                where,
                w,
                lambda e, w=w: through_trainer_loader(at(new, e), w),
            ),
            Contender(
                "batches, plain tensors in the worker, DataLoader(None)",
                where,
                w,
                lambda e, w=w: through_loader(at(plain, e), None, w),
            ),
        ]
    return out


def figures(contender: Contender, repeats: int, warm_up: bool = True) -> dict:
    if warm_up:
        contender.epoch(10_000)  # page cache, allocator, imports
    results = [contender.epoch(100 + r) for r in range(repeats)]
    head = {"contender": contender.name, "where": contender.where}
    if not isinstance(results[0], LoaderRun):
        out = summarize(results, unit="samples")
        return {**head, **out, "cpu_ms_per_sample": 1e3 * statistics.median(r.cpu_s for r in results) / results[0].n}
    out = summarize([r.steady for r in results], workers=contender.workers, unit="samples")
    return {
        **head,
        **out,
        "first_batch_s": statistics.median(r.first_batch_s for r in results),
        "cpu_ms_per_sample": statistics.median(r.worker_cpu_ms for r in results),
        "main_cpu_ms_per_sample": statistics.median(r.main_cpu_ms for r in results),
    }


def slots_or_fresh(contender: Contender) -> bool:
    """The two ways DataLoader workers get batch memory: fresh shared memory per batch, or reused ring slots."""
    name = contender.name
    return name.startswith("batches, ") and contender.where.startswith("DataLoader") and "plain" not in name


def throughput(store: Store, repeats: int, quick: bool = False, ring_only: bool = False) -> list[dict]:
    """Every contender at every (context, batch); ``quick``: batch 32, 1 DataLoader worker, no warm-up epoch.

    ``ring_only``: only the DataLoader rows of fresh shared memory and of reused slots.
    """
    rows = []
    for context in CONTEXTS:
        for batch in BATCHES[:1] if quick else BATCHES:
            for contender in contenders(store, context, batch, (1,) if quick else (1, 2)):
                if ring_only and not slots_or_fresh(contender):
                    continue
                rows.append({"context": context, "batch": batch, **figures(contender, repeats, warm_up=not quick)})
    return rows


def ratios(rows: list[dict]) -> dict:
    """samples/s of each batches row over the former row of its (context, batch, where)."""
    former = {
        (r["context"], r["batch"], r["where"]): r["samples_per_s"] for r in rows if r["contender"].startswith("former")
    }
    return {
        f"context {r['context']}, batch {r['batch']}, {r['where']}: {r['contender']} vs former": ratio(
            r["samples_per_s"], former[r["context"], r["batch"], r["where"]]
        )
        for r in rows
        if not r["contender"].startswith("former")
    }


def allocation(shape: tuple[int, ...] = (32, 9, 256, 256), repeats: int = 15) -> dict:
    """Median ms to get a batch's image memory and write every byte once, per way of getting it."""
    slot = ring.BatchRing(1, shape, depth=1).claim(0, 0, shape[0])
    ways = {
        "plain torch.empty (main process)": lambda: torch.empty(shape, dtype=torch.uint8),
        "torch.empty().share_memory_()": lambda: torch.empty(shape, dtype=torch.uint8).share_memory_(),
        "UntypedStorage._new_shared (ShardStream in workers)": lambda: ring.shared_empty(shape),
        "a reused BatchRing slot (the trainer's loader)": lambda: slot,
    }
    out = {}
    for name, make in ways.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            make().numpy().fill(1)
            times.append(time.perf_counter() - started)
        out[name] = 1e3 * statistics.median(times)
    return {"shape": list(shape), "ms": out}


# ---------------------------------------------------------------- buffer simulation


class RsnaLike(NamedTuple):
    counts: np.ndarray  # one epoch's hybrid plan, int64 per slot
    study: np.ndarray  # study number per slot
    positive: np.ndarray  # bool per slot


def rsna_like(studies: int = 21_744, seed: int = 0, pos_fraction: float = 0.5) -> RsnaLike:
    """RSNA-sized slot table: 24-60 slices a study (mean ~35), ~14 % positive slices in runs in ~41 % of studies."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(24 + np.rint(rng.gamma(2.0, 5.5, studies)), 24, 60).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    positive = np.zeros(int(sizes.sum()), bool)
    bleeding = rng.random(studies) < 0.41
    # A bleed is one run of ~34 % of its study's slices, so positives come in neighbouring slices.
    runs = np.maximum(1, np.rint(sizes * rng.uniform(0.1, 0.58, studies))).astype(np.int64)
    first = starts + (rng.random(studies) * (sizes - runs + 1)).astype(np.int64)
    for a, n in zip(first[bleeding], runs[bleeding]):
        positive[a : a + n] = True
    counts = epoch_plan(np.arange(len(positive)), positive, "hybrid", pos_fraction, seed=seed, epoch=0)
    return RsnaLike(counts, np.repeat(np.arange(studies), sizes), positive)


def emitted_slots(
    counts: np.ndarray, shard_slices: int, buffer_shards: int, seed: int = 0, max_shards: int | None = None
) -> np.ndarray:
    """Slots in the order one loader worker of a shuffled ShardStream emits them (whole shards as pieces)."""
    shards = epoch_layout(counts, shard_slices, shuffle=True, seed=seed, epoch=0, world_size=1).order[:max_shards]
    every = np.arange(len(counts))
    pieces = (
        np.repeat(every[k * shard_slices : (k + 1) * shard_slices], counts[k * shard_slices : (k + 1) * shard_slices])
        for k in shards
    )
    order = WindowShuffle(buffer_shards, np.random.default_rng([seed, 0, 0, 0]))
    out = []
    for live, emission in emissions(order, pieces, len):
        slots = np.empty(len(emission.piece), np.int64)
        for p in np.unique(emission.piece):
            where = emission.piece == p
            slots[where] = live[int(p)][emission.sample[where]]
        out.append(slots)
    return np.concatenate(out)


def distinct_per_batch(study_of_sample: np.ndarray, batch: int) -> np.ndarray:
    """Distinct studies in each full batch of ``batch`` consecutive samples."""
    full = len(study_of_sample) // batch * batch
    sorted_ = np.sort(study_of_sample[:full].reshape(-1, batch), axis=1)
    return 1 + (np.diff(sorted_, axis=1) != 0).sum(axis=1)


BUFFER_VALUES = (1, 2, 4, 8, 12, 16, 20, 22, 23, 24, 28, 32)


def buffer_mix(
    values: Iterable[int] = BUFFER_VALUES,
    batch: int = 32,
    shard_slices: int = 64,
    image_bytes: int = 3 * 256 * 256,
    wanted: int = 25,
    studies: int = 21_744,
    max_shards: int | None = None,
    seed: int = 0,
) -> dict:
    """Median (and 10th percentile) distinct studies per batch for each ``buffer_shards``, with decoded bytes."""
    table = rsna_like(studies, seed)
    rows = []
    for value in values:
        slots = emitted_slots(table.counts, shard_slices, value, seed, max_shards)
        distinct = distinct_per_batch(table.study[slots], batch)
        rows.append(
            {
                "buffer_shards": value,
                "median_distinct_studies": float(np.median(distinct)),
                "p10_distinct_studies": float(np.percentile(distinct, 10)),
                "decoded_bytes_per_worker": value * shard_slices * image_bytes,
                "batches": len(distinct),
            }
        )
    enough = [r["buffer_shards"] for r in rows if r["median_distinct_studies"] >= wanted]
    return {
        "batch": batch,
        "shard_slices": shard_slices,
        "studies": studies,
        "slots": len(table.counts),
        "samples_per_epoch": int(table.counts.sum()),
        "positive_slots": float(table.positive.mean()),
        "positive_samples": float(table.counts[table.positive].sum() / table.counts.sum()),
        "wanted_median": wanted,
        "smallest_enough": min(enough) if enough else None,
        "rows": rows,
    }


# ---------------------------------------------------------------- the section


def run(store: Store, work: Path, repeats: int, min_samples: int, quick: bool = False, ring_only: bool = False) -> dict:
    big = tiled_store.tile(store, work / "tiled-batches.zarr", min_samples)
    try:
        rows = throughput(big, repeats, quick, ring_only)
    finally:
        if layout.root_of(big) != layout.root_of(store):
            shutil.rmtree(layout.root_of(big), ignore_errors=True)
    mix = buffer_mix((4, 23), max_shards=200) if quick else buffer_mix()
    return {
        "slices_per_epoch": int(big.slices["ok"].sum()),
        "rows": rows,
        "ratios": {} if ring_only else ratios(rows),
        "allocation": allocation(repeats=3 if quick else 15),
        "buffer_mix": mix,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="an ichprep store (e.g. 40 synthetic studies at 256²)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-samples", type=int, default=8000, help="slices per epoch of the tiled store")
    parser.add_argument("--out", default=None, help="write the figures here (JSON)")
    parser.add_argument(
        "--ring-only", action="store_true", help="only DataLoader workers: fresh shared memory vs reused slots"
    )
    args = parser.parse_args(argv)
    from .report import format_batches, write_json

    with tempfile.TemporaryDirectory(prefix="ichkit-batch-bench-") as work:
        section = run(open_store(args.store), Path(work), args.repeats, args.min_samples, ring_only=args.ring_only)
    section["command"] = "python -m benchmarks.batch_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_batches(section))
    if args.out:
        write_json(section, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
