"""mask_pool: region features from one encoder pass, pooled under masks (DESIGN.md section 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends, reference

FEATURE_DTYPES = (torch.float32, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8)


class MaskPool(NamedTuple):
    pooled: torch.Tensor  # [B, M, D] in the features' dtype; zeros where the mask is empty
    valid: torch.Tensor   # [B, M] bool; False where the mask covers no pixel


def pack_mask_bits(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bit-pack [..., W] bool/uint8 masks (nonzero = inside) to [..., ceil(W/8)] uint8, pixel x in bit
    x % 8 of byte x // 8 (numpy's bitorder="little"): 8x less memory traffic for mask_pool.
    Returns (packed, W); pass W as mask_pool's packed_width."""
    width = masks.shape[-1]
    padded = torch.nn.functional.pad(masks.bool().to(torch.uint8), (0, (-width) % 8))
    bits = padded.reshape(*padded.shape[:-1], -1, 8) << torch.arange(8, device=masks.device, dtype=torch.uint8)
    return bits.sum(-1, dtype=torch.uint8), width


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


def _check_grid(grid) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"mask_pool: grid must be two positive ints (grid_h, grid_w), got {grid!r}")
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


def fake_mask_pool(features, masks, logits, grid_h, grid_w, packed_width):
    """Output shapes only: the fake kernel of every backend's registered op."""
    batch, _, dim = features.shape
    num_masks = masks.shape[1]
    return features.new_empty((batch, num_masks, dim)), features.new_empty((batch, num_masks), dtype=torch.bool)


def autograd_setup(ctx, inputs, output):
    """Saves what mask_pool_backward needs (every backend's registered op shares it)."""
    features, masks, logits, grid_h, grid_w, packed_width = inputs
    ctx.save_for_backward(features, masks, logits)
    ctx.geometry = (grid_h, grid_w, packed_width)


def autograd_backward(ctx, grad_pooled, grad_valid):
    """Gradients for features and logits from the closed form in reference.mask_pool_backward."""
    features, masks, logits = ctx.saved_tensors
    grad_features, grad_logits = reference.mask_pool_backward(grad_pooled, features, masks, logits, *ctx.geometry)
    return grad_features, None, grad_logits, None, None, None


if not isinstance(backends.EXTENSION, ImportError):
    torch.library.register_fake("clipfast::mask_pool")(fake_mask_pool)
    torch.library.register_autograd("clipfast::mask_pool", autograd_backward, setup_context=autograd_setup)
