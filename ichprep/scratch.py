"""Per-thread scratch buffers for the conversion's large per-slice temporaries.

Each slice passes through a 525 kB file buffer, a 1 MB float32 HU image and 256 kB resize and
window temporaries, and each shard through a 12 MiB image buffer.  Allocated afresh, glibc serves
these from mmap or from a heap it trims after every free, and the kernel faults the pages in again
each time.  Reusing one buffer per thread and purpose removes those page faults (figures:
BENCHMARKS.md).  A buffer is valid until the next request for the same name in the same thread, so
callers copy out what they keep.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def reused(name: str, make):
    """``make()`` on the first call with this name in this thread, the same object after that
    (for objects that are costly to set up and not thread-safe, e.g. a zstd compression context)."""
    cache = _local.__dict__.setdefault("objects", {})
    if name not in cache:
        cache[name] = make()
    return cache[name]


def array(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array of this shape and dtype, the same memory on every call with these arguments."""
    cache = _local.__dict__.setdefault("arrays", {})
    key = (name, tuple(shape), np.dtype(dtype))
    buffer = cache.get(key)
    if buffer is None:
        for old in [k for k in cache if k[0] == name]:  # one buffer per name: a new shape replaces the old
            del cache[old]
        buffer = cache[key] = np.empty(shape, dtype)
    return buffer


def byte_buffer(name: str, size: int) -> memoryview:
    """A writable memoryview of ``size`` bytes; the underlying buffer only grows."""
    buffers = _local.__dict__.setdefault("bytes", {})
    buffer = buffers.get(name)
    if buffer is None or len(buffer) < size:
        # A new object rather than a resize: a view of the old one may still be alive.
        buffer = buffers[name] = bytearray(max(size, 2 * len(buffer) if buffer is not None else size))
    return memoryview(buffer)[:size]
