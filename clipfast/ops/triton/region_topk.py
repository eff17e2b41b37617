"""region_topk in Triton: label histogram, bucket scatter of 64-bit rank keys, per-label top-k.

The ranking rule is csrc/kernels/common/region_topk_common.h's key (orderable score << 32) |
(0xFFFFFFFF - index), larger = better (NaN lowest, -0 == +0, ties to the lower index), stored here
with its top bit flipped so that signed int64 order is the key's unsigned order. Keys are unique,
so the result does not depend on the (atomic, unordered) placement within a bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contracts import register_contract
from ._launch import on_device, pow2_block, wrap_triton

_EMPTY_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every real key (low word > 0): "no entry"


@triton.jit
def _label_histogram_kernel(labels_ptr, counts_ptr, num_entries, num_labels, BLOCK: tl.constexpr):
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: no wrap near 2^31
    label = tl.load(labels_ptr + entries, mask=entries < num_entries, other=-1)
    counted = (label >= 0) & (label < num_labels)
    tl.atomic_add(counts_ptr + tl.where(counted, label, 0), 1, mask=counted, sem="relaxed")


@triton.jit
def _rank_keys(score, index):
    """Signed-int64 form of rank_key(score, index): higher score first, then lower index."""
    score = tl.where(score == 0.0, 0.0, score)  # -0 -> +0
    bits = score.to(tl.int32, bitcast=True)
    # Flip the magnitude bits of negatives: signed int32 order becomes float order.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(score != score, -2147483648, ordered)  # NaN below -inf
    low_word = tl.full(index.shape, 0xFFFFFFFF, tl.int64) - index.to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low_word


@triton.jit
def _bucket_scatter_kernel(
    scores_ptr,         # [N] float32
    labels_ptr,         # [N] int64
    cursor_ptr,         # [L] int32 in/out: next free slot of each label's bucket (starts at its offset)
    keys_ptr,           # [N] int64 out: keys grouped by label
    num_entries,
    num_labels,
    BLOCK: tl.constexpr,
):
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: no wrap near 2^31
    in_range = entries < num_entries
    label = tl.load(labels_ptr + entries, mask=in_range, other=-1)
    counted = (label >= 0) & (label < num_labels)
    slot = tl.atomic_add(cursor_ptr + tl.where(counted, label, 0), 1, mask=counted, sem="relaxed")
    score = tl.load(scores_ptr + entries, mask=in_range, other=0.0)
    tl.store(keys_ptr + slot, _rank_keys(score, entries), mask=counted)


@triton.jit
def _bucket_topk_kernel(
    keys_ptr,           # [N] int64, grouped by label
    offsets_ptr,        # [L] int32: start of each label's bucket
    counts_ptr,         # [L] int32: its size
    top_ptr,            # [L, k] int64 out: indices, best first, -1 padded
    k,
    CHUNK: tl.constexpr,
    BEST: tl.constexpr,  # power of two >= max(k, 2), <= CHUNK
):
    label = tl.program_id(0)
    start = tl.load(offsets_ptr + label).to(tl.int64)
    count = tl.load(counts_ptr + label)
    lanes = tl.arange(0, CHUNK).to(tl.int64)  # chunk_start + lanes may pass 2^31 in a bucket near 2^31 long
    # best: the BEST largest keys so far, sorted descending.
    best = tl.full([BEST], _EMPTY_KEY, tl.int64)
    for chunk_start in range(0, count, CHUNK):
        at = chunk_start + lanes
        chunk = tl.load(keys_ptr + start + at, mask=at < count, other=_EMPTY_KEY)
        # Most chunks of a long bucket hold nothing better than the current BEST-th key: skip them.
        if tl.max(chunk, axis=0) > tl.min(best, axis=0):
            chunk_best = tl.topk(chunk, BEST)  # bitonic top-k, sorted descending
            best = tl.topk(tl.reshape(tl.join(best, chunk_best), (2 * BEST,)), BEST)
    rank = tl.arange(0, BEST)
    low_word = tl.full([BEST], 0xFFFFFFFF, tl.int64)
    index = low_word - (best & low_word)
    index = tl.where(best == _EMPTY_KEY, -1, index)
    tl.store(top_ptr + label.to(tl.int64) * k + rank, index, mask=rank < k)


@torch.library.triton_op("clipfast_triton::region_topk", mutates_args=())
def region_topk(
    scores: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_entries = scores.shape[0]
    if num_entries >= 2**31:
        raise ValueError(f"region_topk: the triton backend takes fewer than 2^31 entries, got {num_entries}")
    scores, labels = scores.contiguous(), labels.contiguous()
    counts = torch.zeros(num_labels, dtype=torch.int32, device=scores.device)
    keys = scores.new_empty(num_entries, dtype=torch.int64)
    block = 1024
    grid = (triton.cdiv(num_entries, block),)
    with on_device(scores):  # Triton launches on the current device: make it the tensors'
        if num_entries > 0:
            wrap_triton(_label_histogram_kernel)[grid](
                labels, counts, num_entries, num_labels, BLOCK=block, num_warps=4)
        # Exclusive scan of L counts: tiny glue.
        offsets = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
        if num_entries > 0:
            cursor = offsets.clone()
            wrap_triton(_bucket_scatter_kernel)[grid](
                scores, labels, cursor, keys, num_entries, num_labels, BLOCK=block, num_warps=4)
        top = scores.new_empty((num_labels, k), dtype=torch.int64)
        best = pow2_block(k, low=2)  # tl.topk fails on k=1 (Triton 3.7); the extra lanes are masked
        chunk = max(best, pow2_block(num_entries, high=1024))  # no bucket outgrows N
        wrap_triton(_bucket_topk_kernel)[(num_labels,)](
            keys, offsets, counts, top, k, CHUNK=chunk, BEST=best, num_warps=4 if chunk <= 1024 else 8)
    return counts.to(torch.int64), top


register_contract("region_topk", region_topk)
