"""Size on disk per slice: the source DICOMs, the PNG baseline's folder, the store (and how many files)."""

from __future__ import annotations

from pathlib import Path

from .layout import SHARD_DIR, STATE
from .measure import files_under, ratio, total_bytes


def run(paths: list[str], png_dir: Path, store: Path, n_ok: int, shard_slices: int) -> dict:
    """Per slice = per slot of the store (``len(paths)``: every file the converter planned; ``n_ok`` decoded)."""
    pngs = files_under(png_dir)
    store_files = [p for p in files_under(store) if f"/{STATE}/" not in p]  # conversion state is not the cache
    shard_files = files_under(store / SHARD_DIR)
    source = total_bytes(paths)
    png = total_bytes(pngs)
    cache = total_bytes(store_files)
    shards = total_bytes(shard_files)
    n = n_slices = len(paths)
    return {
        "slices": n_slices,
        "slices_ok": n_ok,
        "source_files": n,
        "source_bytes": source,
        "source_bytes_per_slice": source / n,
        "png_files": len(pngs),
        "png_bytes": png,
        "png_bytes_per_slice": png / max(1, len(pngs)),
        "store_bytes": cache,
        "store_bytes_per_slice": cache / n_slices,
        "store_shard_bytes_per_slice": shards / n_slices,
        "store_files": len(store_files),
        "store_shard_files": len(shard_files),
        "shard_slices": shard_slices,
        "store_shard_files_per_64_slices": 64 * len(shard_files) / n_slices,
        # 1.0 = one file per 64 slices, the last shard partial: shard files / ceil(slices / 64).
        "store_shard_files_vs_full_shards": len(shard_files) / -(-n_slices // 64),
        "store_files_per_64_slices": 64 * len(store_files) / n_slices,
        "ratios": {
            "store_vs_source": ratio(cache, source),
            "png_vs_source": ratio(png / max(1, len(pngs)), source / n),
            "store_vs_png": ratio(cache / n_slices, png / max(1, len(pngs))),
        },
    }
