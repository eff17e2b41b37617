"""Bit-packed masks: [..., W] bool <-> [..., ceil(W/8)] uint8, pixel x in bit x % 8 of byte x // 8
(numpy's bitorder="little"). mask_pool reads them directly (8x less memory traffic), and the scan
ships its trigger regions packed between ranks."""

from __future__ import annotations

import torch


def pack_mask_bits(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bit-pack [..., W] bool/uint8 masks (nonzero = inside). Returns (packed, W); pass W as
    mask_pool's packed_width."""
    width = masks.shape[-1]
    padded = torch.nn.functional.pad(masks.bool().to(torch.uint8), (0, (-width) % 8))
    bits = padded.reshape(*padded.shape[:-1], -1, 8) << torch.arange(8, device=masks.device, dtype=torch.uint8)
    return bits.sum(-1, dtype=torch.uint8), width


def unpack_mask_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """[..., ceil(W/8)] uint8 from pack_mask_bits -> [..., W] bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :width].bool()
