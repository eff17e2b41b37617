"""Light image augmentation for training on small images (off by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Float images [B, C, H, W], each translated by up to max_shift px in y and x (edge padding).
    No flips anywhere in clipfast's augmentations: captions name positions."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def shift_and_jitter(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2, jitter: float = 0.1) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [0, 1]: random translation by up to max_shift px (edge padding)
    and per-image brightness/contrast jitter of +-jitter."""
    batch = images.shape[0]
    x = random_shift(images.float() / 255.0, generator, max_shift)
    brightness, contrast = (1 + jitter * (2 * torch.rand(2, batch, 1, 1, 1, generator=generator) - 1)).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0.0, 1.0)
