"""Driver-side cost of ``ichprep scan`` + ``ichprep convert`` at full RSNA size, the per-slice work a no-op.

``python -m benchmarks.driver_bench [--slices 752803] [--workers 2] [--seed 0] [--work DIR --keep] [--out FILE.json]
[--profile FILE.prof]``

We cannot hold the real archive (752,803 files of ~525 kB), so this measures only the calling process: the
scan driver's table work on a simulated full-size scan table, then ``convert(..., scan_table=...,
client=...)`` end to end on a LocalCluster whose tasks return, without reading or writing a pixel, the
records a successful shard returns (sha256 None: the manifest lists no shard file). Each stage's wall time
and the driver process's peak RSS during it are reported; worker processes are not measured, the
LocalCluster scheduler (a thread of this process) is. Nothing is asserted: the targets (< 60 s, < 4 GB at
full size) are reported as met or not.

The simulated archive, deterministic by seed, as the real stage_2_train (figures from the brief):

- 752,803 slices in 21,744 studies of 18,938 patients (scaled with ``--slices``); patients have 1-3 studies,
  one series per study; ids as RSNA's (``ID_`` + hex; the SOPInstanceUID is the image id).
- Study sizes: 24 + Gamma(k=2.2, theta=4.8) slices, 0.3 % of studies 60-130 slices, then +-1 on random
  studies to hit the exact total: mean 34.6, 5-95 % range ~26-48, a few studies of 100+.
- Per slice (independent): any 14.3 %, epidural 0.42 %, intraparenchymal 4.8 %, intraventricular 3.5 %,
  subarachnoid 4.7 %, subdural 6.3 %; a subtype always implies any.
- 512 x 512 int16 CT, slope 1, intercept -1024, files of 524,288 + 700-1,500 header bytes under
  ``WORK/stage_2_train/`` (an empty folder); 0.01 % of files (at least one) fail the header scan as ``truncated``.
- The label CSV is Kaggle's format: six rows per file (every file, ok or not, as in the real one) plus the
  six rows of 4 files repeated (agreeing duplicates, as the real file has).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import dataclasses
import datetime as dt
import gc
import json
import multiprocessing
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa

from ichprep.reading.labels import LABELS, SUBTYPES
from ichprep.reading.scan import OK, to_frame
from ichprep.storage.store import ShardRecord

from .measure import load_average

REPO = Path(__file__).resolve().parent.parent
DICOM_FOLDER = "stage_2_train"  # an empty folder in the work folder: convert() checks that its source exists

#: The real archive (stage_2_train), which --slices scales down.
RSNA_SLICES, RSNA_STUDIES, RSNA_PATIENTS = 752_803, 21_744, 18_938
#: Per-slice label rates of the real archive.
SUBTYPE_RATES = {
    "epidural": 0.0042,
    "intraparenchymal": 0.048,
    "intraventricular": 0.035,
    "subarachnoid": 0.047,
    "subdural": 0.063,
}
ANY_RATE = 0.143
BAD_FRACTION = 1e-4
DUPLICATE_LABEL_IMAGES = 4
SCAN_BATCH = 256  # ichprep.reading.scan.scan's default batch_size: one frame per Dask task comes back to the driver
TARGET_S, TARGET_BYTES = 60.0, 4e9
MIB = 2**20


# ---------------------------------------------------------------- the simulated archive


class Simulated(NamedTuple):
    table: pd.DataFrame  # the scan table in path order (as the scan's batches arrive), labels not attached
    labels: np.ndarray  # (rows, 6) int8 in LABELS order, row i labels table row i


class Expected(NamedTuple):
    """What the simulated archive must give, computed from the simulation itself."""

    n_files: int
    n_ok: int
    n_rejected: int
    n_studies: int
    n_patients: int
    label_rows: int
    study_sizes: dict  # mean, p5, p50, p95, max of slices per study
    label_rates: dict  # per ok slice


def study_sizes(*, n_studies: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """Slices per study (see the module docstring), summing to ``total`` exactly."""
    sizes = 24 + np.rint(rng.gamma(shape=2.2, scale=4.8, size=n_studies)).astype(np.int64)
    long = rng.random(n_studies) < 0.003
    sizes[long] = rng.integers(60, 131, int(long.sum()))
    while (diff := total - int(sizes.sum())) != 0:
        # +-1 on distinct random studies; a study keeps at least one slice
        chosen = rng.choice(n_studies, size=min(abs(diff), n_studies), replace=False)
        sizes[chosen] = np.maximum(1, sizes[chosen] + np.sign(diff))
    return sizes


def studies_per_patient(*, n_studies: int, n_patients: int, rng: np.random.Generator) -> np.ndarray:
    """Patient index of each study: every patient has 1-3 studies (a tenth of the extra ones as 3)."""
    extra = n_studies - n_patients
    threes = extra // 10
    twos = extra - 2 * threes
    counts = np.ones(n_patients, np.int64)
    counts[:threes] = 3
    counts[threes : threes + twos] = 2
    return rng.permutation(np.repeat(np.arange(n_patients), rng.permutation(counts)))


def unique_ids(*, n: int, digits: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` distinct random ``ID_<digits hex>`` ids, as integers (for sorting) and strings."""
    values = np.unique(rng.integers(0, 16**digits, size=n + n // 50 + 16))
    while len(values) < n:  # a collision-heavy draw; never at RSNA's sizes
        values = np.unique(np.r_[values, rng.integers(0, 16**digits, size=n)])
    values = rng.permutation(values)[:n]
    return values, [f"ID_{v:0{digits}x}" for v in values.tolist()]


def conditional_subtype_rates() -> tuple[np.ndarray, np.ndarray]:
    """P(subtype | any) drawn independently, and the weights of the one subtype forced when none came up,
    such that the per-slice rates are SUBTYPE_RATES (fixed point of rate = q + P(none) * weight)."""
    target = np.array([SUBTYPE_RATES[s] for s in SUBTYPES]) / ANY_RATE
    weights = target / target.sum()
    q = target.copy()
    for _ in range(200):
        q = np.clip(target - np.prod(1 - q) * weights, 0, 1)
    return q, weights


def draw_labels(*, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) int8 labels at the real rates; every positive slice has at least one subtype."""
    q, weights = conditional_subtype_rates()
    positive = rng.random(n) < ANY_RATE
    sub = (rng.random((n, len(SUBTYPES))) < q) & positive[:, None]
    none = np.flatnonzero(positive & ~sub.any(axis=1))
    sub[none, rng.choice(len(SUBTYPES), size=len(none), p=weights)] = True
    return np.c_[sub, positive].astype(np.int8)


def _slice_columns(
    *, sizes: np.ndarray, patient_of_study: np.ndarray, dicom_dir: str, rng: np.random.Generator
) -> dict:
    """Header fields of every slice, grouped by study, slices in z order."""
    n_studies, n = len(sizes), int(sizes.sum())
    study = np.repeat(np.arange(n_studies), sizes)
    position = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    _, study_ids = unique_ids(n=n_studies, digits=10, rng=rng)
    _, series_ids = unique_ids(n=n_studies, digits=10, rng=rng)
    _, patient_ids = unique_ids(n=int(patient_of_study.max()) + 1, digits=8, rng=rng)
    image_values, image_ids = unique_ids(n=n, digits=9, rng=rng)
    z0 = np.round(rng.uniform(-150, 50, n_studies), 1)
    spacing = rng.choice([5.0, 4.8, 4.5, 3.0], size=n_studies, p=[0.7, 0.15, 0.1, 0.05])
    study_ids, series_ids = np.array(study_ids, object), np.array(series_ids, object)
    return {
        "_order": image_values,
        "image_id": image_ids,
        "path": [f"{dicom_dir}/{i}.dcm" for i in image_ids],
        "study_uid": study_ids[study],
        "series_uid": series_ids[study],
        "patient_id": np.array(patient_ids, object)[patient_of_study][study],
        "sop_uid": image_ids,
        "modality": "CT",
        "transfer_syntax": "1.2.840.10008.1.2",
        "z": np.round(z0[study] + spacing[study] * position, 3),
        "pixel_spacing_row": 0.488281,
        "pixel_spacing_col": 0.488281,
        "slope": 1.0,
        "intercept": -1024.0,
        "window_center": 40.0,
        "window_width": 80.0,
        "instance_number": position + 1,
        "rows": 512,
        "cols": 512,
        "bits_stored": 12,
        "pixel_representation": 0,
        "samples_per_pixel": 1,
        "n_frames": 1,
        "file_size": 524_288 + rng.integers(700, 1_501, n),
        "has_pixels": True,
        "status": OK,
    }


def _break_some(frame: pd.DataFrame, *, rng: np.random.Generator) -> pd.DataFrame:
    """0.01 % of the files (at least one) fail the header scan: only id, path, status, error and size remain."""
    bad = rng.choice(len(frame), size=max(1, round(len(frame) * BAD_FRACTION)), replace=False)
    kept = {"image_id", "path", "status", "error", "file_size"}
    frame.loc[bad, [c for c in frame.columns if c not in kept]] = None
    frame.loc[bad, "status"] = "truncated"
    frame.loc[bad, "error"] = "file ends inside the header"
    frame.loc[bad, "file_size"] = rng.integers(1_000, 500_000, len(bad))
    return frame


def simulate(*, slices: int = RSNA_SLICES, seed: int = 0, dicom_dir: str = "/data/stage_2_train") -> Simulated:
    """A scan table of ``slices`` files under ``dicom_dir`` as the header scan's batches deliver it (by path),
    and its labels."""
    rng = np.random.default_rng(seed)
    n_studies = max(1, round(slices * RSNA_STUDIES / RSNA_SLICES))
    n_patients = max(1, min(n_studies, round(n_studies * RSNA_PATIENTS / RSNA_STUDIES)))
    sizes = study_sizes(n_studies=n_studies, total=slices, rng=rng)
    patients = studies_per_patient(n_studies=n_studies, n_patients=n_patients, rng=rng)
    columns = _slice_columns(sizes=sizes, patient_of_study=patients, dicom_dir=dicom_dir, rng=rng)
    labels = draw_labels(n=slices, rng=rng)
    order = np.argsort(columns.pop("_order"), kind="stable")  # path order = image id order (fixed-width hex)
    frame = to_frame(pd.DataFrame(columns).iloc[order].reset_index(drop=True))  # nullable dtypes, then breakage
    return Simulated(_break_some(frame, rng=rng), labels[order])


def expected_of(sim: Simulated) -> Expected:
    table = sim.table
    ok = (table["status"] == OK).to_numpy()
    sizes = table.loc[ok, "study_uid"].value_counts().to_numpy()
    good = sim.labels[ok]
    return Expected(
        n_files=len(table),
        n_ok=int(ok.sum()),
        n_rejected=int((~ok).sum()),
        n_studies=len(sizes),
        n_patients=int(table.loc[ok, "patient_id"].nunique()),
        label_rows=len(table) * len(LABELS) + DUPLICATE_LABEL_IMAGES * len(LABELS),
        study_sizes={
            "mean": round(float(sizes.mean()), 2),
            "p5": int(np.percentile(sizes, 5)),
            "p50": int(np.median(sizes)),
            "p95": int(np.percentile(sizes, 95)),
            "max": int(sizes.max()),
        },
        label_rates={name: round(float(good[:, j].mean()), 4) for j, name in enumerate(LABELS)},
    )


def write_label_csv(*, image_ids: list[str], labels: np.ndarray, path: Path, duplicates: int) -> None:
    """Kaggle's ``ID,Label`` format, six rows per image in LABELS order, then ``duplicates`` images again."""
    rows = list(range(len(image_ids))) + list(range(min(duplicates, len(image_ids))))
    with open(path, "w") as f:
        f.write("ID,Label\n")
        for start in range(0, len(rows), 100_000):  # bounded memory: 600,000 lines per write
            f.write(
                "".join(
                    f"{image_ids[i]}_{name},{labels[i, j]}\n"
                    for i in rows[start : start + 100_000]
                    for j, name in enumerate(LABELS)
                )
            )


class Inputs(NamedTuple):
    raw_scan: Path  # the scan table in path order, labels not attached (what the scan's batches hold)
    labels_csv: Path
    expected: Expected


def prepare_inputs(*, work: str, slices: int, seed: int) -> Inputs:
    """Simulate and write the inputs; run in a child process so that its memory is not the driver's."""
    dicom_dir = Path(work) / DICOM_FOLDER
    dicom_dir.mkdir(exist_ok=True)
    sim = simulate(slices=slices, seed=seed, dicom_dir=str(dicom_dir))
    raw, csv = Path(work) / "raw_scan.parquet", Path(work) / "stage_2_train.csv"
    sim.table.to_parquet(raw, index=False)
    write_label_csv(
        image_ids=sim.table["image_id"].astype(str).tolist(),
        labels=sim.labels,
        path=csv,
        duplicates=DUPLICATE_LABEL_IMAGES,
    )
    return Inputs(raw, csv, expected_of(sim))


# ---------------------------------------------------------------- the no-op worker side


def noop_convert_shards(shards: list, *, root: str, spec, source, plan_key: str) -> list[ShardRecord]:
    """Stands in for :func:`ichprep.convert.convert_shards` on the workers: the records of shards that
    converted without error, but nothing read or written (sha256 None, size 0: as an all-fill shard, which
    build_manifest and verify already treat as "no file"). Shards are ``(shard, start, stop)``."""
    return [
        ShardRecord(index=shard, start=start, stop=stop, sha256=None, size=0, inputs=plan_key, errors=[], skipped=False)
        for shard, start, stop in shards
    ]


# ---------------------------------------------------------------- measuring


class Mark(NamedTuple):
    t: float
    rss: int
    high_water: int  # ru_maxrss of this process so far, bytes


class Stage(NamedTuple):
    name: str
    wall_s: float
    peak_rss_mib: float  # of this process during the stage
    high_water_mib: float  # ru_maxrss after the stage
    counted: bool  # False: a detail row inside a counted stage


def _high_water() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Recorder:
    """Marks (time, RSS, high-water) by name, and a thread sampling RSS every 10 ms for per-stage peaks.

    The sampler needs the GIL, so a peak inside one long C call can be missed; a stage that raised the
    process high-water (ru_maxrss) takes that as its peak instead, which is exact. (A sample can exceed
    ru_maxrss by a few MiB: the kernel updates the high-water lazily.)
    """

    def __init__(self, interval_s: float = 0.01):
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="driver-bench-rss", daemon=True)
        self.marks: dict[str, Mark] = {}

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._samples.append((time.perf_counter(), self._process.memory_info().rss))

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, name: str) -> Mark:
        self.marks[name] = Mark(time.perf_counter(), self._process.memory_info().rss, _high_water())
        return self.marks[name]

    @contextmanager
    def interval(self, name: str) -> Iterator[None]:
        """Marks ``name:start`` and ``name:end`` around the block."""
        self.mark(f"{name}:start")
        try:
            yield
        finally:
            self.mark(f"{name}:end")

    def stage(self, name: str, start: str, end: str, *, counted: bool = True) -> Stage:
        a, b = self.marks[start], self.marks[end]
        sampled = max((rss for t, rss in list(self._samples) if a.t <= t <= b.t), default=0)
        peak = max(sampled, a.rss, b.rss, b.high_water if b.high_water > a.high_water else 0)
        return Stage(name, b.t - a.t, peak / MIB, b.high_water / MIB, counted)


def timed(recorder: Recorder, name: str, fn: Callable) -> Callable:
    """``fn`` with its every call marked as ``name`` (the last call's marks are kept)."""

    def wrapper(*args, **kwargs):
        with recorder.interval(name):
            return fn(*args, **kwargs)

    return wrapper


class TimedClient:
    """The Dask client as convert() sees it: its one ``map`` call (the task submission) is marked."""

    def __init__(self, client, recorder: Recorder):
        self._client, self._recorder = client, recorder
        self.n_tasks = 0

    def map(self, fn, *iterables, **kwargs):
        with self._recorder.interval("client.map"):
            futures = self._client.map(fn, *iterables, **kwargs)
        self.n_tasks += len(futures)
        return futures

    def __getattr__(self, name):
        return getattr(self._client, name)


def _first_result_marked(recorder: Recorder, real):
    """``distributed.as_completed`` that marks when the first result reaches the driver."""

    def as_completed(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 0:
                recorder.mark("first result")
            yield item

    return as_completed


@contextmanager
def instrumented(recorder: Recorder) -> Iterator[None]:
    """convert()'s steps marked in this process (restored on exit), its per-shard task the no-op."""
    import distributed

    import ichprep.convert as convert_mod
    from benchmarks.driver_bench import noop_convert_shards  # by this name, so workers import it (not __main__)
    from ichprep.storage.location import Location

    steps = (
        "_identity",
        "_prepare",
        "create_images",
        "_tasks",
        "_run_tasks",
        "build_studies",
        "_rejected_table",
        "source_summary",
        "build_manifest",
        "write_manifest",
    )
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(convert_mod, "convert_shards", noop_convert_shards))
        for name in steps:
            stack.enter_context(mock.patch.object(convert_mod, name, timed(recorder, name, getattr(convert_mod, name))))
        for method in ("write_parquet", "write_csv"):
            real = getattr(Location, method)
            stack.enter_context(mock.patch.object(Location, method, _named_write(recorder, real)))
        stack.enter_context(
            mock.patch.object(distributed, "as_completed", _first_result_marked(recorder, distributed.as_completed))
        )
        yield


def _named_write(recorder: Recorder, real: Callable) -> Callable:
    def write(self, name, frame):
        with recorder.interval(f"write {name}"):
            return real(self, name, frame)

    return write


# ---------------------------------------------------------------- the stages


def measured(recorder: Recorder, name: str, fn: Callable, *args) -> tuple[object, Stage]:
    """``fn(*args)`` as one counted stage."""
    with recorder.interval(name):
        result = fn(*args)
    return result, recorder.stage(name, f"{name}:start", f"{name}:end")


def batch_frames(raw_scan: Path) -> list[pd.DataFrame]:
    """The frames the scan's Dask tasks return, one per 256 files (views of one table: untimed, they arrive
    during the scan)."""
    raw = pd.read_parquet(raw_scan)
    return [raw.iloc[i : i + SCAN_BATCH] for i in range(0, len(raw), SCAN_BATCH)]


def concat_batches(parts: list[pd.DataFrame]) -> pd.DataFrame:
    return to_frame(pd.concat(parts, ignore_index=True))


def scan_stages(recorder: Recorder, inputs: Inputs, work: Path) -> tuple[list[Stage], Path, dict]:
    """What ``ichprep scan --labels CSV -o scan.parquet`` does in the driver besides waiting for the workers;
    ``parts`` and ``labels`` stay alive to the end, as in :func:`ichprep.reading.scan.scan`."""
    from ichprep.reading.labels import read_labels
    from ichprep.reading.scan import attach_labels, flag_duplicates, order_slices, summarize, write_scan

    parts = batch_frames(inputs.raw_scan)
    gc.collect()
    stages = []
    labels, stage = measured(
        recorder, f"scan: read_labels ({inputs.expected.label_rows:,}-row CSV)", read_labels, inputs.labels_csv
    )
    stages.append(stage)
    table, stage = measured(recorder, f"scan: concat {len(parts):,} batch frames + to_frame", concat_batches, parts)
    stages.append(stage)
    (table, _), stage = measured(recorder, "scan: attach_labels", attach_labels, table, labels)
    stages.append(stage)
    for name, step in (("scan: flag_duplicates", flag_duplicates), ("scan: order_slices", order_slices)):
        table, stage = measured(recorder, name, step, table)
        stages.append(stage)
    summary, stage = measured(recorder, "scan: summarize", summarize, table)
    stages.append(stage)
    del parts, labels  # scan() has returned when the CLI writes the table
    scan_parquet = work / "scan.parquet"
    _, stage = measured(recorder, "scan: write_scan (parquet)", write_scan, table, scan_parquet)
    return stages + [stage], scan_parquet, dataclasses.asdict(summary)


def convert_stages(
    recorder: Recorder, scan_parquet: Path, store: Path, client
) -> tuple[list[Stage], object, int, list[str]]:
    """``ichprep convert --scan-table scan.parquet``: read the table, then convert() with no-op tasks; also
    returns the warnings convert() raised (first line of each)."""
    from ichprep.convert import convert
    from ichprep.reading.scan import read_scan

    name = "convert: read_scan (parquet)"
    with recorder.interval(name):
        table = read_scan(scan_parquet)
    stages = [recorder.stage(name, f"{name}:start", f"{name}:end")]
    timed_client = TimedClient(client, recorder)
    with instrumented(recorder), recorder.interval("convert"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = convert(scan_parquet.parent / DICOM_FOLDER, store, scan_table=table, client=timed_client)
    said = [f"{w.category.__name__}: {str(w.message).splitlines()[0].rstrip('.')}" for w in caught]
    return stages + convert_breakdown(recorder, n_tasks=timed_client.n_tasks), summary, timed_client.n_tasks, said


def convert_breakdown(recorder: Recorder, *, n_tasks: int) -> list[Stage]:
    """convert() cut at its marks: counted stages tile the call, detail rows say what is inside them."""
    stage = recorder.stage

    def detail(name: str, step: str) -> Stage:
        return stage(f"↳ {name}", f"{step}:start", f"{step}:end", counted=False)

    recorder.marks["manifest"] = recorder.marks["source_summary:start"]  # evaluated just before build_manifest
    return [
        stage("convert: call → first task submitted", "convert:start", "client.map:start"),
        detail("_identity (plan digest)", "_identity"),
        detail("_prepare", "_prepare"),
        detail("create_images", "create_images"),
        detail("_tasks", "_tasks"),
        stage(f"convert: task submission (client.map, {n_tasks:,} tasks)", "client.map:start", "client.map:end"),
        stage("convert: gathering results", "client.map:end", "_run_tasks:end"),
        stage("↳ until the first result", "client.map:end", "first result", counted=False),
        stage("convert: slices/studies/rejected tables", "_run_tasks:end", "manifest"),
        detail("write slices.parquet", "write slices.parquet"),
        detail("build_studies", "build_studies"),
        detail("write studies.parquet", "write studies.parquet"),
        detail("_rejected_table", "_rejected_table"),
        detail("write rejected.csv", "write rejected.csv"),
        stage("convert: manifest", "manifest", "write_manifest:end"),
        detail("source_summary (source digest)", "source_summary"),
        detail("build_manifest", "build_manifest"),
        detail("write_manifest", "write_manifest"),
        stage("convert: lock release, return", "write_manifest:end", "convert:end"),
    ]


# ---------------------------------------------------------------- the run


class DriverReport(NamedTuple):
    command: str
    date_utc: str
    load_before: list
    load_after: list
    slices: int
    workers: int
    seed: int
    expected: Expected
    stages: list[Stage]
    total_s: float
    peak_rss_mib: float  # ru_maxrss of the driver at the end: the whole run's high-water
    setup_high_water_mib: float  # before the first stage (the simulated inputs loaded)
    convert_start_rss_mib: float  # after the scan stages' memory was released
    cluster_start_s: float  # not counted
    warnings: list[str]  # raised during convert()
    code: str  # the commit measured, and ichprep files with uncommitted edits
    n_tasks: int
    n_shards: int
    scan_summary: dict
    convert_summary: dict
    store: str

    @property
    def time_met(self) -> bool:
        return self.total_s < TARGET_S

    @property
    def memory_met(self) -> bool:
        return self.peak_rss_mib * MIB < TARGET_BYTES


@contextmanager
def environ_restored() -> Iterator[None]:
    """LocalCluster's nannies ``os.environ.update`` their pre-spawn variables into this process."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def local_cluster(workers: int) -> Iterator[object]:
    """``ichprep.cluster.dask_client`` with the repository on the workers' path (they import this module)."""
    from ichprep.cluster import dask_client

    with environ_restored():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        with dask_client(workers=workers) as client:
            yield client


def release_memory() -> None:
    """Hand freed memory back to the system (Python, Arrow's pool, glibc), as a process exit would."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def code_state() -> str:
    """``git describe``-like: the commit, plus the ichprep files edited but not committed."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "ichprep").splitlines()]  # "XY path"
    return f"commit {git('rev-parse', '--short', 'HEAD').strip() or '?'}" + (
        f", uncommitted: {', '.join(dirty)}" if dirty else ""
    )


def import_on_worker() -> bool:
    import benchmarks.driver_bench  # noqa: F401

    return True


def make_inputs(*, work: Path, slices: int, seed: int) -> Inputs:
    from benchmarks.driver_bench import prepare_inputs  # by this name: the spawned child imports it

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(prepare_inputs, work=str(work), slices=slices, seed=seed).result()


def run(
    *,
    slices: int = RSNA_SLICES,
    workers: int = 2,
    seed: int = 0,
    work: Path,
    command: str = "",
    profile: Path | None = None,
) -> DriverReport:
    """Simulate the inputs into ``work`` (a child process), then measure the driver's stages; the store is
    ``work/cache.zarr``."""
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    inputs = make_inputs(work=work, slices=slices, seed=seed)
    store = work / "cache.zarr"
    shutil.rmtree(store, ignore_errors=True)  # a store left by an earlier run would be resumed
    started = time.perf_counter()
    with local_cluster(workers) as client:
        client.run(import_on_worker)  # the workers import the no-op before the clock starts
        cluster_start = time.perf_counter() - started
        gc.collect()
        with Recorder() as recorder:
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            scan, scan_parquet, scan_summary = scan_stages(recorder, inputs, work)
            setup_high_water = recorder.marks[f"{scan[0].name}:start"].high_water / MIB
            release_memory()  # `ichprep convert --scan-table` is a new process: the scan's memory is gone
            convert_start_rss = psutil.Process().memory_info().rss / MIB
            conv, summary, n_tasks, said = convert_stages(recorder, scan_parquet, store, client)
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
    stages = scan + conv
    return DriverReport(
        command=command,
        date_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        load_before=load_before,
        load_after=load_average(),
        slices=slices,
        workers=workers,
        seed=seed,
        expected=inputs.expected,
        stages=stages,
        total_s=sum(s.wall_s for s in stages if s.counted),
        peak_rss_mib=_high_water() / MIB,
        setup_high_water_mib=setup_high_water,
        convert_start_rss_mib=convert_start_rss,
        cluster_start_s=cluster_start,
        warnings=said,
        code=code_state(),
        n_tasks=n_tasks,
        n_shards=summary.n_shards,
        scan_summary=scan_summary,
        convert_summary={
            "n_slices": summary.n_slices,
            "n_studies": summary.n_studies,
            "n_shards": summary.n_shards,
            "rejected": summary.rejected,
            "wall_s": summary.wall_s,
        },
        store=str(store),
    )


# ---------------------------------------------------------------- output


def table(report: DriverReport) -> str:
    lines = ["| stage | wall s | peak RSS MiB | high-water MiB |", "|---|---:|---:|---:|"]
    for s in report.stages:
        name = s.name if s.counted else f"&nbsp;&nbsp;{s.name}"
        lines.append(f"| {name} | {s.wall_s:.3f} | {s.peak_rss_mib:,.0f} | {s.high_water_mib:,.0f} |")
    lines.append(f"| **total (driver)** | **{report.total_s:.2f}** | **{report.peak_rss_mib:,.0f}** | |")
    return "\n".join(lines)


def verdict(report: DriverReport) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (
        f"Verdict: driver {report.total_s:.1f} s (target < {TARGET_S:.0f} s: {met(report.time_met)}), "
        f"peak RSS {report.peak_rss_mib:,.0f} MiB = {report.peak_rss_mib * MIB / 1e9:.2f} GB "
        f"(target < {TARGET_BYTES / 1e9:.0f} GB: {met(report.memory_met)})."
    )


def describe(report: DriverReport) -> str:
    e = report.expected
    return (
        f"{report.date_utc}, `{report.command}`: {e.n_files:,} files ({e.n_ok:,} ok, {e.n_rejected} rejected), "
        f"{e.n_studies:,} studies, {e.n_patients:,} patients, study sizes {e.study_sizes}, "
        f"{report.n_shards:,} shards in {report.n_tasks:,} tasks on {report.workers} worker(s); "
        f"cluster start {report.cluster_start_s:.1f} s (not counted); high-water before the first stage "
        f"{report.setup_high_water_mib:,.0f} MiB; RSS when convert began {report.convert_start_rss_mib:,.0f} MiB; "
        f"load average before {report.load_before}, after {report.load_after}; {report.code}."
        + "".join(f" convert() warned: {w}." for w in report.warnings)
    )


def print_profile(path: Path, top: int = 25) -> None:
    stats = pstats.Stats(str(path))
    for key in ("tottime", "cumulative"):
        print(f"\ncProfile of the stages (inflated by the profiler), by {key}:")
        stats.sort_stats(key).print_stats(top)


def to_json(report: DriverReport) -> dict:
    return {
        **report._asdict(),
        "expected": report.expected._asdict(),
        "stages": [s._asdict() for s in report.stages],
        "time_met": report.time_met,
        "memory_met": report.memory_met,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=RSNA_SLICES, help="simulated files (default: RSNA's 752,803)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    parser.add_argument("--out", default=None, help="write the report here (JSON)")
    parser.add_argument("--profile", default=None, help="cProfile the stages into this file and print the top")
    args = parser.parse_args(argv)
    if args.slices < 100:
        parser.error("--slices must be >= 100")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> DriverReport:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.driver_bench", *(sys.argv[1:] if argv is None else argv)])
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="ichkit-driver-bench-")) if own_work else Path(args.work)
    try:
        report = run(
            slices=args.slices,
            workers=args.workers,
            seed=args.seed,
            work=work,
            command=command,
            profile=Path(args.profile) if args.profile else None,
        )
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(describe(report), "", table(report), "", verdict(report), sep="\n")
    if args.keep or not own_work:
        print(f"Inputs and store kept in {work}")
    if args.profile:
        print_profile(Path(args.profile))
    if args.out:
        Path(args.out).write_text(json.dumps(to_json(report), indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    from benchmarks.driver_bench import main as _main  # one copy of this module, named as the workers see it

    _main()
