"""``ichprep convert``: DICOM folder -> one sharded Zarr v3 store, in parallel on Dask.

Race-free by construction: the slot order is fixed by the scan before any
pixel is read, and each shard (``shard_slices`` consecutive slots) belongs to
exactly one Dask task, which decodes its slices into one buffer and writes the
whole shard in one write.  A task takes one or a few consecutive shards
(:func:`shards_per_task`).  zarr-python has no locking and concurrent partial
writes to one shard silently lose data, so no two tasks ever touch the same
shard file.

Resumable: after writing its shard a task records the shard's sha256 in
``.ichprep/shards/NNNNNN.json`` (atomically).  A rerun of the same command
skips every shard whose file still has that hash and rewrites the others,
so an interrupted run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import scratch
from .cluster import map_tasks, resolve_client
from .errors import DicomReadError, ScanTableError, StoreExistsError
from .outdir import check_output_folder
from .privacy import check_key, pseudonymize_scan, scrub
from .reading.labels import read_labels
from .reading.nifti import apply_volume_ids
from .reading.scan import OK, assign_ids, attach_labels, scan
from .reading.series import REPEATED_POSITION, SERIES_LEFT_OUT, SeriesRule, choose_series, decision_counts
from .reading.slabs import Slots, plan_slots
from .reading.slot import Slot, slot_hu
from .reading.source import ZIP_COLUMNS, ZIP_SEP, Member, Source, members_of, parse_source
from .reading.studylabels import KeyLine, StudyLabels, match_study_labels
from .spec import PreprocessSpec
from .storage.location import Location, as_location
from .storage.lock import LOCK, store_lock
from .storage.manifest import build_manifest, source_digest, source_summary, write_manifest
from .storage.shardcodec import FastLayout, Mismatch
from .storage.store import (
    IMAGES,
    MARKERS,
    REJECTED,
    RUN_FILE,
    SERIES,
    SLABS,
    SLICE_COLUMNS,
    SLICES,
    STATE,
    STUDIES,
    ShardRecord,
    build_studies,
    create_images,
    images_layout,
    is_store,
    marker_path,
    n_shards,
    shard_path,
    write_shard,
)

logger = logging.getLogger(__name__)

PLAN = f"{STATE}/plan.parquet"


@dataclass(frozen=True)
class ConvertSummary:
    store: str
    n_slices: int
    n_studies: int
    n_shards: int
    shards_skipped: int
    rejected: dict[str, int]
    wall_s: float
    store_bytes: int
    source_bytes: int
    manifest: dict = field(repr=False)
    series: dict[str, int] = field(default_factory=dict)  # series kept, and left out by reason
    n_slabs: int = 0
    id_rule: str = "file_name"
    study_labels: str | None = None  # how study labels were matched (``folder``, ...), None without them
    study_labels_unmatched: tuple[KeyLine, ...] = ()  # CSV keys that match no study, with their lines

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def slices_per_s(self) -> float:
        return self.n_slices / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def ratio(self) -> float:
        return self.store_bytes / self.source_bytes if self.source_bytes else float("nan")


# ---------------------------------------------------------------- one shard (runs on a worker)


def _inputs_digest(start: int, paths: list[str]) -> str:
    return hashlib.sha256(json.dumps([start, paths]).encode()).hexdigest()


def _completed(root: Location, shard: int, digest: str) -> ShardRecord | None:
    """The shard's marker if the shard file in the store is exactly what that marker recorded."""
    try:
        done = root.read_json(marker_path(shard))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if done.get("inputs") != digest:
        return None
    name = shard_path(shard)
    if done["sha256"] is None:  # every slot failed: zarr writes no file for an all-fill shard
        return done if not root.exists(name) else None
    if not root.isfile(name) or root.size(name) != done["size"] or root.sha256(name) != done["sha256"]:
        return None
    return done


def convert_shard(
    root: str,
    shard: int,
    start: int,
    slots: list[Slot],
    spec: PreprocessSpec,
    layout: FastLayout | Mismatch | None = None,
    source: Source | None = None,
) -> ShardRecord:
    """Decode, preprocess and write shard number ``shard`` whole (slots from ``start``); return its record.

    A slot is one member (a file) or a slab's members (:mod:`ichprep.reading.slot`).  Pixel failures keep
    their slot (zero-filled) and are listed in ``errors``.  ``layout`` is the array's checked metadata
    (:func:`ichprep.storage.store.images_layout`), read once by the caller for many shards.  ``source`` says
    where the members' bytes are; None reads each by its path.
    """
    root = Location(root)
    paths = [m.path if isinstance(m, Member) else "+".join(p.path for p in m) for m in slots]
    digest = _inputs_digest(start, paths)
    done = _completed(root, shard, digest)
    if done is not None:
        return ShardRecord(**done, skipped=True)

    # Reused per thread (ichprep.scratch): a fresh buffer is page-faulted in again on every shard. Every
    # slot below is overwritten or zeroed.
    buffer = scratch.array("shard", (spec.shard_slices, spec.channels, spec.size, spec.size), np.uint8)[: len(paths)]
    errors = []
    for i, slot in enumerate(slots):
        try:
            spec.apply(slot_hu(slot, source, reuse=True), out=buffer[i])
            continue
        except DicomReadError as exc:
            reason, detail = exc.reason, exc.detail
        except FileNotFoundError:
            reason, detail = "missing", "the file was removed after the header scan"
        buffer[i] = 0  # the slot stays, zero-filled
        errors.append([start + i, reason, detail])
    done = ShardRecord(**write_shard(root, spec, shard, start, buffer, layout=layout), inputs=digest, errors=errors)
    root.write_json(marker_path(shard), done)
    return ShardRecord(**done, skipped=False)


# ---------------------------------------------------------------- the run


def _identity(spec: PreprocessSpec, slots: Slots) -> dict:
    """What must match for a rerun to resume instead of refusing."""
    identity = {
        "spec": spec.key(),
        "layout": spec.to_attrs()["layout"],
        "n_slices": len(slots.slots),
        "plan_sha256": source_digest(slots.members),  # path and size of every planned file
    }
    if slots.slabs is not None:  # which files make each slot
        identity["slots_sha256"] = hashlib.sha256(slots.members["slot"].to_numpy("int64").tobytes()).hexdigest()
    return identity


def _prepare(root: Location, identity: dict, overwrite: bool) -> bool:
    """Make ``root`` (empty, or a store: :func:`_check_output`) ready for this run; True when resuming it."""
    entries = [name for name in root.entries() if name != STATE]
    if root.isfile(RUN_FILE):
        previous = root.read_json(RUN_FILE)
        if previous == identity:
            logger.info("resuming the conversion in %s", root)
            # A writer killed mid-write leaves its temporary file; nothing else writes now (we hold the lock).
            for name in root.leftover_temporaries(IMAGES) + root.leftover_temporaries(STATE):
                logger.info("removing %s, left by an interrupted write", name)
                root.remove(name)
            return True
        if not overwrite:
            changed = [k for k in identity if previous.get(k) != identity[k]]
            raise StoreExistsError(
                f"{root} holds a conversion with other inputs or options (differs in: {', '.join(changed)}); "
                "use --overwrite to replace it, or choose another output path"
            )
    elif entries and not overwrite:
        raise StoreExistsError(f"{root} holds a store; use --overwrite to replace it")
    for name in root.entries():
        if name != STATE:
            root.remove(name)
    for name in root.files(STATE):
        if name != LOCK:  # we hold it
            root.remove(name)
    return False


def _check_output(root: Location, overwrite_any: bool) -> None:
    """``root`` is missing, empty or an ichprep store (finished or interrupted), or the user said ``overwrite_any``."""
    entries = [name for name in root.entries() if name != STATE]
    check_output_folder(root, entries, ours=is_store(root), kind="an ichprep store", overwrite_any=overwrite_any)


class ShardTask(NamedTuple):
    """One shard of the plan: shard number ``shard`` holds slots ``start`` to ``stop``."""

    shard: int
    start: int
    stop: int


def _tasks(n_slots: int, shard_slices: int) -> list[ShardTask]:
    return [
        ShardTask(shard, start, min(start + shard_slices, n_slots))
        for shard, start in enumerate(range(0, n_slots, shard_slices))
    ]


def _write_plan(root: Location, members: pd.DataFrame) -> str:
    """Store the members to read, one row per file with its slot, for the workers; returns the file's sha256.

    A task then carries three numbers per shard, not its files: the driver's task graph does not grow with
    the archive's file names.
    """
    buffer = io.BytesIO()
    columns = ["abs_path", "file_size", *ZIP_COLUMNS, "slot"]
    members[columns].rename(columns={"abs_path": "path"}).to_parquet(buffer, index=False)
    data = buffer.getvalue()
    root.write_bytes(PLAN, data)
    return hashlib.sha256(data).hexdigest()


def slots_of(members: pd.DataFrame) -> list[Slot]:
    """Members grouped into slots (``slot`` column, ascending): a Member alone, a tuple for a slab."""
    files = members_of(members)
    slot = members["slot"].to_numpy()
    if len(slot) == 0 or slot[-1] == len(slot) - 1:  # one file per slot: no grouping to do
        return files
    bounds = np.flatnonzero(np.r_[True, slot[1:] != slot[:-1], True])
    return [files[a] if b - a == 1 else tuple(files[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@lru_cache(maxsize=2)
def _plan_slots(root: str, key: str) -> list[Slot]:
    """The plan a worker reads once per run (``key``: the plan file's sha256: a new run never gets an old one)."""
    return slots_of(pd.read_parquet(io.BytesIO(Location(root).read_bytes(PLAN))))


def convert_shards(
    shards: list[ShardTask], *, root: str, spec: PreprocessSpec, source: Source, plan_key: str
) -> list[ShardRecord]:
    """:func:`convert_shard` for consecutive shards, as one Dask task; a retry skips the shards already done."""
    layout = images_layout(root)  # one metadata read per task, not per shard
    slots = _plan_slots(root, plan_key)
    return [convert_shard(root, shard, start, slots[start:stop], spec, layout, source) for shard, start, stop in shards]


def shards_per_task(n_shards: int, n_workers: int) -> int:
    """Shards per Dask task: at most 8, and at least 4 tasks a worker for balance.

    Each task costs the scheduler and client CPU of their own, which a small machine takes from its
    workers, so a task takes several consecutive shards: enough work for that overhead to vanish, as
    Dask advises (figures in BENCHMARKS.md).  Resume stays per shard: each shard keeps its marker.
    """
    return max(1, min(8, n_shards // (4 * max(n_workers, 1))))


def _convert_each(shards: list[ShardTask], *, root: Location, spec: PreprocessSpec, source: Source, layout, slots):
    """:func:`convert_shard` for consecutive shards in this process, from slots the caller holds."""
    return [convert_shard(root.url, t.shard, t.start, slots[t.start : t.stop], spec, layout, source) for t in shards]


def _run_tasks(
    root: Location,
    tasks: list[ShardTask],
    spec: PreprocessSpec,
    client,
    progress,
    source: Source,
    members: pd.DataFrame,
) -> list[ShardRecord]:
    if client is None:
        slots = slots_of(members.assign(path=members["abs_path"]))
        fn = functools.partial(_convert_each, root=root, layout=images_layout(root), slots=slots)
        batches, kwargs, keys = [[task] for task in tasks], {}, None
    else:
        fn = convert_shards
        per_task = shards_per_task(len(tasks), sum(client.nthreads().values()))
        batches = [tasks[i : i + per_task] for i in range(0, len(tasks), per_task)]
        kwargs = {"root": root.url, "plan_key": _write_plan(root, members)}
        keys = [f"ichprep-shards-{b[0].shard}-{b[-1].shard}" for b in batches]
    done = map_tasks(
        client,
        fn,
        batches,
        progress=progress,
        size=lambda records: sum(r["stop"] - r["start"] for r in records),
        keys=keys,
        spec=spec,
        source=source,
        **kwargs,
    )
    return sorted((record for records in done for record in records), key=lambda r: r["index"])


#: rejected.csv's ``stage`` of a file the scan left out, by its status (any other status is a header failure).
_STAGES = {SERIES_LEFT_OUT: "series", REPEATED_POSITION: "series"}


def _rejected_table(left_out: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """Files left out at the scan, then pixel failures (``error`` is "reason: detail"); built row by row."""
    rows = [
        (p, i, _STAGES.get(reason, "header"), reason, detail)
        for p, i, reason, detail in left_out[["path", "image_id", "status", "error"]].itertuples(index=False)
    ]
    failed = slices.loc[~slices["ok"], ["path", "image_id", "error"]]
    for path, image_id, error in failed.itertuples(index=False):
        reason, _, detail = str(error).partition(":")
        rows.append((path, image_id, "pixels", reason, detail.strip()))
    return pd.DataFrame(rows, columns=["path", "image_id", "stage", "reason", "detail"], dtype="string")


def _check_scan_source(table: pd.DataFrame, source: Source) -> None:
    """A scan table made from another SOURCE names files this one cannot read (a folder's table may be relative)."""
    if source.by_path or table.empty:
        return
    paths = table["path"].astype(str)
    foreign = ~paths.str.startswith(source.prefix)
    if foreign.any():
        raise ScanTableError(
            f"the scan table lists {paths[foreign].iloc[0]}, which is not in {source}: "
            "pass the SOURCE it was scanned from, or scan this SOURCE again"
        )


def convert(
    dicom_dir: str | Path,
    store: str | Path,
    spec: PreprocessSpec = PreprocessSpec(),
    labels_csv: str | Path | None = None,
    scan_table: pd.DataFrame | None = None,
    client=None,
    overwrite: bool = False,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    pseudonymize_key: str | None = None,
    manifest_out: str | Path | None = None,
    series: str | frozenset[str] = "auto",
    series_rule: SeriesRule = SeriesRule(),
    slab: str | float = "auto",
    study_labels: StudyLabels | None = None,
    volume_ids: pd.DataFrame | None = None,
    overwrite_any: bool = False,
) -> ConvertSummary:
    """Convert every readable slice of ``dicom_dir`` into ``store``; see the module docstring.

    The store's lock is taken first, so a second converter on the same store stops at once instead
    of after its header scan.  A rerun of the same conversion resumes it.

    Parameters
    ----------
    dicom_dir : str or PathLike
        A SOURCE: a folder, a zip (``rsna.zip::top/stage_2_train``) or an fsspec URL
        (:mod:`ichprep.reading.source`).  The store records paths relative to it, so one archive gives one
        manifest whichever way it is read.
    store : str or PathLike
        The store to write: a local folder or an fsspec URL.
    spec : PreprocessSpec, optional
        Windows, size, shard size and compression.
    labels_csv : str or PathLike, optional
        Kaggle's label CSV (:func:`ichprep.reading.labels.read_labels`); without it the label columns are empty.
    scan_table : pandas.DataFrame, optional
        A table from ``ichprep scan`` of this same SOURCE; skips the header scan.
    client : distributed.Client or OnDemand, optional
        Where the shards are converted: None in this process (tests and small jobs), or an
        :class:`ichprep.cluster.OnDemand`, which starts a cluster only for enough files.
    overwrite : bool, optional
        Replace an ichprep store (finished or interrupted) that holds another conversion.
    overwrite_any : bool, optional
        Also replace a folder that is not an ichprep store (its contents are deleted).
    progress : callable, optional
        ``progress(stage, total)`` returns a callback given the count of items done ("scan": files,
        "convert": slices).
    pseudonymize_key : str, optional
        Replaces every identifier and path written to the store by a keyed hash (:mod:`ichprep.privacy`).
    manifest_out : str or PathLike, optional
        Also write the manifest there (e.g. ``data_manifests/NAME.json``).
    series : "auto", "all" or a set of SeriesInstanceUIDs, optional
        Which series of each study the store holds (:func:`ichprep.reading.series.choose_series`): the one a
        5 mm non-contrast soft-tissue model reads, every eligible one (each its own run), or those listed.
    series_rule : SeriesRule, optional
        Eligibility limits and kernel lists for ``series``.
    slab : "auto", "off" or a thickness in mm, optional
        Average thin series into slabs (:mod:`ichprep.reading.slabs`); ``auto`` slabs a series under 3 mm to 5 mm.
    study_labels : StudyLabels, optional
        Study-level labels (:func:`ichprep.reading.studylabels.read_study_labels`, parsed by the caller before
        the long part), joined onto studies.parquet where slice labels do not say.
    volume_ids : pandas.DataFrame, optional
        NIfTI volumes' study and patient ids (:func:`ichprep.reading.nifti.read_volume_ids`) instead of file names.

    Returns
    -------
    ConvertSummary
        Counts, rejections by reason, sizes, wall time and the manifest written.

    Raises
    ------
    SourceError
        ``dicom_dir`` does not exist or cannot be listed.
    LabelsError
        ``labels_csv`` is malformed (before anything is read or written).
    ScanTableError
        ``scan_table`` lists files of another SOURCE.
    StoreExistsError
        ``store`` holds another conversion and ``overwrite`` is False, or files that are not a store and
        ``overwrite_any`` is False (the message lists them).
    StoreLockedError
        Another converter is writing ``store``.
    DicomReadError
        Not one file of ``dicom_dir`` is a readable CT slice.
    ValueError
        ``pseudonymize_key`` is too short (:func:`ichprep.privacy.check_key`).
    """
    started = time.perf_counter()
    source, root = parse_source(dicom_dir), as_location(store)
    if pseudonymize_key is not None:
        check_key(pseudonymize_key)  # before the long part
    _check_output(root, overwrite_any)
    root.makedirs()
    with store_lock(root):
        if scan_table is None:
            table, _ = scan(source, labels_csv, client=client, progress=progress)
        else:
            table = scan_table
            _check_scan_source(table, source)
            if labels_csv is not None:
                table, _ = attach_labels(table.copy(), read_labels(labels_csv))
        if volume_ids is not None:
            table = apply_volume_ids(table, volume_ids)
        table, id_rule = assign_ids(table, source)
        absolute = table["path"].astype(str).tolist()
        table = table.assign(abs_path=absolute, path=source.relative_all(absolute))
        originals = {}
        if pseudonymize_key is not None:
            table, originals = pseudonymize_scan(table, pseudonymize_key)
        table, series_table = choose_series(table, series, series_rule)
        slots = plan_slots(table, series_table, slab)
        plan = slots.slots
        left_out = table[table["status"] != OK]
        if plan.empty:
            statuses = ", ".join(f"{k} {v}" for k, v in sorted(Counter(table["status"].astype(str)).items()))
            raise DicomReadError(
                str(source), f"no readable CT slice among {len(table)} files (by status: {statuses}); see the scan"
            )

        identity = _identity(spec, slots)
        resuming = _prepare(root, identity, overwrite or overwrite_any)
        if not resuming:
            attrs = {"image_ids": id_rule} if id_rule != "file_name" else {}  # absent: Kaggle's file names
            create_images(root, len(plan), spec, attrs=attrs)
            root.makedirs(MARKERS)
            root.write_json(RUN_FILE, identity)
        advance = progress("convert", len(plan)) if progress else None
        results = _run_tasks(
            root,
            _tasks(len(plan), spec.shard_slices),
            spec,
            resolve_client(client, len(plan)),
            advance,
            source,
            slots.members,
        )

        errors = {slot: f"{reason}: {detail}" for r in results for slot, reason, detail in r["errors"]}
        slices = plan.assign(
            ok=[i not in errors for i in range(len(plan))],
            error=pd.array([errors.get(i) for i in range(len(plan))], dtype="string"),
        )
        slices = slices[SLICE_COLUMNS]
        if originals:  # decode errors can quote a path
            slices = slices.assign(error=scrub(slices["error"], originals))
        root.write_parquet(SLICES, slices)
        studies = build_studies(slices)
        matched = None
        if study_labels is not None:
            matched = match_study_labels(studies, study_labels, folders=_top_folders(slices, studies))
            studies = matched.studies
        root.write_parquet(STUDIES, studies)
        root.write_parquet(SERIES, series_table)
        if slots.slabs is not None:
            root.write_parquet(SLABS, slots.slabs)
        rejected = _rejected_table(left_out, slices)
        root.write_csv(REJECTED, rejected)
        manifest = build_manifest(
            root,
            results,
            slices,
            source_summary(table),
            int((~left_out["status"].isin(list(_STAGES))).sum()),
            pseudonymized=pseudonymize_key is not None,
        )
        write_manifest(root, manifest, extra_copy=manifest_out)

    wall = time.perf_counter() - started
    return ConvertSummary(
        store=root.url,
        n_slices=int(slices["ok"].sum()),
        n_studies=int(slices["study_uid"].nunique()),
        n_shards=n_shards(len(plan), spec.shard_slices),
        shards_skipped=sum(r["skipped"] for r in results),
        rejected=dict(
            sorted(Counter(rejected.loc[rejected["reason"] != SERIES_LEFT_OUT, "reason"].astype(str)).items())
        ),
        wall_s=wall,
        store_bytes=manifest["counts"]["store_bytes"],
        source_bytes=int(slots.members["file_size"].sum()),
        manifest=manifest,
        series=decision_counts(series_table),
        n_slabs=int(slots.slabs["image_id"].nunique()) if slots.slabs is not None else 0,
        id_rule=id_rule,
        study_labels=matched.matched_by if matched is not None else None,
        study_labels_unmatched=matched.unmatched_keys if matched is not None else (),
    )


def _top_folders(slices: pd.DataFrame, studies: pd.DataFrame) -> pd.Series:
    """Each study's top folder in the SOURCE (or its zip, for a folder of zips), from its first slice's path."""
    first = slices["path"].astype(str).to_numpy()[studies["start"].to_numpy()]
    tops = [p.split(ZIP_SEP, 1)[0] if ZIP_SEP in p else p.split("/", 1)[0] for p in first]
    return pd.Series(tops, index=studies.index)
