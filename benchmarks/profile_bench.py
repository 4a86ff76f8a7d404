"""What limits each figure: cProfile of the convert path (one shard) and of the store loader (one epoch),
plus a per-stage breakdown in ms/slice (median of repeats) of the steps those paths are made of.

zarr-python runs codecs on its own threads, so under cProfile the main thread's time spent waiting for
zstd shows as ``acquire`` of a thread lock; the stage breakdown times raw zstd (numcodecs) against the
same data through zarr to separate the codec from zarr's per-chunk overhead.
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pydicom
import zarr
from numcodecs import Zstd

from ichprep.convert import convert_shard
from ichprep.dicomio import read_slice
from ichprep.spec import PreprocessSpec
from ichprep.store import Store
from zarr.codecs import ZstdCodec

from . import layout
from .loader_bench import batches, crop_flip, store_images, store_stream


def _name(key: tuple) -> str:
    path, line, func = key
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({func})" if path != "~" else func


def top_functions(profile: cProfile.Profile, n: int = 12) -> dict:
    stats = pstats.Stats(profile).stats
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return {
        "total_s": total,
        "by_tottime": [{"function": _name(k), "ncalls": v[1], "tottime_s": round(v[2], 4),
                        "cumtime_s": round(v[3], 4), "share": round(v[2] / total, 3) if total else None}
                       for k, v in rows],
    }


def profile_convert_shard(paths: list[str], store: Store) -> dict:
    """cProfile of ``convert_shard`` rewriting shard 0 of the converted store (its marker removed first)."""
    root, spec = layout.root_of(store), store.spec
    shard = paths[: spec.shard_slices]
    layout.marker_file(root, 0).unlink(missing_ok=True)
    profile = cProfile.Profile()
    profile.enable()
    convert_shard(str(root), 0, 0, shard, spec)
    profile.disable()
    return {"slices": len(shard), **top_functions(profile)}


def profile_store_loader(store: Store, crop: int) -> dict:
    stream = store_stream(store)
    rng = np.random.default_rng(0)
    profile = cProfile.Profile()
    profile.enable()
    n = sum(b.shape[0] for b in batches(store_images(stream, 0), store.spec.channels, crop, rng))
    profile.disable()
    return {"slices": n, **top_functions(profile)}


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
                pydicom.dcmread(p).pixel_array
            except Exception:
                pass

    def ichprep_read():
        for p in files:
            try:
                read_slice(p)
            except Exception:
                pass

    shard = np.stack([spec.apply(h) for h in hus])
    codec = Zstd(level=spec.compression_level)
    encoded = [codec.encode(s) for s in shard]
    store = work / "stage.zarr"
    shutil.rmtree(store, ignore_errors=True)
    # The store's array layout (README): chunk = 1 slice, shard = shard_slices slices, zstd.
    images = zarr.create_array(str(store), shape=shard.shape, chunks=(1,) + shard.shape[1:],
                               shards=(spec.shard_slices,) + shard.shape[1:], dtype="uint8", fill_value=0,
                               compressors=ZstdCodec(level=spec.compression_level), zarr_format=3)

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
        "ichprep_spec_apply (pad, resize, 3 windows)": _per_item_ms(lambda: [spec.apply(h) for h in hus], m,
                                                                    repeats),
        "zstd_encode_raw (numcodecs)": _per_item_ms(lambda: [codec.encode(s) for s in shard], m, repeats),
        "zarr_shard_write (zstd inside)": _per_item_ms(write, m, repeats),
        "zstd_decode_raw (numcodecs)": _per_item_ms(lambda: [codec.decode(e) for e in encoded], m, repeats),
        "zarr_shard_read (zstd inside)": _per_item_ms(read, m, repeats),
        "crop_flip_copy": _per_item_ms(crop_only, m, repeats),
    }
    shutil.rmtree(store, ignore_errors=True)
    return {"slices": n, "ms_per_slice": {k: round(v, 4) for k, v in stages.items()},
            "zarr_config": {"threading.max_workers": zarr.config.get("threading.max_workers"),
                            "async.concurrency": zarr.config.get("async.concurrency")}}


def run(paths: list[str], store: Store, work: Path, crop: int, repeats: int) -> dict:
    return {
        "convert_shard": profile_convert_shard(paths, store),
        "store_loader_epoch": profile_store_loader(store, crop),
        "stages": stage_breakdown(paths, store.spec, work, crop, max(3, repeats)),
    }
