"""ichprep.convert under faults: killed converters, killed Dask workers, concurrent converters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for as _wait_for

from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, STATE

BIN = Path(sys.executable).parent


def _convert_cmd(dataset: Path, root: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "ichprep"),
        "convert",
        str(dataset / "stage_2_train"),
        "--labels",
        str(dataset / "stage_2_train.csv"),
        "-o",
        str(root),
        "--shard-slices",
        "16",
        *extra,
    ]


def _markers(root: Path) -> int:
    return len(list((root / STATE / "shards").glob("*.json")))


@pytest.mark.parametrize("kill_after", [0, 3, 8])
def test_kill_9_at_several_points_then_rerun_matches_a_clean_run(synth_dataset6, store6, tmp_path, kill_after):
    """kill_after=0 kills during the header scan; 3 and 8 mid-conversion (12 shards in all)."""
    root = tmp_path / "store.zarr"
    cmd = _convert_cmd(synth_dataset6, root, "--workers", "1")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after == 0:
        time.sleep(1.0)
    else:
        _wait_for(lambda: proc.poll() is not None or _markers(root) >= kill_after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / MANIFEST).exists(), "the run finished before the kill"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    assert verify_store(root).ok


def test_second_converter_on_the_same_store_is_refused(synth_dataset6, tmp_path):
    """Another process holds the store's lock: `ichprep convert` refuses at once, before scanning."""
    root = tmp_path / "store.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom pathlib import Path\nfrom ichprep.convert import store_lock\n"
                f"with store_lock(Path({str(root)!r})):\n    print('locked', flush=True)\n    time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            _convert_cmd(synth_dataset6, root, "--workers", "1"), capture_output=True, text=True, timeout=300
        )
        assert second.returncode != 0
        assert "is being written by another ichprep convert" in second.stderr
        assert not (root / "images").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_converters_started_together_never_interleave(synth_dataset6, store6, tmp_path):
    """Both start at once: one converts while the other is refused (or, if it came second, resumes a done store)."""
    root = tmp_path / "store.zarr"
    procs = [
        subprocess.Popen(
            _convert_cmd(synth_dataset6, root, "--workers", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or "is being written by another ichprep convert" in err
    assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    assert verify_store(root).ok


def test_a_dask_worker_killed_mid_run_loses_nothing(synth_dataset6, store6, tmp_path):
    """`dask scheduler` + 2 `dask worker --no-nanny` on 127.0.0.1; one worker is kill -9'ed mid-run."""
    scheduler_file = tmp_path / "scheduler.json"
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [
        subprocess.Popen(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            **quiet,
        )
    ]
    try:
        assert _wait_for(scheduler_file.exists, 60, 0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [
            subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"], **quiet
            )
            for _ in range(2)
        ]
        procs += workers
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        root = tmp_path / "store.zarr"
        run = subprocess.Popen(
            _convert_cmd(synth_dataset6, root, "--scheduler", address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert _wait_for(lambda: _markers(root) >= 2 or run.poll() is not None)
        workers[0].kill()
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert workers[0].poll() is not None  # really gone
        assert (root / MANIFEST).read_bytes() == (store6 / MANIFEST).read_bytes()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
