"""The store layout as the README states it (the contract), so the benchmarks do not lean on ichprep internals.

``images/c/k/0/0/0`` holds shard k; ``.ichprep/shards/NNNNNN.json`` is shard k's completion marker (a
shard without one is rewritten by ``convert_shard``).  Only local stores are benchmarked.
"""

from __future__ import annotations

from pathlib import Path

IMAGES = "images"
STATE = ".ichprep"


def root_of(store) -> Path:
    """Local folder of an opened store (``Store.root`` may be a Path or an ichprep location)."""
    return Path(str(store.root))


def shard_file(root: Path, index: int) -> Path:
    return root / IMAGES / "c" / str(index) / "0" / "0" / "0"


def marker_file(root: Path, index: int) -> Path:
    return root / STATE / "shards" / f"{index:06d}.json"


def n_shards(n_slices: int, shard_slices: int) -> int:
    return -(-n_slices // shard_slices)
