"""The cache layout: one Zarr v3 group plus tables, a contract shared by ichprep and ichtrain.

::

    STORE/
      zarr.json            group; attributes["ichkit"] = the preprocessing spec
      images/              uint8 (N, C, H, W); chunk = 1 slice, shard = shard_slices slices
      slices.parquet       row i describes images[i]
      studies.parquet      one row per study: [start, stop) rows of images
      series.parquet       one row per series seen: its properties, whether it was kept, and why (or why not)
      slabs.parquet        only where thin series were slabbed: each slab's member slices
      rejected.csv         every file left out or zero-filled, with the reason
      manifest.json        sha256 + size of every file above (written last)
      .ichprep/            conversion state (run identity, per-shard completion markers, lock)
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NotRequired, TypedDict

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import StoreError, repair_hint
from ..reading.labels import LABELS
from ..spec import AXES, PreprocessSpec, warn_if_outdated
from .damage import damaged_error, find_damaged_shards, shard_number, without_damaged
from .location import Location, as_location
from .shardcodec import IMAGES, IMAGES_META, FastLayout, Mismatch, ShardReader, encode_shard, fast_layout, shard_path
from .shardcodec import SHARD_DIR as SHARD_DIR  # re-exported: ichprep.storage.store names the whole layout

logger = logging.getLogger(__name__)

ATTRS_KEY = "ichkit"
GROUP_META = "zarr.json"
SLICES = "slices.parquet"
STUDIES = "studies.parquet"
SERIES = "series.parquet"
SLABS = "slabs.parquet"
REJECTED = "rejected.csv"
MANIFEST = "manifest.json"
STATE = ".ichprep"
#: The conversion's identity (what a rerun must match to resume) and the folder of per-shard markers.
RUN_FILE = f"{STATE}/run.json"
MARKERS = f"{STATE}/shards"

#: Columns of slices.parquet, in order.
SLICE_COLUMNS = [
    "image_id",
    "study_uid",
    "series_uid",
    "patient_id",
    "z",
    "instance_number",
    "order_by",
    *LABELS,
    "ok",
    "error",
    "path",
    "file_size",
    "rows",
    "cols",
]


def compressor(spec: PreprocessSpec):
    if spec.compressor == "zstd":
        return ZstdCodec(level=spec.compression_level)
    # Byte shuffle does nothing for uint8; lz4 at its default is the fast, larger option.
    return BloscCodec(cname="lz4", clevel=spec.compression_level, shuffle="noshuffle")


def create_images(
    root: str | Path | Location, n_slices: int, spec: PreprocessSpec, attrs: dict | None = None
) -> zarr.Array:
    """The group and its empty ``images`` array; ``attrs`` adds to the spec's attributes (e.g. ``image_ids``)."""
    group = zarr.open_group(
        as_location(root).zarr_store(),
        mode="w",
        zarr_format=3,
        attributes={ATTRS_KEY: {**spec.to_attrs(), **(attrs or {})}},
    )
    shape = (n_slices, spec.channels, spec.size, spec.size)
    return group.create_array(
        IMAGES,
        shape=shape,
        chunks=(1,) + shape[1:],
        shards=(spec.shard_slices,) + shape[1:],
        dtype="uint8",
        fill_value=0,
        compressors=compressor(spec),
        dimension_names=AXES,  # what Zarr v3 readers (xarray) name the axes by; shard bytes do not change
    )


def marker_path(shard: int) -> str:
    """Relative path of shard ``shard``'s completion marker (its record as :func:`write_shard` returns it)."""
    return f"{MARKERS}/{shard:06d}.json"


def store_files(root: Location) -> list[str]:
    """Every file of the store, less the converter's private state (``STATE``)."""
    return [name for name in root.files() if not name.startswith(STATE + "/")]


def _not_ichkit(root: Location) -> StoreError:
    return StoreError(f"{root} is a Zarr group but not an ichkit store (no '{ATTRS_KEY}' attribute)")


def is_store(root: str | Path | Location) -> bool:
    """Whether ``root`` holds an ichprep store, finished or interrupted (its run file, or an ichkit group)."""
    root = as_location(root)
    if root.isfile(RUN_FILE):
        return True
    if not root.isfile(GROUP_META):
        return False
    try:
        attributes = root.read_json(GROUP_META).get("attributes", {})
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: not ours to replace
        return False
    return isinstance(attributes, dict) and ATTRS_KEY in attributes


def read_attrs(root: str | Path | Location) -> dict:
    """The ichkit attributes of the store's group (the spec as written); StoreError where there are none."""
    root = as_location(root)
    attrs = root.read_json(GROUP_META).get("attributes", {})
    if ATTRS_KEY not in attrs:
        raise _not_ichkit(root)
    return attrs[ATTRS_KEY]


def open_images(root: str | Path | Location, mode: str = "r") -> zarr.Array:
    images = Location(as_location(root).child_url(IMAGES))
    return zarr.open_array(images.zarr_store(read_only=mode == "r"), mode=mode)


def images_layout(root: str | Path | Location) -> FastLayout | Mismatch:
    """The ``images`` array's own metadata checked against the direct shard codec's layout (one small read)."""
    return fast_layout(as_location(root).read_json(IMAGES_META))


def _not_images(root: Location, mismatch: Mismatch) -> StoreError:
    return StoreError(
        f"{root}: {mismatch}; ichkit needs uint8 (N, C, H, W) images: rewrite the array with "
        "`ichprep export` from the original store, or convert again"
    )


def open_reader(root: str | Path | Location, layout: FastLayout | Mismatch | None = None):
    """Fast read access, ``reader[a:b]``: direct shard decoding where the array's metadata has the one
    layout :mod:`ichprep.storage.shardcodec` implements, zarr for every other valid layout.

    The choice is made once per call, from ``images/zarr.json`` (or ``layout``, already read by the caller).
    A shard file the manifest lists that is absent or does not decode raises
    :class:`~ichprep.errors.DamagedShardError` on the direct path (zarr reads an absent one as zeros:
    :func:`open_store`'s check is what finds it there).
    """
    root = as_location(root)
    layout = images_layout(root) if layout is None else layout
    if isinstance(layout, FastLayout):
        studies_of = functools.partial(studies_between, root)
        return ShardReader(root, layout.shape, layout.shard_slices, expected_shards(root), studies_of)
    if not layout.zarr_only:
        raise _not_images(root, layout)
    logger.info("%s: reading images through zarr (%s)", root, layout)
    return open_images(root)


def studies_between(root: Location, start: int, stop: int) -> list[str]:
    """The study uids holding slots in [start, stop), for an error message; [] where the studies do not read."""
    try:
        studies = read_parquet(root, STUDIES, columns=["study_uid", "start", "stop"])
    except (StoreError, OSError):
        return []
    return studies.loc[(studies["start"] < stop) & (studies["stop"] > start), "study_uid"].astype(str).tolist()


def expected_shards(root: Location) -> frozenset[int] | None:
    """The shards the manifest lists a file for (a reader must find them); None for a store without a manifest."""
    if not root.isfile(MANIFEST):
        return None
    return frozenset(n for n in map(shard_number, read_manifest_files(root)) if n is not None)


def _zarr_shard_file(root: Location, spec: PreprocessSpec, shard: int, images: zarr.Array) -> str:
    """The file zarr writes shard ``shard`` to, checked to be the one shard of ``spec.shard_slices`` slots."""
    slots = (images.shards or images.chunks)[0]
    if slots != spec.shard_slices:
        raise StoreError(
            f"{root}: images has {slots} slices per shard (file), the conversion "
            f"{spec.shard_slices}; convert into a new store or with --shard-slices {slots}"
        )
    return IMAGES + "/" + images.metadata.encode_chunk_key((shard, 0, 0, 0))


class ShardRecord(TypedDict):
    """One written shard, as its marker (``.ichprep/shards/NNNNNN.json``) stores it and the manifest lists it."""

    index: int  # the shard number (the key every marker on disk has)
    start: int  # its first slot
    stop: int  # one past its last slot
    sha256: str | None  # of the shard file; None: every slot zero-filled, so there is no file
    size: int  # bytes of the shard file
    inputs: NotRequired[str]  # sha256 of the first slot and member paths: what a resumed run must match
    errors: NotRequired[list[list]]  # [slot, reason, detail] of every zero-filled slot
    skipped: NotRequired[bool]  # True when an earlier run wrote it and this one kept it


def write_shard(
    root: str | Path | Location,
    spec: PreprocessSpec,
    shard: int,
    start: int,
    buffer: np.ndarray,
    layout: FastLayout | Mismatch | None = None,
) -> ShardRecord:
    """Write shard ``shard`` whole, in one write (never a partial shard write), and record its checksum.

    Where the array's metadata (``layout``, or read here) has the direct codec's layout, the shard is
    encoded here (same bytes as zarr, see :mod:`ichprep.storage.shardcodec`) and written atomically; any other
    layout goes through zarr. A shard that is all fill value (every slot zero-filled) has no file, as
    zarr would leave it: sha256 None.
    """
    root = as_location(root)
    layout = images_layout(root) if layout is None else layout
    record = ShardRecord(index=shard, start=start, stop=start + len(buffer), sha256=None, size=0)
    if (
        isinstance(layout, FastLayout)
        and layout.shard_slices == spec.shard_slices
        and layout.shape[1:] == buffer.shape[1:]
    ):
        return _write_direct(root, layout, shard, buffer, record)
    if isinstance(layout, Mismatch) and not layout.zarr_only:
        raise _not_images(root, layout)
    logger.debug("%s: writing shard %d through zarr (%s)", root, shard, layout)
    images = open_images(root, "r+")
    name = _zarr_shard_file(root, spec, shard, images)
    images[start : start + len(buffer)] = buffer
    if root.isfile(name):
        record.update(sha256=root.sha256(name), size=root.size(name))
    return record


def _write_direct(
    root: Location, layout: FastLayout, shard: int, buffer: np.ndarray, record: ShardRecord
) -> ShardRecord:
    name = shard_path(shard)
    if buffer.any():
        # Hash the bytes we hold rather than reading the shard back (a second GET on object stores).
        data = encode_shard(buffer, layout.shard_slices, layout.level)
        root.write_bytes(name, data)
        record.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    elif root.exists(name):  # an earlier run's file: zarr deletes a shard that became all fill value
        root.remove(name)
    return record


def n_shards(n_slices: int, shard_slices: int) -> int:
    return -(-n_slices // shard_slices)


class SlotRange(NamedTuple):
    """Consecutive slots ``[start, stop)``, held from ``row`` on in the arrays that list the slots in order."""

    row: int
    start: int
    stop: int


def slot_ranges(slots: np.ndarray) -> list[SlotRange]:
    """Each range of consecutive slots in an ascending slot list: one read or write each."""
    if len(slots) == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(slots)]])
    return [SlotRange(row=int(a), start=int(slots[a]), stop=int(slots[b - 1]) + 1) for a, b in zip(starts, stops)]


def count_patients(slices: pd.DataFrame) -> int:
    """Distinct patients; a slice without PatientID counts its study as the patient."""
    return int(slices["patient_id"].fillna(slices["study_uid"]).nunique())


def build_studies(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per study: its contiguous run [start, stop) of slices and study-level label maxima.

    Runs of equal study_uid are found with numpy in one pass, not with a pandas groupby per column.
    """
    study = slices["study_uid"].to_numpy(dtype=object)
    n = len(study)
    starts = np.flatnonzero(np.r_[True, study[1:] != study[:-1]]) if n else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], n].astype(np.int64) if n else starts
    if len(set(study[starts])) != len(starts):
        raise StoreError("studies are not contiguous runs of slices; the slice order is broken")
    run = np.repeat(np.arange(len(starts)), stops - starts)
    studies = pd.DataFrame(
        {
            "study_uid": pd.array(study[starts], dtype=slices["study_uid"].dtype),
            "patient_id": slices["patient_id"].groupby(run).first().reindex(range(len(starts))).array,
            "start": starts.astype(np.int64),
            "stop": stops,
            "n_slices": stops - starts,
            "n_ok": np.add.reduceat(slices["ok"].to_numpy(np.int64), starts) if n else np.zeros(0, np.int64),
        }
    )
    for label in LABELS:  # max over the run; NA only where the whole run is unlabelled
        values = slices[label].to_numpy(dtype=np.float64, na_value=np.nan)
        maxima = np.fmax.reduceat(values, starts) if n else values
        studies[label] = pd.array(np.where(np.isnan(maxima), None, maxima), dtype="Int8")
    return studies


@dataclass(frozen=True)
class Store:
    """An opened, complete ichkit store (read side)."""

    root: Location
    spec: PreprocessSpec
    images: zarr.Array
    slices: pd.DataFrame
    studies: pd.DataFrame

    @property
    def shard_slices(self) -> int:
        return self.spec.shard_slices

    @property
    def n_shards(self) -> int:
        return n_shards(len(self.slices), self.spec.shard_slices)


def open_store(root: str | Path | Location, *, skip_damaged: bool = False, check_files: bool = True) -> Store:
    """Open a complete ichkit store for reading.

    Parameters
    ----------
    root : str, PathLike or Location
        The store: a local folder or an fsspec URL (``s3://bucket/cache.zarr``).
    skip_damaged : bool, optional
        Mark every slot of a damaged shard file not ok (readers then leave it out, as a zero-filled slot)
        and warn, instead of raising; shards are then also checked by their sha256 (every byte read once).
    check_files : bool, optional
        Check the shard files against the manifest (presence and size: one listing, no reads).  Only
        ``ichprep verify`` and ``ichprep info``, which report what they find, turn it off.

    Returns
    -------
    Store
        The spec, the ``images`` array (opened read-only) and the slices and studies tables.

    Raises
    ------
    StoreError
        ``root`` is not a Zarr group, not an ichkit store, or incomplete (a table or the manifest
        missing: the conversion did not finish), a table does not read, or its tables and array
        disagree in length.
    DamagedStoreError
        A shard file the manifest lists is missing or of another size (unless ``skip_damaged``).
    """
    root = as_location(root)
    if not root.isfile(GROUP_META):
        raise StoreError(f"{root} is not a Zarr store (no {GROUP_META}); create one with `ichprep convert`")
    group = zarr.open_group(root.zarr_store(read_only=True), mode="r")
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if attrs is None:
        raise _not_ichkit(root)
    for name in (SLICES, STUDIES, MANIFEST):
        if not root.isfile(name):
            raise StoreError(f"{root} is incomplete ({name} missing): rerun the same `ichprep convert` to finish it")
    images = group[IMAGES]
    slices = read_parquet(root, SLICES)
    if len(slices) != images.shape[0]:
        raise StoreError(f"{root}: {SLICES} has {len(slices)} rows but {IMAGES} has {images.shape[0]} slices")
    spec = PreprocessSpec.from_attrs(attrs)
    warn_if_outdated(attrs, str(root))
    studies = read_parquet(root, STUDIES)
    if check_files:
        slices = _undamaged(root, slices, spec.shard_slices, skip_damaged)
    return Store(root, spec, images, slices, studies)


def _undamaged(root: Location, slices: pd.DataFrame, shard_slices: int, skip_damaged: bool) -> pd.DataFrame:
    """``slices`` where every shard file matches the manifest; else the error, or (skipping) its slots not ok."""
    files = read_manifest_files(root)
    damaged = find_damaged_shards(root, files, n_slices=len(slices), shard_slices=shard_slices, hashes=skip_damaged)
    if not damaged:
        return slices
    if not skip_damaged:
        raise damaged_error(root, damaged, slices)
    logger.warning(
        "%s: --skip-damaged leaves out %d shard file(s) and their %d ok slots:\n%s",
        root,
        len(damaged),
        sum(int(slices["ok"].iloc[d.start : d.stop].sum()) for d in damaged),
        "\n".join(f"  {d.describe(slices)}" for d in damaged),
    )
    return without_damaged(slices, damaged)


def read_manifest_files(root: Location) -> dict:
    """The manifest's ``files`` (name -> sha256 and size); StoreError naming the manifest where it does not read."""
    try:
        files = root.read_json(MANIFEST).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(f"{root}/{MANIFEST} cannot be read ({exc}); {repair_hint(root)}") from exc
    if not isinstance(files, dict):
        raise StoreError(f"{root}/{MANIFEST} lists no files; {repair_hint(root)}")
    return files


def read_parquet(root: Location, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A table of the store; StoreError naming the file and the reason where it does not read."""
    try:
        with root.open(name) as f:
            return pd.read_parquet(f, columns=columns)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError subclasses
        raise StoreError(f"{root}/{name} cannot be read ({exc}); {repair_hint(root)}") from exc
