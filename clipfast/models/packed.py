"""Region-isolated encoding in one pass: every region is its own short token sequence, all regions
of all images of a batch are packed with the whole images, and attention stays within each sequence.

A region's sequence is its own class token plus the encoder patches its mask covers
(ops.region_patches: the token-selection rule and the background fill), each patch embedded from
the region's own masked pixels (pixels outside the mask, such as a trigger next to the object, are
background) at the patch's original positional embedding. Every block runs once over the packed
tokens of the whole batch: the linear layers (QKV, output projection, MLP: nearly all the FLOPs)
on one [tokens, width] matrix, the attention per sequence (varlen_attention). So a region's
embedding is exactly the model run on that region's sequence alone (encode_sequence, the per-region
reference loop), and an image's is the model's own; the cost is the tokens actually kept, about one
image's worth per image when regions are disjoint, instead of one image per region.

Supported: open_clip VisionTransformer towers (class token, learned or sin-cos positional
embedding, patch-embedding convolution, blocks of nn.MultiheadAttention; tiny to bigG) at their own
input size; check_vision_tower says what does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipfast.ops import RegionPatches, region_patches

from .bundle import ClipBundle

ATTENTION = ("auto", "runs", "bucketed", "padded", "nested")


def check_vision_tower(model: nn.Module) -> nn.Module:
    """The open_clip VisionTransformer of a CLIP model, whose layout the packed encoding relies on,
    or a ValueError listing everything that does not fit."""
    visual = getattr(model, "visual", model)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    reasons = []
    conv = getattr(visual, "conv1", None)
    if blocks is None or not len(blocks) or not isinstance(conv, nn.Conv2d):
        reasons.append("the image tower is not an open_clip VisionTransformer (conv1 patch embedding + resblocks)")
    else:
        if conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid") or conv.groups != 1 \
                or conv.dilation != (1, 1):
            reasons.append("its patch embedding is not a non-overlapping convolution (kernel = stride)")
        grid = getattr(visual, "grid_size", None)
        embedding = getattr(visual, "positional_embedding", None)
        if grid is None or embedding is None or embedding.shape[0] != grid[0] * grid[1] + 1:
            reasons.append("it has no positional embedding of one class token plus the patch grid")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            reasons.append("it pools with something other than the class token")
        if visual.training and getattr(getattr(visual, "patch_dropout", None), "prob", 0.0) > 0:
            reasons.append("patch dropout is active (put the model in eval mode)")
        for index, block in enumerate(blocks):
            attention = getattr(block, "attn", None)
            if not isinstance(attention, nn.MultiheadAttention) or not attention._qkv_same_embed_dim \
                    or attention.bias_k is not None or attention.add_zero_attn:
                reasons.append(f"block {index} does not use a plain nn.MultiheadAttention (one in_proj, no bias_kv)")
            if any(hasattr(block, name) for name in ("ln_1_kv", "ln_attn", "ln_inner")):
                reasons.append(f"block {index} is not open_clip's plain ResidualAttentionBlock")
            if reasons:
                break
    if reasons:
        raise ValueError("the packed region encoding needs an open_clip class-token ViT: " + "; ".join(reasons)
                         + " (use the crop regions instead)")
    return visual


def packable(model: nn.Module) -> bool:
    """Whether the packed region encoding can take model's image tower (check_vision_tower)."""
    try:
        check_vision_tower(model)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------- the sequences

@dataclass
class Sequences:
    """Packed sequences: sequence s holds rows offsets[s] : offsets[s + 1] of the token matrix.
    lengths is on the host (the attention plans from it); offsets on the tokens' device."""

    offsets: torch.Tensor  # [S + 1] int64
    lengths: torch.Tensor  # [S] int64, CPU


def packed_layout(region_lengths: torch.Tensor, batch: int, patches: int) -> tuple[torch.Tensor, Sequences]:
    """Where the packed encoder puts each sequence: the B whole images (1 + patches rows each) first,
    then every region that kept a patch (its class token, then its kept patches), sorted by length:
    equal lengths are neighbours (one "runs" SDPA each), and a length bucket's rows are gathered in
    order. region_lengths: [R] kept patches per region (0: no sequence). Returns each kept region's
    first (class-token) row [R] (unspecified for the others) and the sequences in row order."""
    device, whole = region_lengths.device, 1 + patches
    kept = torch.nonzero(region_lengths > 0).flatten()
    order = kept[torch.argsort(region_lengths[kept], stable=True)]
    length = 1 + region_lengths[order]
    base = batch * whole
    start = torch.zeros_like(region_lengths)
    start[order] = base + F.pad(torch.cumsum(length, 0), (1, 0))[:-1]
    offsets = torch.cat([torch.arange(batch, device=device) * whole, start[order],
                         torch.tensor([base + int(length.sum())], device=device)])
    lengths = torch.cat([torch.full((batch,), whole, device=device), length]).cpu()
    return start, Sequences(offsets, lengths)


def _bucket_sizes(longest: int) -> list[int]:
    """Padded lengths of the bucketed attention: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (x1.5 / x1.33
    steps), so a sequence is padded by at most half its length and a batch has ~2 log2(longest)
    buckets."""
    sizes, size = [], 1
    while size < longest:
        sizes.append(size)
        size = size + 1 if size < 2 else (size // 2) * 3 if size & (size - 1) == 0 else (size // 3) * 4
    return sizes + [longest]


class _Bucket:
    """Sequences padded to one length L, as rows of the packed token matrix: `span` (lo, hi) when they
    are consecutive rows and none is padded (the whole images: a view, no copy); else the [n * L]
    rows to gather (a padded position repeats its sequence's first row), the key mask [n, 1, 1, L]
    (None when none is padded) and the real positions with their rows, to write results back."""

    def __init__(self, sequences: Sequences, members: torch.Tensor, length: int, device: torch.device):
        lengths = sequences.lengths[members]
        position = torch.arange(length)
        inside = position[None] < lengths[:, None]  # [n, L]
        rows = (sequences.offsets.cpu()[members][:, None] + torch.where(inside, position[None], 0)).flatten()
        self.length, self.count = length, len(members)
        padded = not bool(inside.all())
        consecutive = not padded and bool((rows.diff() == 1).all()) if len(rows) > 1 else not padded
        self.span = (int(rows[0]), int(rows[0]) + len(rows)) if consecutive and len(rows) else None
        self.rows = rows.to(device)
        self.keys = inside[:, None, None, :].to(device) if padded else None
        real = torch.nonzero(inside.flatten()).flatten()
        self.real, self.real_rows = real.to(device), rows[real].to(device)


def _runs(sequences: Sequences) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive sequences of one length: (first row, count, length) each."""
    runs = []
    for first, length in zip(sequences.offsets.tolist(), sequences.lengths.tolist()):
        if runs and runs[-1][2] == length:
            runs[-1][1] += 1
        else:
            runs.append([first, 1, length])
    return [tuple(run) for run in runs]


def resolve_attention(attention: str, device: torch.device) -> str:
    """The attention method `auto` stands for on `device`. CUDA: SDPA over a jagged nested tensor,
    which dispatches to the flash / memory-efficient varlen kernels (cu_seqlens, no padding, one
    launch per block). CPU: torch 2.13 has no varlen kernel there and runs jagged SDPA as a slow
    per-sequence fallback; runs of length buckets, each one dense SDPA over a view of the rows, are
    the fastest exact method measured (benchmarks/varlen_attention.py)."""
    if attention == "auto":
        return "nested" if device.type == "cuda" else "runs"
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    return attention


class AttentionPlan:
    """How varlen_attention runs over a fixed set of sequences, made once per batch and reused by
    every block. runs: each run of consecutive equal-length sequences is one dense SDPA over a view
    of the token matrix (packed_layout makes one run per distinct length). bucketed / padded: the
    sequences gathered into padded length buckets / into one padded batch, with key masks. nested:
    SDPA over a jagged nested tensor."""

    def __init__(self, sequences: Sequences, method: str, device: torch.device):
        method = resolve_attention(method, device)
        self.method, self.sequences = method, sequences
        lengths = sequences.lengths
        if method == "nested":
            self.offsets = sequences.offsets.to(device)
            return
        if method == "runs":
            self.runs = _runs(sequences)
            return
        if method == "padded":  # one bucket: every sequence padded to the longest
            self.buckets = [_Bucket(sequences, torch.arange(len(lengths)), int(lengths.max()), device)]
            return
        sizes = torch.tensor(_bucket_sizes(int(lengths.max())))
        which = torch.bucketize(lengths, sizes)  # the smallest size >= the length
        self.buckets = [_Bucket(sequences, torch.nonzero(which == k).flatten(), int(sizes[k]), device)
                        for k in torch.unique(which).tolist()]


def varlen_attention(qkv: torch.Tensor, heads: int, plan: AttentionPlan) -> torch.Tensor:
    """Softmax attention within each sequence of the plan: row i attends exactly to the rows of its
    own sequence. qkv: [N, 3 * width] packed rows (queries, keys, values: an attention in-projection's
    output); returns [N, width], the heads' outputs side by side."""
    count, width = len(qkv), qkv.shape[1] // 3
    if plan.method == "nested":
        q, k, v = (t.contiguous() for t in qkv.view(count, 3, heads, width // heads).unbind(1))
        nested = [torch.nested.nested_tensor_from_jagged(t, plan.offsets).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*nested).transpose(1, 2).values().reshape(count, width)
    out = qkv.new_empty(count, width)
    if plan.method == "runs":
        for first, sequences, length in plan.runs:
            rows = slice(first, first + sequences * length)
            q, k, v = qkv[rows].view(sequences, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            out[rows] = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, width)
        return out
    for bucket in plan.buckets:
        # Whole rows of qkv, copied once per bucket (index_select on the contiguous 2-d matrix).
        rows = qkv[bucket.span[0]: bucket.span[1]] if bucket.span else qkv.index_select(0, bucket.rows)
        q, k, v = rows.view(bucket.count, bucket.length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.keys).transpose(1, 2).reshape(-1, width)
        if bucket.span:
            out[bucket.span[0]: bucket.span[1]] = o
        elif bucket.keys is None:
            out.index_copy_(0, bucket.rows, o)
        else:  # padded positions repeat their sequence's first row: write back only the real ones
            out.index_copy_(0, bucket.real_rows, o.index_select(0, bucket.real))
    return out


# ------------------------------------------------------------------------------- the encoder

def _block_forward(block: nn.Module, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock over packed rows [N, width], attention within sequences."""
    attention: nn.MultiheadAttention = block.attn
    heads = attention.num_heads
    qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)
    x = x + block.ls_1(attention.out_proj(varlen_attention(qkv, heads, plan)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _project(visual: nn.Module, class_tokens: torch.Tensor) -> torch.Tensor:
    """The tower's head on class-token rows: ln_post (per token, so before or after pooling alike)
    and the projection."""
    pooled = visual.ln_post(class_tokens)
    return pooled @ visual.proj if visual.proj is not None else pooled


def _class_row(visual: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return visual.class_embedding.to(dtype) + visual.positional_embedding[0].to(dtype)


def _patch_embed(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch embeddings of single patches [T, C, ph, pw] -> [T, width]: the patch convolution as the
    matrix product it is on one patch."""
    conv: nn.Conv2d = visual.conv1
    weight = conv.weight.flatten(1)  # under autocast, linear runs in the autocast dtype as conv1 does
    return F.linear(pixels.flatten(1).to(weight.dtype), weight, conv.bias)


@torch.no_grad()
def encode_packed(visual: nn.Module, pixels: torch.Tensor, regions: RegionPatches, num_masks: int, *,
                  attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and region embeddings (unnormalised) from one packed pass.

    visual: an open_clip VisionTransformer (check_vision_tower). pixels: [B, 3, S, S] the whole
    images, preprocessed for the tower at its own input size. regions: ops.region_patches of the
    same images' [B, num_masks] masks on the tower's patch grid. Returns image embeddings [B, E],
    region embeddings [B, num_masks, E] (zeros where a mask kept no patch) and valid [B, num_masks].
    """
    batch, device = len(pixels), pixels.device
    grid = visual.grid_size
    patches = grid[0] * grid[1]
    if tuple(pixels.shape[-2:]) != tuple(visual.image_size) or len(regions.offsets) != batch * num_masks + 1:
        raise ValueError(f"encode_packed: images must be the tower's {tuple(visual.image_size)} input and regions "
                         f"those of their {batch} x {num_masks} masks, got {tuple(pixels.shape)} and "
                         f"{len(regions.offsets) - 1} regions")
    images = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, P, W], the model's own patch embedding
    dtype = images.dtype
    tokens = _patch_embed(visual, regions.pixels).to(dtype)  # [T, W]

    method = resolve_attention(attention, device)
    lengths = regions.offsets.diff()
    valid = lengths > 0
    kept = torch.nonzero(valid).flatten()
    start, sequences = packed_layout(lengths, batch, patches)
    region_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    within = torch.arange(len(tokens), device=device) - regions.offsets[region_of_token]  # place in its region
    token_rows = start[region_of_token] + 1 + within
    class_rows = torch.cat([sequences.offsets[:batch], start[kept]])  # images, then regions in (b, m) order

    position = visual.positional_embedding.to(dtype)
    x = torch.empty(int(sequences.offsets[-1]), images.shape[-1], dtype=dtype, device=device)
    x[: batch * (1 + patches)].view(batch, 1 + patches, -1)[:, 1:] = images + position[1:]
    x[class_rows] = _class_row(visual, dtype)
    x[token_rows] = tokens + position[1 + regions.patch]
    x = visual.ln_pre(x)

    plan = AttentionPlan(sequences, method, device)
    for block in visual.transformer.resblocks:
        x = _block_forward(block, x, plan)
    pooled = _project(visual, x[class_rows])
    region_embeddings = pooled.new_zeros(batch * num_masks, pooled.shape[-1])
    region_embeddings[kept] = pooled[batch:]
    return pooled[:batch], region_embeddings.view(batch, num_masks, -1), valid.view(batch, num_masks)


def tower_flops(visual: nn.Module, lengths: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per multiply-accumulate) of the tower on sequences of these lengths (a
    class token plus L - 1 patches each): the patch embedding, every block's projections, MLP and
    attention scores and mixing (4 L^2 width), and the head. A whole image is one sequence of
    1 + grid_h * grid_w; the packed encoding's are its images' and regions' sequences. Counted, not
    traced: FlopCounterMode sees no CPU attention kernel."""
    lengths = lengths.to(torch.int64)
    conv = visual.conv1
    width, patch_inputs = conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    tokens, squares = int(lengths.sum()), int((lengths * lengths).sum())
    per_block = 0
    for block in visual.transformer.resblocks:
        hidden = block.mlp.c_fc.out_features
        per_block += 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * squares * width
    head = 2 * width * visual.proj.shape[1] if visual.proj is not None else 0
    return 2 * (tokens - len(lengths)) * patch_inputs * width + per_block + len(lengths) * head


@torch.no_grad()
def encode_sequence(visual: nn.Module, pixels: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """The per-region reference: the tower run, with its own modules, on one region's sequence
    alone: its class token and its patches [L, C, ph, pw] (region_patches' pixels) at positions
    patch [L]. Returns the unnormalised embedding [E]."""
    embedded = visual.conv1(pixels).flatten(1)  # each patch as a one-patch image: [L, W]
    dtype = embedded.dtype
    x = torch.cat([_class_row(visual, dtype)[None], embedded + visual.positional_embedding[1 + patch].to(dtype)])
    x = visual.transformer(visual.ln_pre(x)[None])
    return _project(visual, x[0, 0])


@torch.no_grad()
def encode_regions_packed(bundle: ClipBundle, pixels: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, *,
                          background: float, min_coverage: float = 0.0, token_budget: int | None = None,
                          attention: str = "auto", backend: str = "auto",
                          normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and region embeddings of a batch, every region isolated, in packed passes.

    pixels: [B, 3, S, S] the images preprocessed (bundle.preprocess); images: the same images at
    S x S before normalisation (uint8, or float in [0, 1]); masks: [B, M, S, S] at the encoder's
    input resolution (bundle.resize_masks), empty where a region is not to be encoded. background
    and min_coverage: region_patches' fill (in [0, 1] pixel units) and token rule. token_budget:
    at most this many tokens per pass (whole images per pass; default: everything in one).
    Returns image embeddings [B, E], region embeddings [B, M, E] and valid [B, M], float32.
    """
    visual = check_vision_tower(bundle.model)
    regions = region_patches(images, masks, visual.grid_size, min_coverage=min_coverage, background=background,
                             mean=bundle.mean, std=bundle.std, out_dtype=pixels.dtype, backend=backend)
    batch, num_masks = masks.shape[:2]
    # Tokens of each image's pass: its own sequence, and its regions' patches and class tokens.
    bounds = regions.offsets[:: max(num_masks, 1)].cpu() if num_masks else torch.zeros(batch + 1, dtype=torch.int64)
    tokens_per_image = bounds.diff() + num_masks + 1 + visual.grid_size[0] * visual.grid_size[1]
    outputs = []
    for lo, hi in _chunks(tokens_per_image, token_budget):
        first, last = int(bounds[lo]), int(bounds[hi])
        part = RegionPatches(regions.pixels[first:last], regions.image[first:last] - lo, regions.patch[first:last],
                             regions.offsets[lo * num_masks: hi * num_masks + 1] - first)
        outputs.append(encode_packed(visual, pixels[lo:hi], part, num_masks, attention=attention))
    if not outputs:  # no images
        dim = visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels
        image = pixels.new_zeros(0, dim)
        return image, image.new_zeros(0, num_masks, dim), masks.new_zeros(0, num_masks, dtype=torch.bool)
    image, region, valid = (torch.cat(parts) for parts in zip(*outputs))
    if normalize:
        image, region = F.normalize(image.float(), dim=-1), F.normalize(region.float(), dim=-1)
    return image.float(), region.float(), valid


def _chunks(tokens_per_image: torch.Tensor, budget: int | None) -> list[tuple[int, int]]:
    """Consecutive image ranges of at most `budget` tokens each (always at least one image)."""
    count = len(tokens_per_image)
    if budget is None or count == 0:
        return [(0, count)] if count else []
    ranges, lo, total = [], 0, 0
    for i, n in enumerate(tokens_per_image.tolist()):
        if i > lo and total + n > budget:
            ranges.append((lo, i))
            lo, total = i, 0
        total += n
    return ranges + [(lo, count)]
