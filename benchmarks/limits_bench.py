"""What the read limits cost on an ordinary zip, and what a hostile zip costs with them.

``python -m benchmarks.limits_bench [--studies 8] [--repeats 5] [--base COMMIT] [--out FILE.json] [--quick]``

1. **Ordinary archive**: a Kaggle-style deflated zip (``ichprep synth --zip``), header scan (files/s) and whole
   ``convert`` (slices/s) in-process, today's code against ``--base`` (the code before the limits), each in a
   Python process of its own (:class:`benchmarks.archive_bench.Code`), interleaved ABAB after one warm-up.
   Today's code checks each member's declared sizes and inflates into a bounded buffer; the figures should
   not move (target: ratio >= 0.97).
2. **Hostile archive**: the same zip plus a 2 GiB bomb member and a member whose 1 GiB of zeros declares
   600 kB, scanned by today's code in a fresh process: wall time and the process's peak resident memory,
   against the same scan of the ordinary zip.  The old code is not run on it (it inflates the whole bomb).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from ichprep.synth import KAGGLE_TOP, generate

from .archive_bench import REPO, Code, extract_base, interleaved
from .measure import ratio, summarize

BASE_COMMIT = "b26cd13"
SPEED_TARGET = 0.97
MIB = 1 << 20

#: A fresh process that scans one SOURCE and prints its wall time, peak RSS and the rejection counts.
SCAN_ONCE = r"""
import json, sys, time
from ichprep.reading.scan import scan
start = time.perf_counter()
table, summary = scan(sys.argv[1])
wall = time.perf_counter() - start
# VmHWM is this process's own peak (ru_maxrss would carry the parent's across exec).
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "files": len(table), "peak_rss_mib": peak / 1024, "rejected": summary.rejected}))
"""


def _say(message: str) -> None:
    print(f"[limits-bench] {message}", file=sys.stderr, flush=True)


def deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of ``n_mib`` MiB of zeros from one repeated full-flush block."""
    chunk, c = bytes(MIB), zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    return first + block * (n_mib - 2) + c.compress(chunk) + c.flush()


def hostile_copy(ordinary: Path, out: Path) -> Path:
    """``ordinary`` with two deflated members added: a 2 GiB bomb and 1 GiB of zeros declaring 600 kB."""
    data = ordinary.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    _, _, _, _, count, size, offset, _ = struct.unpack_from("<4s4H2LH", data, end)
    body, central = bytearray(data[:offset]), bytearray(data[offset : offset + size])
    for stem, stream, declared in (("bomb", deflated_zeros(2048), 2 << 30), ("liar", deflated_zeros(1024), 600_000)):
        name, at = f"{KAGGLE_TOP}/stage_2_train/ID_{stem}.dcm".encode(), len(body)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(stream), declared, len(name), 0)
        body += name + stream
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, len(stream), declared, len(name), 0, 0, 0, 0, 0, at
        )
        central += name
        count += 1
    tail = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(body), 0)
    out.write_bytes(bytes(body + central + tail))
    return out


def scan_fresh(source: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCAN_ONCE, source], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(studies: int, repeats: int, base: str, work: Path) -> dict:
    _say(f"a deflated Kaggle-style zip of {studies} studies")
    ordinary = work / "rsna.zip"
    generate(ordinary, studies=studies, seed=0, as_zip=True, lesion_rate=0.4)
    train = f"{ordinary}::{KAGGLE_TOP}/stage_2_train"
    old_root = extract_base(base, work / "base")
    results: dict = {"studies": studies, "repeats": repeats, "base": base}
    with Code("old", old_root, work) as old, Code("new", REPO, work) as new:
        codes = {"old": old, "new": new}
        for op in ("scan", "convert"):
            _say(f"{op}: old against new, {repeats} repeats")
            request = {"op": op, "source": train, "store": str(work / f"{op}.zarr"), "options": {}}
            runs = interleaved({name: (lambda c=c, r=request: c.run(**r)) for name, c in codes.items()}, repeats)
            unit = "files" if op == "scan" else "slices"
            figs = {name: summarize(r, unit=unit) for name, r in runs.items()}
            results[op] = {**figs, "new_over_old": ratio(figs["new"][f"{unit}_per_s"], figs["old"][f"{unit}_per_s"])}
    _say("the hostile copy, scanned by today's code in fresh processes")
    hostile = hostile_copy(ordinary, work / "hostile.zip")
    plain = [scan_fresh(train) for _ in range(repeats)]
    bad = [scan_fresh(f"{hostile}::{KAGGLE_TOP}/stage_2_train") for _ in range(repeats)]
    results["hostile"] = {
        "ordinary": plain,
        "hostile": bad,
        "ordinary_wall_s": statistics.median(p["wall_s"] for p in plain),
        "hostile_wall_s": statistics.median(b["wall_s"] for b in bad),
        "ordinary_peak_rss_mib": max(p["peak_rss_mib"] for p in plain),
        "hostile_peak_rss_mib": max(b["peak_rss_mib"] for b in bad),
        "rejected": bad[0]["rejected"],
    }
    return results


def table(results: dict) -> str:
    lines = ["| figure | old | new | new / old |", "|---|---:|---:|---:|"]
    for op, unit in (("scan", "files"), ("convert", "slices")):
        fig = results[op]
        lines.append(
            f"| {op} ({unit}/s) | {fig['old'][f'{unit}_per_s']:.1f} | {fig['new'][f'{unit}_per_s']:.1f} | "
            f"{fig['new_over_old']:.3f} |"
        )
    h = results["hostile"]
    lines += [
        "",
        "| scan of | wall s | peak RSS MiB | rejected |",
        "|---|---:|---:|---|",
        f"| ordinary zip | {h['ordinary_wall_s']:.2f} | {h['ordinary_peak_rss_mib']:.0f} | "
        f"{h['ordinary'][0]['rejected']} |",
        f"| + 2 GiB bomb + lying member | {h['hostile_wall_s']:.2f} | {h['hostile_peak_rss_mib']:.0f} | "
        f"{h['rejected']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=None, help="studies in the zip (default 8, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 1)")
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the code before the limits (default {BASE_COMMIT})")
    parser.add_argument("--out", default=None, help="write every figure and raw repeat here (JSON)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 studies, 1 repeat")
    args = parser.parse_args(argv)
    studies = args.studies or (2 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory() as work:
        results = run(studies, repeats, args.base, Path(work))
    print(table(results))
    for op in ("scan", "convert"):
        met = results[op]["new_over_old"] >= SPEED_TARGET
        verdict = "met" if met else "MISSED"
        print(f"{op}: new / old {results[op]['new_over_old']:.3f} (target >= {SPEED_TARGET}: {verdict})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
