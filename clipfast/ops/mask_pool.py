"""mask_pool: region features from one encoder pass, pooled under masks (DESIGN.md section 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from .contracts import register_contract

FEATURE_DTYPES = (torch.float32, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8)


class MaskPool(NamedTuple):
    pooled: torch.Tensor  # [B, M, D] in the features' dtype; zeros where the mask is empty
    valid: torch.Tensor   # [B, M] bool; False where the mask covers no pixel


def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    grid: tuple[int, int],
    *,
    logits: torch.Tensor | None = None,
    packed_width: int | None = None,
    backend: str = "auto",
) -> MaskPool:
    """Pool patch features under masks: pooled[b, m] = sum_p w x[b, p] / sum_p w, w = the number of
    mask pixels in patch p, times exp(logit - max) when attention logits are given (per head when
    logits are [B, heads, P]: head h pools feature channels h*D/heads .. (h+1)*D/heads).

    features: [B, P, D] float32/bfloat16 patch tokens (no class token), P = grid[0] * grid[1],
    row-major. masks: [B, M, H, W] bool/uint8 at pixel resolution, H and W multiples of the grid
    (patches of H/grid[0] x W/grid[1] pixels); or bit-packed uint8 [B, M, H, ceil(W/8)] from
    pack_mask_bits with packed_width=W. logits: None, [B, P] or [B, heads, P] (e.g. the last
    block's CLS-query attention logits). Differentiable in features and logits.
    """
    grid_h, grid_w = _check_grid(grid)
    _check_inputs(features, masks, grid_h, grid_w, packed_width)
    if logits is not None:
        logits = _check_logits(logits, features)
    args = (features, masks, logits, grid_h, grid_w, int(packed_width or 0))
    chosen = backends.resolve("mask_pool", backend, features.device)
    return MaskPool(*backends.call("mask_pool", chosen, *args))


def _check_grid(grid, op: str = "mask_pool") -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"{op}: grid must be two positive ints (grid_h, grid_w), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_inputs(features, masks, grid_h, grid_w, packed_width) -> None:
    if not isinstance(features, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise TypeError("mask_pool: features and masks must be torch tensors")
    if features.dim() != 3:
        raise ValueError(f"mask_pool: features must be [B, P, D], got shape {tuple(features.shape)}")
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(f"mask_pool: features must be float32 or bfloat16, got {features.dtype}")
    if features.shape[1] != grid_h * grid_w:
        raise ValueError(f"mask_pool: features have {features.shape[1]} tokens but the grid {grid_h}x{grid_w} "
                         f"has {grid_h * grid_w} patches (drop the class token)")
    if masks.dim() != 4 or masks.shape[0] != features.shape[0]:
        raise ValueError(f"mask_pool: masks must be [B={features.shape[0]}, M, H, W], got {tuple(masks.shape)}")
    if masks.device != features.device:
        raise ValueError(f"mask_pool: features are on {features.device} but masks on {masks.device}")
    if masks.dtype not in MASK_DTYPES:
        raise TypeError(f"mask_pool: masks must be bool or uint8, got {masks.dtype}")
    height = masks.shape[2]
    if packed_width:
        if masks.dtype != torch.uint8 or masks.shape[3] != (packed_width + 7) // 8:
            raise ValueError(f"mask_pool: bit-packed masks for width {packed_width} must be uint8 [B, M, H, "
                             f"{(packed_width + 7) // 8}], got {masks.dtype} {tuple(masks.shape)}")
        width = packed_width
    else:
        width = masks.shape[3]
    if height % grid_h or width % grid_w or height == 0 or width == 0:
        raise ValueError(f"mask_pool: mask size {height}x{width} is not a multiple of the {grid_h}x{grid_w} patch "
                         "grid; resize the masks to the encoder's input size first")


def _check_logits(logits, features) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("mask_pool: logits must be a floating-point tensor")
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    batch, patches, dim = features.shape
    if logits.dim() != 3 or logits.shape[0] != batch or logits.shape[2] != patches or dim % logits.shape[1]:
        raise ValueError(f"mask_pool: logits must be [B={batch}, P={patches}] or [B, heads, P] with heads "
                         f"dividing D={dim}, got {tuple(logits.shape)}")
    if logits.device != features.device:
        raise ValueError(f"mask_pool: logits are on {logits.device} but features on {features.device}")
    return logits


if not isinstance(backends.EXTENSION, ImportError):
    register_contract("mask_pool", "clipfast::mask_pool")
