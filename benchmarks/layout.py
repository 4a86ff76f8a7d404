"""The store layout as paths of a local folder: ichprep's own names (:mod:`ichprep.storage.store`), one definition.

``images/c/k/0/0/0`` holds shard k; ``.ichprep/shards/NNNNNN.json`` is shard k's completion marker (a
shard without one is rewritten by ``convert_shard``).  Only local stores are benchmarked.
"""

from __future__ import annotations

from pathlib import Path

from ichprep.storage.store import IMAGES, SHARD_DIR, STATE, marker_path, n_shards, shard_path

__all__ = ["IMAGES", "SHARD_DIR", "STATE", "marker_file", "n_shards", "root_of", "shard_file"]


def root_of(store) -> Path:
    """Local folder of an opened store (``Store.root`` may be a Path or an ichprep location)."""
    return Path(str(store.root))


def shard_file(root: Path, shard: int) -> Path:
    return root / shard_path(shard)


def marker_file(root: Path, shard: int) -> Path:
    return root / marker_path(shard)
