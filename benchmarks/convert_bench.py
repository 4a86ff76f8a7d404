"""Conversion, slices/s per worker: decode floor, Kaggle-style PNG baseline, ``ichprep convert`` (1 and 2 workers).

All four read the same files: the rows of one header scan whose status is ok (the converter's plan),
from a warm page cache (the scan and the floor read every file first).  ``ichprep convert`` gets that
scan as ``scan_table`` so its time excludes the header scan, whose own speed is reported separately.
Its time is the whole ``convert()`` call: shards, tables, rejected list and manifest.  The shard path
alone (``convert_shard`` over every shard, what grows with the archive) is reported next to it.
Cluster start-up (worker processes, imports) and one untimed warm-up conversion are excluded.

``prototype_malloc_fix_*`` rows run the same LocalCluster with the benchmark itself telling distributed to
leave MALLOC_TRIM_THRESHOLD_ unset on the workers (``ichprep.cluster.UNSET_MALLOC_TRIM``).  ``ichprep.cluster``
applies that setting to every local cluster it starts, so these rows measure the same configuration as the
``ichprep_*`` rows: a second sample of it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import dask
import numpy as np
import pandas as pd
import pydicom

from ichprep.cluster import MALLOC_TRIM_KEY, UNSET_MALLOC_TRIM, dask_client
from ichprep.convert import ConvertSummary, convert, convert_shard
from ichprep.reading.scan import OK, scan
from ichprep.reading.source import Member
from ichprep.spec import PreprocessSpec
from ichprep.storage.store import open_store

from . import layout, shard_codec
from .measure import Run, Stopwatch, ratio, repeat, summarize, timed

#: The three windows of the top RSNA solutions (center, width), as in ichprep's defaults.
KAGGLE_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))


def plan_paths(table: pd.DataFrame) -> list[str]:
    """Absolute paths of the slices the converter will read, in its order."""
    return table.loc[table["status"] == OK, "path"].astype(str).tolist()


# ---------------------------------------------------------------- floor and baseline


def decode_floor(paths: list[str]) -> int:
    """pydicom read + pixel decode only: nothing can convert faster than this."""
    for path in paths:
        try:
            _ = pydicom.dcmread(path).pixel_array
        except Exception:  # the truncated file: it costs its read, like in every other contender
            pass
    return len(paths)


def kaggle_png(path: str, out_png: str, size: int = 256) -> bool:
    """The common Kaggle practice: HU in float64 at 512², three windows in float, stack, resize, PNG.

    As the public kernels the top RSNA solutions started from: ``pixel_array * slope + intercept``
    (float64), each window clipped and scaled to [0, 1] at full resolution, stacked to (H, W, 3),
    resized to ``size`` with cv2 (bilinear, aspect not kept), scaled to uint8 and written with
    ``cv2.imwrite`` (default PNG compression).  No wrap-around fix.
    """
    try:
        image = kaggle_slice(path, size)
    except Exception:  # the truncated file
        return False
    return cv2.imwrite(out_png, image)


def kaggle_slice(path: str, size: int = 256) -> np.ndarray:
    """(size, size, 3) uint8 the Kaggle way (see :func:`kaggle_png`)."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for center, width in KAGGLE_WINDOWS:
        low = center - width / 2
        channels.append((np.clip(hu, low, low + width) - low) / width)
    image = cv2.resize(np.stack(channels, axis=-1), (size, size), interpolation=cv2.INTER_LINEAR)
    return (image * 255).round().astype(np.uint8)


def png_path(png_dir: Path, dicom_path: str) -> str:
    return str(png_dir / (Path(dicom_path).stem + ".png"))


def baseline(paths: list[str], png_dir: Path, size: int) -> int:
    shutil.rmtree(png_dir, ignore_errors=True)
    png_dir.mkdir(parents=True)
    for path in paths:
        kaggle_png(path, png_path(png_dir, path), size)
    return len(paths)


# ---------------------------------------------------------------- ichprep


def ichprep_convert(
    dicom_dir: Path, store: Path, spec: PreprocessSpec, table: pd.DataFrame, client=None
) -> ConvertSummary:
    shutil.rmtree(store, ignore_errors=True)  # a rerun on the same store would resume (skip every shard)
    return convert(dicom_dir, store, spec, scan_table=table, client=client)


def shard_path_only(paths: list[str], store: Path, spec: PreprocessSpec) -> Run:
    """``convert_shard`` over every shard of a store ``convert`` made, in this process: the per-slice cost
    that grows with the archive (no scan table, tables or manifest).  Each shard's completion marker is
    removed first (untimed), so the shard is decoded and written again rather than skipped."""
    tasks = list(enumerate(range(0, len(paths), spec.shard_slices)))
    watch = Stopwatch()
    for shard, _start in tasks:
        layout.marker_file(store, shard).unlink(missing_ok=True)
    with watch.timing():
        for shard, start in tasks:
            convert_shard(str(store), shard, start, [Member(p) for p in paths[start : start + spec.shard_slices]], spec)
    return watch.run(len(paths))


def _warm_worker() -> bool:
    import ichprep.convert  # noqa: F401  (imports pydicom, cv2, zarr on the worker)

    return True


@contextmanager
def _environ_restored():
    """LocalCluster's nannies run in this process and ``os.environ.update`` their pre-spawn variables into it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cluster_runs(
    workers: int,
    repeats: int,
    dicom_dir: Path,
    store: Path,
    spec: PreprocessSpec,
    table: pd.DataFrame,
    n: int,
    unset_malloc_trim: bool = False,
) -> dict:
    started = time.perf_counter()
    with (
        _environ_restored(),
        dask.config.set(UNSET_MALLOC_TRIM if unset_malloc_trim else {}),
        dask_client(workers=workers) as client,
    ):
        client.run(_warm_worker)
        startup = time.perf_counter() - started
        ichprep_convert(dicom_dir, store, spec, table, client)  # warm-up, untimed

        def one() -> int:
            ichprep_convert(dicom_dir, store, spec, table, client)
            return n

        runs = repeat(lambda: timed(one), repeats)
    result = summarize(runs, workers=workers)
    result["cluster_startup_s_excluded"] = round(startup, 3)
    # What the benchmark's own dask config says, read outside ichprep.cluster: it does not see the override
    # ichprep.cluster applies around LocalCluster, so ichprep_* rows still show distributed's default.
    result["worker_malloc_trim_threshold"] = None if unset_malloc_trim else dask.config.get(MALLOC_TRIM_KEY, None)
    return result


# ---------------------------------------------------------------- the machine's own ceiling


def _shard_loop_seconds(paths: list[str], store: str, spec: PreprocessSpec) -> float:
    """In a fresh process: :func:`shard_path_only` over ``paths`` into a private store, once to warm up, then timed."""
    from ichprep.storage.store import create_images

    create_images(store, len(paths), spec)
    shard_path_only(paths, Path(store), spec)
    return shard_path_only(paths, Path(store), spec).wall_s


def process_ceiling(paths: list[str], work: Path, spec: PreprocessSpec, repeats: int) -> dict:
    """What 2 processes can do on this machine without Dask: the shard path in 2 processes at once vs 1.

    Each process converts every slice into its own store; the ratio 2 x t(alone) / t(both at once) is the
    throughput two workers could reach if nothing else ran (no scheduler, client or tables).
    """
    import multiprocessing

    stores = [str(work / f"ceiling-{i}.zarr") for i in range(2)]
    alone, together = [], []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for _ in range(repeats):
            alone.append(pool.starmap(_shard_loop_seconds, [(paths, stores[0], spec)])[0])
            together.append(
                max(pool.starmap(_shard_loop_seconds, [(paths, stores[0], spec), (paths, stores[1], spec)]))
            )
    for store in stores:
        shutil.rmtree(store, ignore_errors=True)
    one, two = statistics.median(alone), statistics.median(together)
    return {"one_process_s": alone, "two_processes_s": together, "throughput_2_vs_1": round(2 * one / two, 3)}


# ---------------------------------------------------------------- the section


def run(dataset, work: Path, spec: PreprocessSpec, repeats: int, cluster_workers=(1, 2)) -> tuple[dict, dict]:
    """Returns (figures, artefacts): artefacts name the store, PNG folder and scan table for later sections."""
    dicom_dir = dataset.dicom_dir
    tables: list[pd.DataFrame] = []

    def scan_once() -> int:
        tables.append(scan(dicom_dir, dataset.labels_csv)[0])
        return len(tables[-1])

    scan_runs = repeat(lambda: timed(scan_once), repeats)
    table = tables[-1]
    paths = plan_paths(table)
    n = len(paths)
    if n == 0:
        raise SystemExit(f"no readable CT slice in {dicom_dir}")

    out: dict = {"scan": summarize(scan_runs, unit="files")}
    decode_floor(paths)  # warm the page cache and the pixel handlers
    out["floor_decode"] = summarize(repeat(lambda: timed(lambda: decode_floor(paths)), repeats))

    png_dir = work / "png"
    baseline(paths[:8], png_dir, spec.size)  # warm-up
    out["baseline_png"] = summarize(repeat(lambda: timed(lambda: baseline(paths, png_dir, spec.size)), repeats))

    store = work / "cache.zarr"
    ichprep_convert(dicom_dir, store, spec, table)  # warm-up
    summaries: list[ConvertSummary] = []

    def in_process() -> int:
        summaries.append(ichprep_convert(dicom_dir, store, spec, table))
        return n

    out["ichprep_in_process"] = summarize(repeat(lambda: timed(in_process), repeats))
    out["ichprep_shard_path"] = summarize(repeat(lambda: shard_path_only(paths, store, spec), repeats))
    direct = work / "direct-shards"
    out["prototype_direct_shard_write"] = summarize(
        repeat(lambda: timed(lambda: shard_codec.convert_shards_direct(paths, direct, spec)), repeats)
    )
    out["prototype_direct_shard_write"]["identical_to_zarr"] = shard_codec.identical_to_zarr(direct, open_store(store))
    shutil.rmtree(direct, ignore_errors=True)
    for prefix, unset in (("ichprep", False), ("prototype_malloc_fix", True)):
        for workers in cluster_workers:
            out[f"{prefix}_{workers}_worker{'s' if workers > 1 else ''}"] = cluster_runs(
                workers, repeats, dicom_dir, work / f"cache-{workers}w.zarr", spec, table, n, unset
            )
            shutil.rmtree(work / f"cache-{workers}w.zarr", ignore_errors=True)

    if 2 in cluster_workers:
        out["ceiling_2_processes"] = process_ceiling(paths, work, spec, repeats)
    rate = "slices_per_s"
    per_worker = "slices_per_s_per_worker"
    ratios = {
        "convert_in_process_vs_png_baseline": ratio(out["ichprep_in_process"][rate], out["baseline_png"][rate]),
        "convert_in_process_time_vs_floor": ratio(out["floor_decode"][rate], out["ichprep_in_process"][rate]),
        "shard_path_time_vs_floor": ratio(out["floor_decode"][rate], out["ichprep_shard_path"][rate]),
        "shard_path_vs_png_baseline": ratio(out["ichprep_shard_path"][rate], out["baseline_png"][rate]),
        "prototype_direct_write_time_vs_floor": ratio(
            out["floor_decode"][rate], out["prototype_direct_shard_write"][rate]
        ),
    }
    if "ichprep_1_worker" in out:
        ratios["convert_1_worker_vs_png_baseline"] = ratio(
            out["ichprep_1_worker"][per_worker], out["baseline_png"][rate]
        )
    if "ichprep_1_worker" in out and "ichprep_2_workers" in out:
        ratios["scaling_2_workers_vs_1"] = ratio(out["ichprep_2_workers"][rate], out["ichprep_1_worker"][rate])
        ratios["prototype_malloc_fix_scaling_2_workers_vs_1"] = ratio(
            out["prototype_malloc_fix_2_workers"][rate], out["prototype_malloc_fix_1_worker"][rate]
        )
    if "ichprep_1_worker" in out:
        ratios["prototype_malloc_fix_1_worker_vs_default"] = ratio(
            out["prototype_malloc_fix_1_worker"][rate], out["ichprep_1_worker"][rate]
        )
        ratios["convert_1_worker_vs_in_process"] = ratio(out["ichprep_1_worker"][rate], out["ichprep_in_process"][rate])
    out["ratios"] = ratios
    out["slices_converted"] = summaries[-1].n_slices
    out["files_in_plan"] = n
    out["shards"] = -(-n // spec.shard_slices)
    artefacts = {"table": table, "paths": paths, "store": store, "png_dir": png_dir, "summary": summaries[-1]}
    return out, artefacts
