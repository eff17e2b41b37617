"""mask_crop: batched, fused region crops for the encoder (DESIGN.md section 3)."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import backends
from .contracts import register_contract

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8)
OUT_DTYPES = (torch.float32, torch.bfloat16)
MAX_CHANNELS = 4  # kMaxChannels in csrc/kernels/common/mask_crop_common.h


class MaskCrops(NamedTuple):
    crops: torch.Tensor  # [B, M, C, S, S] normalised encoder input
    boxes: torch.Tensor  # [B, M, 4] int32 (y0, x0, y1, x1): the sampling box; zeros for empty masks
    valid: torch.Tensor  # [B, M] bool; False where the mask is empty (crop is all background)


def mask_crop(
    images: torch.Tensor,
    masks: torch.Tensor,
    out_size: int,
    *,
    margin: float = 0.1,
    square: bool = False,
    background: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> MaskCrops:
    """For every (image b, mask m): crop the mask's bounding box grown by floor(margin * side) on
    each side (clipped to the image), fill pixels outside the mask with `background`, bilinear-resize
    to out_size x out_size (align_corners=False) and normalise with the encoder's mean/std.
    square=True keeps the region's aspect ratio instead: a square box of side max(h, w) * (1 + 2 *
    margin) centred on the mask, not clipped, pixels outside the image read as background (see
    reference.mask_box for the exact integer rule).

    images: [B, C, H, W] uint8 (read as value/255) or float32/bfloat16 in [0, 1], C <= 4.
    masks: [B, M, H, W] bool or uint8 (nonzero = inside), on the same device; pad with empty masks.
    background is in [0, 1] pixel units, before normalisation. mean/std default to 0/1 (no-op).
    """
    channels = _check_inputs(images, masks, out_size, margin, background, out_dtype)
    mean = _per_channel(mean, 0.0, channels, "mean")
    std = _per_channel(std, 1.0, channels, "std")
    if any(s <= 0 for s in std):
        raise ValueError(f"mask_crop: std must be positive, got {std}")
    args = (images, masks, int(out_size), float(margin), bool(square), float(background), mean, std, out_dtype)
    chosen = backends.resolve("mask_crop", backend, images.device)
    return MaskCrops(*backends.call("mask_crop", chosen, *args))


def _check_inputs(images, masks, out_size, margin, background, out_dtype) -> int:
    if not isinstance(images, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise TypeError("mask_crop: images and masks must be torch tensors")
    if images.dim() != 4:
        raise ValueError(f"mask_crop: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if masks.dim() != 4:
        raise ValueError(f"mask_crop: masks must be [B, M, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"mask_crop: masks {tuple(masks.shape)} do not match images {tuple(images.shape)}"
                         " (batch and H, W must agree)")
    if images.device != masks.device:
        raise ValueError(f"mask_crop: images are on {images.device} but masks on {masks.device}")
    if images.dtype not in IMAGE_DTYPES:
        raise TypeError(f"mask_crop: images must be uint8, float32 or bfloat16, got {images.dtype}")
    if masks.dtype not in MASK_DTYPES:
        raise TypeError(f"mask_crop: masks must be bool or uint8, got {masks.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"mask_crop: out_dtype must be float32 or bfloat16, got {out_dtype}")
    if not 1 <= images.shape[1] <= MAX_CHANNELS:
        raise ValueError(f"mask_crop: images must have 1 to {MAX_CHANNELS} channels, got {images.shape[1]}")
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"mask_crop: out_size must be a positive int, got {out_size!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"mask_crop: margin must be a finite number >= 0, got {margin!r}")
    if not math.isfinite(background):
        raise ValueError(f"mask_crop: background must be finite, got {background!r}")
    return images.shape[1]


def _per_channel(values, default: float, channels: int, name: str, op: str = "mask_crop") -> list[float]:
    if values is None:
        return [default] * channels
    values = [float(v) for v in values]
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{op}: {name} needs {channels} finite values (one per channel), got {values}")
    return values


if not isinstance(backends.EXTENSION, ImportError):
    register_contract("mask_crop", "clipfast::mask_crop")
