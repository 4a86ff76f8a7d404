"""Header scan: one row per DICOM file, read in parallel, in the order the cache is written.

The scan never stops on a bad file: a file whose header cannot be read, or
that is not a single-frame CT slice, stays in the table with ``status`` set
to the reason (``not_dicom``, ``truncated``, ...) and the message in
``error``; ``status == "ok"`` rows are the ones the converter writes.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..cluster import map_tasks, resolve_client
from ..errors import DicomReadError, ScanTableError
from ..storage.store import count_patients
from .dicomio import SliceHeader, check_slice, image_id_of, read_header
from .labels import LABELS, read_labels
from .limits import HEADER_BYTES
from .nifti import VOLUME_HEAD_BYTES, is_volume, scan_volume, volume_id
from .plainread import HEAD_BYTES, parse
from .series import sort_slices
from .source import (
    ZIP_COLUMNS,
    Member,
    Source,
    by_path,
    declared_size,
    limits_of,
    list_members,
    parse_source,
    read_member,
)

logger = logging.getLogger(__name__)

OK = "ok"
_HEADER_COLUMNS = [f.name for f in fields(SliceHeader)]
#: pandas dtypes of the scan table (nullable, so a table of failures keeps its schema).
SCAN_DTYPES: dict[str, str] = {
    **{
        name: "string"
        for name in (
            "image_id",
            "path",
            "study_uid",
            "series_uid",
            "patient_id",
            "sop_uid",
            "modality",
            "transfer_syntax",
            "status",
            "error",
            "order_by",
            "sop_class_uid",
            "series_description",
            "image_type",
            "kernel",
            "contrast",
        )
    },
    **{
        name: "Float64"
        for name in (
            "z",
            "pixel_spacing_row",
            "pixel_spacing_col",
            "slope",
            "intercept",
            "window_center",
            "window_width",
            "slice_thickness",
            "normal_x",
            "normal_y",
            "normal_z",
            "position",
        )
    },
    **{
        name: "Int64"
        for name in (
            "instance_number",
            "rows",
            "cols",
            "bits_stored",
            "pixel_representation",
            "samples_per_pixel",
            "n_frames",
            "file_size",
            "series_number",
            "frame",  # a slice's index in a volume file (NIfTI); null for a DICOM file
        )
    },
    **{name: "Int64" for name in ZIP_COLUMNS},
    "has_pixels": "boolean",
    **{name: "Int8" for name in LABELS},
}


@dataclass(frozen=True)
class ScanSummary:
    n_files: int
    n_ok: int
    n_studies: int
    n_patients: int
    n_labelled: int
    rejected: dict[str, int] = field(default_factory=dict)
    labels_without_file: int = 0

    @property
    def n_rejected(self) -> int:
        return self.n_files - self.n_ok


def list_dicom_files(root: str | Path) -> list[str]:
    """Every ``*.dcm`` file of a source (folder, zip, URL; see :mod:`ichprep.reading.source`), sorted by path."""
    return [member.path for member in list_members(parse_source(root))]


def scan_file(path: str, source: Source | None = None, member: Member | None = None) -> dict:
    """One scan row; errors become a status instead of an exception.

    A file over the source's size limits (:mod:`ichprep.reading.limits`) is rejected unread.  A local file
    is read by path; a zip member or an object (``source``, ``member``) by its first bytes, and at most
    :data:`~ichprep.reading.limits.HEADER_BYTES` where its header is longer than those or not plain.
    """
    local, size = by_path(source, member), declared_size(path, source, member)
    try:
        if local:
            limits_of(source).check_file(path, size)  # read_member checks every other member's declared sizes
            header = read_header(path)
        else:
            header = read_header(path, data=_header_bytes(source, member))
    except DicomReadError as exc:
        row = {"image_id": image_id_of(path), "path": str(path), "status": exc.reason, "error": exc.detail}
    except FileNotFoundError as exc:
        row = {"image_id": image_id_of(path), "path": str(path), "status": "missing", "error": str(exc)}
    else:
        row = header.to_row()  # a readable header that we reject (e.g. MR) keeps its fields for the report
        try:
            check_slice(header)
            row.update(status=OK, error=None)
        except DicomReadError as exc:
            row.update(status=exc.reason, error=exc.detail)
    row["file_size"] = size
    if member is not None and member.offset is not None:
        row.update(zip(ZIP_COLUMNS, (member.offset, member.csize, member.method, member.crc)))
    return row


def _header_bytes(source: Source, member: Member) -> bytes:
    """The member's first HEAD_BYTES where they hold a plain header and the pixel tag, else its first
    HEADER_BYTES (pydicom reads the header from them)."""
    head = read_member(source, member, head=HEAD_BYTES)
    plain = parse(head, want_pixels=False)
    if plain is not None and plain.has_pixels:
        return head
    return read_member(source, member, head=HEADER_BYTES)


def scan_volume_file(path: str, source: Source | None = None, member: Member | None = None) -> list[dict]:
    """One scan row per slice of a NIfTI volume (:func:`ichprep.reading.nifti.scan_volume`), or one failure row.

    The volume is refused unread over the source's limits (its file size, then the voxel bytes and the gzip
    ratio its header announces); a volume not on a local disk is read up to its header only.  Each slice's
    ``file_size`` is its share of the volume's bytes, so a store's source bytes add up.
    """
    local, size, limits = by_path(source, member), declared_size(path, source, member), limits_of(source)
    try:
        limits.check_file(path, size)
        data = None if local else read_member(source, member, head=VOLUME_HEAD_BYTES)
        rows = scan_volume(path, data=data, limits=limits, stored=size)
    except DicomReadError as exc:
        return [{"image_id": volume_id(path), "path": str(path), "status": exc.reason, "error": exc.detail}]
    except FileNotFoundError as exc:
        return [{"image_id": volume_id(path), "path": str(path), "status": "missing", "error": str(exc)}]
    for row in rows:
        row["file_size"] = None if size is None else size // len(rows)
    return rows


def _scan_one(path: str, source: Source | None, member: Member | None) -> list[dict]:
    if is_volume(path):
        return scan_volume_file(path, source, member)
    return [scan_file(path, source, member)]


def scan_files(paths: list[str] | list[Member], source: Source | None = None) -> pd.DataFrame:
    """Scan a batch of files (one Dask task): local paths, or the members of ``source``."""
    if source is None:
        return to_frame([row for p in paths for row in _scan_one(p, None, None)])
    return to_frame([row for m in paths for row in _scan_one(m.path, source, m)])


def to_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for name in SCAN_DTYPES:
        if name not in frame:
            frame[name] = None
    return frame[list(SCAN_DTYPES)].astype(SCAN_DTYPES)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def order_slices(table: pd.DataFrame) -> pd.DataFrame:
    """Readable slices by study, series and position along the normal (:func:`ichprep.reading.series.sort_slices`).

    A series where any slice lacks ImagePositionPatient is ordered by InstanceNumber instead, and its
    rows say so in ``order_by``.  Rows with a non-ok status follow, by path.  The index is reset: row i is slot i.
    """
    ok = table["status"] == OK
    good, bad = sort_slices(table[ok]), table[~ok]
    bad = bad.sort_values("path", kind="stable")
    return pd.concat([good, bad]).reset_index(drop=True)


def flag_duplicates(table: pd.DataFrame, source: Source | None = None) -> pd.DataFrame:
    """Two files with one SOPInstanceUID are one image: keep the first by path, flag the others.

    (A copy left next to the original would otherwise be trained on twice and could straddle splits.)  The
    reason names the kept file relative to ``source`` where given, as every path a store records is.
    """
    ok = table.index[(table["status"] == OK) & table["sop_uid"].notna()]
    rows = table.loc[ok].sort_values("path", kind="stable")
    dup = rows["sop_uid"].duplicated(keep="first")
    if dup.any():
        kept = rows[~dup].set_index("sop_uid")["path"]
        table = table.copy()
        for index, sop in rows.loc[dup, "sop_uid"].items():
            table.loc[index, "status"] = "duplicate"
            name = source.relative(kept[sop]) if source is not None else kept[sop]
            table.loc[index, "error"] = f"same SOPInstanceUID {sop} as {name} (kept)"
        logger.warning("%d files repeat another file's SOPInstanceUID; they are left out", int(dup.sum()))
    return table


class Identities(NamedTuple):
    """:func:`assign_ids`' result: the table with its ``image_id`` column, and the rule that made it."""

    table: pd.DataFrame
    rule: str


#: How a store's image ids were made: file names (Kaggle's ``ID_<hex>.dcm``) where they are unique among the
#: readable slices, else each file's SOPInstanceUID (``ID_`` + a hash of its path where it has none).
ID_RULES: tuple[str, ...] = ("file_name", "sop_uid")


def assign_ids(table: pd.DataFrame, source: Source) -> Identities:
    """One ``image_id`` per readable slice, unique in the table (see :data:`ID_RULES`); volume slices keep theirs.

    Idempotent: ids follow from paths, SOPInstanceUIDs and statuses only, so a scan table given to
    ``convert`` gets the ids its own scan would.
    """
    files = table["frame"].isna()
    stems = table["path"].astype(str).map(image_id_of)
    readable = (table["status"] == OK) & files
    if stems[readable].is_unique:
        return Identities(table.assign(image_id=table["image_id"].where(~files, stems).astype("string")), "file_name")
    relative = source.relative_all(table["path"].astype(str).tolist())
    hashed = pd.Series(
        ["ID_" + hashlib.sha256(p.encode()).hexdigest()[:16] for p in relative], index=table.index, dtype="string"
    )
    ids = table["sop_uid"].astype("string").fillna(hashed)
    logger.info("file names repeat among the slices: image ids are the files' SOPInstanceUIDs")
    return Identities(table.assign(image_id=table["image_id"].where(~files, ids).astype("string")), "sop_uid")


def attach_labels(table: pd.DataFrame, labels: pd.DataFrame | None) -> tuple[pd.DataFrame, int]:
    """Fill the six label columns from a label table; returns the count of labelled ids with no file."""
    if labels is None:
        return table, 0
    joined = labels.reindex(table["image_id"].astype(str))
    for name in LABELS:
        table[name] = joined[name].to_numpy()
    table = table.astype({name: "Int8" for name in LABELS})
    missing = len(labels.index.difference(table["image_id"].astype(str)))  # the label index is unique
    return table, missing


def summarize(table: pd.DataFrame, labels_without_file: int = 0) -> ScanSummary:
    ok = table[table["status"] == OK]
    rejected = Counter(table.loc[table["status"] != OK, "status"].astype(str))
    return ScanSummary(
        n_files=len(table),
        n_ok=len(ok),
        n_studies=int(ok["study_uid"].nunique()),
        n_patients=count_patients(ok),
        n_labelled=int(ok["any"].notna().sum()),
        rejected=dict(sorted(rejected.items())),
        labels_without_file=labels_without_file,
    )


def scan(
    dicom_dir: str | Path,
    labels_csv: str | Path | None = None,
    client=None,
    batch_size: int = 256,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> tuple[pd.DataFrame, ScanSummary]:
    """Read the header of every DICOM file of a source, in the order the store is written.

    A file that cannot be read, or is not a single-frame CT slice, is a row with its reason in
    ``status``; the scan does not stop for it.

    Parameters
    ----------
    dicom_dir : str or PathLike
        A SOURCE: a folder, a zip or an fsspec URL (:mod:`ichprep.reading.source`).
    labels_csv : str or PathLike, optional
        Kaggle's label CSV, parsed first so a bad CSV fails before the long part.
    client : distributed.Client or OnDemand, optional
        Read the headers on its workers in batches of ``batch_size`` files (a batch is retried if a
        worker dies); an :class:`ichprep.cluster.OnDemand` starts a cluster only for enough files;
        None reads them in this process.
    batch_size : int, optional
        Files per Dask task.
    progress : callable, optional
        ``progress("scan", total)`` returns a callback given the number of files done (the CLI turns
        it into a progress bar).

    Returns
    -------
    table : pandas.DataFrame
        One row per file (:data:`SCAN_DTYPES`): readable slices by study and z, then the rest by path.
    summary : ScanSummary
        Counts of files, slices, studies, patients and labels, and rejections by reason.

    Raises
    ------
    SourceError
        ``dicom_dir`` does not exist or cannot be listed.
    LabelsError
        ``labels_csv`` is malformed.
    """
    labels = read_labels(labels_csv) if labels_csv is not None else None
    source = parse_source(dicom_dir)
    members = list_members(source)
    logger.info("scanning %d files in %s", len(members), source)
    advance = progress("scan", len(members)) if progress else None
    batches = list(_batches(members, batch_size))
    parts = map_tasks(resolve_client(client, len(members)), scan_files, batches, progress=advance, source=source)
    table = pd.concat(parts, ignore_index=True) if parts else to_frame([])  # each part has SCAN_DTYPES already
    table = assign_ids(flag_duplicates(table, source), source).table
    table, labels_without_file = attach_labels(table, labels)
    table = order_slices(table)
    return table, summarize(table, labels_without_file)


def read_scan(path: str | Path) -> pd.DataFrame:
    """A table written by ``ichprep scan`` (refuses other Parquet files, e.g. a store's slices.parquet)."""
    frame = pd.read_parquet(path)
    missing = [
        c
        for c in ("image_id", "path", "study_uid", "z", "instance_number", "status", "file_size")
        if c not in frame.columns
    ]
    if missing:
        raise ScanTableError(
            f"{path} is not an `ichprep scan` table (no column {', '.join(missing)}); "
            "make one with `ichprep scan DICOM_DIR -o slices.parquet`"
        )
    return to_frame(frame)


def write_scan(table: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
