"""Header scan, conversion, series decisions and slabs on two archive layouts, against the code before series choice.

``python -m benchmarks.archive_bench [--studies 8] [--repeats 5] [--base f1528ce | --no-base] [--hospital-size 512]
[--large-rows 20000] [--out FILE.json] [--work DIR --keep] [--quick]``

The series choice (:func:`ichprep.reading.series.choose_series`), ordering along the slice normal, one image id
per slice (:func:`ichprep.reading.scan.assign_ids`) and slabs of thin series
(:func:`ichprep.reading.slabs.plan_slots`) added per-file fields to the header scan and table work to
``convert``.  This measures what they cost, on a synthetic Kaggle-style archive (``ichprep.synth.generate``:
one 5 mm series per study, unique file names) and a CQ500-style one of as many studies
(``ichprep.synthlayouts.generate_hospital``: localizers, dose screens, bone, contrast and thin series, file
names repeated in every series):

1. **Header scan**, files/s of ``scan(source)`` in-process (client None), today's code against ``--base``'s.
   Each version runs in its own Python process whose ``ichprep`` is that version: ``--base`` is extracted
   with ``git archive BASE ichprep | tar -x -C WORK/base`` and put first on that process's PYTHONPATH, the
   repository first on the other's (each process checks where its ``ichprep`` came from).  Both processes
   stay up; after one untimed warm-up each, repeat r of the old code runs, then repeat r of the new one
   (ABAB), so a drift of the machine's load hits both.  On the hospital archive both scan the same files;
   the old scan only records fewer fields per file.
2. **Conversion**, slices written/s and input files/s (the ``.dcm`` files of the SOURCE, header scan
   included) of the whole ``convert(source, store, PreprocessSpec(), overwrite=True)`` call in-process, old
   against new, interleaved the same way, each run into an emptied store.  On the hospital archive the old
   code writes every file of every series, interleaved by z (the defect the series choice fixes): its figure
   is the cost of reading everything, not the same product.
3. **Series decisions**: ``assign_ids`` + ``choose_series`` + ``plan_slots`` (what ``convert`` runs between
   the scan and the shards) on the hospital scan table, and on a larger table of renamed copies of the
   Kaggle scan table (~20,000 rows, one series per study), as a share of what scanning that many files
   takes (today's scan s/file of that layout, from 1).  Target: < 5 % of the scan time.
4. **Slab cost**: the hospital archive's thin-only studies (their expected series is ``thin`` in
   ``series_truth.csv``; a folder of symlinks to their files is the SOURCE) converted with ``slab="auto"``
   (5 mm slabs) against ``slab="off"`` (every thin slice a slot), interleaved.  Both read the same files;
   target: slabbing costs no more than reading the slices it averages (auto time <= off time x 1.05).

Every figure is the median of ``--repeats`` runs; every raw repeat is in the JSON.  Targets are reported,
never asserted.  Temporary data live in a temporary folder (removed unless ``--keep``) or ``--work DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd

from ichprep.reading.scan import assign_ids, scan
from ichprep.reading.series import choose_series
from ichprep.reading.slabs import plan_slots
from ichprep.reading.source import parse_source
from ichprep.synth import generate
from ichprep.synthlayouts import SERIES_TRUTH_CSV, generate_hospital

from .measure import Run, Stopwatch, files_under, load_average, ratio, repeat, summarize
from .report import _grid, _num, _target, machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
BASE_COMMIT = "f1528ce"
LAYOUTS = ("kaggle", "hospital")
LARGE_ROWS = 20_000  # rows of the copied Kaggle table of step 3 (RSNA's 752,803 is ~40 times more)
DECISIONS_SHARE_TARGET = 0.05
SLAB_TIME_TARGET = 1.05

#: The timing process: its ``ichprep`` is the code under test (argv[1]); one JSON request per stdin line,
#: one JSON reply per line on the original stdout.
CHILD = r"""
import json, os, shutil, sys
from pathlib import Path

code = Path(sys.argv[1]).resolve()
replies = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # whatever the code under test prints goes to stderr, never among the replies
import ichprep

where = Path(ichprep.__file__).resolve()
if code not in where.parents:
    raise SystemExit(f"ichprep was imported from {where}, not from the code under test in {code}")
from ichprep.convert import convert
from ichprep.reading.scan import scan
from ichprep.spec import PreprocessSpec

from benchmarks.measure import timed


def convert_once(request, kept):
    shutil.rmtree(request["store"], ignore_errors=True)  # a rerun into the same store would resume it
    summary = convert(request["source"], request["store"], PreprocessSpec(), overwrite=True, **request["options"])
    kept.update(
        n_slices=summary.n_slices,
        rejected=summary.rejected,
        convert_wall_s=summary.wall_s,
        n_slabs=getattr(summary, "n_slabs", None),  # the old code has no slabs and no series
        series=getattr(summary, "series", None),
    )
    return summary.n_slices


def answer(request):
    kept = {}
    if request["op"] == "scan":
        run = timed(lambda: len(scan(request["source"])[0]))
    else:
        run = timed(lambda: convert_once(request, kept))
    return {"n": run.n, "wall_s": run.wall_s, "cpu_s": run.cpu_s, **kept}


replies.write(json.dumps({"ichprep": str(where)}) + "\n")
for line in sys.stdin:
    replies.write(json.dumps(answer(json.loads(line))) + "\n")
"""


def _say(message: str) -> None:
    print(f"[archive-bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the two versions of the code


class Code:
    """One version of ichprep in a Python process of its own that times what it is asked, one request at a time."""

    def __init__(self, name: str, root: Path, cwd: Path):
        self.name = name
        # The code under test first; the repository after it for benchmarks.measure (its ichprep is shadowed).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(root), str(REPO)]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root)],
            cwd=cwd,  # not the repository: its ichprep would come first on sys.path
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.imported_from = self._reply()["ichprep"]
        self.last: dict = {}

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} code's process stopped (exit {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def run(self, **request) -> Run:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        self.last = {k: v for k, v in reply.items() if k not in ("n", "wall_s", "cpu_s")}
        return Run(reply["n"], reply["wall_s"], reply["cpu_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> Code:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def extract_base(commit: str, base: Path) -> Path:
    """``git archive COMMIT ichprep | tar -x -C base``; returns ``base``."""
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "ichprep"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
    return base


def interleaved(contenders: dict[str, Callable[[], Run]], repeats: int) -> dict[str, list[Run]]:
    """One untimed warm-up of each, then repeat r of every contender before repeat r + 1 of any (ABAB)."""
    for fn in contenders.values():
        fn()  # page cache, imports, pixel handlers
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            runs[name].append(fn())
    return runs


# ---------------------------------------------------------------- the archives


class Archives:
    """The synthetic inputs: per layout the SOURCE and its file count, and the thin-only studies' folder."""

    def __init__(self, data: Path, studies: int, seed: int, hospital_size: int):
        self.data = data
        self.kaggle = data / "kaggle" / "stage_2_train"
        self.hospital = data / "hospital"
        self.thin_only = data / "thin-only"
        marker = data / "archive-bench.json"
        wanted = {"studies": studies, "seed": seed, "hospital_size": hospital_size}
        started = time.perf_counter()
        if not (marker.is_file() and json.loads(marker.read_text()) == wanted):  # --work DIR reused: same data
            if data.exists():
                if not marker.is_file():
                    raise SystemExit(f"{data} exists and was not made by this benchmark; choose another --work")
                shutil.rmtree(data)
            generate(data / "kaggle", studies, seed)
            generate_hospital(self.hospital, studies, seed, size=hospital_size)
            link_thin_only(self.hospital, self.thin_only)
            marker.write_text(json.dumps(wanted) + "\n")
        self.thin_studies = thin_only_studies(self.hospital)
        self.synth_s = round(time.perf_counter() - started, 1)
        self.sources = {"kaggle": self.kaggle, "hospital": self.hospital}
        self.files = {name: count_dicoms(path) for name, path in self.sources.items()}
        self.thin_files = count_dicoms(self.thin_only)

    def describe(self) -> dict:
        return {
            "sources": {k: str(v) for k, v in self.sources.items()},
            "files": self.files,
            "thin_only_source": str(self.thin_only),
            "thin_only_studies": self.thin_studies,
            "thin_only_files": self.thin_files,
            "synth_s": self.synth_s,
        }


def count_dicoms(root: Path) -> int:
    return sum(p.endswith(".dcm") for p in files_under(root))


def thin_only_studies(hospital: Path) -> list[str]:
    """Study folders whose expected series is a thin one (``series_truth.csv``)."""
    with open(hospital / SERIES_TRUTH_CSV, newline="") as f:
        return sorted({r["study_folder"] for r in csv.DictReader(f) if r["expected"] == "1" and r["kind"] == "thin"})


def link_thin_only(hospital: Path, out: Path) -> list[str]:
    """A folder tree of symlinks to every file of the thin-only studies (the lister skips symlinked folders)."""
    studies = thin_only_studies(hospital)
    for study in studies:
        for path in files_under(hospital / study):
            link = out / Path(path).relative_to(hospital)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return studies


# ---------------------------------------------------------------- 1 and 2: old against new


def with_files(fig: dict, files: int) -> dict:
    """A conversion figure plus the input files/s of its SOURCE."""
    fig["input_files"] = files
    fig["input_files_per_s"] = ratio(files, fig["median_wall_s"])
    return fig


def old_vs_new(codes: dict[str, Code], archives: Archives, work: Path, repeats: int) -> tuple[dict, dict]:
    scans, converts = {}, {}
    for layout, source in archives.sources.items():
        _say(f"1. header scan, {layout}: {', '.join(codes)} interleaved")
        scan_runs = {name: partial(code.run, op="scan", source=str(source)) for name, code in codes.items()}
        runs = interleaved(scan_runs, repeats)
        scans[layout] = {name: summarize(r, unit="files") for name, r in runs.items()}
        _say(f"2. conversion, {layout}")
        convert_runs = {
            name: partial(
                code.run, op="convert", source=str(source), store=str(work / f"{name}-{layout}.zarr"), options={}
            )
            for name, code in codes.items()
        }
        runs = interleaved(convert_runs, repeats)
        converts[layout] = {
            name: with_files(summarize(r), archives.files[layout]) | {"last_run": codes[name].last}
            for name, r in runs.items()
        }
        for section, key in ((scans, "files_per_s"), (converts, "slices_per_s")):
            if "old" in section[layout]:
                section[layout]["new_vs_old"] = ratio(section[layout]["new"][key], section[layout]["old"][key])
        if "old" in converts[layout]:
            converts[layout]["input_files_new_vs_old"] = ratio(
                converts[layout]["new"]["input_files_per_s"], converts[layout]["old"]["input_files_per_s"]
            )
    return scans, converts


# ---------------------------------------------------------------- 3: series decisions


def renamed_copies(table: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Copies of a scan table up to ``rows`` rows, each with its own UIDs, patient and file names."""
    copies = -(-rows // len(table))
    parts = []
    for k in range(copies):
        tag = f"c{k:04d}"
        part = table.copy()
        for column in ("study_uid", "series_uid", "patient_id", "sop_uid"):
            part[column] = part[column] + f".{k}"
        part["image_id"] = part["image_id"] + tag
        part["path"] = part["path"].str.replace(r"\.dcm$", f"{tag}.dcm", regex=True)  # the file names stay unique
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def decisions_once(table: pd.DataFrame, source, parts: dict[str, list[float]]) -> Run:
    """``convert``'s table work between the scan and the shards, each step's wall time added to ``parts``."""
    watches = {name: Stopwatch() for name in ("assign_ids", "choose_series", "plan_slots")}
    with watches["assign_ids"].timing():
        ids = assign_ids(table, source).table
    with watches["choose_series"].timing():
        choice = choose_series(ids)
    with watches["plan_slots"].timing():
        plan_slots(choice.table, choice.series, "auto")
    for name, watch in watches.items():
        parts.setdefault(name, []).append(watch.wall_s)
    return Run(len(table), sum(w.wall_s for w in watches.values()), sum(w.cpu_s for w in watches.values()))


def decisions(table: pd.DataFrame, source_path: Path, scan_s_per_file: float, repeats: int) -> dict:
    source = parse_source(source_path)
    parts: dict[str, list[float]] = {}
    decisions_once(table, source, {})  # warm-up
    fig = summarize(repeat(lambda: decisions_once(table, source, parts), repeats), unit="rows")
    fig["series"] = int(table[["study_uid", "series_uid"]].drop_duplicates().shape[0])
    fig["parts_wall_s"] = parts
    fig["scan_s_per_file"] = scan_s_per_file
    fig["scan_s_for_rows"] = scan_s_per_file * len(table)
    fig["share_of_scan"] = ratio(fig["median_wall_s"], fig["scan_s_for_rows"])
    return fig


def series_decisions(archives: Archives, scans: dict, repeats: int, large_rows: int) -> dict:
    per_file = {layout: 1 / scans[layout]["new"]["files_per_s"] for layout in LAYOUTS}
    hospital = scan(archives.hospital)[0]
    kaggle = scan(archives.kaggle)[0]
    large = renamed_copies(kaggle, large_rows)
    return {
        "hospital": decisions(hospital, archives.hospital, per_file["hospital"], repeats),
        "large": decisions(large, archives.kaggle, per_file["kaggle"], repeats),
    }


# ---------------------------------------------------------------- 4: slabs


def slab_cost(new: Code, archives: Archives, work: Path, repeats: int) -> dict:
    def convert_with(slab: str) -> Run:
        store = str(work / f"thin-only-{slab}.zarr")
        return new.run(op="convert", source=str(archives.thin_only), store=store, options={"slab": slab})

    lasts: dict[str, dict] = {}

    def contender(slab: str) -> Callable[[], Run]:
        def one() -> Run:
            run = convert_with(slab)
            lasts[slab] = new.last
            return run

        return one

    runs = interleaved({"auto": contender("auto"), "off": contender("off")}, repeats)
    out = {name: with_files(summarize(r), archives.thin_files) | {"last_run": lasts[name]} for name, r in runs.items()}
    out["auto_vs_off_time"] = ratio(out["auto"]["median_wall_s"], out["off"]["median_wall_s"])
    out["studies"] = archives.thin_studies
    return out


# ---------------------------------------------------------------- figures, targets, table


def figures(results: dict) -> dict[str, float]:
    """Every headline figure, flat: what the table prints and the smoke test checks."""
    out = {}
    for layout in LAYOUTS:
        for name, fig in results["scan"][layout].items():
            if isinstance(fig, dict):
                out[f"scan_{layout}_files_per_s_{name}"] = fig["files_per_s"]
        for name, fig in results["convert"][layout].items():
            if isinstance(fig, dict):
                out[f"convert_{layout}_slices_per_s_{name}"] = fig["slices_per_s"]
                out[f"convert_{layout}_input_files_per_s_{name}"] = fig["input_files_per_s"]
    for table, fig in results["decisions"].items():
        out[f"decisions_{table}_s"] = fig["median_wall_s"]
        out[f"decisions_{table}_share_of_scan"] = fig["share_of_scan"]
    for slab in ("auto", "off"):
        out[f"slab_{slab}_s"] = results["slab"][slab]["median_wall_s"]
        out[f"slab_{slab}_input_files_per_s"] = results["slab"][slab]["input_files_per_s"]
    out["slab_auto_vs_off_time"] = results["slab"]["auto_vs_off_time"]
    return out


def targets(results: dict) -> list[dict]:
    out = [
        _target(
            f"series decisions, {name} table: share of its scan time",
            f"< {DECISIONS_SHARE_TARGET:.0%}",
            fig["share_of_scan"],
            "<=",
            DECISIONS_SHARE_TARGET,
            f"{fig['rows']:,} rows, {fig['series']:,} series",
        )
        for name, fig in results["decisions"].items()
    ]
    out.append(
        _target(
            "slab auto time vs slab off",
            f"<= {SLAB_TIME_TARGET}x",
            results["slab"]["auto_vs_off_time"],
            "<=",
            SLAB_TIME_TARGET,
            f"{results['slab']['off']['input_files']} thin-only files",
        )
    )
    return out


def table(results: dict) -> str:
    """One row per figure: old (or reference), new (or measured), their ratio and the target's verdict."""
    verdict = {t["target"]: t for t in results["targets"]}

    def met(name: str) -> list[str]:
        t = verdict[name]
        return [t["wanted"], {True: "yes", False: "NO", None: "n/a"}[t["met"]]]

    rows = []
    for layout in LAYOUTS:
        s, c = results["scan"][layout], results["convert"][layout]
        old = "old" in s
        rows.append(
            [
                f"scan {layout}, files/s ({s['new']['files']} files)",
                _num(s["old"]["files_per_s"]) if old else "-",
                _num(s["new"]["files_per_s"]),
                _num(s.get("new_vs_old"), 2),
                "-",
                "-",
            ]
        )
        for label, key, ratio_key in (
            ("slices written/s", "slices_per_s", "new_vs_old"),
            ("input files/s", "input_files_per_s", "input_files_new_vs_old"),
        ):
            rows.append(
                [
                    f"convert {layout}, {label} ({c['new']['input_files']} files)",
                    _num(c["old"][key]) if old else "-",
                    _num(c["new"][key]),
                    _num(c.get(ratio_key), 2),
                    "-",
                    "-",
                ]
            )
    for name, fig in results["decisions"].items():
        rows.append(
            [
                f"series decisions, {name} table ({fig['rows']:,} rows, {fig['series']:,} series), ms: "
                "scan of as many files, decisions",
                _num(1e3 * fig["scan_s_for_rows"], 1),
                _num(1e3 * fig["median_wall_s"], 1),
                f"{fig['share_of_scan']:.1%}",
                *met(f"series decisions, {name} table: share of its scan time"),
            ]
        )
    slab = results["slab"]
    for label, key in (("wall s", "median_wall_s"), ("input files/s", "input_files_per_s")):
        rows.append(
            [
                f"thin-only studies ({slab['off']['input_files']} files), {label}: slab off, slab auto",
                _num(slab["off"][key], 3 if key == "median_wall_s" else 0),
                _num(slab["auto"][key], 3 if key == "median_wall_s" else 0),
                _num(ratio(slab["auto"][key], slab["off"][key]), 2),
                *(met("slab auto time vs slab off") if key == "median_wall_s" else ["-", "-"]),
            ]
        )
    meta = results["meta"]
    lines = [
        f"{meta['date_utc']}, `{meta['command']}`: {meta['studies']} studies per layout, hospital images "
        f"{meta['hospital_size']}², {meta['repeats']} repeat(s) per figure (medians); old = {meta['base']}, "
        f"new = {meta['git']['commit']}{' (dirty)' if meta['git']['dirty'] else ''}; load average before "
        f"{meta['load_before']}, after {meta['load_after']}",
        "",
        _grid(["figure", "old / reference", "new / measured", "ratio", "target", "met"], rows),
        "",
        *(f"Note: {n}" for n in results["notes"]),
    ]
    return "\n".join(lines)


def notes(results: dict) -> list[str]:
    out = []
    hospital = results["convert"]["hospital"]
    if "old" in hospital:
        out.append(
            f"the old code on the hospital archive writes every file ({hospital['old']['last_run']['n_slices']} "
            f"slices: localizers, dose screens, bone, contrast and thin series interleaved by z); today's writes "
            f"{hospital['new']['last_run']['n_slices']} slots of the chosen series.  Its figure is the cost of "
            "reading everything, not a like-for-like product."
        )
        out.append("both scans read the same hospital files; the old one records fewer fields per file.")
    else:
        out.append("no old-code comparison in this run (--no-base).")
    out.append(
        "series decisions share: assign_ids + choose_series + plan_slots against today's scan s/file of that "
        "layout times the table's rows."
    )
    small, large = results["decisions"]["hospital"], results["decisions"]["large"]
    out.append(
        f"the decisions' time barely grows with the table ({small['rows']:,} rows: "
        f"{1e3 * small['median_wall_s']:.0f} ms, {large['rows']:,} rows: {1e3 * large['median_wall_s']:.0f} ms): "
        "on a small archive it is a fixed cost per convert() call, the scan's grows with every file."
    )
    return out


# ---------------------------------------------------------------- the run


def run(
    *,
    studies: int,
    repeats: int,
    seed: int,
    hospital_size: int,
    base_commit: str | None,
    large_rows: int,
    work: Path,
    command: str,
    quick: bool,
) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    meta = machine_info()
    meta.update(
        command=command,
        quick=quick,
        studies=studies,
        repeats=repeats,
        seed=seed,
        hospital_size=hospital_size,
        base=base_commit,
        work_dir=str(work),
        load_before=load_average(),
    )
    results: dict = {"meta": meta}
    _say(f"archives: {studies} studies per layout in {work / 'data'}")
    archives = Archives(work / "data", studies, seed, hospital_size)
    results["archives"] = archives.describe()
    roots = {"new": REPO}
    if base_commit:
        roots = {"old": extract_base(base_commit, work / "base"), **roots}  # old first: ABAB is old, new, old, ...
    stores = work / "stores"
    stores.mkdir(exist_ok=True)
    with _codes(roots, work) as codes:
        meta["ichprep_imported_from"] = {name: code.imported_from for name, code in codes.items()}
        results["scan"], results["convert"] = old_vs_new(codes, archives, stores, repeats)
        _say("3. series decisions")
        results["decisions"] = series_decisions(archives, results["scan"], repeats, large_rows)
        _say("4. slab auto vs off on the thin-only studies")
        results["slab"] = slab_cost(codes["new"], archives, stores, repeats)
    meta["load_after"] = load_average()
    results["targets"] = targets(results)
    results["figures"] = figures(results)
    results["notes"] = notes(results)
    return results


class _codes:
    """Start every version's process at once (their imports overlap) and close them all at the end."""

    def __init__(self, roots: dict[str, Path], cwd: Path):
        self.roots, self.cwd, self.codes = roots, cwd, {}

    def __enter__(self) -> dict[str, Code]:
        try:
            for name, root in self.roots.items():
                self.codes[name] = Code(name, root, self.cwd)
        except BaseException:
            self.__exit__()
            raise
        return self.codes

    def __exit__(self, *exc) -> None:
        for code in self.codes.values():
            code.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.archive_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=None, help="studies per layout (default 8, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 5, quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hospital-size", type=int, default=None, help="hospital image rows and columns (default 512, quick 128)"
    )
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the old code's commit (default {BASE_COMMIT})")
    parser.add_argument("--no-base", action="store_true", help="today's code only (no old-code comparison)")
    parser.add_argument("--large-rows", type=int, default=LARGE_ROWS, help="rows of the copied Kaggle table")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 studies, 1 repeat, hospital at 128²")
    parser.add_argument("--out", default=None, help="write every figure, raw repeats and targets here (JSON)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    args = parser.parse_args(argv)
    args.studies = args.studies or (2 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.hospital_size = args.hospital_size or (128 if args.quick else 512)
    if args.studies < 2:
        parser.error("--studies must be >= 2 (a hospital archive has a thin-only study from 2 studies on)")
    if args.repeats < 1 or args.large_rows < 1:
        parser.error("--repeats and --large-rows must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "python -m benchmarks.archive_bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="ichkit-archive-bench-")) if own_work else Path(args.work)
    try:
        results = run(
            studies=args.studies,
            repeats=args.repeats,
            seed=args.seed,
            hospital_size=args.hospital_size,
            base_commit=None if args.no_base else args.base,
            large_rows=args.large_rows,
            work=work,
            command=command.strip(),
            quick=args.quick,
        )
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.keep or not own_work:
        print(f"Archives, stores and the old code kept in {work}")
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
