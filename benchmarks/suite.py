"""The one ``run``: every section in order, on one dataset, in one process run."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

from ichprep.cluster import MALLOC_TRIM_VAR
from ichprep.spec import PreprocessSpec
from ichprep.storage.store import open_store

from . import (
    batch_bench,
    convert_bench,
    loader_bench,
    profile_bench,
    report,
    size_bench,
    train_bench,
)
from . import (
    dataset as dataset_mod,
)
from .measure import load_average, ratio


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(
    quick: bool = False,
    studies: int | None = None,
    out: str | Path | None = None,
    repeats: int | None = None,
    dicom_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    work: str | Path | None = None,
    keep: bool = False,
    seed: int = 0,
    min_samples: int | None = None,
    crop: int = 224,
    cluster_workers: tuple[int, ...] = (1, 2),
    train_device: str | None = None,
    command: str = "",
) -> dict:
    studies = studies or (2 if quick else 12)
    repeats = repeats or (1 if quick else 3)
    min_samples = min_samples if min_samples is not None else (1 if quick else 2000)
    spec = PreprocessSpec()
    started = time.perf_counter()
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="ichkit-bench-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    meta = report.machine_info()
    meta.update(
        command=command,
        quick=quick,
        repeats=repeats,
        min_samples_per_loader_run=min_samples,
        cv2_threads=cv2.getNumThreads(),
        work_dir=str(work),
        load_before=load_average(),
        environ={
            k: os.environ.get(k)
            for k in (MALLOC_TRIM_VAR, "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
    )
    results: dict = {"meta": meta}
    try:
        _say(f"dataset ({'given folder' if dicom_dir else f'synthetic, {studies} studies'}) in {work}")
        data = dataset_mod.prepare(work, studies, seed, dicom_dir, labels_csv)
        results["dataset"] = data.describe()

        _say(
            "1. conversion: scan, floor, PNG baseline, ichprep in-process, LocalCluster "
            + ", ".join(map(str, cluster_workers))
        )
        results["conversion"], art = convert_bench.run(data, work, spec, repeats, cluster_workers)

        meta["load_after_section"] = {"conversion": load_average()}
        _say("2. size on disk")
        results["size"] = size_bench.run(
            art["paths"], art["png_dir"], art["store"], art["summary"].n_slices, spec.shard_slices
        )

        store = open_store(art["store"])
        _say("3. loaders (warm and cold), then the DataLoader with 2 workers")
        results["loader"] = loader_bench.run(store, data.dicom_dir, art["png_dir"], work, crop, repeats, min_samples)

        meta["load_after_section"]["loader"] = load_average()
        _say("3b. finished batches per loader process (context 0 and 1), against the former per-sample path")
        results["batches"] = batch_bench.run(store, work, repeats, min_samples, quick)

        meta["load_after_section"]["batches"] = load_average()
        _say("4. training step")
        results["train"] = train_bench.run(quick, spec.size, spec.channels, train_device)

        meta["load_after_section"]["train"] = load_average()
        _say("5. profiles and stage breakdown")
        results["profile"] = profile_bench.run(art["paths"], store, work, crop, repeats)
    finally:
        if own_work and not keep:
            shutil.rmtree(work, ignore_errors=True)

    loader_rate = results["loader"]["store_dataloader"]["warm"]["slices_per_s"]
    results["ratios"] = {
        "loader_vs_train": ratio(loader_rate, results["train"]["images_per_s"]),
        "loader_in_process_vs_train": ratio(
            results["loader"]["store"]["warm"]["slices_per_s"], results["train"]["images_per_s"]
        ),
    }
    meta["load_after"] = load_average()
    meta["total_s"] = round(time.perf_counter() - started, 1)
    results["targets"] = report.targets(results)
    print(report.format_table(results))
    if out is not None:
        report.write_json(results, out)
        _say(f"wrote {out}")
    return results
