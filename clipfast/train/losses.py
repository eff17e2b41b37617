"""Training objectives. An objective maps (forward, batch) to a dict of scalar losses whose "loss"
entry is optimised; other entries are only logged. Repair plugs in CleanCLIP-style objectives here.

`ClipForward` is how objectives reach the model: CLIP's own forward split into its towers, with the
towers optionally compiled and, when no text parameter trains (repair's frozen text tower), the
training captions' text features computed once instead of every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from open_clip.loss import ClipLoss
from torch import nn

from clipfast.models.bundle import text_tower_trains


@dataclass
class Batch:
    images: torch.Tensor  # preprocessed (normalised) float [B, 3, S, S], augmented if enabled
    tokens: torch.Tensor  # token ids [B, context_length]
    indices: torch.Tensor  # positions of these pairs in the training set [B] (on the host: reading them never syncs)


class ClipForward:
    """What CLIP.forward computes (normalised image and text features, exp(logit_scale)), tower by
    tower, for a training set whose captions are tokenised once (`tokens`, [N, context]).

    A text tower without trainable parameters gives the same features every step: they are encoded
    once per distinct caption, here, then looked up by sample index (no text forward in the loop).
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        self.model = model
        self.text_frozen = not text_tower_trains(model)
        self._encode_image, self._encode_text = model.encode_image, model.encode_text
        self._text_bank = None  # [N, D] features of every sample's caption when the text tower is frozen
        if self.text_frozen:
            with torch.no_grad():
                distinct, inverse = torch.unique(tokens, dim=0, return_inverse=True)
                features = torch.cat([model.encode_text(chunk, normalize=True) for chunk in distinct.split(1024)])
            self._text_bank = features[inverse]

    def compiled(self) -> "ClipForward":
        """The same forward with the trained towers under torch.compile (parameters shared)."""
        twin = copy.copy(self)
        twin._encode_image = torch.compile(self.model.encode_image)
        if not self.text_frozen:
            twin._encode_text = torch.compile(self.model.encode_text)
        return twin

    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_image(images, normalize=True)

    def text(self, batch: Batch) -> torch.Tensor:
        """Features of the batch's own captions."""
        if self._text_bank is None:
            return self._encode_text(batch.tokens, normalize=True)
        return self._text_bank[batch.indices.to(self._text_bank.device)]

    def text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of arbitrary token rows (e.g. augmented caption views)."""
        return self._encode_text(tokens, normalize=True)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


class Objective(Protocol):
    def __call__(self, forward: ClipForward, batch: Batch) -> dict[str, torch.Tensor]: ...


class ClipContrastiveObjective:
    """CLIP's symmetric InfoNCE over the batch (open_clip's ClipLoss)."""

    def __init__(self):
        self._clip_loss = ClipLoss(cache_labels=True)

    def __call__(self, forward: ClipForward, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": self._clip_loss(forward.image(batch.images), forward.text(batch), forward.logit_scale())}
