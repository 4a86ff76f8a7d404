"""ichtrain.data: targets, splits, slice selection, epoch plans and the shard stream, on a tiny real store."""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.utils.data
from conftest import fake_slices

from ichprep.reading.labels import LABELS, SUBTYPES
from ichprep.storage.store import open_reader, open_store
from ichtrain.data import ring, tables
from ichtrain.data import stream as stream_module
from ichtrain.data.balance import epoch_plan
from ichtrain.data.folds import split_slices
from ichtrain.data.loader import batch_loader
from ichtrain.data.order import SequenceOrder, WindowShuffle, emissions
from ichtrain.data.stream import Batch, ShardStream
from ichtrain.data.tables import is_positive, select_slices, study_bounds, targets, train_candidates
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
    convert(
        tmp / "synth" / "stage_2_train",
        tmp / "cache.zarr",
        PreprocessSpec(size=32, shard_slices=SHARD),
        labels_csv=tmp / "synth" / "stage_2_train.csv",
    )
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


def drain(ds) -> list[Batch]:
    return list(iter(ds))


def slots_of(batches) -> list[int]:
    return [int(slot) for batch in batches for slot in batch.slots]


def by_slot(batches) -> dict[int, np.ndarray]:
    """Each slot's image (the last one seen when it repeats)."""
    return {int(slot): image for batch in batches for image, slot in zip(batch.images.numpy(), batch.slots)}


def group_keys(frame: pd.DataFrame) -> pd.Series:
    return frame["patient_id"].fillna("study:" + frame["study_uid"])


# ---- targets, candidates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, columns", [("rsna", LABELS), ("binary", ("any",)), ("subtypes", SUBTYPES)])
def test_targets_tasks_and_unlabelled_rows(store, task, columns):
    unlabelled = store.slices[LABELS[0]].isna().to_numpy()
    assert unlabelled.sum() >= 1
    y = targets(store.slices, task)
    assert y.dtype == np.float32
    assert y.shape == (len(store.slices), len(columns))
    assert np.isnan(y[unlabelled]).all()
    assert not np.isnan(y[~unlabelled]).any()
    assert np.array_equal(y[~unlabelled], store.slices.loc[~unlabelled, list(columns)].to_numpy(np.float32))


def test_targets_rsna_ends_with_any_and_an_unknown_task_is_refused(store):
    assert tables.TASKS["rsna"][-1] == "any"
    with pytest.raises(ConfigError, match="rsna, binary, subtypes"):
        targets(store.slices, "multi")


def test_train_candidates(store):
    slices = store.slices
    n = len(slices)
    bad = np.flatnonzero(~slices["ok"].to_numpy(bool))
    unlabelled = np.flatnonzero(slices["any"].isna().to_numpy())
    assert len(bad)
    assert len(unlabelled)
    split = split_slices(slices, 0.3, seed=1, by="study")
    cand = train_candidates(slices, split, None, "rsna")
    assert not np.isin(cand, bad).any()
    assert not np.isin(cand, unlabelled).any()
    assert (split[cand] == "train").all()
    expected = set(np.flatnonzero(split == "train")) - set(bad) - set(unlabelled)
    assert set(cand) == expected
    val = train_candidates(slices, split, None, "rsna", part="val")
    assert not set(val) & set(cand)
    assert (split[val] == "val").all()

    mask = select_slices(slices, store.studies, "middle:5")
    assert set(train_candidates(slices, split, mask, "binary")) == expected & set(np.flatnonzero(mask))
    sub = train_candidates(slices, np.full(n, "train"), None, "subtypes")
    assert len(sub)
    assert set(sub) == set(np.flatnonzero(is_positive(slices))) - set(bad)
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
    assert all(len(s) == 1 for s in per_study)
    assert set().union(*per_study) == {"train", "val"}
    real = split_slices(store.slices, 0.25, seed=0)
    assert (pd.Series(real).groupby(store.slices["patient_id"].to_numpy()).nunique() == 1).all()
    assert set(real) == {"train", "val"}


def test_slice_split_is_leaky_and_bad_args():
    frame = fake_slices(20)
    split = split_slices(frame, 0.2, seed=0, by="slice")
    assert abs((split == "val").mean() - 0.2) < 0.01
    assert (pd.Series(split).groupby(frame["study_uid"].to_numpy()).nunique() == 2).any()  # leaks
    assert "leaky" in split_slices.__doc__
    with pytest.raises(ConfigError, match="patient, study, slice"):
        split_slices(frame, 0.2, by="series")
    with pytest.raises(DataError):
        split_slices(frame[frame["study_uid"] == "1.2.1.0"], 0.2, by="study")


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.2"])
def test_split_refuses_a_fraction_outside_0_1(bad):
    frame = fake_slices(20)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_slices(frame, bad)


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
    assert list(picked("middle:1000")) == list(range(start, stop))  # clipped to the study
    assert select_slices(store.slices, store.studies, "all").all()
    per_study = select_slices(store.slices, store.studies, "middle:3")
    assert [per_study[s.start : s.stop].sum() for s in store.studies.itertuples()] == [3] * len(store.studies)


def test_select_short_study_and_bad_forms():
    slices = pd.DataFrame({"x": range(10)})
    studies = pd.DataFrame({"start": [0, 3, 5], "stop": [3, 5, 10]})  # 3, 2 and 5 slices
    mask = select_slices(slices, studies, "middle:4")
    assert list(np.flatnonzero(mask)) == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # short studies whole; [5,10) -> 5..8
    with pytest.raises(DataError):
        study_bounds(pd.DataFrame({"start": [0, 4], "stop": [3, 10]}), 10)


@pytest.mark.parametrize("bad", ["middle", "middle:0", "middle:x", "top:3", "middle:-2", "", None])
def test_select_refuses_bad_forms(bad):
    slices = pd.DataFrame({"x": range(10)})
    studies = pd.DataFrame({"start": [0, 3, 5], "stop": [3, 5, 10]})
    with pytest.raises(ConfigError, match="middle:K"):
        select_slices(slices, studies, bad)


# ---- epoch plan ----------------------------------------------------------------------------------------------


def test_epoch_plan_hybrid():
    n = 1000
    positive = np.zeros(n, bool)
    positive[np.random.default_rng(0).choice(n, 50, replace=False)] = True
    candidates = np.setdiff1d(np.arange(n), np.arange(0, n, 10))  # every 10th slot is not a candidate
    counts = epoch_plan(candidates, positive, "hybrid", 0.5, seed=0, epoch=0)
    assert counts.shape == (n,)
    assert counts.dtype == np.int64
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
    with caplog.at_level(logging.WARNING, logger="ichtrain.data.balance"):
        counts = epoch_plan(np.arange(100), positive)
    assert (counts == 1).all()
    assert "using 'none'" in caplog.text
    positive[:60] = True  # already >= pos_fraction
    assert (epoch_plan(np.arange(100), positive, pos_fraction=0.5) == 1).all()
    with pytest.raises(ConfigError, match="hybrid, none"):
        epoch_plan(np.arange(10), positive, "oversample")
    with pytest.raises(ConfigError):
        epoch_plan(np.arange(10), positive, pos_fraction=1.0)
    with pytest.raises(DataError):
        epoch_plan(np.array([5, 5]), positive)
    with pytest.raises(DataError):
        epoch_plan(np.array([100]), positive)


# ---- shuffle orders ------------------------------------------------------------------------------------------


def run_order(order, sizes) -> list[tuple[int, int]]:
    """(piece, sample) of every emission, checking that each names only a piece still live."""
    out = []
    for step in emissions(order, sizes, lambda n: n):
        assert set(step.emission.piece.tolist()) <= set(step.live)
        out += list(zip(step.emission.piece.tolist(), step.emission.sample.tolist()))
    return out


@pytest.mark.parametrize("window", [1, 3, 5, 40])
def test_window_shuffle_emits_everything_once_within_the_window(window):
    sizes = [7, 0, 12, 3, 9, 9, 1, 20, 5]
    out = run_order(WindowShuffle(window, np.random.default_rng(0)), sizes)
    assert sorted(out) == [(p, j) for p, n in enumerate(sizes) for j in range(n)]
    assert out == run_order(WindowShuffle(window, np.random.default_rng(0)), sizes)  # deterministic
    assert out != run_order(WindowShuffle(window, np.random.default_rng(1)), sizes)
    # Stratified rounds: `window` consecutive samples of a piece never go out in the same round (from
    # round `window` on: the first emission and the rest merge several rounds).
    order = WindowShuffle(window, np.random.default_rng(2))
    rounds = [order.add(n) for n in sizes]
    for emission in rounds[window:]:
        for p in set(emission.piece.tolist()):
            mine = np.sort(emission.sample[emission.piece == p])
            assert len(set((mine // window).tolist())) == len(mine)


def test_sequence_order_keeps_the_sequence():
    sizes = [4, 0, 3]
    assert run_order(SequenceOrder(), sizes) == [(0, 0), (0, 1), (0, 2), (0, 3), (2, 0), (2, 1), (2, 2)]


# ---- shard stream --------------------------------------------------------------------------------------------


def test_stream_sequential_yields_every_slot_once(store, images):
    counts = all_ok(store)
    ds = stream(store, counts, shuffle=False, batch_size=7)
    out = drain(ds)
    assert slots_of(out) == list(np.flatnonzero(counts))  # evaluation order: ascending
    assert len(ds) == sum(len(b.slots) for b in out) == counts.sum()
    y = targets(store.slices, "rsna")
    for batch in out:
        assert isinstance(batch, Batch)
        assert batch.images.dtype == torch.uint8
        assert batch.targets.dtype == torch.float32
        assert batch.slots.dtype == torch.int64
        slots = batch.slots.numpy()
        assert np.array_equal(batch.images.numpy(), images[slots])
        assert np.array_equal(batch.targets.numpy(), y[slots])
    assert ds.sample_shape == (3, 32, 32)


def test_stream_repeats_follow_plan_and_is_deterministic(store):
    cand = train_candidates(store.slices, np.full(len(store.slices), "train"), None, "binary")
    counts = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=0)
    assert counts.max() > 1
    ds = stream(store, counts, task="binary", seed=5, buffer_shards=3)
    first = slots_of(drain(ds))
    assert Counter(first) == {i: int(c) for i, c in enumerate(counts) if c}
    assert len(ds) == len(first)
    assert first == slots_of(drain(stream(store, counts, task="binary", seed=5, buffer_shards=3)))
    # The buffer mixes shards: the first samples do not all come from one shard.
    assert len({slot // SHARD for slot in first[:8]}) > 1
    ds.set_epoch(1)
    assert Counter(slots_of(drain(ds))) == Counter(first)
    assert slots_of(drain(ds)) != first
    ds.set_epoch(2, epoch_plan(cand, is_positive(store.slices), seed=0, epoch=2))
    assert Counter(slots_of(drain(ds))) == {i: int(c) for i, c in enumerate(ds.counts) if c}
    # Sequential: each slot's repeats follow each other, slots ascending.
    assert slots_of(drain(stream(store, counts, task="binary", shuffle=False))) == list(
        np.repeat(np.arange(len(counts)), counts)
    )


class CountingReader:
    def __init__(self, array, log):
        self.array, self.log, self.shape = array, log, array.shape

    def __getitem__(self, key):
        self.log.append((key.start, key.stop))
        return self.array[key]


def counted_reads(monkeypatch) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    real = stream_module._open_images
    monkeypatch.setattr(stream_module, "_open_images", lambda root: CountingReader(real(root), log))
    return log


@pytest.mark.parametrize("context", [0, 1])
def test_stream_reads_only_needed_shards_once(store, monkeypatch, context):
    log = counted_reads(monkeypatch)
    counts = np.zeros(len(store.slices), np.int64)
    counts[[16, 21, 47]] = [1, 2, 1]  # shards 2 and 5 only
    out = drain(stream(store, counts, context=context, shuffle=True))
    assert sorted(slots_of(out)) == [16, 21, 21, 47]
    # A read is widened only as far as the 2.5D neighbours need (16's previous, 47's next; same study).
    assert sorted(log) == [(16 - context, 24), (40, 48 + context)]
    log.clear()
    drain(stream(store, all_ok(store), context=context))
    assert len(log) == store.n_shards  # one read per shard


class BlockWatch:
    """A reader that keeps a weak reference to every block it returns, to count the ones still alive."""

    def __init__(self, array):
        self.array, self.shape, self.blocks = array, array.shape, []

    def __getitem__(self, key):
        block = self.array[key]
        self.blocks.append(weakref.ref(block))
        return block

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.blocks)


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_holds_at_most_buffer_shards_blocks(store, monkeypatch, shuffle):
    real = stream_module._open_images
    watch = BlockWatch(real(store.root))
    monkeypatch.setattr(stream_module, "_open_images", lambda root: watch)
    cand = train_candidates(store.slices, np.full(len(store.slices), "train"), None, "binary")
    counts = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=0)
    alive = [
        watch.alive() for _ in stream(store, counts, task="binary", buffer_shards=3, batch_size=4, shuffle=shuffle)
    ]
    assert max(alive) == (3 if shuffle else 1)
    assert len(watch.blocks) == store.n_shards


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
            ds = stream(store, counts, rank=rank, world_size=2, seed=1, buffer_shards=2)
            parts[rank, worker] = slots_of(drain(ds))
            lengths.add(len(ds))
    sets = [set(p) for p in parts.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == sum(len(p) for p in parts.values())
    assert lengths == {total // 2}
    assert len(parts[0, 0]) + len(parts[0, 1]) == len(parts[1, 0]) + len(parts[1, 1]) == total // 2
    # Same batches per rank.
    assert len(parts[0, 0]) == len(parts[1, 0])
    assert len(parts[0, 1]) == len(parts[1, 1])
    assert total - len(set().union(*sets)) == total % 2

    # One rank: the workers cover everything exactly, also with repeats.
    cand = np.flatnonzero(counts)
    plan = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=3)
    for c in (counts, plan):
        seen = Counter()
        for worker in range(3):
            fake_worker(monkeypatch, worker, 3)
            seen.update(slots_of(drain(stream(store, c, seed=2, buffer_shards=2))))
        assert seen == {i: int(v) for i, v in enumerate(c) if v}


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("context", [0, 1])
def test_stream_batch_shapes_and_short_last_batch_per_worker(store, monkeypatch, shuffle, context):
    counts = all_ok(store)
    total = 0
    for worker in range(2):
        fake_worker(monkeypatch, worker, 2)
        ds = stream(store, counts, batch_size=5, context=context, shuffle=shuffle, buffer_shards=2)
        sizes = [len(b.slots) for b in drain(ds)]
        mine = ds._worker_ranges(2)[worker]
        n = mine[1] - mine[0]
        assert sizes == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        total += n
        for b in drain(ds):
            n = len(b.slots)
            assert b.images.shape == (n, 3 * (2 * context + 1), 32, 32)
            assert b.targets.shape == (n, 6)
            assert b.slots.shape == (n,)
    assert total == counts.sum()


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 32, 500])
def test_stream_batch_count_equals_batches(store, monkeypatch, world_size, workers, batch_size):
    counts = epoch_plan(np.flatnonzero(all_ok(store)), is_positive(store.slices), seed=0, epoch=1)
    for rank in range(world_size):
        made = 0
        for worker in range(workers):
            fake_worker(monkeypatch, worker, workers)
            ds = stream(store, counts, rank=rank, world_size=world_size, batch_size=batch_size)
            made += len(drain(ds))
        assert made == ds.batches(batch_size, workers)


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_batches_own_their_memory(store, images, monkeypatch, shuffle):
    cand = train_candidates(store.slices, np.full(len(store.slices), "train"), None, "binary")
    counts = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=0)  # with repeats
    y = targets(store.slices, "binary")
    for worker_info in (False, True):
        if worker_info:  # inside a worker the images are born in shared memory
            fake_worker(monkeypatch, 0, 1)
        out = drain(stream(store, counts, task="binary", shuffle=shuffle, batch_size=3, context=1))
        assert all(b.images.is_shared() == worker_info for b in out)
        for b in out[::2]:  # a consumer scribbles over every other batch
            b.images.fill_(255)
            b.targets.fill_(-1)
            b.slots.fill_(-1)
        for b in out[1::2]:
            slots = b.slots.numpy()
            assert np.array_equal(b.images.numpy()[:, 3:6], images[slots])
            assert np.array_equal(b.targets.numpy(), y[slots])
        arrays = [t.numpy() for b in out for t in b]
        assert not any(np.shares_memory(a, c) for i, a in enumerate(arrays) for c in arrays[i + 1 :])


def test_stream_dataloader_two_workers(store, monkeypatch):
    counts = epoch_plan(np.flatnonzero(all_ok(store)), is_positive(store.slices), seed=0, epoch=1)
    ds = stream(store, counts, seed=0, batch_size=4, context=1, buffer_shards=2)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert Counter(slots_of(batches)) == {i: int(c) for i, c in enumerate(counts) if c}
    assert len(batches) == ds.batches(4, 2)
    assert batches[0].images.shape == (4, 9, 32, 32)
    assert batches[0].targets.shape == (4, 6)
    ordered = two_workers_in_process(ds, monkeypatch)
    assert [b.slots.tolist() for b in batches] == [b.slots.tolist() for b in ordered]
    assert all(torch.equal(b.images, e.images) and torch.equal(b.targets, e.targets) for b, e in zip(batches, ordered))


def two_workers_in_process(ds, monkeypatch) -> list[Batch]:
    """What two DataLoader workers yield, worker by worker in this process, in the DataLoader's order."""
    first, second = [], []
    for worker, out in enumerate((first, second)):
        fake_worker(monkeypatch, worker, 2)
        out.extend(drain(ds))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    # The DataLoader takes one batch from each worker in turn, then the longer one's rest.
    return [b for pair in zip(first, second) for b in pair] + first[len(second) :] + second[len(first) :]


def consumed(loader) -> list[tuple[Batch, int]]:
    """Each batch copied as it arrives (a ring batch is valid until the next), with its storage's address."""
    out = []
    for b in loader:
        out.append((Batch(*(t.clone() for t in b)), b.images.untyped_storage().data_ptr()))
    return out


class FakeEvent:
    """Stands in for torch.cuda.Event: done only when the test says so."""

    done = False

    def record(self):
        pass

    def query(self):
        return FakeEvent.done


@pytest.mark.parametrize("copies_finish", [True, False, None])
def test_ring_loader_reuses_slots_and_gives_the_workers_batches(store, monkeypatch, copies_finish):
    """The trainer's loader: the same batches as the workers make, mostly in the ring's slots.

    None: CPU (a batch is released when the next is asked for).  True/False: CUDA, where a batch is released
    once its event has passed; when events never pass, every batch goes to fresh memory and none waits.
    """
    counts = epoch_plan(np.flatnonzero(all_ok(store)), is_positive(store.slices), seed=0, epoch=1)
    ds = stream(store, counts, seed=0, batch_size=2, context=1, buffer_shards=2)
    ds.set_epoch(1)
    device = torch.device("cpu")
    if copies_finish is not None:
        device = torch.device("cuda")
        monkeypatch.setattr(ring.BatchRing, "pin", lambda self: setattr(self, "pinned", True))
        monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
        monkeypatch.setattr(FakeEvent, "done", copies_finish)
    got = consumed(batch_loader(ds, 2, device))
    expected = two_workers_in_process(ds, monkeypatch)
    assert len(got) == len(expected) == ds.batches(2, 2) > 4 * ring.PREFETCH
    for (b, _), e in zip(got, expected):
        assert torch.equal(b.slots, e.slots)
        assert torch.equal(b.images, e.images)
        assert torch.equal(b.targets, e.targets)
    storages = Counter(address for _, address in got)
    in_ring = storages.most_common(1)[0][1]
    if copies_finish is False:
        assert in_ring <= 2 * ring.BatchRing(2, (1,)).depth  # only the slots' first use
    else:
        assert in_ring >= len(got) - 2  # one segment for (nearly) every batch


def test_ring_slot_is_claimed_only_after_its_last_batch_is_released():
    r = ring.BatchRing(workers=2, batch_shape=(3, 1, 2, 2), depth=2)
    mine = ring.WorkerCells(r, worker=1)
    sent = []
    for _ in range(3):
        images = mine.empty((3, 1, 2, 2))
        images.fill_(len(sent))
        sent.append(mine.batch(images, torch.zeros(3, 6), torch.arange(3)))
    assert [b.images is None for b in sent] == [True, True, False]  # batch 2 would reuse batch 0's slot
    assert [int(r.images_of(b).max()) for b in sent] == [0, 1, 2]
    r.release(sent[0])
    assert r.claim(1, 3, 3) is None
    assert r.claim(1, 2, 3) is not None
    assert r.claim(0, 2, 3) is None
    assert r.claim(1, 2, 2).shape == (2, 1, 2, 2)  # a short last batch is a view of the slot's head


def test_stream_context_neighbours(store, images):
    slices, n = store.slices, len(store.slices)
    start, stop = study_bounds(store.studies, n)
    counts = np.ones(n, np.int64)
    bad = np.flatnonzero(~slices["ok"].to_numpy(bool))
    counts[bad] = 0
    # Without ok: neighbours are clamped to the study only (a zero-filled neighbour stays zero).
    ds = stream(store, counts, context=1, shuffle=False, ok=None)
    out = by_slot(drain(ds))
    assert ds.sample_shape == (9, 32, 32)
    for slot, image in out.items():
        prev, nxt = max(slot - 1, start[slot]), min(slot + 1, stop[slot] - 1)
        assert np.array_equal(image, np.concatenate([images[prev], images[slot], images[nxt]]))
    first = store.studies["start"].to_numpy()
    s1 = int(first[1])  # second study's first slot: previous neighbour is itself
    assert np.array_equal(out[s1][:3], images[s1])
    assert np.array_equal(out[s1 - 1][6:], images[s1 - 1])
    assert np.array_equal(out[0][:3], images[0])
    assert np.array_equal(out[n - 1][6:], images[n - 1])
    # Shard edges inside a study: the neighbour comes from the previous/next shard.
    edge = next(k * SHARD for k in range(1, store.n_shards) if start[k * SHARD] < k * SHARD)
    assert np.array_equal(out[edge][:3], images[edge - 1])
    assert np.array_equal(out[edge - 1][6:], images[edge])
    # With ok (from_store's default) a zero-filled neighbour is replaced by the slot itself.
    b = int(bad[0])
    with_ok = by_slot(drain(stream(store, counts, context=1, shuffle=False)))
    assert not images[b].any()
    assert np.array_equal(out[b + 1][:3], images[b])
    assert np.array_equal(with_ok[b + 1][:3], images[b + 1])
    assert np.array_equal(with_ok[b - 1][6:], images[b - 1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_context_stacks_equal_reader_slices(store, shuffle):
    """Each context-1 stack is (previous, slot, next) as ``open_reader`` returns them, in the study and ok."""
    reader = open_reader(store.root)
    start, stop = study_bounds(store.studies, len(store.slices))
    ok = store.slices["ok"].to_numpy(bool)
    cand = train_candidates(store.slices, np.full(len(store.slices), "train"), None, "binary")
    counts = epoch_plan(cand, is_positive(store.slices), seed=0, epoch=0)
    out = drain(stream(store, counts, task="binary", context=1, shuffle=shuffle, batch_size=6, buffer_shards=2))
    for batch in out:
        for image, slot in zip(batch.images.numpy(), batch.slots.tolist()):
            stack = [max(slot - 1, start[slot]), slot, min(slot + 1, stop[slot] - 1)]
            stack = [s if ok[s] else slot for s in stack]
            assert np.array_equal(image, np.concatenate([reader[s : s + 1][0] for s in stack]))


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
    with pytest.raises(ConfigError, match="buffer_shards"):
        stream(store, all_ok(store), buffer_shards=0)
    start, stop = study_bounds(store.studies, n)
    with pytest.raises(DataError):
        ShardStream(store.root, all_ok(store), targets(store.slices, "rsna"), SHARD, stop, start)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_stream_refuses_a_bad_batch_size(store, bad):
    with pytest.raises(ConfigError, match="batch_size"):
        stream(store, all_ok(store), batch_size=bad)


_DDP_SCRIPT = """
import json, sys
import numpy as np, torch, torch.distributed as dist
from ichprep.storage.store import open_store
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import targets
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store = open_store(sys.argv[1])
counts = store.slices["ok"].to_numpy(bool).astype(np.int64)
stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), rank=rank, world_size=world, seed=5,
                                batch_size=4)
stream.set_epoch(1)
loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
batches = list(loader)
slots = [int(s) for batch in batches for s in batch.slots]
everything = [None] * world
dist.all_gather_object(everything, {"slots": slots, "batches": len(batches), "expected": stream.batches(4, 2)})
if rank == 0:
    json.dump({"ranks": everything, "expected": int(counts.sum())}, open(sys.argv[2], "w"))
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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
            str(store.root),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rank0, rank1 = (r["slots"] for r in data["ranks"])
    assert len(rank0) == len(rank1)
    assert not set(rank0) & set(rank1)
    assert len(set(rank0)) == len(rank0)
    assert len(set(rank1)) == len(rank1)
    assert data["expected"] - 2 < len(rank0) + len(rank1) <= data["expected"]
    assert [r["batches"] for r in data["ranks"]] == [r["expected"] for r in data["ranks"]]
