"""ichtrain.data: targets, splits, slice selection, epoch plans and the shard stream, on a tiny real store."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.utils.data

from ichprep.labels import LABELS, SUBTYPES
from ichprep.store import open_store
from ichtrain import data
from ichtrain.data import (ShardStream, epoch_plan, is_positive, select_slices, split_slices, study_bounds, targets,
                           train_candidates)
from ichtrain.errors import ConfigError, DataError

SHARD = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 synthetic studies (122 slots, 16 shards of 8), with one zero-filled and one unlabelled slot."""
    from ichprep.convert import convert
    from ichprep.spec import PreprocessSpec
    from ichprep.synth import generate

    tmp = tmp_path_factory.mktemp("datastore")
    generate(tmp / "synth", 4, seed=0)
    convert(tmp / "synth" / "stage_2_train", tmp / "cache.zarr", PreprocessSpec(size=32, shard_slices=SHARD),
            labels_csv=tmp / "synth" / "stage_2_train.csv")
    return open_store(tmp / "cache.zarr")


@pytest.fixture(scope="module")
def images(store):
    return store.images[:]


def stream(store, counts, task="rsna", **kwargs) -> ShardStream:
    return ShardStream.from_store(store, counts, targets(store.slices, task), **kwargs)


def all_ok(store) -> np.ndarray:
    """Counts 1 on every ok, fully labelled slot."""
    counts = np.zeros(len(store.slices), np.int64)
    counts[train_candidates(store.slices, np.full(len(store.slices), "train"), None, "rsna")] = 1
    return counts


def drain(ds) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return list(iter(ds))


def fake_slices(n_patients=150, seed=0) -> pd.DataFrame:
    """Patients with 1-3 studies of 20-40 slices; every 7th patient's id is null (study is its own group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(rng.integers(1, 4)):
            pid = None if p % 7 == 0 else f"ID_p{p}"
            rows += [(f"1.2.{p}.{s}", pid)] * int(rng.integers(20, 41))
    frame = pd.DataFrame(rows, columns=["study_uid", "patient_id"]).astype("string")
    return frame


def group_keys(frame: pd.DataFrame) -> pd.Series:
    return frame["patient_id"].fillna("study:" + frame["study_uid"])


# ---- targets, candidates -------------------------------------------------------------------------------------

def test_targets_tasks_and_unlabelled_rows(store):
    unlabelled = store.slices[LABELS[0]].isna().to_numpy()
    assert unlabelled.sum() >= 1
    for task, columns in (("rsna", LABELS), ("binary", ("any",)), ("subtypes", SUBTYPES)):
        y = targets(store.slices, task)
        assert y.dtype == np.float32 and y.shape == (len(store.slices), len(columns))
        assert np.isnan(y[unlabelled]).all() and not np.isnan(y[~unlabelled]).any()
        assert np.array_equal(y[~unlabelled], store.slices.loc[~unlabelled, list(columns)].to_numpy(np.float32))
    assert data.TASKS["rsna"][-1] == "any"
    with pytest.raises(ConfigError, match="rsna, binary, subtypes"):
        targets(store.slices, "multi")


def test_train_candidates(store):
    slices = store.slices
    n = len(slices)
    bad = np.flatnonzero(~slices["ok"].to_numpy(bool))
    unlabelled = np.flatnonzero(slices["any"].isna().to_numpy())
    assert len(bad) and len(unlabelled)
    split = split_slices(slices, 0.3, seed=1, by="study")
    cand = train_candidates(slices, split, None, "rsna")
    assert not np.isin(cand, bad).any() and not np.isin(cand, unlabelled).any()
    assert (split[cand] == "train").all()
    expected = set(np.flatnonzero(split == "train")) - set(bad) - set(unlabelled)
    assert set(cand) == expected
    val = train_candidates(slices, split, None, "rsna", part="val")
    assert not set(val) & set(cand) and (split[val] == "val").all()

    mask = select_slices(slices, store.studies, "middle:5")
    assert set(train_candidates(slices, split, mask, "binary")) == expected & set(np.flatnonzero(mask))
    sub = train_candidates(slices, np.full(n, "train"), None, "subtypes")
    assert len(sub) and set(sub) == set(np.flatnonzero(is_positive(slices))) - set(bad)
    with pytest.raises(ConfigError, match="train, val"):
        train_candidates(slices, split, None, "rsna", part="test")
    with pytest.raises(DataError):
        train_candidates(slices, split[:-1], None, "rsna")


# ---- split ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("by", ["patient", "study"])
def test_split_groups_never_straddle(by):
    frame = fake_slices()
    split = split_slices(frame, 0.2, seed=3, by=by)
    keys = group_keys(frame) if by == "patient" else frame["study_uid"]
    sides = pd.Series(split).groupby(keys.to_numpy()).nunique()
    assert (sides == 1).all()
    assert abs((split == "val").mean() - 0.2) < 0.03
    assert np.array_equal(split, split_slices(frame, 0.2, seed=3, by=by))
    assert not np.array_equal(split, split_slices(frame, 0.2, seed=4, by=by))
    # Row order does not matter: shuffled rows keep their side.
    perm = np.random.default_rng(0).permutation(len(frame))
    assert np.array_equal(split_slices(frame.iloc[perm].reset_index(drop=True), 0.2, seed=3, by=by), split[perm])


def test_split_null_patient_falls_back_to_study(store):
    frame = fake_slices()
    split = split_slices(frame, 0.5, seed=0)
    nulls = frame["patient_id"].isna().to_numpy()
    # Null-patient studies are split per study: several of them, on both sides.
    per_study = pd.Series(split[nulls]).groupby(frame.loc[nulls, "study_uid"].to_numpy()).agg(set)
    assert all(len(s) == 1 for s in per_study) and set().union(*per_study) == {"train", "val"}
    real = split_slices(store.slices, 0.25, seed=0)
    assert (pd.Series(real).groupby(store.slices["patient_id"].to_numpy()).nunique() == 1).all()
    assert set(real) == {"train", "val"}


def test_slice_split_is_leaky_and_bad_args():
    frame = fake_slices(20)
    split = split_slices(frame, 0.2, seed=0, by="slice")
    assert abs((split == "val").mean() - 0.2) < 0.01
    assert (pd.Series(split).groupby(frame["study_uid"].to_numpy()).nunique() == 2).any()    # leaks
    assert "leaky" in split_slices.__doc__
    with pytest.raises(ConfigError, match="patient, study, slice"):
        split_slices(frame, 0.2, by="series")
    for bad in (0, 1, 1.5, -0.1, "0.2"):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            split_slices(frame, bad)
    with pytest.raises(DataError):
        split_slices(frame[frame["study_uid"] == "1.2.1.0"], 0.2, by="study")


# ---- slice selection -----------------------------------------------------------------------------------------

def test_select_middle(store):
    study = store.studies.iloc[0]
    start, stop = int(study.start), int(study.stop)
    mid = start + (stop - start) // 2

    def picked(sel):
        return np.flatnonzero(select_slices(store.slices, store.studies, sel)[start:stop]) + start

    assert list(picked("middle:5")) == list(range(mid - 2, mid + 3))
    assert list(picked("middle:1")) == [mid]
    assert list(picked("middle:4")) == list(range(mid - 2, mid + 2))
    assert list(picked("middle:1000")) == list(range(start, stop))       # clipped to the study
    assert select_slices(store.slices, store.studies, "all").all()
    per_study = select_slices(store.slices, store.studies, "middle:3")
    assert [per_study[s.start:s.stop].sum() for s in store.studies.itertuples()] == [3] * len(store.studies)


def test_select_short_study_and_bad_forms():
    slices = pd.DataFrame({"x": range(10)})
    studies = pd.DataFrame({"start": [0, 3, 5], "stop": [3, 5, 10]})     # 3, 2 and 5 slices
    mask = select_slices(slices, studies, "middle:4")
    assert list(np.flatnonzero(mask)) == [0, 1, 2, 3, 4, 5, 6, 7, 8]     # short studies whole; [5,10) -> 5..8
    for bad in ("middle", "middle:0", "middle:x", "top:3", "middle:-2", "", None):
        with pytest.raises(ConfigError, match="middle:K"):
            select_slices(slices, studies, bad)
    with pytest.raises(DataError):
        study_bounds(pd.DataFrame({"start": [0, 4], "stop": [3, 10]}), 10)


# ---- epoch plan ----------------------------------------------------------------------------------------------

def test_epoch_plan_hybrid():
    n = 1000
    positive = np.zeros(n, bool)
    positive[np.random.default_rng(0).choice(n, 50, replace=False)] = True
    candidates = np.setdiff1d(np.arange(n), np.arange(0, n, 10))         # every 10th slot is not a candidate
    counts = epoch_plan(candidates, positive, "hybrid", 0.5, seed=0, epoch=0)
    assert counts.shape == (n,) and counts.dtype == np.int64
    assert (counts[np.arange(0, n, 10)] == 0).all()
    assert abs(counts.sum() / len(candidates) - 1) < 0.15
    assert abs(counts[positive].sum() / counts.sum() - 0.5) < 0.05
    assert np.array_equal(counts, epoch_plan(candidates, positive, "hybrid", 0.5, seed=0, epoch=0))
    assert not np.array_equal(counts, epoch_plan(candidates, positive, "hybrid", 0.5, seed=0, epoch=1))
    assert not np.array_equal(counts, epoch_plan(candidates, positive, "hybrid", 0.5, seed=1, epoch=0))
    third = epoch_plan(candidates, positive, "hybrid", 0.3, seed=0, epoch=2)
    assert abs(third[positive].sum() / third.sum() - 0.3) < 0.05
    ones = np.zeros(n, np.int64)
    ones[candidates] = 1
    assert np.array_equal(epoch_plan(candidates, positive, "none"), ones)


def test_epoch_plan_fallbacks_and_errors(caplog):
    positive = np.zeros(100, bool)
    with caplog.at_level(logging.WARNING, logger="ichtrain.data"):
        counts = epoch_plan(np.arange(100), positive)
    assert (counts == 1).all() and "using 'none'" in caplog.text
    positive[:60] = True                                                 # already >= pos_fraction
    assert (epoch_plan(np.arange(100), positive, pos_fraction=0.5) == 1).all()
    with pytest.raises(ConfigError, match="hybrid, none"):
        epoch_plan(np.arange(10), positive, "oversample")
    with pytest.raises(ConfigError):
        epoch_plan(np.arange(10), positive, pos_fraction=1.0)
    with pytest.raises(DataError):
        epoch_plan(np.array([5, 5]), positive)
    with pytest.raises(DataError):
        epoch_plan(np.array([100]), positive)


# ---- shard stream --------------------------------------------------------------------------------------------

def test_stream_sequential_yields_every_slot_once(store, images):
    counts = all_ok(store)
    ds = stream(store, counts, shuffle=False)
    out = drain(ds)
    assert [slot for _, _, slot in out] == list(np.flatnonzero(counts))   # evaluation order: ascending
    assert len(ds) == len(out) == counts.sum()
    y = targets(store.slices, "rsna")
    for image, target, slot in out:
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert np.array_equal(image.numpy(), images[slot])
        assert target.dtype == torch.float32 and np.array_equal(target.numpy(), y[slot])
    assert ds.sample_shape == (3, 32, 32)


def test_stream_repeats_follow_plan_and_is_deterministic(store):
    cand = train_candidates(store.slices, np.full(len(store.slices), "train"), None, "binary")
    counts = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=0)
    assert counts.max() > 1
    ds = stream(store, counts, task="binary", seed=5)
    first = [slot for _, _, slot in drain(ds)]
    assert Counter(first) == {i: int(c) for i, c in enumerate(counts) if c}
    assert len(ds) == len(first)
    assert first == [slot for _, _, slot in drain(stream(store, counts, task="binary", seed=5))]
    # The buffer mixes shards: the first samples do not all come from one shard.
    assert len({slot // SHARD for slot in first[:8]}) > 1
    ds.set_epoch(1)
    assert Counter(s for _, _, s in drain(ds)) == Counter(first) and [s for _, _, s in drain(ds)] != first
    ds.set_epoch(2, epoch_plan(cand, is_positive(store.slices), seed=0, epoch=2))
    assert Counter(s for _, _, s in drain(ds)) == {i: int(c) for i, c in enumerate(ds.counts) if c}


class CountingReader:
    def __init__(self, array, log):
        self.array, self.log, self.shape = array, log, array.shape

    def __getitem__(self, key):
        self.log.append((key.start, key.stop))
        return self.array[key]


def counted_reads(monkeypatch) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    real = data._open_images
    monkeypatch.setattr(data, "_open_images", lambda root: CountingReader(real(root), log))
    return log


@pytest.mark.parametrize("context", [0, 1])
def test_stream_reads_only_needed_shards_once(store, monkeypatch, context):
    log = counted_reads(monkeypatch)
    counts = np.zeros(len(store.slices), np.int64)
    counts[[16, 21, 47]] = [1, 2, 1]                                     # shards 2 and 5 only
    out = drain(stream(store, counts, context=context, shuffle=True))
    assert sorted(s for _, _, s in out) == [16, 21, 21, 47]
    # A read is widened only as far as the 2.5D neighbours need (16's previous, 47's next; same study).
    assert sorted(log) == [(16 - context, 24), (40, 48 + context)]
    log.clear()
    drain(stream(store, all_ok(store), context=context))
    assert len(log) == store.n_shards                                    # one read per shard


def fake_worker(monkeypatch, worker, num_workers):
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)


def test_stream_ranks_and_workers_are_disjoint(store, monkeypatch):
    counts = all_ok(store)
    total = int(counts.sum())
    parts, lengths = {}, set()
    for rank in range(2):
        for worker in range(2):
            fake_worker(monkeypatch, worker, 2)
            ds = stream(store, counts, rank=rank, world_size=2, seed=1)
            parts[rank, worker] = [s for _, _, s in drain(ds)]
            lengths.add(len(ds))
    sets = [set(p) for p in parts.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == sum(len(p) for p in parts.values())
    assert lengths == {total // 2}
    assert len(parts[0, 0]) + len(parts[0, 1]) == len(parts[1, 0]) + len(parts[1, 1]) == total // 2
    assert len(parts[0, 0]) == len(parts[1, 0]) and len(parts[0, 1]) == len(parts[1, 1])   # same batches per rank
    assert total - len(set().union(*sets)) == total % 2

    # One rank: the workers cover everything exactly, also with repeats.
    cand = np.flatnonzero(counts)
    plan = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=3)
    for c in (counts, plan):
        seen = Counter()
        for worker in range(3):
            fake_worker(monkeypatch, worker, 3)
            seen.update(s for _, _, s in drain(stream(store, c, seed=2)))
        assert seen == {i: int(v) for i, v in enumerate(c) if v}


def test_stream_dataloader_two_workers(store):
    counts = all_ok(store)
    ds = stream(store, counts, seed=0)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    slots = torch.cat([b[2] for b in batches]).tolist()
    assert sorted(slots) == list(np.flatnonzero(counts))
    assert len(batches) == ds.batches(4, 2)
    assert batches[0][0].shape == (4, 3, 32, 32) and batches[0][1].shape == (4, 6)


def test_stream_context_neighbours(store, images):
    slices, n = store.slices, len(store.slices)
    start, stop = study_bounds(store.studies, n)
    counts = np.ones(n, np.int64)
    bad = np.flatnonzero(~slices["ok"].to_numpy(bool))
    counts[bad] = 0
    # Without ok: neighbours are clamped to the study only (a zero-filled neighbour stays zero).
    ds = stream(store, counts, context=1, shuffle=False, ok=None)
    out = {slot: image.numpy() for image, _, slot in drain(ds)}
    assert ds.sample_shape == (9, 32, 32)
    for slot, image in out.items():
        prev, nxt = max(slot - 1, start[slot]), min(slot + 1, stop[slot] - 1)
        assert np.array_equal(image, np.concatenate([images[prev], images[slot], images[nxt]]))
    first = store.studies["start"].to_numpy()
    s1 = int(first[1])                       # second study's first slot: previous neighbour is itself
    assert np.array_equal(out[s1][:3], images[s1]) and np.array_equal(out[s1 - 1][6:], images[s1 - 1])
    assert np.array_equal(out[0][:3], images[0]) and np.array_equal(out[n - 1][6:], images[n - 1])
    # Shard edges inside a study: the neighbour comes from the previous/next shard.
    edge = next(k * SHARD for k in range(1, store.n_shards) if start[k * SHARD] < k * SHARD)
    assert np.array_equal(out[edge][:3], images[edge - 1]) and np.array_equal(out[edge - 1][6:], images[edge])
    # With ok (from_store's default) a zero-filled neighbour is replaced by the slot itself.
    b = int(bad[0])
    with_ok = {slot: image.numpy() for image, _, slot in drain(stream(store, counts, context=1, shuffle=False))}
    assert not images[b].any() and np.array_equal(out[b + 1][:3], images[b])
    assert np.array_equal(with_ok[b + 1][:3], images[b + 1]) and np.array_equal(with_ok[b - 1][6:], images[b - 1])


def test_stream_rejects_bad_inputs(store):
    n = len(store.slices)
    counts = np.ones(n, np.int64)
    with pytest.raises(DataError, match="zero-filled"):
        stream(store, counts)
    with pytest.raises(DataError):
        stream(store, np.ones(n - 1, np.int64), ok=None)
    with pytest.raises(ConfigError):
        stream(store, all_ok(store), rank=2, world_size=2)
    with pytest.raises(ConfigError):
        stream(store, all_ok(store), context=-1)
    start, stop = study_bounds(store.studies, n)
    with pytest.raises(DataError):
        ShardStream(store.root, all_ok(store), targets(store.slices, "rsna"), SHARD, stop, start)


_DDP_SCRIPT = """
import json, sys
import numpy as np, torch, torch.distributed as dist
from ichprep.store import open_store
from ichtrain.data import ShardStream, targets
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store = open_store(sys.argv[1])
counts = store.slices["ok"].to_numpy(bool).astype(np.int64)
stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), rank=rank, world_size=world, seed=5)
stream.set_epoch(1)
loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
slots = [int(s) for _, _, batch in loader for s in batch]
everything = [None] * world
dist.all_gather_object(everything, slots)
if rank == 0:
    json.dump({"slots": everything, "expected": int(counts.sum())}, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def test_ranks_get_disjoint_shards_in_a_real_gloo_run(tmp_path, store):
    """Two torchrun processes x two DataLoader workers each: no slot is seen twice, nothing but the tail is lost."""
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_stream.py"
    script.write_text(_DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "slots.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
                             str(store.root), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rank0, rank1 = data["slots"]
    assert len(rank0) == len(rank1)
    assert not set(rank0) & set(rank1)
    assert len(set(rank0)) == len(rank0) and len(set(rank1)) == len(rank1)
    assert data["expected"] - 2 < len(rank0) + len(rank1) <= data["expected"]
