"""region_patches: each region's own masked patch tokens, packed over a batch (DESIGN.md section 3).

The input of the packed-region encoding (clipfast/models/packed.py): for every (image b, mask m),
the encoder patches the mask covers, with the pixels outside the mask replaced by the background
(as mask_crop fills them), normalised like the encoder's input, all regions of the batch packed
into one token list with cu_seqlens-style offsets. Coverage per patch is mask_pool's
(reference.mask_patch_counts; the C++, CUDA and Triton backends call mask_pool's counting cores).

The token-selection rule (reference.region_patch_keep): a patch is kept when the mask covers at
least min_coverage of its pixels (at least one pixel with the default 0, so that every mask pixel
reaches the encoder, as in a crop); a region no patch of which reaches that keeps its best-covered
patch(es) instead, so a non-empty region is never dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import backends
from .contracts import register_contract
from .mask_crop import IMAGE_DTYPES, MAX_CHANNELS, OUT_DTYPES, _per_channel
from .mask_pool import MASK_DTYPES, _check_grid


class RegionPatches(NamedTuple):
    pixels: torch.Tensor   # [T, C, patch_h, patch_w] normalised masked patch pixels, out_dtype
    image: torch.Tensor    # [T] int64: the image of each token
    patch: torch.Tensor    # [T] int64: its patch in the image's grid (row-major)
    offsets: torch.Tensor  # [B * M + 1] int64: region b * M + m owns tokens offsets[r] : offsets[r + 1]


def region_patches(
    images: torch.Tensor,
    masks: torch.Tensor,
    grid: tuple[int, int],
    *,
    min_coverage: float = 0.0,
    background: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float32,
    packed_width: int | None = None,
    backend: str = "auto",
) -> RegionPatches:
    """Every region's kept patches, packed: regions in (b, m) order, each one's patches row-major.

    images: [B, C, H, W] uint8 (read as value/255) or float32/bfloat16 in [0, 1], C <= 4, at the
    encoder's input size (H, W multiples of the grid). masks: [B, M, H, W] bool/uint8 (nonzero =
    inside), or bit-packed uint8 [B, M, H, ceil(W/8)] from pack_mask_bits with packed_width=W; pad
    with empty masks (they get no token). grid: (grid_h, grid_w) patches. min_coverage in [0, 1]: the
    share of a patch's pixels the mask must cover for the patch to be kept (see the module doc).
    background in [0, 1] pixel units, before normalisation; mean/std default to 0/1 (no-op).
    """
    grid_h, grid_w = _check_grid(grid, "region_patches")
    channels = _check_inputs(images, masks, grid_h, grid_w, packed_width, min_coverage, background, out_dtype)
    mean = _per_channel(mean, 0.0, channels, "mean", "region_patches")
    std = _per_channel(std, 1.0, channels, "std", "region_patches")
    if any(s <= 0 for s in std):
        raise ValueError(f"region_patches: std must be positive, got {std}")
    patch_pixels = (images.shape[2] // grid_h) * (images.shape[3] // grid_w)
    args = (images, masks, grid_h, grid_w, min_pixels(min_coverage, patch_pixels), float(background), mean, std,
            out_dtype, int(packed_width or 0))
    chosen = backends.resolve("region_patches", backend, images.device)
    return RegionPatches(*backends.call("region_patches", chosen, *args))


def min_pixels(min_coverage: float, patch_pixels: int) -> int:
    """The pixel count min_coverage of a patch stands for: at least 1, at most the whole patch
    (a hair under exact products, so that 0.5 of 256 pixels is 128, not 129)."""
    return min(patch_pixels, max(1, math.ceil(min_coverage * patch_pixels - 1e-9)))


def _check_inputs(images, masks, grid_h, grid_w, packed_width, min_coverage, background, out_dtype) -> int:
    if not isinstance(images, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise TypeError("region_patches: images and masks must be torch tensors")
    if images.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"region_patches: images must be [B, C, H, W] and masks [B, M, H, W], got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    if images.dtype not in IMAGE_DTYPES or masks.dtype not in MASK_DTYPES or out_dtype not in OUT_DTYPES:
        raise TypeError(f"region_patches: images must be uint8/float32/bfloat16 (got {images.dtype}), masks bool/uint8 "
                        f"(got {masks.dtype}), out_dtype float32/bfloat16 (got {out_dtype})")
    if images.device != masks.device:
        raise ValueError(f"region_patches: images are on {images.device} but masks on {masks.device}")
    batch, channels, height, width = images.shape
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"region_patches: images must have 1 to {MAX_CHANNELS} channels, got {channels}")
    row = (width + 7) // 8 if packed_width else width
    if packed_width not in (None, 0, width) or (packed_width and masks.dtype != torch.uint8):
        raise ValueError(f"region_patches: bit-packed masks need packed_width = the images' width {width} and "
                         f"uint8 masks, got packed_width={packed_width!r} and {masks.dtype}")
    if masks.shape[0] != batch or masks.shape[2] != height or masks.shape[3] != row:
        raise ValueError(f"region_patches: masks {tuple(masks.shape)} do not match images {tuple(images.shape)} "
                         f"(expected [B={batch}, M, {height}, {row}])")
    if height == 0 or width == 0 or height % grid_h or width % grid_w:
        raise ValueError(f"region_patches: image size {height}x{width} is not a multiple of the {grid_h}x{grid_w} "
                         "patch grid; resize to the encoder's input size first")
    if not (math.isfinite(min_coverage) and 0.0 <= min_coverage <= 1.0):
        raise ValueError(f"region_patches: min_coverage must be in [0, 1], got {min_coverage!r}")
    if not math.isfinite(background):
        raise ValueError(f"region_patches: background must be finite, got {background!r}")
    return channels


# A clipfast._C built before this op existed lacks it: the cpu/cuda backends then fail when called
# (reinstall), but importing clipfast.ops must not.
if not isinstance(backends.EXTENSION, ImportError) and hasattr(torch.ops.clipfast, "region_patches"):
    register_contract("region_patches", "clipfast::region_patches")
