"""Region embeddings from ONE encoder pass (ops.mask_pool): the last block's class-token attention
restricted to each mask.

For an open_clip ViT, a region's embedding is the class token's output when, in the last block, it
attends only to the patches under the region's mask (weighted by how much of each patch the mask
covers). All blocks before the last run once per image; the last block's attention for every
(image, mask) is one mask_pool over the value vectors with the per-head query-key logits, followed
by the block's output projection and MLP on the class token only. It approximates encoding each
region's crop; how closely is a measured number, not an assumption.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipfast.ops import mask_pool

from .bundle import ClipBundle


def _checked_vision_tower(model: nn.Module):
    """The open_clip VisionTransformer whose layout this module relies on, or a clear error."""
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    reasons = []
    if visual is None or blocks is None or not len(blocks):
        reasons.append("the image tower is not an open_clip VisionTransformer")
    else:
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            reasons.append("it pools with something other than the class token")
        if getattr(visual, "final_ln_after_pool", False):
            reasons.append("it normalises after pooling")
        if not isinstance(getattr(blocks[-1], "attn", None), nn.MultiheadAttention):
            reasons.append("its last block does not use nn.MultiheadAttention")
        if not getattr(visual.transformer, "batch_first", True):
            reasons.append("its transformer is not batch-first")
    if reasons:
        raise ValueError("pooled region embeddings need a class-token ViT: " + "; ".join(reasons)
                         + " (use the crop regions instead)")
    return visual, blocks


@torch.no_grad()
def encode_regions_pooled(bundle: ClipBundle, images: torch.Tensor, masks: torch.Tensor, *, normalize: bool = True,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and region embeddings from one encoder pass.

    images: [B, 3, S, S] preprocessed encoder input (bundle.preprocess). masks: [B, M, S, S] bool/uint8
    at the encoder's input resolution. Returns image embeddings [B, E] (exactly the model's own),
    region embeddings [B, M, E] and valid [B, M] (False for empty masks, whose rows are meaningless).
    """
    visual, blocks = _checked_vision_tower(bundle.model)
    grid_h, grid_w = (images.shape[-2] // visual.conv1.stride[0], images.shape[-1] // visual.conv1.stride[1])
    x = visual._embeds(images)  # [B, 1 + P, W]
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    image_tokens = last(x)
    image = visual.ln_post(image_tokens[:, 0]) @ visual.proj

    attention: nn.MultiheadAttention = last.attn
    heads, width = attention.num_heads, x.shape[-1]
    head_dim = width // heads
    normed = last.ln_1(x)
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = (attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None))
    query = F.linear(normed[:, 0], w_q, b_q).view(-1, heads, head_dim)            # [B, heads, dh]
    keys = F.linear(normed[:, 1:], w_k, b_k).view(len(x), -1, heads, head_dim)    # [B, P, heads, dh]
    values = F.linear(normed[:, 1:], w_v, b_v)                                      # [B, P, W]
    logits = torch.einsum("bhd,bphd->bhp", query.float(), keys.float()) / math.sqrt(head_dim)
    pooled = mask_pool(values, masks, (grid_h, grid_w), logits=logits, backend=backend)
    cls = x[:, :1] + last.ls_1(attention.out_proj(pooled.pooled))                  # [B, M, W]
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    regions = visual.ln_post(cls) @ visual.proj
    if normalize:
        image, regions = F.normalize(image, dim=-1), F.normalize(regions, dim=-1)
    return image.float(), regions.float(), pooled.valid
