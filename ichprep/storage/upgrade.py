"""``ichprep upgrade``: bring a store of an older format to the current one, rewriting metadata only.

Format 1 -> 2 added ``dimension_names`` to ``images/zarr.json``; 2 -> 3 restates the recorded
``pipeline`` (which reader reads what) in the group's attributes, with ``format_version``. Shards,
tables and ``rejected.csv`` keep every byte. The ``zarr.json`` files that change are serialised by
zarr itself, so an upgraded store has the bytes (and manifest) of one converted by this version.
The manifest lists both files: their entries, its spec block and ``store_bytes`` are restated, so
``ichprep verify`` passes; a copy published elsewhere (``data_manifests/``) must be replaced by the
new one (``--manifest-out``). ``.ichprep/run.json`` gets the new spec too, so rerunning the same
``ichprep convert`` resumes instead of refusing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata

from ..errors import StoreError
from ..spec import AXES, FORMAT_VERSION, PIPELINE, check_format
from .location import Location, as_location
from .lock import store_lock
from .manifest import load_manifest, with_metadata, write_manifest
from .store import ATTRS_KEY, GROUP_META, IMAGES_META, MANIFEST, RUN_FILE, read_attrs

logger = logging.getLogger(__name__)

#: The spec fields an upgrade restates, in the group's attributes and in ``.ichprep/run.json``.
RESTATED = {"format_version": FORMAT_VERSION, "pipeline": list(PIPELINE)}


class UpgradeSummary(NamedTuple):
    store: str
    from_version: int
    to_version: int
    rewritten: tuple[str, ...]  # files written, in order (empty: the store was already current)


def _zarr_bytes(metadata) -> bytes:
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _store_format(root: Location):
    """The format version in the group's attributes, refused unless this ichkit reads it."""
    found = read_attrs(root).get("format_version")
    try:
        check_format(found)
    except ValueError as exc:
        raise StoreError(f"{root}: {exc}") from None
    return found


def _current_metadata(root: Location) -> tuple[dict, dict[str, bytes]]:
    """The group's spec attributes and the current-format bytes of both zarr.json files."""
    group = GroupMetadata.from_dict(root.read_json(GROUP_META))
    spec = {**group.attributes[ATTRS_KEY], **RESTATED}
    group = dataclasses.replace(group, attributes={**group.attributes, ATTRS_KEY: spec})
    images = dataclasses.replace(ArrayV3Metadata.from_dict(root.read_json(IMAGES_META)), dimension_names=AXES)
    return spec, {IMAGES_META: _zarr_bytes(images), GROUP_META: _zarr_bytes(group)}


def _check_unaltered(root: Location, manifest: dict, new: dict[str, bytes]) -> None:
    """Refuse to restate the manifest over a zarr.json that is neither as listed nor already upgraded."""
    for name, data in new.items():
        expected = manifest["files"].get(name, {}).get("sha256")
        if expected not in (root.sha256(name), _sha256(data)):
            raise StoreError(
                f"{root}/{name} differs from the manifest; run `ichprep verify {root}` and repair "
                "or reconvert the store before upgrading it"
            )


def _restate_run(root: Location) -> bytes | None:
    """run.json with the new format version (its spec is what a rerun of convert compares), if there is one."""
    if not root.isfile(RUN_FILE):
        return None
    run = root.read_json(RUN_FILE)
    run["spec"] = {**run.get("spec", {}), **RESTATED}
    return (json.dumps(run, indent=2, sort_keys=True) + "\n").encode()  # as Location.write_json


def upgrade_store(root: str | Path | Location, manifest_out: str | Path | None = None) -> UpgradeSummary:
    """Rewrite the metadata of ``root`` to the current format; see the module docstring.

    Parameters
    ----------
    root : str, PathLike or Location
        The store: a local folder or an fsspec URL.  Its lock is held while it is rewritten.
    manifest_out : str or PathLike, optional
        Also write the restated manifest there (the copy published in ``data_manifests/``).

    Returns
    -------
    UpgradeSummary
        The versions before and after and the files rewritten, in order (none when the store was
        already current).

    Raises
    ------
    StoreError
        ``root`` is not an ichkit store, its format is one this ichkit does not read, or a
        ``zarr.json`` differs from the manifest (altered since conversion: verify it first).
    StoreLockedError
        A converter or another upgrade is writing ``root``.
    """
    root = as_location(root)
    if not root.isfile(GROUP_META) or not root.isfile(IMAGES_META):
        raise StoreError(
            f"{root} is not an ichkit store (no {GROUP_META} or {IMAGES_META}); create one with `ichprep convert`"
        )
    with store_lock(root):
        found = _store_format(root)
        if found == FORMAT_VERSION:
            return UpgradeSummary(root.url, found, FORMAT_VERSION, ())
        spec, new = _current_metadata(root)
        manifest = load_manifest(None, root) if root.isfile(MANIFEST) else None
        if manifest is not None:
            _check_unaltered(root, manifest, new)
        writes = {IMAGES_META: new[IMAGES_META]} if root.sha256(IMAGES_META) != _sha256(new[IMAGES_META]) else {}
        run = _restate_run(root)
        if run is not None:
            writes[RUN_FILE] = run
        for name, data in writes.items():
            root.write_bytes(name, data)
        if manifest is not None:
            write_manifest(root, with_metadata(manifest, new, spec), extra_copy=manifest_out)
        # The group's format_version goes last: until it is written, a rerun redoes every step.
        root.write_bytes(GROUP_META, new[GROUP_META])
    rewritten = (*writes, *([MANIFEST] if manifest is not None else []), GROUP_META)
    logger.info("upgraded %s from store format %s to %d (%s)", root, found, FORMAT_VERSION, ", ".join(rewritten))
    return UpgradeSummary(root.url, found, FORMAT_VERSION, rewritten)
