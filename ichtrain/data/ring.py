"""Batch memory that DataLoader workers reuse: one shared segment of batch slots per loader pass.

A worker writes its ``b``-th batch into its slot ``b % depth`` once the consumer has released batch
``b - depth``, and sends only the slot's coordinates; the consumer reads the batch in place.  A slot that
is still in use never makes a worker wait: that batch goes into fresh shared memory instead, as every batch
did before (what that costs per batch: BENCHMARKS.md, "Loader: reused batch slots").  The consumer
releases a batch when it asks for the next one (on CUDA, once an event recorded then has passed, so the
copy to the device has finished reading it).  On CUDA the segment is page-locked with ``cudaHostRegister``,
so the workers write straight into pinned memory and the copy to the device does not wait for the host.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import NamedTuple

import torch
import torch.utils.data

logger = logging.getLogger(__name__)

#: Batches each worker may have in flight (DataLoader ``prefetch_factor``); a worker gets this many slots + 2.
PREFETCH = 4
#: Slots per worker beyond PREFETCH: the batch the consumer holds and one it has not yet released.
SPARE_SLOTS = 2


class Batch(NamedTuple):
    """One batch of a :class:`~ichtrain.data.stream.ShardStream`."""

    images: torch.Tensor  # uint8 (b, C*(2*context+1), H, W)
    targets: torch.Tensor  # float32 (b, K)
    slots: torch.Tensor  # int64 (b,)


class SlotBatch(NamedTuple):
    """What a worker sends for a batch it wrote into the ring: everything but the images."""

    worker: int
    seq: int  # the worker's batch number in this pass
    size: int
    images: torch.Tensor | None  # None: the images are in the worker's slot ``seq % depth``
    targets: torch.Tensor
    slots: torch.Tensor


def shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor born in shared memory (``share_memory_()`` would first copy uninitialised bytes)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class BatchRing:
    """``workers x depth`` batch slots in shared memory, and per worker the count of batches released."""

    def __init__(self, workers: int, batch_shape: tuple[int, ...], *, depth: int = PREFETCH + SPARE_SLOTS):
        self.depth = depth
        self.images = shared_empty((workers, depth, *batch_shape))
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the slots for CUDA copies (unlocked again when the ring is collected).

        If the driver refuses, the slots stay pageable: copies to the device are then synchronous, not wrong.
        """
        pointer, size = self.images.data_ptr(), self.images.numel()
        code = int(torch.cuda.cudart().cudaHostRegister(pointer, size, 0))
        if code != 0:
            logger.warning("could not page-lock %d bytes of batch slots (CUDA error %d): copies will wait", size, code)
            return
        weakref.finalize(self, _unregister, pointer)
        self.pinned = True

    def claim(self, worker: int, seq: int, size: int) -> torch.Tensor | None:
        """Worker ``worker``'s slot for its batch ``seq`` of ``size`` samples, or None while it is in use."""
        if seq - int(self.released[worker]) >= self.depth:
            return None
        return self.images[worker, seq % self.depth, :size]

    def images_of(self, batch: SlotBatch) -> torch.Tensor:
        if batch.images is not None:
            return batch.images
        return self.images[batch.worker, batch.seq % self.depth, : batch.size]

    def release(self, batch: SlotBatch) -> None:
        """Every batch of the worker up to ``batch`` is done with (a worker's batches are released in order)."""
        self.released[batch.worker] = batch.seq + 1


class WorkerSlots:
    """Inside one worker: batch memory from the ring, or fresh shared memory while its slot is in use."""

    def __init__(self, ring: BatchRing, worker: int):
        self.ring, self.worker, self.seq = ring, worker, 0
        self._in_slot = False

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        slot = self.ring.claim(self.worker, self.seq, shape[0])
        self._in_slot = slot is not None
        return slot if slot is not None else shared_empty(shape)

    def batch(self, images: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> SlotBatch:
        out = SlotBatch(
            worker=self.worker,
            seq=self.seq,
            size=len(slots),
            images=None if self._in_slot else images,
            targets=targets,
            slots=slots,
        )
        self.seq += 1
        return out
