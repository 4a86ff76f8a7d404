"""ichprep.scratch: per-thread buffers, reused within a thread, private to it, replaced on a new shape."""

from __future__ import annotations

import threading

import numpy as np

from ichprep import scratch


def test_same_request_same_memory_new_shape_new_buffer():
    a = scratch.array("test-a", (4, 5), np.float32)
    a[...] = 7
    b = scratch.array("test-a", (4, 5), np.float32)
    assert np.shares_memory(a, b)
    assert (b == 7).all()
    c = scratch.array("test-a", (8, 5), np.float32)
    assert c.shape == (8, 5)
    assert not np.shares_memory(a, c)
    assert not np.shares_memory(c, scratch.array("test-b", (8, 5), np.float32))  # names are separate


def test_each_thread_has_its_own_buffers():
    mine = scratch.array("test-thread", (16,), np.uint8)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch.array("test-thread", (16,), np.uint8)))
    thread.start()
    thread.join()
    assert not np.shares_memory(mine, theirs[0])


def test_byte_buffer_grows_without_touching_views_still_held():
    small = scratch.byte_buffer("test-bytes", 10)
    small[:3] = b"abc"
    held = small[:3]
    big = scratch.byte_buffer("test-bytes", 100)  # a new object: resizing would fail while `held` exists
    assert len(big) == 100
    assert bytes(held) == b"abc"
    again = scratch.byte_buffer("test-bytes", 50)
    assert len(again) == 50
    assert again.obj is big.obj  # large enough: reused
