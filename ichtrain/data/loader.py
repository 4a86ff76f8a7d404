"""Whole batches of a stream: in the calling process, or from DataLoader workers through reused batch memory."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import torch
import torch.utils.data

from .ring import PREFETCH, Batch, BatchRing
from .stream import ShardStream


class RingLoader:
    """``DataLoader(stream, num_workers=workers)`` whose workers write into a :class:`BatchRing`.

    Yields :class:`Batch`es; a batch's images are valid until the next batch is asked for.  Each pass
    (``iter``) gets its own ring, so workers of an abandoned pass can never write into a new pass's slots.
    """

    def __init__(self, stream, workers: int, device: torch.device):
        if workers < 1:
            raise ValueError(f"RingLoader needs at least one worker, got {workers}")
        self.stream, self.workers, self.device = stream, workers, device

    def __iter__(self) -> Iterator[Batch]:
        ring = BatchRing(self.workers, (self.stream.batch_size, *self.stream.sample_shape))
        if self.device.type == "cuda":
            ring.pin()
        loader = torch.utils.data.DataLoader(
            self.stream.with_ring(ring), batch_size=None, num_workers=self.workers, prefetch_factor=PREFETCH
        )
        held: collections.deque = collections.deque()  # (CellBatch, CUDA event or None), in arrival order
        for batch in loader:
            while held and (held[0][1] is None or held[0][1].query()):
                ring.release(held.popleft()[0])
            yield Batch(images=ring.images_of(batch), targets=batch.targets, slots=batch.slots)
            event = None
            if ring.pinned:
                event = torch.cuda.Event()
                event.record()  # after the work queued on this batch, its copy to the device included
            held.append((batch, event))


def batch_loader(stream: ShardStream, workers: int, device: torch.device):
    """Whole batches of a stream: in this process, or from ``workers`` processes through reused slots.

    No persistent workers: each pass hands workers a fresh copy of the stream (new epoch plan).
    """
    if workers:
        return RingLoader(stream, workers, device)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0, pin_memory=device.type == "cuda")
