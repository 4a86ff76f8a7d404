"""Damaged shard files, found cheaply: every shard the manifest lists is present and of its recorded size.

``ichprep verify`` hashes every byte; this is what every reader of a store runs when it opens one (one listing
of ``images/c/``, no reads), so a deleted or cut shard stops a run before it trains on the fill value.  A shard
whose bytes changed but not its size is found by the reader when it fails to decode
(:class:`ichprep.errors.DamagedShardError`), or up front with ``hashes=True`` (what ``--skip-damaged`` runs, so
it can leave every damaged shard out before the first step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import DamagedStoreError, repair_hint
from .location import Location
from .shardcodec import SHARD_DIR, name_studies

_SHARD_FILE = re.compile(r"^" + re.escape(SHARD_DIR) + r"/(\d+)/0/0/0$")


@dataclass(frozen=True)
class Problem:
    """One file of a store that does not match its manifest (or a table that does not match the array)."""

    path: str
    kind: str  # missing | size | altered | unlisted | unsafe_path | table
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:10s} {self.path}: {self.detail}"


class FileCheck(NamedTuple):
    """What :func:`check_files` found: the problems, and the files and bytes it looked at."""

    problems: list[Problem]
    files_checked: int
    bytes_checked: int


def safe_relative(name: str) -> bool:
    """Manifest paths must stay inside the store: relative, no '..', no backslashes."""
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in name.split("/")


def check_files(root: Location, files: dict, *, hashes: bool, under: str = "") -> FileCheck:
    """Every file of ``files`` (the manifest's: name -> sha256 and size) present and of its size, from one
    stat each on a local disk or one listing of ``under`` (where every name of ``files`` lies) on an object store;
    with ``hashes`` also its sha256 (every byte read), and shard files the manifest does not list are ``unlisted``."""
    safe = {name for name in files if safe_relative(name)}
    # verify also looks for shard files the manifest does not list: that needs the listing itself
    present = root.sizes(under) if hashes else root.sizes_of(safe, under)
    problems, checked, nbytes = [], 0, 0
    for name, expected in sorted(files.items()):
        if name not in safe:
            problems.append(Problem(name, "unsafe_path", "manifest names a path outside the store; refusing"))
            continue
        size = present.get(name)
        if size is None:
            problems.append(Problem(name, "missing", "file not found"))
            continue
        checked, nbytes = checked + 1, nbytes + size
        if size != expected["size"]:  # smaller or larger alike: a rewrite, a cut copy or an append
            problems.append(
                Problem(name, "size", f"differs from the manifest (size {size}, expected {expected['size']})")
            )
        elif hashes and root.sha256(name) != expected["sha256"]:
            problems.append(Problem(name, "altered", "sha256 differs from the manifest"))
    for name in sorted(present):  # with the listing (hashes): every shard file on disk
        if shard_number(name) is not None and name not in files:
            problems.append(Problem(name, "unlisted", "shard file not in the manifest"))
    return FileCheck(problems, checked, nbytes)


class DamagedShard(NamedTuple):
    """One shard file that does not match the manifest, and what it holds."""

    path: str  # relative to the store, e.g. images/c/1/0/0/0
    shard: int
    start: int  # its slots [start, stop)
    stop: int
    reason: str  # the problem's detail

    def describe(self, slices: pd.DataFrame | None = None) -> str:
        """One line: the file, why, its slots, and (given the slice table) its ok slots and studies."""
        text = f"{self.path}: {self.reason}; slots {self.start}-{self.stop - 1}"
        if slices is not None:
            part = slices.iloc[self.start : self.stop]
            studies = part["study_uid"].astype(str).unique().tolist()
            text += f" ({int(part['ok'].sum())} ok), studies {name_studies(studies)}"
        return text


def shard_number(path: str) -> int | None:
    """The shard number of a shard file's relative path, None for any other file."""
    match = _SHARD_FILE.match(path)
    return int(match.group(1)) if match else None


def damaged_shards(problems: list[Problem], *, n_slices: int, shard_slices: int) -> list[DamagedShard]:
    """The shard files among ``problems`` that are missing, resized or altered, with their slot ranges."""
    damaged = []
    for problem in problems:
        shard = shard_number(problem.path)
        if shard is None or problem.kind not in ("missing", "size", "altered"):
            continue
        start = shard * shard_slices
        damaged.append(DamagedShard(problem.path, shard, start, min(start + shard_slices, n_slices), problem.detail))
    return damaged


def find_damaged_shards(
    root: Location, files: dict, *, n_slices: int, shard_slices: int, hashes: bool = False
) -> list[DamagedShard]:
    """Every shard file ``files`` (the manifest's) lists that is absent or of another size; with ``hashes``,
    also every one whose sha256 differs.  One listing of the store; hashes read every shard."""
    shards = {name: entry for name, entry in files.items() if shard_number(name) is not None}
    problems = check_files(root, shards, hashes=hashes, under=SHARD_DIR).problems  # not the converter's markers
    return damaged_shards(problems, n_slices=n_slices, shard_slices=shard_slices)


def damaged_error(root: Location, damaged: list[DamagedShard], slices: pd.DataFrame) -> DamagedStoreError:
    """The error a reader stops with: each shard, its slots and studies, and the fix."""
    lines = "\n".join(f"  {d.describe(slices)}" for d in damaged)
    return DamagedStoreError(
        f"{root}: {len(damaged)} shard file(s) do not match the manifest:\n{lines}\n"
        f"To repair: {repair_hint(root)}; or pass --skip-damaged to use the rest of the store"
    )


def without_damaged(slices: pd.DataFrame, damaged: list[DamagedShard]) -> pd.DataFrame:
    """``slices`` with every slot of the damaged shards marked not ok (left out like a zero-filled slot)."""
    ok = slices["ok"].to_numpy(dtype=bool).copy()
    for d in damaged:
        ok[d.start : d.stop] = False
    error = slices["error"].astype("string").copy()
    lost = np.flatnonzero(slices["ok"].to_numpy(dtype=bool) & ~ok)
    error.iloc[lost] = "damaged shard (--skip-damaged)"
    return slices.assign(ok=ok, error=error)
