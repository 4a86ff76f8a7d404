"""Loader, slices/s per process: from files on disk to a uint8 batch tensor (B, C, crop, crop).

Every loader does the same work after getting a (C, H, W) uint8 image: a random ``crop``² window and a
random horizontal flip (numpy, on the CPU: what is left for the loader before the batch goes to the
device) into a preallocated batch, handed over as a torch tensor.  They differ in where the image comes
from:

* ``store``: ichtrain's :class:`~ichtrain.data.stream.ShardStream` (shard reads, zstd decode, shuffle buffer, its
  uint8 batches taken apart again: :mod:`benchmarks.batch_bench` measures the batches themselves);
* ``dicom``: DICOM on the fly every epoch, ``read_slice`` + windows + resize in the loader (ichprep's
  own fast preprocessing, so this is the best case for the reference method's way of loading);
* ``png``: one PNG per slice from the baseline, ``cv2.imread``.

Warm: files in the page cache (one untimed pass first).  Cold: before every epoch each file involved is
fsync'ed and dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (untimed).  A raw-read probe and a
``mincore`` residency check say how cold "cold" really was on this machine.  Last, the store through a
real ``torch.utils.data.DataLoader`` with 2 workers (what ``ichtrain train --workers 2`` builds), on a
store tiled from the converted one so that an epoch holds at least ``min_samples`` slices
(:mod:`benchmarks.tiled_store`).
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.utils.data
import zarr

from ichprep.reading.dicomio import read_slice
from ichprep.storage.store import Store
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import targets

from . import layout, tiled_store
from .convert_bench import kaggle_slice
from .measure import Run, Stopwatch, evict, files_under, ratio, read_all, resident_fraction, summarize, total_bytes
from .shard_codec import decoded_equals_zarr, direct_store_images

BATCH = 64


def crop_flip(image: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> None:
    """Random ``out``-sized window of a (C, H, W) image, flipped left-right half the time, written into ``out``."""
    size = out.shape[-1]
    h, w = image.shape[-2:]
    y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    view = image[:, y : y + size, x : x + size]
    out[...] = view[:, :, ::-1] if rng.random() < 0.5 else view


def batches(
    images: Iterable[np.ndarray], channels: int, crop: int, rng: np.random.Generator, batch_size: int = BATCH
) -> Iterator[torch.Tensor]:
    """Crop/flip each image into uint8 batches of ``batch_size`` (the last one may be short)."""
    buffer = np.empty((batch_size, channels, crop, crop), np.uint8)
    filled = 0
    for image in images:
        crop_flip(image, buffer[filled], rng)
        filled += 1
        if filled == batch_size:
            yield torch.from_numpy(buffer)
            buffer = np.empty_like(buffer)  # the consumer owns the batch it got
            filled = 0
    if filled:
        yield torch.from_numpy(buffer[:filled])


# ---------------------------------------------------------------- the three sources


def store_stream(store: Store) -> ShardStream:
    """Every ok slot once per epoch, shuffled as in training."""
    ok = store.slices["ok"].to_numpy(bool)
    return ShardStream.from_store(store, ok.astype(np.int64), targets(store.slices, "rsna"), shuffle=True)


def store_images(stream: ShardStream, epoch: int) -> Iterator[np.ndarray]:
    """The stream's batches taken apart into images, for the same crop/flip as the other sources."""
    stream.set_epoch(epoch)
    for batch in stream:
        yield from batch.images.numpy()


def store_images_batched(stream: ShardStream, epoch: int, batch_size: int) -> Iterator[np.ndarray]:
    """The same stream with zarr's codec pipeline decoding ``batch_size`` chunks per batch (default: 1).

    ShardStream decodes zstd shards without zarr, so this setting has no effect on them: the figure is
    then a second sample of the plain ShardStream one."""
    with zarr.config.set({"codec_pipeline.batch_size": batch_size}):
        yield from store_images(stream, epoch)


def dicom_images(paths: list[str], spec, epoch: int) -> Iterator[np.ndarray]:
    for i in np.random.default_rng(epoch).permutation(len(paths)):
        _, hu = read_slice(paths[i])
        yield spec.apply(hu)


def dicom_reference_images(paths: list[str], size: int, epoch: int) -> Iterator[np.ndarray]:
    """The Kaggle/reference way in the loader: float64 HU at 512², windows at full size, then resize."""
    for i in np.random.default_rng(epoch).permutation(len(paths)):
        yield kaggle_slice(paths[i], size).transpose(2, 0, 1)


def png_images(paths: list[str], epoch: int) -> Iterator[np.ndarray]:
    for i in np.random.default_rng(epoch).permutation(len(paths)):
        yield cv2.imread(paths[i], cv2.IMREAD_UNCHANGED).transpose(2, 0, 1)  # HWC -> CHW view


# ---------------------------------------------------------------- timing


def timed_epochs(
    epoch_images: Callable[[int], Iterable[np.ndarray]],
    epochs: int,
    channels: int,
    crop: int,
    cold_files: list[str] | None,
    first_epoch: int,
) -> Run:
    """``epochs`` passes; before each, evict ``cold_files`` (untimed) when given."""
    watch = Stopwatch()
    n = 0
    for e in range(first_epoch, first_epoch + epochs):
        if cold_files is not None:
            evict(cold_files)
        rng = np.random.default_rng([7, e])
        with watch.timing():
            for batch in batches(epoch_images(e), channels, crop, rng):
                n += batch.shape[0]
    return watch.run(n)


def loader_figures(
    name: str,
    epoch_images,
    files: list[str],
    n_per_epoch: int,
    channels: int,
    crop: int,
    repeats: int,
    min_samples: int,
) -> dict:
    epochs = max(1, math.ceil(min_samples / n_per_epoch))
    timed_epochs(epoch_images, 1, channels, crop, None, 10_000)  # warm-up: page cache, imports, allocator
    warm = [timed_epochs(epoch_images, epochs, channels, crop, None, 100 * r) for r in range(repeats)]
    cold = [timed_epochs(epoch_images, epochs, channels, crop, files, 100 * r + 50) for r in range(repeats)]
    return {
        "source": name,
        "epochs_per_run": epochs,
        "files": len(files),
        "bytes": total_bytes(files),
        "warm": summarize(warm),
        "cold": summarize(cold),
    }


class CropFlipStream(torch.utils.data.IterableDataset):
    """The store stream with the same crop/flip done in the DataLoader workers."""

    def __init__(self, stream: ShardStream, crop: int):
        self.stream, self.crop = stream, crop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([11, self.stream.epoch, worker])
        c = self.stream.sample_shape[0]
        for batch in self.stream:
            for image, target in zip(batch.images.numpy(), batch.targets):
                out = np.empty((c, self.crop, self.crop), np.uint8)
                crop_flip(image, out, rng)
                yield torch.from_numpy(out), target


def dataloader_epochs(
    stream: ShardStream, crop: int, workers: int, epochs: int, cold_files: list[str] | None, first_epoch: int
) -> tuple[Run, float]:
    """(whole epochs including each epoch's worker start-up, median seconds to an epoch's first batch)."""
    dataset = CropFlipStream(stream, crop)
    total = Stopwatch()
    n = 0
    first_batch = []
    for e in range(first_epoch, first_epoch + epochs):
        if cold_files is not None:
            evict(cold_files)
        stream.set_epoch(e)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH, num_workers=workers, prefetch_factor=4 if workers else None
        )
        started, first = time.perf_counter(), None
        with total.timing():
            for images, _target in loader:
                if first is None:
                    first = time.perf_counter() - started
                n += images.shape[0]
        first_batch.append(first if first is not None else float("nan"))
    return total.run(n), statistics.median(first_batch)


def io_probe(name: str, files: list[str]) -> dict:
    """Raw read speed of the files warm and right after eviction, and how much eviction really dropped."""
    read_all(files)
    resident_warm = resident_fraction(files)
    started = time.perf_counter()
    nbytes = read_all(files)
    warm = time.perf_counter() - started
    evict(files)
    resident_cold = resident_fraction(files)
    started = time.perf_counter()
    read_all(files)
    cold = time.perf_counter() - started
    return {
        "files": name,
        "bytes": nbytes,
        "warm_MB_per_s": nbytes / warm / 1e6,
        "cold_MB_per_s": nbytes / cold / 1e6,
        "resident_fraction_warm": resident_warm,
        "resident_fraction_after_evict": resident_cold,
    }


# ---------------------------------------------------------------- the section


def run(
    store: Store,
    dicom_dir: Path,
    png_dir: Path,
    work: Path,
    crop: int,
    repeats: int,
    min_samples: int,
    dataloader_workers: int = 2,
) -> dict:
    ok = store.slices["ok"].to_numpy(bool)
    rel = store.slices.loc[ok, "path"].astype(str).tolist()
    dicoms = [str(dicom_dir / p) for p in rel]
    pngs = [str(png_dir / (Path(p).stem + ".png")) for p in rel]
    missing = [p for p in pngs if not Path(p).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} PNGs of the baseline are missing, e.g. {missing[0]}")
    store_files = files_under(layout.root_of(store) / layout.IMAGES)
    n, channels = len(dicoms), store.spec.channels
    stream = store_stream(store)

    out = {
        "crop": crop,
        "batch": BATCH,
        "slices_per_epoch": n,
        "io_probe": [io_probe("dicom", dicoms), io_probe("store shards", store_files), io_probe("png", pngs)],
        "store": loader_figures(
            "store (ShardStream)",
            lambda e: store_images(stream, e),
            store_files,
            n,
            channels,
            crop,
            repeats,
            min_samples,
        ),
        "dicom": loader_figures(
            "DICOM on the fly",
            lambda e: dicom_images(dicoms, store.spec, e),
            dicoms,
            n,
            channels,
            crop,
            repeats,
            min_samples,
        ),
        "dicom_reference": loader_figures(
            "DICOM on the fly, float64 windows at 512² (Kaggle style)",
            lambda e: dicom_reference_images(dicoms, store.spec.size, e),
            dicoms,
            n,
            channels,
            crop,
            repeats,
            min_samples,
        ),
        "png": loader_figures(
            "PNG per slice (cv2.imread)", lambda e: png_images(pngs, e), pngs, n, channels, crop, repeats, min_samples
        ),
    }
    out["store_zarr_batched_prototype"] = loader_figures(
        f"store (ShardStream), zarr codec_pipeline.batch_size={store.shard_slices} set (prototype; "
        "no effect on direct shard reads)",
        lambda e: store_images_batched(stream, e, store.shard_slices),
        store_files,
        n,
        channels,
        crop,
        repeats,
        min_samples,
    )
    out["store_direct_prototype"] = loader_figures(
        "store, direct shard decode (prototype)",
        lambda e: direct_store_images(store, e),
        store_files,
        n,
        channels,
        crop,
        repeats,
        min_samples,
    )
    big = tiled_store.tile(store, work / "tiled.zarr", min_samples)
    big_stream = store_stream(big)
    big_files = files_under(layout.root_of(big) / layout.IMAGES)
    big_n = int(big.slices["ok"].sum())
    out["store_direct_prototype"]["identical_to_zarr"] = decoded_equals_zarr(store)
    epochs = max(1, math.ceil(min_samples / big_n))
    dataloader_epochs(big_stream, crop, dataloader_workers, 1, None, 20_000)  # warm-up
    figures = {
        "workers": dataloader_workers,
        "epochs_per_run": epochs,
        "slices_per_epoch": big_n,
        "tiled_from_slices": n,
        "note": "the store's full shards copied until one epoch >= --min-samples slices; each epoch builds a "
        "new DataLoader iterator as ichtrain does, so worker start-up is included",
    }
    for mode, files in (("warm", None), ("cold", big_files)):
        first_epochs = [30_000 + 100 * r + (mode == "cold") for r in range(repeats)]
        runs = [dataloader_epochs(big_stream, crop, dataloader_workers, epochs, files, e) for e in first_epochs]
        figures[mode] = summarize([r[0] for r in runs], workers=dataloader_workers)
        figures[mode]["first_batch_s"] = statistics.median(r[1] for r in runs)
    out["store_dataloader"] = figures
    if layout.root_of(big) != layout.root_of(store):
        shutil.rmtree(layout.root_of(big), ignore_errors=True)

    rate = "slices_per_s"
    out["ratios"] = {
        f"store_vs_{other}_{mode}": ratio(out["store"][mode][rate], out[other][mode][rate])
        for mode in ("warm", "cold")
        for other in ("dicom", "dicom_reference", "png")
    }
    for mode in ("warm", "cold"):
        out["ratios"][f"store_direct_prototype_vs_dicom_{mode}"] = ratio(
            out["store_direct_prototype"][mode][rate], out["dicom"][mode][rate]
        )
        out["ratios"][f"store_direct_prototype_vs_store_{mode}"] = ratio(
            out["store_direct_prototype"][mode][rate], out["store"][mode][rate]
        )
        out["ratios"][f"store_zarr_batched_prototype_vs_store_{mode}"] = ratio(
            out["store_zarr_batched_prototype"][mode][rate], out["store"][mode][rate]
        )
    out["ratios"]["store_cold_vs_warm"] = ratio(out["store"]["cold"][rate], out["store"]["warm"][rate])
    out["ratios"]["dicom_cold_vs_warm"] = ratio(out["dicom"]["cold"][rate], out["dicom"]["warm"][rate])
    out["ratios"]["dataloader_2w_vs_in_process_warm"] = ratio(figures["warm"][rate], out["store"]["warm"][rate])
    return out
