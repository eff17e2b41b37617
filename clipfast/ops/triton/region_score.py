"""region_score in Triton: zero-shot softmax over the labels, reduced on the fly.

One program per tile of embedding rows sweeps the label tiles with tl.dot and keeps an online
softmax per row (running max, its lowest index, sum of exp), so the [B, M, C] logits never exist.
Images go first; the region pass then also picks up, in the same sweep, each region's logit for its
image's label (region_image_prob) without reading the regions again. A last light kernel reduces
the discrepancy per image.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contracts import register_contract
from ._launch import INTERPRETED, on_device, pow2_block, wrap_triton


@triton.jit
def _text_scale_kernel(
    text_ptr,           # [C, D]
    scale_ptr,          # [C] float32 out: logit_scale / max(|t_c|, 1e-12)
    num_classes,
    dim,
    logit_scale,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_ok = classes < num_classes
    lanes = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k_start in range(0, dim, BLOCK_K):
        k = k_start + lanes
        t = tl.load(text_ptr + classes.to(tl.int64)[:, None] * dim + k[None, :],
                    mask=class_ok[:, None] & (k < dim)[None, :], other=0.0).to(tl.float32)
        squares += tl.sum(t * t, axis=1)
    # F.normalize's rule: divide by max(norm, eps).
    tl.store(scale_ptr + classes, logit_scale / tl.maximum(tl.sqrt(squares), 1e-12), mask=class_ok)


@triton.jit
def _label_softmax_kernel(
    rows_ptr,           # [R, D] image or region embeddings
    num_rows,
    text_ptr,           # [C, D], same dtype as rows
    text_scale_ptr,     # [C] float32 from _text_scale_kernel
    num_classes,
    dim,
    valid_ptr,          # [R] uint8 (HAS_VALID)
    image_label_ptr,    # [B] int64 (GATHER): the label whose probability each region reports
    rows_per_image,
    label_ptr,          # [R] int64 out: top label, -1 for invalid rows
    prob_ptr,           # [R] float32 out: its probability, 0 for invalid rows
    label_prob_ptr,     # [R] float32 out (GATHER): probability of the image's label, 0 for invalid rows
    HAS_VALID: tl.constexpr,
    GATHER: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    row_base = rows_ptr + rows.to(tl.int64)[:, None] * dim
    lanes = tl.arange(0, BLOCK_K)

    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k_start in range(0, dim, BLOCK_K):
        k = k_start + lanes
        a = tl.load(row_base + k[None, :], mask=row_ok[:, None] & (k < dim)[None, :], other=0.0).to(tl.float32)
        squares += tl.sum(a * a, axis=1)
    row_scale = 1.0 / tl.maximum(tl.sqrt(squares), 1e-12)

    if GATHER:
        target = tl.load(image_label_ptr + rows // rows_per_image, mask=row_ok, other=-1)
        target_logit = tl.zeros([BLOCK_R], dtype=tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_label = tl.zeros([BLOCK_R], dtype=tl.int32)
    exp_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c_start in range(0, num_classes, BLOCK_C):
        classes = c_start + tl.arange(0, BLOCK_C)
        class_ok = classes < num_classes
        text_base = text_ptr + classes.to(tl.int64)[None, :] * dim
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for k_start in range(0, dim, BLOCK_K):
            k = k_start + lanes
            k_ok = k < dim
            a = tl.load(row_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            t = tl.load(text_base + k[:, None], mask=k_ok[:, None] & class_ok[None, :], other=0.0)
            if FP32_INPUTS:
                acc = tl.dot(a, t, acc, input_precision="tf32x3")  # plain tf32 would shift logits by ~0.1
            elif INTERPRETED:
                acc = tl.dot(a.to(tl.float32), t.to(tl.float32), acc)
            else:
                acc = tl.dot(a, t, acc)
        text_scale = tl.load(text_scale_ptr + classes, mask=class_ok, other=0.0)
        logits = acc * row_scale[:, None] * text_scale[None, :]
        logits = tl.where(class_ok[None, :], logits, float("-inf"))
        tile_best = tl.max(logits, axis=1)
        tile_label = tl.argmax(logits, axis=1, tie_break_left=True) + c_start
        new_best = tl.maximum(best, tile_best)
        exp_sum = exp_sum * tl.exp(best - new_best) + tl.sum(tl.exp(logits - new_best[:, None]), axis=1)
        # Strictly greater: on a tie the earlier tile, i.e. the lower label, keeps it.
        best_label = tl.where(tile_best > best, tile_label, best_label)
        best = new_best
        if GATHER:
            target_logit += tl.sum(tl.where(classes[None, :] == target[:, None], logits, 0.0), axis=1)

    if HAS_VALID:
        keep = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        keep = row_ok
    tl.store(label_ptr + rows, tl.where(keep, best_label, -1).to(tl.int64), mask=row_ok)
    tl.store(prob_ptr + rows, tl.where(keep, 1.0 / exp_sum, 0.0), mask=row_ok)  # exp(best - best) / sum
    if GATHER:
        tl.store(label_prob_ptr + rows, tl.where(keep, tl.exp(target_logit - best) / exp_sum, 0.0), mask=row_ok)


@triton.jit
def _discrepancy_kernel(
    image_prob_ptr,         # [B]
    region_image_prob_ptr,  # [B, M], 0 for invalid regions
    discrepancy_ptr,        # [B] out
    batch,
    regions,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    images = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    image_ok = images < batch
    # Starting at 0 matches the reference: invalid regions count as probability 0.
    support = tl.zeros([BLOCK_B], dtype=tl.float32)
    for m_start in range(0, regions, BLOCK_M):
        m = m_start + tl.arange(0, BLOCK_M)
        probs = tl.load(region_image_prob_ptr + images.to(tl.int64)[:, None] * regions + m[None, :],
                        mask=image_ok[:, None] & (m < regions)[None, :], other=0.0)
        support = tl.maximum(support, tl.max(probs, axis=1))
    image_prob = tl.load(image_prob_ptr + images, mask=image_ok, other=0.0)
    tl.store(discrepancy_ptr + images, image_prob - support, mask=image_ok)


def _softmax_launch(rows: int, classes: int, dim: int, fp32: bool) -> dict:
    """Tile sizes and warps for _label_softmax_kernel. Row tiles of 64 re-read the labels least, but
    below ~8K rows they would leave most of an H100's 132 SMs idle: 32 then. tl.dot needs >= 16.
    These stay below 255 registers without spills (fp32's tf32x3 wants the shorter K)."""
    block_r = pow2_block(rows, low=16, high=64 if rows >= 8192 else 32)
    return dict(
        BLOCK_R=block_r,
        BLOCK_C=pow2_block(classes, low=16, high=64),
        BLOCK_K=pow2_block(dim, low=16, high=32 if fp32 else 64),
        num_warps=8 if block_r == 64 else 4,
        num_stages=3,
    )


@torch.library.triton_op("clipfast_triton::region_score", mutates_args=())
def region_score(
    image_embeddings: torch.Tensor,
    region_embeddings: torch.Tensor,
    region_valid: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, dim = image_embeddings.shape
    num_regions = region_embeddings.shape[1]
    num_classes = text_embeddings.shape[0]
    image_embeddings = image_embeddings.contiguous()
    region_embeddings = region_embeddings.contiguous()
    text_embeddings = text_embeddings.contiguous()
    valid = region_valid.contiguous().view(torch.uint8)
    new = image_embeddings.new_empty
    image_label, image_prob = new(batch, dtype=torch.int64), new(batch, dtype=torch.float32)
    region_label = new((batch, num_regions), dtype=torch.int64)
    region_prob = new((batch, num_regions), dtype=torch.float32)
    region_image_prob = new((batch, num_regions), dtype=torch.float32)
    discrepancy = new(batch, dtype=torch.float32)
    if batch == 0:
        return image_label, image_prob, region_label, region_prob, region_image_prob, discrepancy
    fp32 = image_embeddings.dtype == torch.float32

    with on_device(image_embeddings):  # Triton launches on the current device: make it the tensors'
        text_scale = new(num_classes, dtype=torch.float32)
        block_c = pow2_block(num_classes, high=64)
        block_k = pow2_block(dim, high=128)
        wrap_triton(_text_scale_kernel)[(triton.cdiv(num_classes, block_c),)](
            text_embeddings, text_scale, num_classes, dim, float(logit_scale), BLOCK_C=block_c, BLOCK_K=block_k,
            num_warps=4,
        )

        image_launch = _softmax_launch(batch, num_classes, dim, fp32)
        wrap_triton(_label_softmax_kernel)[(triton.cdiv(batch, image_launch["BLOCK_R"]),)](
            image_embeddings, batch, text_embeddings, text_scale, num_classes, dim,
            # No validity or gather here: those pointer slots get a read-only stand-in (never touched;
            # passing an output twice would confuse torch.compile's mutation tracking).
            text_scale, text_scale, 1, image_label, image_prob, text_scale,
            HAS_VALID=False, GATHER=False, FP32_INPUTS=fp32, INTERPRETED=INTERPRETED, **image_launch,
        )
        if num_regions > 0:
            region_rows = batch * num_regions
            region_launch = _softmax_launch(region_rows, num_classes, dim, fp32)
            wrap_triton(_label_softmax_kernel)[(triton.cdiv(region_rows, region_launch["BLOCK_R"]),)](
                region_embeddings, region_rows, text_embeddings, text_scale, num_classes, dim,
                valid, image_label, num_regions, region_label, region_prob, region_image_prob,
                HAS_VALID=True, GATHER=True, FP32_INPUTS=fp32, INTERPRETED=INTERPRETED, **region_launch,
            )

        block_b = pow2_block(batch, high=32)
        block_m = pow2_block(num_regions, high=128)
        wrap_triton(_discrepancy_kernel)[(triton.cdiv(batch, block_b),)](
            image_prob, region_image_prob, discrepancy, batch, num_regions, BLOCK_B=block_b, BLOCK_M=block_m,
            num_warps=4,
        )
    return image_label, image_prob, region_label, region_prob, region_image_prob, discrepancy


register_contract("region_score", region_score)
