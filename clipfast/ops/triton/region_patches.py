"""region_patches in Triton: mask_pool's patch-count kernel, the keep rule and the packing order in
torch (reference.region_patch_keep, one nonzero), then one program per kept patch writing its
masked, normalised pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import reference
from ..contracts import register_contract
from ._launch import on_device, pow2_block, wrap_triton
from .mask_pool import _patch_counts_kernel


@triton.jit
def _fill_kernel(
    images_ptr,    # [B, C, H, W] uint8 / float32 / bfloat16
    masks_ptr,     # [B*M, H, row_bytes] uint8: pixels, or bits (pixel x = bit x%8 of byte x//8)
    region_ptr,    # [T] int64: region b*M + m of each token
    patch_ptr,     # [T] int64: its patch, row-major
    mean_ptr,      # [C] float32
    std_ptr,       # [C] float32
    out_ptr,       # [T, C, patch_h, patch_w] out
    num_masks,
    height,
    width,
    row_bytes,
    grid_w,
    patch_h,
    patch_w,
    input_divisor,
    background,
    CHANNELS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,  # pixels of a patch per step
):
    token = tl.program_id(0)
    region = tl.load(region_ptr + token)
    patch = tl.load(patch_ptr + token)
    image = region // num_masks
    patch_pixels = patch_h * patch_w
    mask = masks_ptr + region * height * row_bytes
    out = out_ptr + token.to(tl.int64) * CHANNELS * patch_pixels
    for start in range(0, patch_pixels, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < patch_pixels
        y = (patch // grid_w) * patch_h + i // patch_w
        x = (patch % grid_w) * patch_w + i % patch_w
        if PACKED:
            bits = tl.load(mask + y * row_bytes + (x >> 3), mask=ok, other=0).to(tl.int32)
            inside = ((bits >> (x & 7)) & 1) != 0
        else:
            inside = tl.load(mask + y * row_bytes + x, mask=ok, other=0) != 0
        for c in tl.static_range(CHANNELS):
            pixel = tl.load(images_ptr + ((image * CHANNELS + c) * height + y) * width + x, mask=ok & inside,
                            other=0).to(tl.float32)
            value = tl.where(inside, pixel / input_divisor, background)
            normalised = (value - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
            tl.store(out + c * patch_pixels + i, normalised.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.triton_op("clipfast_triton::region_patches", mutates_args=())
def region_patches(
    images: torch.Tensor,
    masks: torch.Tensor,
    grid_h: int,
    grid_w: int,
    min_pixels: int,
    background: float,
    mean: list[float],
    std: list[float],
    out_dtype: torch.dtype,
    packed_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, height, width = images.shape
    num_masks, row_bytes = masks.shape[1], masks.shape[3]
    patch_h, patch_w = height // grid_h, width // grid_w
    images = images.contiguous()
    masks = masks.contiguous().view(torch.uint8)
    counts = images.new_zeros((batch * num_masks, grid_h * grid_w), dtype=torch.float32)
    if batch * num_masks:
        block_gw, block_pw = pow2_block(grid_w), pow2_block(patch_w)
        block_r = pow2_block(patch_h, high=max(1, 4096 // (block_gw * block_pw)))
        with on_device(images):  # Triton launches on the current device: make it the tensors'
            wrap_triton(_patch_counts_kernel)[(batch * num_masks, grid_h)](
                masks, counts, height, row_bytes, grid_h * grid_w, grid_w, patch_h, patch_w,
                PACKED=bool(packed_width), BLOCK_R=block_r, BLOCK_GW=block_gw, BLOCK_PW=block_pw, num_warps=4,
            )
    kept = reference.region_patch_keep(counts, min_pixels)
    kept_index = torch.nonzero(kept)  # the packing order: region, then patch
    region, patch = kept_index[:, 0].clone(), kept_index[:, 1].clone()  # own storage: fresh outputs
    offsets = F.pad(kept.sum(-1).cumsum(0), (1, 0))
    pixels = images.new_empty((len(region), channels, patch_h, patch_w), dtype=out_dtype)
    if len(region):
        constants = torch.tensor([mean, std], dtype=torch.float32, device=images.device)
        with on_device(images):
            wrap_triton(_fill_kernel)[(len(region),)](
                images, masks, region, patch, constants[0], constants[1], pixels, num_masks, height, width,
                row_bytes, grid_w, patch_h, patch_w, 255.0 if images.dtype == torch.uint8 else 1.0,
                float(background), CHANNELS=channels, PACKED=bool(packed_width),
                BLOCK=pow2_block(patch_h * patch_w, high=1024), num_warps=4,
            )
    return pixels, torch.div(region, num_masks, rounding_mode="floor"), patch, offsets


register_contract("region_patches", region_patches)
