"""One epoch of training and one pass of evaluation (the torchvision reference's split of work)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from .augment import eval_batch, train_batch
from .metrics import label_weights

logger = logging.getLogger(__name__)


def loss_weights(names: tuple[str, ...], device) -> torch.Tensor:
    """The competition's weights (:func:`ichtrain.metrics.label_weights`) as a tensor on ``device``."""
    return torch.as_tensor(label_weights(names), dtype=torch.float32, device=device)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of sum_j w_j * BCE_j / sum_j w_j: the RSNA metric as a loss."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (per_label * weights).sum(dim=1).div(weights.sum()).mean()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _for_model(inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The model's memory format, applied to the augmented float batch (grid_sample returns NCHW)."""
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    weights: torch.Tensor,
    device: torch.device,
    image_size: int,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> dict:
    """Train for one pass over ``loader``; ``on_step(images, loss, images_per_s)`` drives a progress bar."""
    model.train()
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    for step, (images, targets, _slots) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        # Augment on the device the model runs on: on a GPU this keeps the CPU for decompression.
        inputs = _for_model(train_batch(images, image_size, generator), channels_last)
        with _autocast(device, amp_dtype):
            logits = model(inputs)
        loss = weighted_bce(logits, targets, weights)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n, value = images.shape[0], loss.item()
        total_loss += value * n
        seen += n
        if on_step is not None:
            on_step(n, value, seen / (time.perf_counter() - started))
    seconds = time.perf_counter() - started
    return {"train_loss": total_loss / max(seen, 1), "train_images": seen, "train_seconds": seconds,
            "train_images_per_s": seen / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, targets and slots of every sample of ``loader`` (whole images, no augmentation)."""
    model.eval()
    probs, targets, slots = [], [], []
    for images, target, slot in loader:
        images = images.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(_for_model(eval_batch(images), channels_last))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(target.numpy())
        slots.append(np.asarray(slot))
        if on_step is not None:
            on_step(images.shape[0])
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(targets), np.concatenate(slots).astype(np.int64)
