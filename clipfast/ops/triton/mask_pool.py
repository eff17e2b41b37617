"""mask_pool in Triton: pixel masks -> per-patch pixel counts, then a batched weighted-average GEMM.

Kernel 1 reduces each mask to its patch grid (one program per mask and patch row). Kernel 2 is, per
image and head, pooled[m, :] = sum_p w[m, p] x[p, :] / sum_p w[m, p] on tensor cores: the weights
(count * exp(logit - max over covered patches)) are rebuilt tile by tile from the counts, so the
[B, M, heads, P] weight tensor never exists. Backward is the reference's closed form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contracts import register_contract
from ._launch import INTERPRETED, on_device, pow2_block, wrap_triton


@triton.jit
def _patch_counts_kernel(
    masks_ptr,          # [B*M, H, row_bytes] uint8: pixels, or bits (pixel x = bit x%8 of byte x//8)
    counts_ptr,         # [B*M, grid_h * grid_w] float32 out: mask pixels per patch
    mask_h,
    row_bytes,
    patches,
    grid_w,
    patch_h,
    patch_w,
    PACKED: tl.constexpr,
    BLOCK_R: tl.constexpr,   # pixel rows per step
    BLOCK_GW: tl.constexpr,  # >= grid_w
    BLOCK_PW: tl.constexpr,  # >= patch_w
):
    item = tl.program_id(0)
    patch_row = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    patch_col = tl.arange(0, BLOCK_GW)
    within = tl.arange(0, BLOCK_PW)
    # Pixel x of lane (patch column, offset within the patch): one row of the band as a 2-d tile.
    x = patch_col[:, None] * patch_w + within[None, :]
    x_ok = (patch_col[:, None] < grid_w) & (within[None, :] < patch_w)
    if PACKED:
        byte_index = x >> 3
        bit_index = x & 7
    else:
        byte_index = x
    mask = masks_ptr + item.to(tl.int64) * mask_h * row_bytes
    # Counts accumulate per lane; one reduction at the end.
    band = tl.zeros([BLOCK_R, BLOCK_GW, BLOCK_PW], dtype=tl.int32)
    for row_start in range(0, patch_h, BLOCK_R):
        row_in_patch = row_start + rows
        y = patch_row * patch_h + row_in_patch
        ok = (row_in_patch < patch_h)[:, None, None] & x_ok[None, :, :]
        raw = tl.load(mask + y[:, None, None] * row_bytes + byte_index[None, :, :], mask=ok, other=0)
        if PACKED:
            inside = (raw.to(tl.int32) >> bit_index[None, :, :]) & 1
        else:
            inside = (raw != 0).to(tl.int32)
        band += inside
    counts = tl.sum(tl.sum(band, axis=2), axis=0)
    out = counts_ptr + item.to(tl.int64) * patches + patch_row * grid_w
    tl.store(out + patch_col, counts.to(tl.float32), mask=patch_col < grid_w)


@triton.jit
def _masked_pool_kernel(
    features_ptr,       # [B, P, D] float32 / bfloat16
    counts_ptr,         # [B, M, P] float32 from _patch_counts_kernel
    logits_ptr,         # [B, heads, P] any float (unused without logits)
    pooled_ptr,         # [B, M, D] out, features' dtype
    valid_ptr,          # [B, M] uint8 out
    num_masks,
    patches,
    dim,
    heads,
    head_dim,
    m_tiles,
    d_tiles,
    HAS_LOGITS: tl.constexpr,
    FP32_FEATURES: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    image = tl.program_id(0) // m_tiles
    m_tile = tl.program_id(0) % m_tiles
    head = tl.program_id(1) // d_tiles
    d_tile = tl.program_id(1) % d_tiles
    masks_idx = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = masks_idx < num_masks
    d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    channel = head * head_dim + d
    count_rows = counts_ptr + (image * num_masks + masks_idx).to(tl.int64)[:, None] * patches
    logit_row = logits_ptr + (image * heads + head).to(tl.int64) * patches
    lanes = tl.arange(0, BLOCK_P)

    # Pass 1: each mask's weight total, with an online max of the covered logits (as in softmax),
    # and its pixel total: valid means the mask covers a pixel, whatever its logits (-inf, NaN) are.
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    pixels = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p_start in range(0, patches, BLOCK_P):
        p = p_start + lanes
        p_ok = p < patches
        count = tl.load(count_rows + p[None, :], mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        pixels += tl.sum(count, axis=1)
        if HAS_LOGITS:
            covered = count > 0
            logit = tl.load(logit_row + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            new_top = tl.maximum(top, tl.max(tl.where(covered, logit, float("-inf")), axis=1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # nothing covered yet: no NaN
            # exp of -inf (not where() after exp): an uncovered patch's logit may exceed the max.
            tile_total = tl.sum(count * tl.exp(tl.where(covered, logit - shift[:, None], float("-inf"))), axis=1)
            total = total * tl.exp(top - shift) + tile_total
            top = new_top
        else:
            total += tl.sum(count, axis=1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    inv_total = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # empty mask: zeros

    # Pass 2: acc[m, d] = sum_p w[m, p] x[p, d] on tensor cores, fp32 accumulation.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    feature_rows = features_ptr + image.to(tl.int64) * patches * dim
    for p_start in range(0, patches, BLOCK_P):
        p = p_start + lanes
        p_ok = p < patches
        weight = tl.load(count_rows + p[None, :], mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        if HAS_LOGITS:
            logit = tl.load(logit_row + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            weight = weight * tl.exp(tl.where(weight > 0, logit - shift[:, None], float("-inf")))
        values = tl.load(feature_rows + p[:, None] * dim + channel[None, :], mask=p_ok[:, None] & d_ok[None, :],
                         other=0.0)
        if FP32_FEATURES:
            acc = tl.dot(weight, values, acc, input_precision="tf32x3")  # ~fp32 accuracy
        else:
            # bf16 features are exact in bf16; the fp32 weights go in as hi + lo bf16 parts (~16 bits).
            weight_hi = weight.to(tl.bfloat16)
            weight_lo = (weight - weight_hi.to(tl.float32)).to(tl.bfloat16)
            if INTERPRETED:
                weight_hi, weight_lo = weight_hi.to(tl.float32), weight_lo.to(tl.float32)
                values = values.to(tl.float32)
            acc = tl.dot(weight_hi, values, acc)
            acc = tl.dot(weight_lo, values, acc)
    pooled = acc * inv_total[:, None]
    out_rows = (image * num_masks + masks_idx).to(tl.int64) * dim
    tl.store(pooled_ptr + out_rows[:, None] + channel[None, :], pooled.to(pooled_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(valid_ptr + image * num_masks + masks_idx, (pixels > 0).to(tl.uint8), mask=m_ok)


@torch.library.triton_op("clipfast_triton::mask_pool", mutates_args=())
def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    logits: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    packed_width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, patches, dim = features.shape
    num_masks, mask_h, row_bytes = masks.shape[1], masks.shape[2], masks.shape[3]
    mask_w = packed_width if packed_width else row_bytes
    features = features.contiguous()
    masks = masks.contiguous().view(torch.uint8)
    pooled = features.new_empty((batch, num_masks, dim))
    valid = features.new_empty((batch, num_masks), dtype=torch.bool)
    if batch * num_masks == 0:
        return pooled, valid
    with on_device(features):  # Triton launches on the current device: make it the tensors'
        counts = features.new_empty((batch, num_masks, patches), dtype=torch.float32)
        patch_h, patch_w = mask_h // grid_h, mask_w // grid_w
        block_gw = pow2_block(grid_w)
        block_pw = pow2_block(patch_w)
        block_r = pow2_block(patch_h, high=max(1, 4096 // (block_gw * block_pw)))
        wrap_triton(_patch_counts_kernel)[(batch * num_masks, grid_h)](
            masks, counts, mask_h, row_bytes, patches, grid_w, patch_h, patch_w,
            PACKED=bool(packed_width), BLOCK_R=block_r, BLOCK_GW=block_gw, BLOCK_PW=block_pw, num_warps=4,
        )

        heads = 1 if logits is None else logits.shape[1]
        head_dim = dim // heads
        logits_arg = counts if logits is None else logits.contiguous()  # any pointer when unused
        # tl.dot needs tiles >= 16. 64 x 64 outputs take 8 warps to stay clear of register spills (fp32's
        # tf32x3 keeps three operand splits live); 2 stages bound shared memory to <= 100 KB.
        block_m = pow2_block(num_masks, low=16, high=64)
        block_d = pow2_block(head_dim, low=16, high=64)
        block_p = 64
        m_tiles, d_tiles = triton.cdiv(num_masks, block_m), triton.cdiv(head_dim, block_d)
        wrap_triton(_masked_pool_kernel)[(batch * m_tiles, heads * d_tiles)](
            features, counts, logits_arg, pooled, valid.view(torch.uint8), num_masks, patches, dim, heads, head_dim,
            m_tiles, d_tiles,
            HAS_LOGITS=logits is not None, FP32_FEATURES=features.dtype == torch.float32,
            INTERPRETED=INTERPRETED, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=block_d,
            num_warps=8 if block_m * block_d >= 4096 else 4, num_stages=2,
        )
    return pooled, valid


register_contract("mask_pool", mask_pool)
