"""Batch augmentation and normalisation, on whatever device the batch is on.

The loader hands over uint8 batches; on a GPU the random crop, flip and small
affine happen there in one ``grid_sample`` per batch, keeping the CPU cores
for decompression.  Each sample gets its own random transform.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# ImageNet statistics: pretrained torchvision weights expect them; repeated over window channels.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=16)
def _statistics(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel on ``device``, built once rather than copied to the device every batch."""
    mean = torch.tensor([_MEAN[i % 3] for i in range(channels)], device=device).view(1, channels, 1, 1) * 255
    std = torch.tensor([_STD[i % 3] for i in range(channels)], device=device).view(1, channels, 1, 1) * 255
    return mean, std


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, ImageNet-normalised per channel (C may be 3k for 2.5D input)."""
    mean, std = _statistics(batch.shape[1], batch.device)
    return (batch.float() - mean) / std


def random_affine(batch: torch.Tensor, out_size: int, generator: torch.Generator | None = None,
                  max_rotate_deg: float = 10.0, max_zoom: float = 0.1, flip: bool = True) -> torch.Tensor:
    """Random crop to ``out_size`` + horizontal flip + small rotation/zoom, per sample, in one resampling.

    ``batch`` is float (B, C, H, W) with H == W. The crop is a scaled affine
    window at a random position inside the image.
    """
    b, _, h, w = batch.shape
    device = batch.device

    def uniform(low, high):
        return torch.rand(b, generator=generator, device="cpu").mul(high - low).add(low).to(device)

    crop = out_size / h
    zoom = crop * uniform(1 - max_zoom, 1 + max_zoom)
    angle = uniform(-max_rotate_deg, max_rotate_deg) * math.pi / 180
    sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=device)
    room = (1 - zoom).clamp(min=0)
    tx, ty = uniform(-1, 1) * room, uniform(-1, 1) * room
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, batch.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_batch(batch: torch.Tensor, out_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    # Padding with zeros after normalisation would be "mean grey"; sample the raw values so padding is black (air).
    return normalize(random_affine(batch.float(), out_size, generator))


def eval_batch(batch: torch.Tensor) -> torch.Tensor:
    """Evaluation sees the whole stored image (ResNet pools globally, so any size works)."""
    return normalize(batch)
