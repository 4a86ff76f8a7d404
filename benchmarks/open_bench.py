"""What the damaged-store checks cost a reader: opening a store and reading epochs through ShardStream.

``python -m benchmarks.open_bench STORE [--base COMMIT] [--repeats 7] [--epochs 3]``

Each repeat runs one fresh Python process per version, alternating (old, new, old, new, ...). The old
version is ``--base``'s ``ichprep``, from ``git archive``, placed first on ``PYTHONPATH``; the new one is
this checkout.  A process times ``open_store(STORE)`` (today: one listing of the shard folder against the
manifest) and ``--epochs`` shuffled epochs of every ok slot through ``ShardStream`` in the process (workers 0;
today each frame's decode is guarded and a listed shard that has gone raises).  Medians, and new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .archive_bench import REPO, extract_base

BASE_COMMIT = "00222f2"

ONE = r"""
import json, sys, time
import numpy as np
import ichprep
from ichprep.storage.store import open_store
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import targets
t0 = time.perf_counter()
store = open_store(sys.argv[1])
t1 = time.perf_counter()
ok = store.slices["ok"].to_numpy(bool)
stream = ShardStream.from_store(store, ok.astype(np.int64), targets(store.slices, "rsna"), batch_size=32)
n = 0
for epoch in range(int(sys.argv[2])):
    stream.set_epoch(epoch)
    n += sum(len(b.slots) for b in stream)
print(json.dumps({"ichprep": ichprep.__file__, "open_s": t1 - t0, "epochs_s": time.perf_counter() - t1, "n": n}))
"""


def one(code: Path, store: str, epochs: int, cwd: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(code), str(REPO)]))}
    out = subprocess.run(
        [sys.executable, "-c", ONE, store, str(epochs)], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["ichprep"]).resolve().is_relative_to(code.resolve()):
        raise RuntimeError(f"ichprep came from {result['ichprep']}, not from {code}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the code before the checks (default {BASE_COMMIT})")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    store = str(Path(args.store).resolve())
    with tempfile.TemporaryDirectory() as work:
        codes = {"old": extract_base(args.base, Path(work) / "base"), "new": REPO}
        runs: dict[str, list[dict]] = {name: [] for name in codes}
        for _ in range(args.repeats):
            for name, code in codes.items():
                runs[name].append(one(code, store, args.epochs, work))
    figures = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("open_s", "epochs_s")} for name, rs in runs.items()
    }
    print("| figure | old | new | new / old |\n|---|---:|---:|---:|")
    for key, label in (("open_s", "open_store, s"), ("epochs_s", f"{args.epochs} epochs through ShardStream, s")):
        old, new = figures["old"][key], figures["new"][key]
        print(f"| {label} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    return {"figures": figures, "runs": runs}


if __name__ == "__main__":
    main()
