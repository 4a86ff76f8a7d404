"""Batch memory that DataLoader workers reuse: one shared segment of batch cells per loader pass.

A cell holds one batch; "slot" keeps its one meaning, a row of the store.

A worker writes its batch number ``b`` into its cell ``b % depth`` once the consumer has released batch
``b - depth``, and sends only the cell's coordinates; the consumer reads the batch in place.  A cell that
is still in use never makes a worker wait: that batch goes into fresh shared memory instead, as every batch
did before (what that costs per batch: BENCHMARKS.md, "Loader: reused batch cells").  The consumer
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

#: Batches each worker may have in flight (DataLoader ``prefetch_factor``); a worker gets this many cells + 2.
PREFETCH = 4
#: Cells per worker beyond PREFETCH: the batch the consumer holds and one it has not yet released.
SPARE_CELLS = 2


class Batch(NamedTuple):
    """One batch of a :class:`~ichtrain.data.stream.ShardStream`."""

    images: torch.Tensor  # uint8 (b, C*(2*context+1), H, W)
    targets: torch.Tensor  # float32 (b, K)
    slots: torch.Tensor  # int64 (b,)


class CellBatch(NamedTuple):
    """What a worker sends for a batch it wrote into the ring: everything but the images."""

    worker: int
    number: int  # the worker's batch number in this pass
    size: int
    images: torch.Tensor | None  # None: the images are in the worker's cell ``number % depth``
    targets: torch.Tensor
    slots: torch.Tensor


def shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor born in shared memory (``share_memory_()`` would first copy uninitialised bytes)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class BatchRing:
    """``workers x depth`` batch cells in shared memory, and per worker the count of batches released."""

    def __init__(self, workers: int, batch_shape: tuple[int, ...], *, depth: int = PREFETCH + SPARE_CELLS):
        self.depth = depth
        self.images = shared_empty((workers, depth, *batch_shape))
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the cells for CUDA copies (unlocked again when the ring is collected).

        If the driver refuses, the cells stay pageable: copies to the device are then synchronous, not wrong.
        """
        pointer, size = self.images.data_ptr(), self.images.numel()
        code = int(torch.cuda.cudart().cudaHostRegister(pointer, size, 0))
        if code != 0:
            logger.warning("could not page-lock %d bytes of batch cells (CUDA error %d): copies will wait", size, code)
            return
        weakref.finalize(self, _unregister, pointer)
        self.pinned = True

    def claim(self, worker: int, number: int, size: int) -> torch.Tensor | None:
        """Worker ``worker``'s cell for its batch ``number`` of ``size`` samples, or None while it is in use."""
        if number - int(self.released[worker]) >= self.depth:
            return None
        return self.images[worker, number % self.depth, :size]

    def images_of(self, batch: CellBatch) -> torch.Tensor:
        if batch.images is not None:
            return batch.images
        return self.images[batch.worker, batch.number % self.depth, : batch.size]

    def release(self, batch: CellBatch) -> None:
        """Every batch of the worker up to ``batch`` is done with (a worker's batches are released in order)."""
        self.released[batch.worker] = batch.number + 1


class WorkerCells:
    """Inside one worker: batch memory from the ring, or fresh shared memory while its cell is in use."""

    def __init__(self, ring: BatchRing, worker: int):
        self.ring, self.worker, self.number = ring, worker, 0
        self._in_cell = False

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        cell = self.ring.claim(self.worker, self.number, shape[0])
        self._in_cell = cell is not None
        return cell if cell is not None else shared_empty(shape)

    def batch(self, images: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> CellBatch:
        out = CellBatch(
            worker=self.worker,
            number=self.number,
            size=len(slots),
            images=None if self._in_cell else images,
            targets=targets,
            slots=slots,
        )
        self.number += 1
        return out
