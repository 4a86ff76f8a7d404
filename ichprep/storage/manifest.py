"""``manifest.json``: checksums of every file of a store, and ``verify``.

The manifest holds the preprocessing spec, counts, a digest of the source
file list and the sha256 + size of every shard file, of the Zarr metadata
and of the tables.  It contains no timestamps or worker counts, so the same
inputs and options give a byte-identical manifest.  A collaborator who
receives a copy of a store runs ``ichprep verify STORE --manifest FILE``
against the manifest published in ``data_manifests/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import StoreError
from .damage import Problem as Problem  # re-exported: verify's problems
from .damage import check_files
from .location import Location, as_location, read_any
from .store import (
    GROUP_META,
    IMAGES_META,
    MANIFEST,
    REJECTED,
    SERIES,
    SLABS,
    SLICES,
    STUDIES,
    ShardRecord,
    count_patients,
    open_store,
    read_attrs,
    shard_path,
)

MANIFEST_FORMAT = "ichkit-manifest/1"
_TABLES = (GROUP_META, IMAGES_META, SLICES, STUDIES, REJECTED)
#: Tables a store has where its conversion made them (older stores have no series.parquet).
_OPTIONAL_TABLES = (SERIES, SLABS)


def _entry(root: Location, name: str) -> dict:
    return {"sha256": root.sha256(name), "size": root.size(name)}


def source_digest(table: pd.DataFrame) -> str:
    """sha256 over 'relative path<TAB>size' of every scanned file, in scan order."""
    # .tolist() first: arrow-backed columns are slow to iterate element by element.
    listing = "\n".join(
        f"{p}\t{s}" for p, s in zip(table["path"].astype(str).tolist(), table["file_size"].fillna(-1).tolist())
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def source_summary(table: pd.DataFrame) -> dict:
    """The manifest's ``source`` block: file count, bytes and digest of the listing (path, file_size)."""
    return {"n_files": len(table), "bytes": int(table["file_size"].fillna(0).sum()), "sha256": source_digest(table)}


def build_manifest(
    root: Location,
    shard_results: list[ShardRecord],
    slices: pd.DataFrame,
    source: dict,
    header_failures: int,
    pseudonymized: bool = False,
) -> dict:
    """Manifest of a finished store from its shard records and the slices table it has just written;
    ``source`` from :func:`source_summary`."""
    files = {}
    for result in sorted(shard_results, key=lambda r: r["index"]):
        if result["sha256"] is not None:
            files[shard_path(result["index"])] = {"sha256": result["sha256"], "size": result["size"]}
    for name in _TABLES + tuple(n for n in _OPTIONAL_TABLES if root.isfile(n)):
        files[name] = _entry(root, name)
    attrs = read_attrs(root)
    return {
        "format": MANIFEST_FORMAT,
        "spec": attrs,
        "counts": {
            "slices": len(slices),
            "slices_ok": int(slices["ok"].sum()),
            "pixel_failures": int((~slices["ok"]).sum()),
            "header_failures": int(header_failures),
            "studies": int(slices["study_uid"].nunique()),
            "patients": count_patients(slices),
            "shards": len(shard_results),
            "store_bytes": sum(f["size"] for f in files.values()),
        },
        "source": source,
        "pseudonymized": pseudonymized,
        "files": files,
    }


def with_metadata(manifest: dict, rewritten: dict[str, bytes], spec_attrs: dict) -> dict:
    """``manifest`` restated for metadata files rewritten in place (shards untouched): their entries,
    the spec block and the store's byte count."""
    files = {
        **manifest["files"],
        **{name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in rewritten.items()},
    }
    counts = {**manifest["counts"], "store_bytes": sum(f["size"] for f in files.values())}
    return {**manifest, "spec": spec_attrs, "counts": counts, "files": files}


def write_manifest(root: str | Path | Location, manifest: dict, extra_copy: str | Path | None = None) -> None:
    as_location(root).write_json(MANIFEST, manifest)
    if extra_copy is not None:
        extra = Path(extra_copy).absolute()
        Location(extra.parent).write_json(extra.name, manifest)


def load_manifest(path: str | Path, root: Location | None = None) -> dict:
    """A manifest file, or (``path`` None) the store's own ``manifest.json``."""
    if path is None:
        path = root.child_url(MANIFEST)
    try:
        manifest = json.loads(read_any(path))
    except FileNotFoundError:
        raise StoreError(f"manifest {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"manifest {path} is not valid JSON ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise StoreError(f"{path} is not an ichkit manifest (format {manifest.get('format')!r})")
    return manifest


@dataclass(frozen=True)
class VerifyReport:
    root: Location
    files_checked: int
    bytes_checked: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_tables(root: Location, manifest: dict) -> list[Problem]:
    try:
        store = open_store(root, check_files=False)  # verify has checked the files, by hash
    except (StoreError, OSError, KeyError, ValueError) as exc:
        return [Problem(str(root), "table", f"store does not open: {exc}")]
    problems = []
    slices, studies, n = store.slices, store.studies, store.images.shape[0]
    if len(slices) != manifest["counts"]["slices"]:
        problems.append(Problem(SLICES, "table", f"{len(slices)} rows, manifest says {manifest['counts']['slices']}"))
    covered = (studies.sort_values("start")[["start", "stop"]]).to_numpy()
    if len(covered) and (covered[0, 0] != 0 or covered[-1, 1] != n or (covered[1:, 0] != covered[:-1, 1]).any()):
        problems.append(Problem(STUDIES, "table", "study ranges do not tile images[0:N] contiguously"))
    for row in studies.itertuples():
        run = slices.iloc[row.start : row.stop]
        if (run["study_uid"] != row.study_uid).any():
            problems.append(Problem(STUDIES, "table", f"study {row.study_uid} rows {row.start}:{row.stop} mix studies"))
            break
        by_z = run["order_by"].eq("z").all()
        if by_z and not run["z"].is_monotonic_increasing:
            problems.append(Problem(SLICES, "table", f"study {row.study_uid} is not sorted by z"))
            break
    return problems


def verify_store(root: str | Path | Location, manifest_path: str | Path | None = None) -> VerifyReport:
    """Recompute every checksum of the manifest and check the tables against the array.

    Parameters
    ----------
    root : str, PathLike or Location
        The store: a local folder or an fsspec URL.
    manifest_path : str or PathLike, optional
        A published copy of the manifest (e.g. ``data_manifests/NAME.json``, a path or a URL) to check
        against; by default the store's own ``manifest.json``.

    Returns
    -------
    VerifyReport
        Files and bytes checked and every problem found (missing, resized, altered or unlisted
        files, unsafe paths, inconsistent tables); ``report.ok`` when there is none.  Problems are
        reported, not raised.

    Raises
    ------
    StoreError
        The manifest does not exist, is not valid JSON, or is not an ichkit manifest.
    """
    root = as_location(root)
    manifest = load_manifest(manifest_path, root)
    problems, checked, nbytes = check_files(root, manifest["files"], hashes=True)
    if not any(p.kind in {"unsafe_path"} for p in problems) and all(
        p.path not in (SLICES, STUDIES, GROUP_META, IMAGES_META) for p in problems
    ):
        problems += _check_tables(root, manifest)
    return VerifyReport(root, checked, nbytes, problems)
