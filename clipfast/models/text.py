"""Text embeddings without the padding: a causal text tower's pooled token never sees the tokens after
it, so the context can be cut after the batch's last pooled position with the same result.

CLIP tokenizers pad every prompt to the full context (77 tokens for open_clip's models) while a
zero-shot prompt is ~5-15 tokens long: the full-context encode spends ~80 % of its FLOPs on padding
that no pooled feature depends on (causal mask). The scan's text stage (every class x every prompt
template, once per scan) and the repair's frozen caption bank are such encodes: ViT-B-16's 150 world
prompts cut to 10 tokens, 7.6 -> 0.8 s on a 2-core CPU (benchmarks/text_trim.py).

Applies to open_clip's CLIP class (token_embedding, positional_embedding, a causal attn_mask, pooling
at the EOT token: 'argmax' or 'eos'); any other text tower (CustomTextCLIP, CoCa, SigLIP-style towers
without a causal mask or pooling the last position) is encoded by its own encode_text, untrimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn


def pooled_positions(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Each row's pooled position [N] if `model`'s text tower can be trimmed exactly, else None."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    if not all(getattr(model, name, None) is not None for name in needed) or hasattr(model, "text"):
        return None
    mask = model.attn_mask
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] < tokens.shape[1] \
            or not torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1)):
        return None  # not the causal mask: later tokens may reach the pooled one
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    eos = getattr(model, "text_eos_id", None)
    if model.text_pool_type == "eos" and eos is not None:
        return (tokens == eos).int().argmax(dim=-1)
    return None


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """model.encode_text(tokens, normalize) with the context cut after the last pooled position (the
    same features, to float rounding), or model.encode_text itself where that is not exact."""
    positions = pooled_positions(model, tokens)
    if positions is None or len(tokens) == 0:
        return model.encode_text(tokens, normalize=normalize)
    length = int(positions.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x
