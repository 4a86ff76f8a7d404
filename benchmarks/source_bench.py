"""Conversion from a folder against the same archive as a zip: slices/s, bytes read per slice, start-up.

``python -m benchmarks.source_bench ARCHIVE_DIR [--workers 1 2] [--cold]`` where ARCHIVE_DIR holds the same
synthetic archive three ways (``ichprep synth``): ``folder/`` (``--test-studies`` as for the zips),
``deflated.zip`` and ``stored.zip`` (``--zip``).  Each run is the whole ``convert()`` call of the command line
(header scan included, labels from the same place as the DICOMs) on a fresh LocalCluster whose start is timed
apart; ``--cold`` empties the page cache before each run (root only), as a 390 GB archive never fits in it.
Bytes read are the ``rchar`` (bytes asked of the kernel) and ``read_bytes`` (bytes fetched from the disk) of
``/proc/PID/io``, summed over the calling process and every worker.

``python -m benchmarks.source_bench --listing 875000 DIR`` instead times the driver's listing of a zip with that
many members (Kaggle's zip holds 752,803 train + 121,232 test files): one central-directory read, then one
:class:`ichprep.reading.source.Member` per ``.dcm``, with the peak memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

from ichprep.cluster import dask_client
from ichprep.convert import convert
from ichprep.reading.source import list_members, parse_source
from ichprep.spec import PreprocessSpec
from ichprep.synth import KAGGLE_TOP

from .markdown import _table as markdown_table

KINDS = ("folder", "stored", "deflated")


class SourceRun(NamedTuple):
    kind: str
    workers: int
    slices: int
    cluster_start_s: float
    first_slice_s: float  # from the convert() call to the first shard done
    scan_s: float
    wall_s: float
    rchar: int
    disk_read: int


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {key: int(value) for key, value in (line.split(": ") for line in f)}


def _io_total(client) -> dict[str, int]:
    counters = [_io(), *client.run(_io).values()]
    return {key: sum(c[key] for c in counters) for key in ("rchar", "read_bytes")}


def source_paths(archive: Path, kind: str) -> tuple[str, str]:
    """(SOURCE, labels CSV) of one spelling of the archive."""
    if kind == "folder":
        return str(archive / "folder" / "stage_2_train"), str(archive / "folder" / "stage_2_train.csv")
    zip_path = archive / f"{kind}.zip"
    return f"{zip_path}::{KAGGLE_TOP}/stage_2_train", f"{zip_path}::{KAGGLE_TOP}/stage_2_train.csv"


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_one(archive: Path, kind: str, workers: int, spec: PreprocessSpec, cold: bool) -> SourceRun:
    source, labels = source_paths(archive, kind)
    with tempfile.TemporaryDirectory(prefix="source-bench-", dir=archive) as tmp:
        if cold:
            _drop_caches()
        started = time.perf_counter()
        with dask_client(workers=workers) as client:
            cluster_start = time.perf_counter() - started
            marks: dict[str, float] = {}

            def progress(stage: str, total: int):
                marks[stage] = time.perf_counter()

                def advance(n: int) -> None:
                    marks.setdefault(f"{stage}-first", time.perf_counter())

                return advance

            before = _io_total(client)
            called = time.perf_counter()
            summary = convert(
                source, Path(tmp) / "cache.zarr", spec, labels_csv=labels, client=client, progress=progress
            )
            after = _io_total(client)
    return SourceRun(
        kind,
        workers,
        summary.n_slices,
        cluster_start,
        marks["convert-first"] - called,
        marks["convert"] - called,
        summary.wall_s,
        after["rchar"] - before["rchar"],
        after["read_bytes"] - before["read_bytes"],
    )


def report(runs: list[SourceRun]) -> str:
    folder = {r.workers: r.slices / r.wall_s for r in runs if r.kind == "folder"}
    rows = [
        [
            r.kind,
            str(r.workers),
            str(r.slices),
            f"{r.cluster_start_s:.1f}",
            f"{r.first_slice_s:.1f}",
            f"{r.scan_s:.1f}",
            f"{r.wall_s:.1f}",
            f"{r.slices / r.wall_s:.0f}",
            f"{(r.slices / r.wall_s) / folder[r.workers]:.2f}" if r.workers in folder else "",
            f"{r.rchar / r.slices / 1e3:.0f}",
            f"{r.disk_read / r.slices / 1e3:.0f}",
        ]
        for r in runs
    ]
    return markdown_table(
        [
            "source",
            "workers",
            "slices",
            "cluster start s",
            "call to first shard s",
            "scan s",
            "convert s",
            "slices/s",
            "x folder",
            "kB asked/slice",
            "kB from disk/slice",
        ],
        rows,
    )


def listing(folder: Path, members: int) -> str:
    """Driver-side cost of listing a zip of ``members`` tiny members (names as Kaggle's)."""
    zip_path = folder / f"listing-{members}.zip"
    if not zip_path.exists():
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
            for i in range(members):
                split = "stage_2_train" if i < members * 752803 // 874035 else "stage_2_test"
                archive.writestr(f"{KAGGLE_TOP}/{split}/ID_{i:09x}.dcm", b"")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    found = list_members(parse_source(f"{zip_path}::{KAGGLE_TOP}/stage_2_train"))
    wall = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        f"listing {len(found):,} of {members:,} members ({zip_path.stat().st_size / 1e6:.0f} MB zip): {wall:.1f} s, "
        f"peak RSS {rss / 1024:.0f} MiB (before: {rss_before / 1024:.0f} MiB)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--listing", type=int, default=None, help="only time listing a zip of this many members")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each run (root)")
    args = parser.parse_args(argv)
    if args.listing:
        print(listing(args.archive, args.listing))
        return
    spec = PreprocessSpec()
    runs = []
    for workers in args.workers:
        for kind in args.kinds:
            run = run_one(args.archive, kind, workers, spec, args.cold)
            print(run, flush=True)
            runs.append(run)
    print(report(runs))


if __name__ == "__main__":
    main()
