"""ichtrain.config, data.stream and model with --context N: its bounds, 2N+1-slice stacks, a model that takes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichprep.storage.store import open_reader, open_store
from ichtrain.config import MAX_CONTEXT, TrainConfig
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import study_bounds, targets, train_candidates
from ichtrain.errors import ConfigError
from ichtrain.model import build_model


@pytest.mark.parametrize("context", [0, 1, 2, 3, MAX_CONTEXT])
def test_config_takes_any_context_up_to_the_maximum(context):
    assert TrainConfig(store="s", out="o", context=context).context == context


@pytest.mark.parametrize("context", [-1, MAX_CONTEXT + 1, 1.5, True, "2"])
def test_config_refuses_a_negative_absurd_or_non_integer_context(context):
    with pytest.raises(ConfigError, match=f"context must be an integer from 0 to {MAX_CONTEXT} .*got"):
        TrainConfig(store="s", out="o", context=context)


@pytest.fixture(scope="module")
def store(store6):
    return open_store(store6)


def _expected_stack(slot: int, context: int, start: np.ndarray, stop: np.ndarray, ok: np.ndarray) -> list[int]:
    """Neighbours slot-context .. slot+context clamped to the study; a zero-filled one replaced by the slot."""
    rows = [min(max(slot + k, start[slot]), stop[slot] - 1) for k in range(-context, context + 1)]
    return [row if ok[row] else slot for row in rows]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("context", [2, 3])
def test_stream_stacks_2n_plus_1_slices_slice_major(store, context, shuffle):
    """Sample channels [k*C, (k+1)*C) are neighbour k (slot - N .. slot + N), as for context 1."""
    images = open_reader(store.root)[0 : len(store.slices)]
    start, stop = study_bounds(store.studies, len(store.slices))
    ok = store.slices["ok"].to_numpy(bool).copy()
    counts = np.zeros(len(store.slices), np.int64)
    counts[train_candidates(store.slices, np.full(len(store.slices), "train"), None, "rsna")] = 1
    # One more zero-filled slot (pixels kept, so replacing it is visible) in the middle of the first study.
    hole = int(start[0]) + 5
    ok[hole], counts[hole] = False, 0
    stream = ShardStream.from_store(
        store,
        counts,
        targets(store.slices, "rsna"),
        context=context,
        shuffle=shuffle,
        batch_size=7,
        buffer_shards=2,
        ok=ok,
    )
    channels = images.shape[1]
    assert stream.sample_shape[0] == channels * (2 * context + 1) == {2: 15, 3: 21}[context]
    stacks = {}
    for batch in stream:
        assert batch.images.shape[1:] == stream.sample_shape
        for image, slot in zip(batch.images.numpy(), batch.slots.tolist()):
            stacks[slot] = _expected_stack(slot, context, start, stop, ok)
            assert np.array_equal(image, np.concatenate([images[row] for row in stacks[slot]])), slot
    assert sorted(stacks) == np.flatnonzero(counts).tolist()
    # The cases the stacks above had to get right: a study's ends, a neighbour in another shard, the hole.
    first, last = int(start[0]), int(stop[0]) - 1
    assert stacks[first] == [first] * (context + 1) + list(range(first + 1, first + context + 1))
    assert stacks[last] == list(range(last - context, last)) + [last] * (context + 1)
    shard = store.shard_slices
    assert any(row // shard != slot // shard for slot, rows in stacks.items() for row in rows)
    assert stacks[hole + 1][context - 1] == hole + 1


def test_context_2_model_takes_a_stream_batch(store):
    counts = np.zeros(len(store.slices), np.int64)
    counts[train_candidates(store.slices, np.full(len(store.slices), "train"), None, "rsna")[:4]] = 1
    batch = next(
        iter(
            ShardStream.from_store(store, counts, targets(store.slices, "rsna"), context=2, shuffle=False, batch_size=4)
        )
    )
    model = build_model("resnet18", n_outputs=6, windows=3, slices=5).eval()
    inputs = torch.nn.functional.interpolate(batch.images.float() / 255, size=64, mode="bilinear")
    with torch.no_grad():
        assert model(inputs).shape == (4, 6)
