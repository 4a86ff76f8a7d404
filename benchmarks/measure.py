"""Timing and page-cache helpers shared by every benchmark.

A :class:`Run` is one timed repetition: how many items (slices, images) it processed, its wall time and
the CPU time of this process (all its threads; child processes such as Dask or DataLoader workers are
not included).  :func:`summarize` turns repeated runs into medians, per-item and per-worker figures.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    n: int
    wall_s: float
    cpu_s: float


class Stopwatch:
    """Adds up the wall and CPU time of the ``with watch.timing():`` blocks (untimed work stays outside)."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0

    @contextmanager
    def timing(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.process_time() - cpu

    def run(self, n: int) -> Run:
        return Run(n, self.wall_s, self.cpu_s)


def timed(fn: Callable[[], int]) -> Run:
    """Time one call of ``fn``, which returns the number of items it processed."""
    watch = Stopwatch()
    with watch.timing():
        n = fn()
    return watch.run(n)


def repeat(fn: Callable[[], Run], repeats: int) -> list[Run]:
    return [fn() for _ in range(repeats)]


def summarize(runs: list[Run], workers: int = 1, unit: str = "slices") -> dict:
    """Medians over the runs, per item and per worker; the raw repeats are kept."""
    walls = [r.wall_s for r in runs]
    cpus = [r.cpu_s for r in runs]
    n = runs[0].n
    wall = statistics.median(walls)
    rate = n / wall if wall > 0 else float("nan")
    return {
        unit: n,
        "repeats": len(runs),
        "wall_s": walls,
        "cpu_s": cpus,
        "median_wall_s": wall,
        f"ms_per_{unit[:-1]}": 1e3 * wall / n if n else float("nan"),
        f"{unit}_per_s": rate,
        f"{unit}_per_s_per_worker": rate / workers,
        "workers": workers,
        # CPU seconds of this process per wall second: > 1 means it used more than one core.
        "cores_used_in_process": statistics.median(cpus) / wall if wall > 0 else float("nan"),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---------------------------------------------------------------- files and the page cache


def files_under(root: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


def total_bytes(paths: Iterable[str | Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def evict(paths: Iterable[str | Path]) -> None:
    """Drop each file's pages from this machine's page cache (dirty pages are written back first).

    ``POSIX_FADV_DONTNEED`` does not drop dirty pages, so files just written (the store, the PNGs) are
    fsync'ed before.  On a VM the host may still cache the disk image; see :func:`resident_fraction`
    and the raw-read probe for what a cold read really costs here.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_fraction(paths: Iterable[str | Path]) -> float | None:
    """Fraction of the files' pages in this machine's page cache (mincore), None where unsupported."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in vec)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else None


def read_all(paths: list[str], block: int = 1 << 20) -> int:
    """Read every byte of the files (the raw I/O a loader cannot avoid); returns bytes read."""
    n = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(block):
                n += len(chunk)
    return n


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
