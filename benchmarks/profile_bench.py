"""What limits each figure: cProfile of the convert path (one shard) and of the store loader (one epoch),
plus a per-stage breakdown in ms/slice (median of repeats) of the steps those paths are made of.

zstd stores are written and read without zarr (``ichprep/shardcodec.py``), so both
profiles normally see the main thread only; the all-thread machinery below still matters for other codecs
and for the stage breakdown's zarr rows, which are kept as the reference for zarr's own overhead.

zarr-python runs its I/O on an event-loop thread and its codecs on a thread pool, where a main-thread
cProfile cannot see them (it shows the wait as ``acquire`` of a lock).  So every thread is profiled:
zarr's threads are stopped first (``zarr.core.sync.cleanup_resources``) and restarted by the next zarr
call under ``threading.setprofile``, which starts a cProfile in each new thread; the profiles are merged.
Idle waits (lock acquire, queue get, epoll) are reported apart from the functions that do the work.  The
stage breakdown times raw zstd (numcodecs) against the same data through zarr to separate the codec from
zarr's per-chunk overhead.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from ichprep.convert import convert_shard
from ichprep.reading.dicomio import read_header, read_slice
from ichprep.reading.source import Member
from ichprep.spec import PreprocessSpec
from ichprep.storage.shardcodec import encode_shard
from ichprep.storage.store import Store

from . import layout
from .loader_bench import batches, crop_flip, store_images, store_stream


def _name(key: tuple) -> str:
    path, line, func = key
    if path == "~":  # a builtin
        return func
    for pattern in (r".*/site-packages/", r".*/lib/python3\.\d+/", re.escape(str(Path(__file__).parent.parent)) + "/"):
        path = re.sub("^" + pattern, "", path)
    return f"{path}:{line}({func})"


#: Functions in which a thread sleeps (waiting for another thread or for I/O readiness), not works.
WAITS = (
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'get' of '_queue.SimpleQueue' objects>",
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
)


def top_functions(stats: pstats.Stats, n: int = 12) -> dict:
    """Top ``n`` functions by own time, idle waits excluded (reported as ``waiting_s``)."""
    raw = stats.stats
    waiting = sum(v[2] for k, v in raw.items() if _name(k) in WAITS)
    work = {k: v for k, v in raw.items() if _name(k) not in WAITS}
    total = sum(v[2] for v in work.values())
    rows = sorted(work.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return {
        "busy_s": total,
        "waiting_s": waiting,
        "by_tottime": [
            {
                "function": _name(k),
                "ncalls": v[1],
                "tottime_s": round(v[2], 4),
                "cumtime_s": round(v[3], 4),
                "share": round(v[2] / total, 3) if total else None,
            }
            for k, v in rows
        ],
    }


def profile_all_threads(fn) -> tuple[pstats.Stats, list[str]]:
    """cProfile ``fn()`` in this thread and in every thread zarr starts meanwhile (see the module docstring)."""
    try:
        from zarr.core.sync import cleanup_resources
    except ImportError:  # another zarr: main thread only
        cleanup_resources = None
    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def start_in_thread(frame, event, arg):
        profile = cProfile.Profile()
        with lock:
            profiles.append((threading.current_thread().name, profile))
        profile.enable()  # replaces this hook for the rest of the thread's life

    # A zarr-owned pool (max_workers set) is shut down and joined by cleanup_resources; the loop's default one
    # would not be, and its threads' profiles could still be running when they are read.
    with zarr.config.set({"threading.max_workers": 1}):
        if cleanup_resources:
            cleanup_resources()
        threading.setprofile(start_in_thread)
        main = cProfile.Profile()
        main.enable()
        try:
            fn()
        finally:
            main.disable()
            threading.setprofile(None)
            if cleanup_resources:
                cleanup_resources()
    stats = pstats.Stats(main)
    for _, profile in profiles:
        profile.disable()
        stats.add(profile)
    return stats, ["main"] + [name for name, _ in profiles]


def profile_convert_shard(paths: list[str], store: Store) -> dict:
    """Every thread's profile of ``convert_shard`` rewriting shard 0 of the converted store (marker removed)."""
    root, spec = layout.root_of(store), store.spec
    shard = [Member(p) for p in paths[: spec.shard_slices]]
    layout.marker_file(root, 0).unlink(missing_ok=True)
    stats, threads = profile_all_threads(lambda: convert_shard(str(root), 0, 0, shard, spec))
    return {"slices": len(shard), "threads": threads, **top_functions(stats)}


def profile_store_loader(store: Store, crop: int) -> dict:
    """Every thread's profile of one epoch of the store loader (ShardStream + crop/flip + batching)."""
    stream = store_stream(store)
    rng = np.random.default_rng(0)
    counted = []

    def epoch():
        counted.append(sum(b.shape[0] for b in batches(store_images(stream, 0), store.spec.channels, crop, rng)))

    stats, threads = profile_all_threads(epoch)
    return {"slices": counted[0], "threads": threads, **top_functions(stats)}


def _per_item_ms(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times) / n


def stage_breakdown(paths: list[str], spec: PreprocessSpec, work: Path, crop: int, repeats: int) -> dict:
    """ms per slice of each step on up to one shard's worth of the plan's files (warm page cache)."""
    files = paths[: spec.shard_slices]
    hus = []
    for p in files:
        try:
            hus.append(read_slice(p)[1])
        except Exception:
            pass
    n = len(files)

    def parse():
        for p in files:
            pydicom.dcmread(p)

    def floor():
        for p in files:
            try:
                _ = pydicom.dcmread(p).pixel_array
            except Exception:
                pass

    def ichprep_read():
        for p in files:
            try:
                read_slice(p)
            except Exception:
                pass

    def header_only():
        for p in files:
            try:
                read_header(p)
            except Exception:
                pass

    shard = np.stack([spec.apply(h) for h in hus])
    codec = Zstd(level=spec.compression_level)
    encoded = [codec.encode(s) for s in shard]
    store = work / "stage.zarr"
    shutil.rmtree(store, ignore_errors=True)
    # The store's array layout (README): chunk = 1 slice, shard = shard_slices slices, zstd.
    images = zarr.create_array(
        str(store),
        shape=shard.shape,
        chunks=(1,) + shard.shape[1:],
        shards=(spec.shard_slices,) + shard.shape[1:],
        dtype="uint8",
        fill_value=0,
        compressors=ZstdCodec(level=spec.compression_level),
        zarr_format=3,
    )

    def write():
        images[0 : len(shard)] = shard

    def read():
        np.asarray(images[0 : len(shard)])

    rng = np.random.default_rng(0)
    out = np.empty((spec.channels, crop, crop), np.uint8)

    def crop_only():
        for s in shard:
            crop_flip(s, out, rng)

    m = len(shard)
    stages = {
        "pydicom_parse": _per_item_ms(parse, n, repeats),
        "pydicom_parse_and_pixel_array (floor)": _per_item_ms(floor, n, repeats),
        "ichprep_read_slice (parse, header fields, decode, HU)": _per_item_ms(ichprep_read, n, repeats),
        "ichprep_read_header (scan)": _per_item_ms(header_only, n, repeats),
        "ichprep_spec_apply (pad, resize, 3 windows)": _per_item_ms(lambda: [spec.apply(h) for h in hus], m, repeats),
        "zstd_encode_raw (numcodecs)": _per_item_ms(lambda: [codec.encode(s) for s in shard], m, repeats),
        "ichprep_encode_shard (reused zstd context)": _per_item_ms(
            lambda: encode_shard(shard, spec.shard_slices, spec.compression_level), m, repeats
        ),
        "zarr_shard_write (zstd inside)": _per_item_ms(write, m, repeats),
        "zstd_decode_raw (numcodecs)": _per_item_ms(lambda: [codec.decode(e) for e in encoded], m, repeats),
        "zarr_shard_read (zstd inside)": _per_item_ms(read, m, repeats),
        "crop_flip_copy": _per_item_ms(crop_only, m, repeats),
    }
    shutil.rmtree(store, ignore_errors=True)
    return {
        "slices": n,
        "ms_per_slice": {k: round(v, 4) for k, v in stages.items()},
        "zarr_config": {
            "threading.max_workers": zarr.config.get("threading.max_workers"),
            "async.concurrency": zarr.config.get("async.concurrency"),
        },
    }


def run(paths: list[str], store: Store, work: Path, crop: int, repeats: int) -> dict:
    return {
        "convert_shard": profile_convert_shard(paths, store),
        "store_loader_epoch": profile_store_loader(store, crop),
        "stages": stage_breakdown(paths, store.spec, work, crop, max(3, repeats)),
    }
