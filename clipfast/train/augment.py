"""Light image augmentation for training on small images (off by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_and_jitter(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2, jitter: float = 0.1) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [0, 1]: random translation by up to max_shift px (edge padding)
    and per-image brightness/contrast jitter of +-jitter. No flips: captions name positions."""
    batch, _, height, width = images.shape
    x = images.float() / 255.0
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])
    brightness, contrast = (1 + jitter * (2 * torch.rand(2, batch, 1, 1, 1, generator=generator) - 1)).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0.0, 1.0)
