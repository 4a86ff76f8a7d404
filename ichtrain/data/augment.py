"""Batch resizing, augmentation and normalisation, on whatever device the batch is on.

``image_size`` is the network's input size everywhere (torchvision's convention): evaluation resizes the
whole stored image to it; training resizes the same way, then takes a random resized crop of 80-100 % of
the field (aspect kept) with a flip and a small rotation, resampled back to ``image_size`` in one
``grid_sample``.  Random numbers are drawn on the batch's device, so a GPU step never waits for the host.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# ImageNet statistics: pretrained torchvision weights expect them; repeated over window channels.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
#: Fraction of the field's area a training crop keeps (torchvision's RandomResizedCrop ``scale``).
CROP_SCALE = (0.8, 1.0)
MAX_ROTATE_DEG = 10.0


@functools.lru_cache(maxsize=16)
def _statistics(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel on ``device``, built once rather than copied to the device every batch."""
    mean = torch.tensor([_MEAN[i % 3] for i in range(channels)], device=device).view(1, channels, 1, 1) * 255
    std = torch.tensor([_STD[i % 3] for i in range(channels)], device=device).view(1, channels, 1, 1) * 255
    return mean, std


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in 0-255 -> float, ImageNet-normalised per channel (C may be 3k for 2.5D input)."""
    mean, std = _statistics(batch.shape[1], batch.device)
    return (batch.float() - mean) / std


def resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float (B, C, H, W) -> float (B, C, size, size); antialiased, so shrinking does not alias."""
    batch = batch.float()
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def random_resized_crop(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    max_rotate_deg: float = MAX_ROTATE_DEG,
    flip: bool = True,
) -> torch.Tensor:
    """Per sample: a square crop of ``scale`` of the area at a random place, flip, rotation; same output size.

    ``batch`` is float (B, C, S, S).  ``generator`` must live on the batch's device.
    """
    b = batch.shape[0]
    u = torch.rand(b, 5, generator=generator, device=batch.device)  # one draw per step, on the device
    side = torch.sqrt(scale[0] + u[:, 0] * (scale[1] - scale[0]))  # crop side as a fraction of the field
    angle = (u[:, 1] * 2 - 1) * (max_rotate_deg * math.pi / 180)
    sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones_like(side)
    room = 1 - side  # the crop's centre may move this far (normalised coordinates) and stay inside
    tx, ty = (u[:, 3] * 2 - 1) * room, (u[:, 4] * 2 - 1) * room
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    # Zero padding on raw 0-255 values is black (air) where a rotated corner leaves the image.
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_batch(batch: torch.Tensor, image_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stored uint8 batch -> augmented, normalised network input of ``image_size``²."""
    return normalize(random_resized_crop(resize(batch, image_size), generator))


def eval_batch(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """Stored uint8 batch -> the whole image at ``image_size``², normalised (what training's crops approximate)."""
    return normalize(resize(batch, image_size))
