"""One converter per store.

Local (and shared POSIX) filesystems: an exclusive ``flock`` on
``STORE/.ichprep/lock``, released by the kernel even on ``kill -9``.

Object stores have no locks, so there the lock is a *lease*: a small object
naming its owner and an expiry that a heartbeat thread pushes forward every
``HEARTBEAT_SECONDS``.  A second converter refuses while a live lease exists; a
killed run's lease lapses within ``LEASE_SECONDS``, after which a rerun takes
over and resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreLockedError
from .location import Location, as_location
from .store import STATE

LOCK = f"{STATE}/lock"
LEASE_SECONDS = 120
HEARTBEAT_SECONDS = 30


def _refuse(root: Location, owner: str) -> StoreLockedError:
    return StoreLockedError(
        f"{root} is being written by another ichprep convert ({owner}); "
        "wait for it to finish, or stop it and rerun to resume"
    )


@contextmanager
def _flock(root: Location) -> Iterator[None]:
    path = Path(root.path(LOCK))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise _refuse(root, handle.read().strip() or "unknown") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _lease(root: Location) -> Iterator[None]:
    me = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"

    def current() -> dict | None:
        try:
            return root.read_json(LOCK)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    held = current()
    if held and held.get("owner") != me and held.get("expires", 0) > time.time():
        raise _refuse(root, f"{held.get('owner')}, lease until {time.ctime(held['expires'])}")
    root.write_json(LOCK, {"owner": me, "expires": time.time() + LEASE_SECONDS})
    time.sleep(0.2)  # two starters racing: the last write wins, the other sees it and backs off
    held = current()
    if held is None or held.get("owner") != me:
        raise _refuse(root, held.get("owner") if held else "unknown")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            root.write_json(LOCK, {"owner": me, "expires": time.time() + LEASE_SECONDS})

    beating = threading.Thread(target=heartbeat, name="ichprep-lease", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()
        root.remove(LOCK)


@contextmanager
def store_lock(root: str | os.PathLike | Location) -> Iterator[None]:
    """Hold the store's lock for the duration of the block (flock locally, a lease on object stores)."""
    root = as_location(root)
    with _flock(root) if root.is_local else _lease(root):
        yield
