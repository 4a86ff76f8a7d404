"""``ichprep export``: a whole store, or a subset of its studies, as a new verifiable store.

A whole-store export with the same shard size copies the files byte for byte
(the manifest stays valid).  A subset, or a new ``--shard-slices``, is
re-sharded: each destination shard is assembled from one range read per run
of consecutive source slots and written whole, then gets its own manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import StoreError, StoreExistsError
from ..outdir import check_output_folder
from ..reading.labels import LABELS
from .location import Location, as_location
from .manifest import build_manifest, source_summary, write_manifest
from .store import (
    MANIFEST,
    REJECTED,
    SERIES,
    SLABS,
    SLICES,
    STUDIES,
    build_studies,
    create_images,
    images_layout,
    is_store,
    open_reader,
    open_store,
    read_attrs,
    read_parquet,
    slot_ranges,
    store_files,
    write_shard,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSummary:
    dest: str
    n_studies: int
    n_slices: int
    n_shards: int
    copied_verbatim: bool


def read_study_list(path: str | Path) -> list[str]:
    """One StudyInstanceUID per line; blank lines and '#' comments ignored."""
    lines = Path(path).read_text().splitlines()
    studies = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not studies:
        raise StoreError(f"{path} lists no study UIDs (one per line)")
    return studies


def _prepare_dest(dest: Location, overwrite: bool, overwrite_any: bool) -> None:
    """Make ``dest`` an empty folder: it is missing or empty, or a store and ``overwrite``, or ``overwrite_any``."""
    entries = dest.entries()
    check_output_folder(dest, entries, ours=is_store(dest), kind="an ichprep store", overwrite_any=overwrite_any)
    if entries:
        if not (overwrite or overwrite_any):
            raise StoreExistsError(f"{dest} holds a store; use --overwrite to replace it")
        for name in entries:
            dest.remove(name)
    dest.makedirs()


def _studies_of(slices: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """The exported studies' rows: runs of the new slice table, with the labels and reader columns they had
    (study-level labels from ``convert --study-labels`` are in no slice)."""
    studies = build_studies(slices)
    for label in LABELS:
        studies[label] = studies[label].fillna(chosen[label].astype("Int8"))
    for column in chosen.columns.difference(studies.columns, sort=False):
        studies[column] = chosen[column].to_numpy()
    return studies


def export_store(
    src: str | Path | Location,
    dest: str | Path | Location,
    studies: list[str] | None = None,
    shard_slices: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    overwrite_any: bool = False,
) -> ExportSummary:
    """Write a store, or some of its studies, to ``dest`` as a new store with its own manifest.

    Parameters
    ----------
    src : str, PathLike or Location
        The store to read (a local folder or an fsspec URL).
    dest : str, PathLike or Location
        The new store: a missing or empty folder (or URL prefix), or a store with ``overwrite``.
    studies : list of str, optional
        StudyInstanceUIDs to keep (:func:`read_study_list` reads them from a file); all by default.
    shard_slices : int, optional
        Slices per shard of the new store; by default the source's.
    overwrite : bool, optional
        Replace ``dest`` where it is an ichprep store.
    overwrite_any : bool, optional
        Empty ``dest`` first whatever it holds.
    progress : callable, optional
        Called with the number of slices written after each re-sharded shard.

    Returns
    -------
    ExportSummary
        ``copied_verbatim`` is True when every file was copied byte for byte (whole store, same shard
        size): the source's manifest then holds for the copy too.

    Raises
    ------
    StoreError
        ``src`` is not a complete ichkit store, ``dest`` is ``src``, or a study is not in ``src``.
    StoreExistsError
        ``dest`` is a store and ``overwrite`` is False, or holds anything else and ``overwrite_any`` is False.
    """
    src, dest = as_location(src), as_location(dest)
    store = open_store(src)
    if dest.url == src.url:
        raise StoreError("export destination is the source store")
    _prepare_dest(dest, overwrite, overwrite_any)
    spec = store.spec if shard_slices is None else replace(store.spec, shard_slices=shard_slices)

    if studies is None and spec.shard_slices == store.spec.shard_slices:
        for name in store_files(src):  # byte for byte, either way between folders and object stores
            dest.write_bytes(name, src.read_bytes(name))
        return ExportSummary(dest.url, len(store.studies), len(store.slices), store.n_shards, copied_verbatim=True)

    chosen = store.studies if studies is None else store.studies[store.studies["study_uid"].isin(studies)]
    unknown = sorted(set(studies or []) - set(chosen["study_uid"]))
    if unknown:
        raise StoreError(
            f"{len(unknown)} studies are not in {src} (e.g. {unknown[:3]}); study UIDs are listed in {STUDIES}"
        )
    chosen = chosen.sort_values("start")
    slots = np.concatenate([np.arange(r.start, r.stop) for r in chosen.itertuples()])
    slices = store.slices.iloc[slots].reset_index(drop=True)

    kept_attrs = {k: v for k, v in read_attrs(src).items() if k not in spec.to_attrs()}  # e.g. image_ids
    create_images(dest, len(slots), spec, attrs=kept_attrs)
    reader, layout = open_reader(src), images_layout(dest)  # each array's metadata read once
    results = []
    for shard, first in enumerate(range(0, len(slots), spec.shard_slices)):
        part = slots[first : first + spec.shard_slices]
        buffer = np.empty((len(part),) + store.images.shape[1:], dtype=np.uint8)
        for at, a, b in slot_ranges(part):
            buffer[at : at + (b - a)] = reader[a:b]
        results.append(write_shard(dest, spec, shard, first, buffer, layout))
        if progress:
            progress(len(part))

    dest.write_parquet(SLICES, slices)
    dest.write_parquet(STUDIES, _studies_of(slices, chosen.reset_index(drop=True)))
    for name, key, keep in ((SERIES, "study_uid", chosen["study_uid"]), (SLABS, "image_id", slices["image_id"])):
        if src.isfile(name):
            table = read_parquet(src, name)
            dest.write_parquet(name, table[table[key].isin(set(keep))].reset_index(drop=True))
    with src.open(REJECTED) as f:
        rejected = pd.read_csv(f, dtype=str)
    dest.write_csv(REJECTED, rejected[rejected["image_id"].isin(set(slices["image_id"]))])
    source_manifest = src.read_bytes(MANIFEST)
    # The source of an export is its parent store: the digest ties the copy to the exact parent.
    source = {**source_summary(slices), "export_of": hashlib.sha256(source_manifest).hexdigest()}
    pseudonymized = bool(json.loads(source_manifest).get("pseudonymized", False))
    write_manifest(dest, build_manifest(dest, results, slices, source, header_failures=0, pseudonymized=pseudonymized))
    logger.info("exported %d studies (%d slices) from %s to %s", len(chosen), len(slices), src, dest)
    return ExportSummary(dest.url, len(chosen), len(slices), len(results), copied_verbatim=False)
