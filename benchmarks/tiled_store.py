"""A bigger store made of copies of a small one, so one DataLoader epoch lasts long enough to measure.

ichtrain builds a new DataLoader iterator every epoch (fresh worker processes, each filling its
shuffle buffer of ``buffer_shards`` shards before its first batch).  On the real archive an epoch is
~750k slices and that start-up is noise; on a 400-slice synthetic store it is most of the epoch.  The
tiled store repeats the full shards of the converted store (byte copies of real shard files) with
tables whose studies and patients are renamed per copy, and is opened with ``open_store`` like any
store.  It is a benchmark fixture only: its manifest says so and it never leaves the work folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from ichprep.storage.store import GROUP_META, IMAGES_META, MANIFEST, SLICES, STUDIES, Store, build_studies, open_store

from .layout import IMAGES, root_of, shard_file


def tile(store: Store, out: Path, min_slices: int) -> Store:
    s = store.shard_slices
    full = len(store.slices) // s
    if full == 0:
        return store  # not even one full shard: nothing to tile
    copies = max(1, math.ceil(min_slices / (full * s)))
    src = root_of(store)
    shutil.rmtree(out, ignore_errors=True)
    (out / IMAGES).mkdir(parents=True)
    shutil.copyfile(src / GROUP_META, out / GROUP_META)
    meta = json.loads((src / IMAGES_META).read_text())
    meta["shape"][0] = full * s * copies
    (out / IMAGES_META).write_text(json.dumps(meta, indent=2))
    base = store.slices.iloc[: full * s]
    tables = []
    for c in range(copies):
        for shard in range(full):
            source, target = shard_file(src, shard), shard_file(out, c * full + shard)
            if source.is_file():  # an all-failed shard has no file (zarr writes none for fill values)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        part = base.copy()
        for column in ("study_uid", "series_uid", "patient_id", "image_id"):
            part[column] = part[column].astype("string") + f".tile{c}"
        tables.append(part)
    slices = pd.concat(tables, ignore_index=True)
    slices.to_parquet(out / SLICES, index=False)
    build_studies(slices).to_parquet(out / STUDIES, index=False)
    (out / MANIFEST).write_text(json.dumps({"benchmark_tile_of": str(src), "copies": copies}) + "\n")
    return open_store(out)
