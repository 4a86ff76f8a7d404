"""Machine info, the targets (measured vs wanted, never asserted), the plain-text table and the JSON file."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "ichkit",
    "torch",
    "torchvision",
    "zarr",
    "numcodecs",
    "pydicom",
    "numpy",
    "opencv-python-headless",
    "dask",
    "distributed",
    "pandas",
    "pyarrow",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "git": _git(),
    }


# ---------------------------------------------------------------- targets


def loader_figures(loader: dict) -> list[tuple[str, dict]]:
    """(label, figure) of every loader contender, warm then cold, for both renderings of a run."""
    rows = []
    for key in ("store", "dicom", "dicom_reference", "png", "store_zarr_batched_prototype", "store_direct_prototype"):
        rows += [(f"{loader[key]['source']}, {mode}", loader[key][mode]) for mode in ("warm", "cold")]
    dl = loader["store_dataloader"]
    rows += [
        (f"store, DataLoader {dl['workers']} workers, {mode} (epoch of {dl['slices_per_epoch']})", dl[mode])
        for mode in ("warm", "cold")
    ]
    return rows


def batch_figure(section: dict, context: int, batch: int, where: str) -> float | None:
    """samples/s per worker of the stream at its defaults, at (context, batch, where)."""
    for row in section["rows"]:
        if (row["context"], row["batch"], row["where"]) == (context, batch, where) and "(default)" in row["contender"]:
            return row["samples_per_s_per_worker"]
    return None


def _target(name: str, wanted: str, measured, op: str, bound: float, note: str = "") -> dict:
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        met = None
    else:
        met = bool(measured >= bound) if op == ">=" else bool(measured <= bound)
    return {"target": name, "wanted": wanted, "measured": measured, "met": met, "note": note}


def targets(results: dict) -> list[dict]:
    conv = results["conversion"]["ratios"]
    size = results["size"]
    loader = results["loader"]
    train = results["train"]
    rate = "slices_per_s"
    out = [
        _target(
            "conversion vs PNG baseline, 1 worker",
            ">= 3x",
            conv["convert_in_process_vs_png_baseline"],
            ">=",
            3,
            "whole convert() in-process against the Kaggle-style PNG writer",
        ),
        _target(
            "conversion time vs decode-only floor",
            "<= 2x",
            conv["convert_in_process_time_vs_floor"],
            "<=",
            2,
            f"whole convert() in-process (shard path alone: {conv['shard_path_time_vs_floor']:.2f}x)",
        ),
        _target(
            "2 workers vs 1 worker",
            ">= 1.7x",
            conv.get("scaling_2_workers_vs_1"),
            ">=",
            1.7,
            f"LocalCluster, {results['conversion']['shards']} shards; this machine's ceiling (2 bare "
            f"processes vs 1): {results['conversion'].get('ceiling_2_processes', {}).get('throughput_2_vs_1')}x",
        ),
        _target(
            "store bytes vs source DICOM bytes at 256x256", "<= 0.1x", size["ratios"]["store_vs_source"], "<=", 0.1
        ),
        _target(
            "store shard files per 64 slices (vs ceil(slices/64))",
            "<= 1",
            size["store_shard_files_vs_full_shards"],
            "<=",
            1,
            f"{size['store_shard_files']} shard files for {size['slices']} slices; plus "
            f"{size['store_files'] - size['store_shard_files']} fixed files (metadata, tables, manifest)",
        ),
    ]
    for mode in ("warm", "cold"):
        out.append(
            _target(
                f"loader: store vs DICOM on the fly ({mode})",
                ">= 5x",
                loader["ratios"][f"store_vs_dicom_{mode}"],
                ">=",
                5,
            )
        )
    for mode in ("warm", "cold"):
        out.append(
            _target(f"loader: store slices/s per process ({mode})", ">= 3000", loader["store"][mode][rate], ">=", 3000)
        )
    for context, wanted in ((0, 3000), (1, 2000)):
        out.append(
            _target(
                f"batches: context {context}, samples/s per loader process (batch 32, in process)",
                f">= {wanted:,}",
                batch_figure(results["batches"], context, 32, "in process"),
                ">=",
                wanted,
                "through a DataLoader, per worker: 1 worker "
                f"{_num(batch_figure(results['batches'], context, 32, 'DataLoader, 1 worker'))}, 2 workers "
                f"{_num(batch_figure(results['batches'], context, 32, 'DataLoader, 2 workers'))}",
            )
        )
    gpu = train["device"] == "cuda"
    out.append(
        _target(
            "ResNet-152 training images/s at 224 on one H100",
            ">= 2000",
            train["images_per_s"] if gpu and train["arch"] == "resnet152" else None,
            ">=",
            2000,
            f"measured on {train['device_name']}" if gpu else "no GPU on this machine: not measured",
        )
    )
    out.append(
        _target(
            "loader keeps up: DataLoader(2 workers) slices/s / training images/s",
            ">= 1x",
            results["ratios"]["loader_vs_train"],
            ">=",
            1,
            f"training on {train['device_name']} ({train['arch']}, batch {train['batch']})",
        )
    )
    return out


# ---------------------------------------------------------------- the table


def _num(x, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _rate_row(label: str, fig: dict, unit: str = "slices") -> list[str]:
    one = unit[:-1]
    return [
        label,
        _num(fig[f"{unit}_per_s"]),
        _num(fig[f"{unit}_per_s_per_worker"]),
        _num(fig[f"ms_per_{one}"], 3),
        _num(fig["cores_used_in_process"], 2),
    ]


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


BATCH_HEADER = [
    "context",
    "batch",
    "where",
    "contender",
    "samples/s",
    "per worker",
    "cpu ms/sample",
    "main cpu ms/sample",
    "first batch s",
]
MIX_HEADER = ["buffer_shards", "median distinct studies / batch", "10th percentile", "decoded MiB per worker"]


def batch_rows(section: dict) -> list[list[str]]:
    """One row per (context, batch, where, contender) of the batches section, for the text and Markdown tables."""
    return [
        [
            str(r["context"]),
            str(r["batch"]),
            r["where"],
            r["contender"],
            _num(r["samples_per_s"]),
            _num(r["samples_per_s_per_worker"]),
            _num(r["cpu_ms_per_sample"], 3),
            _num(r.get("main_cpu_ms_per_sample"), 3),
            _num(r.get("first_batch_s"), 3),
        ]
        for r in section["rows"]
    ]


def mix_rows(section: dict) -> list[list[str]]:
    return [
        [
            str(r["buffer_shards"]),
            _num(r["median_distinct_studies"]),
            _num(r["p10_distinct_studies"]),
            _num(r["decoded_bytes_per_worker"] / 2**20),
        ]
        for r in section["buffer_mix"]["rows"]
    ]


def batch_notes(section: dict) -> list[str]:
    """The ratios, the allocation figures and the buffer simulation's verdict, one line each."""
    mix = section["buffer_mix"]
    return [
        "ratios: " + "; ".join(f"{k} {_num(v, 2)}x" for k, v in section["ratios"].items()),
        f"batch image memory {tuple(section['allocation']['shape'])}, get + write once (ms): "
        + "; ".join(f"{k} {_num(v, 2)}" for k, v in section["allocation"]["ms"].items()),
        f"buffer_shards simulation: {mix['studies']:,} RSNA-like studies, {mix['samples_per_epoch']:,} samples in an "
        f"epoch of the hybrid plan ({mix['positive_samples']:.2f} positive), {mix['shard_slices']}-slice shards, "
        f"batches of {mix['batch']}: smallest buffer_shards with a median >= {mix['wanted_median']} distinct "
        f"studies: {mix['smallest_enough']}",
    ]


def format_batches(section: dict) -> str:
    return "\n".join(
        [_grid(BATCH_HEADER, batch_rows(section)), *batch_notes(section), _grid(MIX_HEADER, mix_rows(section))]
    )


def format_table(results: dict) -> str:
    meta, conv, size, loader, train = (results[k] for k in ("meta", "conversion", "size", "loader", "train"))
    parts = [
        f"ichkit benchmarks  {meta['date_utc']}  {meta['cpu_model']}, {meta['usable_cores']} cores"
        f"{', GPU ' + meta['gpu'] if meta['gpu'] else ', no GPU'}; load avg before {meta['load_before']}, "
        f"after {meta['load_after']}",
        f"data: {results['dataset']['source']}, {conv['files_in_plan']} slices; repeats {meta['repeats']} "
        f"(figures are medians)",
        "",
        "1. Conversion (warm page cache; convert() gets the scan table; cluster start-up excluded)",
        _grid(
            ["contender", "slices/s", "per worker", "ms/slice", "cores in proc"],
            [
                _rate_row("header scan (ichprep scan, in-process)", conv["scan"], "files"),
                _rate_row("floor: pydicom read + pixel decode", conv["floor_decode"]),
                _rate_row("baseline: Kaggle float64 windows + PNG", conv["baseline_png"]),
                _rate_row("ichprep convert, in-process", conv["ichprep_in_process"]),
                _rate_row("ichprep shard path only (convert_shard)", conv["ichprep_shard_path"]),
                _rate_row("prototype: direct shard write, no bookkeeping", conv["prototype_direct_shard_write"]),
                *[
                    _rate_row(f"ichprep convert, LocalCluster {fig['workers']}", fig)
                    for k, fig in conv.items()
                    if k.startswith("ichprep_") and "_worker" in k
                ],
                *[
                    _rate_row(f"LocalCluster {fig['workers']}, trim unset by benchmark", fig)
                    for k, fig in conv.items()
                    if k.startswith("prototype_malloc_fix_")
                ],
            ],
        ),
        "ratios: " + ", ".join(f"{k} {_num(v, 2)}" for k, v in conv["ratios"].items()),
        f"prototype shard bytes identical to zarr's: {conv['prototype_direct_shard_write']['identical_to_zarr']}",
        *(
            [
                f"machine ceiling: shard path in 2 bare processes at once = "
                f"{conv['ceiling_2_processes']['throughput_2_vs_1']:.2f}x one process"
            ]
            if "ceiling_2_processes" in conv
            else []
        ),
        "",
        "2. Size on disk",
        _grid(
            ["what", "bytes/slice", "files", "vs source"],
            [
                ["source DICOM", _num(size["source_bytes_per_slice"]), str(size["source_files"]), "1.000"],
                [
                    "PNG baseline",
                    _num(size["png_bytes_per_slice"]),
                    str(size["png_files"]),
                    _num(size["ratios"]["png_vs_source"], 3),
                ],
                [
                    "store (all files)",
                    _num(size["store_bytes_per_slice"]),
                    f"{size['store_files']} ({size['store_shard_files']} shards)",
                    _num(size["ratios"]["store_vs_source"], 3),
                ],
            ],
        ),
        f"shard files per 64 slices: {_num(size['store_shard_files_per_64_slices'], 2)}; "
        f"all store files per 64 slices: {_num(size['store_files_per_64_slices'], 2)}",
        "",
        f"3. Loader, per process, to uint8 batches ({loader['batch']}, C, {loader['crop']}, {loader['crop']}) "
        "with random crop + flip",
    ]
    rows = [_rate_row(label, fig) for label, fig in loader_figures(loader)]
    dl = loader["store_dataloader"]
    parts += [
        _grid(["loader", "slices/s", "per worker", "ms/slice", "cores in proc"], rows),
        "ratios: " + ", ".join(f"{k} {_num(v, 2)}" for k, v in loader["ratios"].items()),
        f"prototype direct decode equals zarr's pixels: {loader['store_direct_prototype']['identical_to_zarr']}",
        f"DataLoader: first batch of an epoch after {_num(dl['warm']['first_batch_s'], 3)} s warm, "
        f"{_num(dl['cold']['first_batch_s'], 3)} s cold (worker start-up + filling the shuffle buffer)",
        "raw read (MB/s warm / cold, resident fraction after eviction): "
        + "; ".join(
            f"{p['files']} {_num(p['warm_MB_per_s'])} / {_num(p['cold_MB_per_s'])}, "
            f"{_num(p['resident_fraction_after_evict'], 3)}"
            for p in loader["io_probe"]
        ),
        "",
        f"3b. Finished uint8 batches per loader process, warm, epoch of {results['batches']['slices_per_epoch']} "
        "(DataLoader rows: samples/s from the first batch on)",
        format_batches(results["batches"]),
        "",
        f"4. Training step ({train['arch']}, batch {train['batch']}, {train['image_size']}², {train['device_name']}, "
        f"amp {train['amp']}, channels_last {train['channels_last']}, {train['torch_threads']} threads)",
        f"images/s {_num(train['images_per_s'], 1)} (median step {_num(train['median_step_s'], 3)} s of "
        f"{len(train['step_s'])}); loader/model ratio {_num(results['ratios']['loader_vs_train'], 1)}",
        "",
        "5. Profile (top functions by own time)",
    ]
    for key, prof in results["profile"].items():
        if key == "stages":
            continue
        top = ", ".join(f"{r['function']} {r['share']:.0%}" for r in prof["by_tottime"][:5])
        parts.append(
            f"{key} ({prof['slices']} slices; threads {', '.join(prof['threads'])}; busy "
            f"{prof['busy_s']:.3f} s, waiting {prof['waiting_s']:.3f} s under cProfile): {top}"
        )
    parts.append(
        "stages, ms/slice: "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["profile"]["stages"]["ms_per_slice"].items())
    )
    parts += ["", "Targets (reported, never asserted)"]
    parts.append(
        _grid(
            ["target", "wanted", "measured", "met"],
            [
                [
                    t["target"],
                    t["wanted"],
                    _num(t["measured"], 3) if isinstance(t["measured"], float) else _num(t["measured"]),
                    {True: "yes", False: "NO", None: "n/a"}[t["met"]],
                ]
                for t in results["targets"]
            ],
        )
    )
    return "\n".join(parts)


def _clean(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _clean(value.item())
    return value


def write_json(results: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=2) + "\n")
