"""Data augmentation as a few batched tensor functions (no per-sample Python, no workers).

Each function takes a whole batch of uint8 images (N, H, W) where it lives (CPU or CUDA) and a
seeded generator on the same device, and returns the augmented batch; the same code runs on
every device. The trainer applies them to each training batch before it is normalised
(`augment`); evaluation batches are never augmented.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from study.config import TrainConfig

ERASE_AREA = (0.02, 0.25)
"""Random erasing: the rectangle's share of the image area, drawn uniformly."""
ERASE_ASPECT = (0.3, 3.3)
"""Random erasing: the rectangle's height/width ratio, drawn log-uniformly."""


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


def batch_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image left to right with probability 1/2."""
    flip = _uniform(len(images), generator, images.device) < 0.5
    return torch.where(flip[:, None, None], images.flip(-1), images)


def batch_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Shift each image by a random whole number of pixels in [-padding, padding] on each axis,
    filling with black: a random crop of the zero-padded image, as one gather."""
    n, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    rows = offsets[:, :1] + torch.arange(height, device=device)  # (n, height)
    cols = offsets[:, 1:] + torch.arange(width, device=device)  # (n, width)
    index = torch.arange(n, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def batch_erase(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Random erasing: with `probability`, set a random rectangle of each image to black (its
    area `ERASE_AREA` of the image, its aspect `ERASE_ASPECT`)."""
    n, height, width = images.shape
    device = images.device
    draws = torch.rand(n, 5, generator=generator, device=device)
    apply, area, aspect, top, left = draws.unbind(1)
    area = (ERASE_AREA[0] + area * (ERASE_AREA[1] - ERASE_AREA[0])) * height * width
    low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(low + aspect * (high - low))
    tall = torch.sqrt(area * aspect).round().clamp(1, height)
    wide = torch.sqrt(area / aspect).round().clamp(1, width)
    top = (top * (height - tall + 1)).floor()
    left = (left * (width - wide + 1)).floor()
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + tall)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + wide)[:, None, None])
    )
    return images.masked_fill(inside & (apply < probability)[:, None, None], 0)


def augment(images: Tensor, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """A training batch augmented as `config` says (crop, then flip, then erasing)."""
    if config.crop_padding:
        images = batch_crop(images, config.crop_padding, generator)
    if config.flip:
        images = batch_flip(images, generator)
    if config.erase_probability:
        images = batch_erase(images, config.erase_probability, generator)
    return images
