"""Render a benchmark JSON as the Markdown tables of BENCHMARKS.md: ``python -m benchmarks.markdown FILE.json``."""

from __future__ import annotations

import json
import sys

from ichprep.cluster import MALLOC_TRIM_VAR

from .report import BATCH_HEADER, MIX_HEADER, batch_notes, batch_rows, loader_figures, mix_rows


def _n(x, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _rate(label: str, fig: dict) -> list[str]:
    return [
        label,
        _n(fig["slices_per_s"]),
        _n(fig["slices_per_s_per_worker"]),
        _n(fig["ms_per_slice"], 3),
        " / ".join(f"{w:.3f}" for w in fig["wall_s"]),
    ]


def render(r: dict) -> str:
    conv, size, loader, train, meta = r["conversion"], r["size"], r["loader"], r["train"], r["meta"]
    out = [
        f"Run {meta['date_utc']}, `{meta['command']}`, {conv['files_in_plan']} slices, "
        f"load average before {meta['load_before']}, after {meta['load_after']}.",
        "",
    ]
    rows = [
        _rate("floor: `pydicom.dcmread(p).pixel_array`", conv["floor_decode"]),
        _rate("baseline: Kaggle float64 windows at 512², resize, PNG", conv["baseline_png"]),
        _rate("**ichprep convert**, in-process (`client=None`)", conv["ichprep_in_process"]),
        _rate("ichprep shard path only (`convert_shard` × shards)", conv["ichprep_shard_path"]),
    ]
    rows += [
        _rate(f"**ichprep convert**, LocalCluster {f['workers']}", f)
        for k, f in conv.items()
        if k.startswith("ichprep_") and "_worker" in k
    ]
    rows += [
        _rate(
            "*benchmark-only*: shard loop with direct encode, no marker or checksum (same bytes)",
            conv["prototype_direct_shard_write"],
        )
    ]
    rows += [
        _rate(f"*benchmark-only*: LocalCluster {f['workers']}, {MALLOC_TRIM_VAR} unset by the benchmark itself", f)
        for k, f in conv.items()
        if k.startswith("prototype_malloc_fix_")
    ]
    out += [
        "**Conversion** (slices/s; wall seconds of each repeat)",
        "",
        _table(["contender", "slices/s", "per worker", "ms/slice", "repeats (s)"], rows),
        "",
        f"Header scan alone: {_n(conv['scan']['files_per_s'])} files/s in-process.",
        "",
        *(
            [
                f"Machine ceiling: the shard path in 2 bare processes at once gives "
                f"{_n(conv['ceiling_2_processes']['throughput_2_vs_1'], 2)}x the throughput of 1 process.",
                "",
            ]
            if "ceiling_2_processes" in conv
            else []
        ),
        "Ratios: " + ", ".join(f"`{k}` {_n(v, 2)}" for k, v in conv["ratios"].items()),
        "",
    ]
    out += [
        "**Size on disk**",
        "",
        _table(
            ["", "bytes/slice", "files", "× source"],
            [
                ["source DICOM", _n(size["source_bytes_per_slice"]), str(size["source_files"]), "1"],
                [
                    "PNG baseline (256², 3 windows)",
                    _n(size["png_bytes_per_slice"]),
                    str(size["png_files"]),
                    _n(size["ratios"]["png_vs_source"], 3),
                ],
                [
                    "store (all files, zstd-1, 64-slice shards)",
                    _n(size["store_bytes_per_slice"]),
                    f"{size['store_files']} ({size['store_shard_files']} shards)",
                    _n(size["ratios"]["store_vs_source"], 3),
                ],
            ],
        ),
        "",
    ]
    rows = [_rate(label, fig) for label, fig in loader_figures(loader)]
    out += [
        f"**Loader** (to uint8 ({loader['batch']}, 3, {loader['crop']}, {loader['crop']}) batches with random "
        "crop + flip; one process unless stated)",
        "",
        _table(["loader", "slices/s", "per worker", "ms/slice", "repeats (s)"], rows),
        "",
        "Ratios: " + ", ".join(f"`{k}` {_n(v, 2)}" for k, v in loader["ratios"].items()),
        "",
        "Raw reads (MB/s warm / cold; page-cache residency after eviction): "
        + "; ".join(
            f"{p['files']} {_n(p['warm_MB_per_s'])} / {_n(p['cold_MB_per_s'])} ({p['resident_fraction_after_evict']})"
            for p in loader["io_probe"]
        ),
        "",
    ]
    batches = r["batches"]
    out += [
        f"**Finished batches per loader process** (uint8 batches from the stream, warm, epoch of "
        f"{batches['slices_per_epoch']}; DataLoader rows count samples/s from the first batch on)",
        "",
        _table(BATCH_HEADER, batch_rows(batches)),
        "",
        *[f"{line}  " for line in batch_notes(batches)],
        "",
        _table(MIX_HEADER, mix_rows(batches)),
        "",
    ]
    out += [
        f"**Training step**: {train['arch']}, batch {train['batch']}, {train['image_size']}², "
        f"{train['device_name']}, amp {train['amp']}, channels_last {train['channels_last']}, "
        f"{train['torch_threads']} threads: "
        f"{_n(train['images_per_s'], 2)} images/s (steps "
        + " / ".join(f"{s:.2f}" for s in train["step_s"])
        + f" s); loader/model ratio {_n(r['ratios']['loader_vs_train'])}.",
        "",
    ]
    stages = r["profile"]["stages"]["ms_per_slice"]
    out += [
        "**Stage breakdown** (ms/slice, median)",
        "",
        _table(["stage", "ms/slice"], [[k, f"{v:.3f}"] for k, v in stages.items()]),
        "",
    ]
    out += [
        "**Targets**",
        "",
        _table(
            ["target", "wanted", "measured", "met"],
            [
                [
                    t["target"],
                    t["wanted"],
                    _n(t["measured"], 2) if t["measured"] is not None else "–",
                    {True: "yes", False: "**no**", None: "n/a"}[t["met"]],
                ]
                for t in r["targets"]
            ],
        ),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.markdown FILE.json")
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
