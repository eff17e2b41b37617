"""Training objectives. An objective maps (model, batch) to a dict of scalar losses whose "loss"
entry is optimised; other entries are only logged. Repair plugs in CleanCLIP-style objectives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from open_clip.loss import ClipLoss
from torch import nn


@dataclass
class Batch:
    images: torch.Tensor  # preprocessed (normalised) float [B, 3, S, S], augmented if enabled
    tokens: torch.Tensor  # token ids [B, context_length]
    indices: torch.Tensor  # positions of these pairs in the training set [B], e.g. to look up captions


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...


class ClipContrastiveObjective:
    """CLIP's symmetric InfoNCE over the batch (open_clip's ClipLoss)."""

    def __init__(self):
        self._clip_loss = ClipLoss(cache_labels=True)

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        image_features, text_features, logit_scale = model(batch.images, batch.tokens)[:3]
        return {"loss": self._clip_loss(image_features, text_features, logit_scale)}
