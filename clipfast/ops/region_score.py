"""region_score: whole-image vs region zero-shot scores, reduced per image (DESIGN.md section 3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import backends
from .contracts import register_contract


class RegionScores(NamedTuple):
    image_label: torch.Tensor        # [B] int64: whole-image top label
    image_prob: torch.Tensor         # [B]: its probability
    region_label: torch.Tensor       # [B, M] int64: each region's top label (-1 for invalid regions)
    region_prob: torch.Tensor        # [B, M]: its probability (0 for invalid regions)
    region_image_prob: torch.Tensor  # [B, M]: each region's probability for the whole-image label
    discrepancy: torch.Tensor        # [B]: image_prob - max_j region_image_prob (high = no region supports the label)


def region_score(image_embeddings: torch.Tensor, region_embeddings: torch.Tensor, region_valid: torch.Tensor,
                 text_embeddings: torch.Tensor, logit_scale: float, *, backend: str = "auto") -> RegionScores:
    """Softmax(logit_scale * cos) over the C labels for every image and region, reduced without
    keeping [B, M, C]: see RegionScores. Embeddings need not be normalised; invalid (padded) regions
    are ignored."""
    for name, tensor, dims in (("image_embeddings", image_embeddings, 2), ("region_embeddings", region_embeddings, 3),
                               ("region_valid", region_valid, 2), ("text_embeddings", text_embeddings, 2)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
            raise ValueError(f"region_score: {name} must be a {dims}-d tensor, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    batch, dim = image_embeddings.shape
    if region_embeddings.shape[0] != batch or region_embeddings.shape[2] != dim:
        raise ValueError(f"region_score: region_embeddings {tuple(region_embeddings.shape)} do not match "
                         f"image_embeddings {tuple(image_embeddings.shape)}")
    if tuple(region_valid.shape) != tuple(region_embeddings.shape[:2]):
        raise ValueError(f"region_score: region_valid {tuple(region_valid.shape)} must be [B, M] = "
                         f"{tuple(region_embeddings.shape[:2])}")
    if text_embeddings.shape[1] != dim or text_embeddings.shape[0] == 0:
        raise ValueError(f"region_score: text_embeddings must be [C >= 1, {dim}], got {tuple(text_embeddings.shape)}")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"region_score: logit_scale must be a positive finite number, got {logit_scale!r}")
    for name, tensor in (("image_embeddings", image_embeddings), ("region_embeddings", region_embeddings),
                         ("text_embeddings", text_embeddings)):
        if not tensor.is_floating_point():
            raise TypeError(f"region_score: {name} must be floating point, got {tensor.dtype}")
    # Compiled kernels take one dtype: bf16 when every input is bf16, else fp32 (what the reference computes in).
    dtype = torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in (image_embeddings, region_embeddings,
                                                                      text_embeddings)) else torch.float32
    image_embeddings, region_embeddings, text_embeddings = (
        t.to(dtype) for t in (image_embeddings, region_embeddings, text_embeddings))
    if region_valid.dtype != torch.bool:
        region_valid = region_valid != 0
    for name, tensor in (("region_embeddings", region_embeddings), ("region_valid", region_valid),
                         ("text_embeddings", text_embeddings)):
        if tensor.device != image_embeddings.device:
            raise ValueError(f"region_score: {name} is on {tensor.device} but image_embeddings on "
                             f"{image_embeddings.device}")
    chosen = backends.resolve("region_score", backend, image_embeddings.device)
    return RegionScores(*backends.call("region_score", chosen, image_embeddings, region_embeddings, region_valid,
                                       text_embeddings, float(logit_scale)))


if not isinstance(backends.EXTENSION, ImportError):
    register_contract("region_score", "clipfast::region_score")
