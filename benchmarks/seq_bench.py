"""Stage-2 (sequence model) training speed on an RSNA-sized array of stage-1 features, against merely reading it.

``python -m benchmarks.seq_bench [--dims 512,2048] [--models window,gru,transformer] [--batches 40] [--threads N]
[--studies 21744] [--out FILE.json]``

The simulated array has the RSNA 2019 training set's shape: 21,744 studies and 752,803 slots.  Study lengths
are 24 + a gamma draw, clipped to 20-60 and then nudged by single slices to the exact slot total.  The
features are float16 rows of ``D`` (512: ResNet-18, 2048: ResNet-152) drawn from a pool of 4,096 random
normal rows; only the speed is measured, so repeated rows change nothing.  The labels are ~14 % ``any``:
41 % of the studies bleed, each in one run of 10-58 % of its slices, with one random subtype.

For every ``D``:

* baseline: one shuffled pass of :func:`ichtrain.study.sequence.iter_batches` over every study.  It gathers the float16
  rows, standardises them to float32 and pads them: the data work of an epoch, with no model.  The
  standardisation statistics pass (:func:`ichtrain.study.sequence.standardisation`, once per fit) is timed apart;
* each model kind, with its default :class:`~ichtrain.config.SeqConfig`: the same batches, each followed by
  :func:`ichtrain.study.sequence.train_step` (forward, masked RSNA-weighted BCE, backward, AdamW, cosine step).
  Two untimed warm-up batches come first.  Then ``--batches`` batches are timed and the time is
  extrapolated to one epoch of ``ceil(studies / batch_studies)`` batches (``--batches 0``: the whole
  epoch, timed).

Peak memory: the highest resident set size (sampled every 5 ms) above the RSS just before that contender
(freed heap handed back to the OS first, so memory an earlier contender freed is not reused unseen); the
feature array itself is already resident and is listed apart.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch

from ichtrain.config import SEQ_MODELS, SeqConfig
from ichtrain.study import sequence as seq
from ichtrain.study.sequence import SeqInputs

from .measure import load_average, ratio
from .report import _grid, _num, machine_info, write_json

RSNA_STUDIES = 21_744
RSNA_SLOTS = 752_803
LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
POOL_ROWS = 4_096
WARMUP_BATCHES = 2


# ---------------------------------------------------------------- the simulated stage-1 outputs


def study_lengths(studies: int, slots: int, seed: int = 0) -> np.ndarray:
    """``studies`` lengths in 20..60 summing to exactly ``slots`` (24 + gamma, then +-1 slice to the total)."""
    if not 20 * studies <= slots <= 60 * studies:
        raise ValueError(f"{slots} slots cannot be split into {studies} studies of 20-60 slices")
    rng = np.random.default_rng(seed)
    mean_extra = slots / studies - 24
    lengths = np.clip(24 + np.rint(rng.gamma(2.0, max(mean_extra, 0.5) / 2.0, studies)), 20, 60).astype(np.int64)
    while (gap := slots - int(lengths.sum())) != 0:
        room = np.flatnonzero(lengths < 60) if gap > 0 else np.flatnonzero(lengths > 20)
        picked = rng.choice(room, size=min(abs(gap), len(room)), replace=False)
        lengths[picked] += 1 if gap > 0 else -1
    return lengths


def simulate(studies: int, slots: int, dim: int, seed: int = 0) -> SeqInputs:
    """Stage-1 outputs of an RSNA-shaped store: float16 features, float32 logits and 0/1 targets."""
    rng = np.random.default_rng(seed)
    lengths = study_lengths(studies, slots, seed)
    stops = np.cumsum(lengths)
    starts = stops - lengths
    pool = rng.standard_normal((POOL_ROWS, dim), dtype=np.float32).astype(np.float16)
    x = pool[rng.integers(0, POOL_ROWS, slots)]
    targets = np.zeros((slots, len(LABELS)), np.float32)
    bleeding = np.flatnonzero(rng.random(studies) < 0.41)
    runs = np.maximum(1, np.rint(lengths[bleeding] * rng.uniform(0.1, 0.58, len(bleeding)))).astype(np.int64)
    firsts = starts[bleeding] + (rng.random(len(bleeding)) * (lengths[bleeding] - runs + 1)).astype(np.int64)
    for first, run, subtype in zip(firsts, runs, rng.integers(0, 5, len(bleeding))):
        targets[first : first + run, [subtype, 5]] = 1
    logits = (rng.standard_normal(targets.shape) + 2 * targets - 2).astype(np.float32)
    return SeqInputs(
        x=x, logits=logits, targets=targets, starts=starts, stops=stops, study_fold=np.zeros(studies, np.int64)
    )


# ---------------------------------------------------------------- memory


def release_freed() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS rise is that contender's own."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    rss: int = 0


@contextmanager
def peak_rss(interval_s: float = 0.005):
    """Highest RSS seen while the block runs (a sampling thread; the block's own end included)."""
    release_freed()
    peak, stop = _Peak(), threading.Event()
    peak.rss = _rss()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak.rss = max(peak.rss, _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak.rss = max(peak.rss, _rss())


# ---------------------------------------------------------------- timing


def _row(
    label: str, dim: int, seconds: float, slots: int, timed_batches: int, epoch_batches: int, extra_rss: int, **more
) -> dict:
    epoch_s = seconds * epoch_batches / timed_batches
    return {
        "contender": label,
        "dim": dim,
        "timed_batches": timed_batches,
        "epoch_batches": epoch_batches,
        "extrapolated": timed_batches < epoch_batches,
        "timed_s": seconds,
        "timed_slots": slots,
        "epoch_s": epoch_s,
        "slots_per_s": slots / seconds if seconds > 0 else float("nan"),
        "peak_extra_mib": extra_rss / 2**20,
        **more,
    }


def baseline(inputs: SeqInputs, order: np.ndarray, cfg: SeqConfig, norm: seq.Norm) -> dict:
    """One epoch of batches (gather, standardise, pad) and nothing else."""
    epoch_batches = math.ceil(len(order) / cfg.batch_studies)
    with peak_rss() as peak:
        before = peak.rss
        started = time.perf_counter()
        slots = sum(int(b.mask.sum()) for b in seq.iter_batches(inputs, order, cfg.batch_studies, norm))
        seconds = time.perf_counter() - started
    return _row(
        "read + standardise", inputs.x.shape[1], seconds, slots, epoch_batches, epoch_batches, peak.rss - before
    )


def training(inputs: SeqInputs, order: np.ndarray, cfg: SeqConfig, norm: seq.Norm, batches: int) -> dict:
    """``batches`` training steps of ``cfg`` after the warm-up (0: a whole epoch), extrapolated to one epoch."""
    epoch_batches = math.ceil(len(order) / cfg.batch_studies)
    timed = epoch_batches if batches <= 0 else min(batches, epoch_batches)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = seq.build_seq_model(
        cfg.model,
        in_dim=inputs.x.shape[1],
        n_out=len(LABELS),
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
        concat_logits=cfg.concat_logits,
    ).to(device)
    model.train()
    step = seq.make_step(model, cfg, LABELS, epoch_batches + WARMUP_BATCHES, device)
    warm = order[-WARMUP_BATCHES * cfg.batch_studies :]
    with peak_rss() as peak:
        before = peak.rss
        for batch in seq.iter_batches(inputs, warm, cfg.batch_studies, norm):
            seq.train_step(step, batch)
        slots, last = 0, torch.zeros(())
        started = time.perf_counter()
        for batch in seq.iter_batches(inputs, order[: timed * cfg.batch_studies], cfg.batch_studies, norm):
            last = seq.train_step(step, batch)
            slots += int(batch.mask.sum())
        last.item()  # the device finishes the queued steps inside the timed span
        seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    return _row(
        cfg.model, inputs.x.shape[1], seconds, slots, timed, epoch_batches, peak.rss - before, parameters=params
    )


def run(
    studies: int = RSNA_STUDIES,
    slots: int | None = None,
    dims=(512, 2048),
    models=SEQ_MODELS,
    batches: int = 40,
    seed: int = 0,
    device: str = "cpu",
    command: str = "",
) -> dict:
    slots = slots if slots is not None else round(studies * RSNA_SLOTS / RSNA_STUDIES)
    cfg = SeqConfig(device=device)
    rows = []
    for dim in dims:
        started = time.perf_counter()
        inputs = simulate(studies, slots, dim, seed)
        made_s = time.perf_counter() - started
        every = np.arange(studies)
        started = time.perf_counter()
        norm = seq.standardisation(inputs, every)
        stats_s = time.perf_counter() - started
        order = np.random.default_rng(seed).permutation(every)
        rows.append(
            {
                **baseline(inputs, order, cfg, norm),
                "array_mib": inputs.x.nbytes / 2**20,
                "standardisation_stats_s": stats_s,
                "simulate_s": made_s,
            }
        )
        for kind in models:
            rows.append(training(inputs, order, SeqConfig(model=kind, device=device), norm, batches))
        del inputs
    for row in rows:
        base = next(r for r in rows if r["dim"] == row["dim"] and "array_mib" in r)
        row["epoch_vs_baseline"] = ratio(row["epoch_s"], base["epoch_s"])
    lengths = study_lengths(studies, slots, seed)
    return {
        "meta": {
            **machine_info(),
            "command": command,
            "load_before": load_average(),
            "device": device,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "studies": studies,
        "slots": slots,
        "mean_length": float(lengths.mean()),
        "length_p5_p50_p95": [float(q) for q in np.percentile(lengths, [5, 50, 95])],
        "config": asdict(cfg),
        "hidden": {kind: SeqConfig(model=kind).hidden for kind in models},
        "rows": rows,
    }


HEADER = ["D", "contender", "timed", "epoch s", "slots/s", "x baseline", "peak MiB above start"]


def format_seq(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        timed = (
            f"{r['timed_batches']} of {r['epoch_batches']} batches, extrapolated"
            if r["extrapolated"]
            else f"whole epoch, {r['epoch_batches']} batches"
        )
        rows.append(
            [
                str(r["dim"]),
                r["contender"],
                timed,
                _num(r["epoch_s"], 1),
                _num(r["slots_per_s"]),
                _num(r["epoch_vs_baseline"], 1),
                _num(r["peak_extra_mib"]),
            ]
        )
    cfg, meta = section["config"], section["meta"]
    notes = [
        f"{section['studies']:,} studies, {section['slots']:,} slots (mean {section['mean_length']:.1f} slices, "
        f"5/50/95th percentile {'/'.join(f'{q:g}' for q in section['length_p5_p50_p95'])}); SeqConfig defaults: "
        f"hidden {', '.join(f'{k} {h}' for k, h in section['hidden'].items())}, layers {cfg['layers']}, "
        f"batch {cfg['batch_studies']} studies; "
        f"{meta['device']}, {meta['torch_threads']} torch threads, load average before {meta['load_before']}",
        "feature array: "
        + ", ".join(
            f"D={r['dim']} {r['array_mib']:,.0f} MiB float16 (statistics pass {r['standardisation_stats_s']:.1f} s)"
            for r in section["rows"]
            if "array_mib" in r
        )
        + f"; process peak RSS {meta['peak_rss_mib']:,.0f} MiB",
    ]
    return "\n".join([_grid(HEADER, rows), *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seq_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--dims", default="512,2048", help="feature widths, comma-separated (default 512,2048)")
    parser.add_argument("--models", default=",".join(SEQ_MODELS), help="model kinds (default: every one)")
    parser.add_argument(
        "--batches",
        type=int,
        default=40,
        help="timed training batches per contender, extrapolated to an epoch (0: a whole epoch)",
    )
    parser.add_argument("--studies", type=int, default=RSNA_STUDIES, help="simulated studies (default RSNA's 21,744)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    dims = tuple(int(d) for d in args.dims.split(",") if d.strip())
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks.seq_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    section = run(
        studies=args.studies,
        dims=dims,
        models=models,
        batches=args.batches,
        device=args.device,
        command=command.strip(),
    )
    print(format_seq(section))
    if args.out:
        write_json(section, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
