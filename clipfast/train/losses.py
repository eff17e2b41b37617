"""Training objectives. An objective maps (forward, batch) to a dict of scalar losses whose "loss"
entry is optimised; other entries are only logged. Repair plugs in CleanCLIP-style objectives here.

`ClipForward` is how objectives reach the model: CLIP's own forward split into its towers, with the
towers optionally compiled and, when no text parameter trains (repair's frozen text tower), the
training captions' text features computed once instead of every step. It is also where training
goes data-parallel: under torch.distributed each rank encodes its slice of the global batch through
DistributedDataParallel and gets every rank's features back (with gradients), so objectives always
see the whole batch and compute exactly the single-process loss.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from open_clip.loss import ClipLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipfast import distributed
from clipfast.models.bundle import text_tower_trains
from clipfast.models.text import encode_text


@dataclass
class Batch:
    images: torch.Tensor  # preprocessed (normalised) float [B, 3, S, S], augmented if enabled
    tokens: torch.Tensor  # token ids [B, context_length]
    indices: torch.Tensor  # positions of these pairs in the training set [B] (on the host: reading them never syncs)
    step: int = 0  # the optimisation step it belongs to
    part: int = 0  # its micro-batch within the step (gradient accumulation)


class _Towers(nn.Module):
    """CLIP's two encoders behind one forward, so that DistributedDataParallel sees every use."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if images is not None:
            return self.model.encode_image(images, normalize=True)
        return self.model.encode_text(tokens, normalize=True)


class ClipForward:
    """What CLIP.forward computes (normalised image and text features, exp(logit_scale)), tower by
    tower, for a training set whose captions are tokenised once (`tokens`, [N, context]).

    A text tower without trainable parameters gives the same features every step: they are encoded
    once per distinct caption, here, then looked up by sample index (no text forward in the loop).

    Under torch.distributed, image(x) / text_tokens(t) encode this rank's slice of the rows through
    DistributedDataParallel (which averages gradients across ranks) and return all ranks' rows.
    Every rank then computes the loss of the whole batch; the gathered rows' gradients flow back to
    their rank summed over ranks, and DDP's average gives the single-process gradient.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, group: distributed.ProcessGroup | None = None,
                 replicate: bool = True):
        """replicate=False: the model is already sharded (FSDP2 reduces its gradients), no DDP."""
        self.model = model
        self.group = group or distributed.current()
        self.text_frozen = not text_tower_trains(model)
        self._towers: nn.Module = _Towers(model)
        if self.group.distributed and replicate:
            device = next(model.parameters()).device
            self._towers = DistributedDataParallel(self._towers, device_ids=[device] if device.type == "cuda" else None)
        self._run = self._towers
        self._text_bank = None  # [N, D] features of every sample's caption when the text tower is frozen
        if self.text_frozen:
            with torch.no_grad():
                distinct, inverse = torch.unique(tokens, dim=0, return_inverse=True)
                features = torch.cat([encode_text(model, chunk, normalize=True) for chunk in distinct.split(1024)])
            self._text_bank = features[inverse]

    def compiled(self) -> "ClipForward":
        """The same forward with the towers under torch.compile (parameters shared)."""
        twin = copy.copy(self)
        twin._run = torch.compile(self._towers)
        return twin

    @contextlib.contextmanager
    def no_sync(self, skip: bool):
        """Within it, backward passes accumulate gradients without the cross-rank reduction (all
        micro-batches of an accumulated step but the last)."""
        if not skip or not self.group.distributed:
            yield
        elif isinstance(self._towers, DistributedDataParallel):
            with self._towers.no_sync():
                yield
        else:  # FSDP2: the sharded image tower
            self.model.visual.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.visual.set_requires_gradient_sync(True)

    def _sharded(self, rows: torch.Tensor, argument: str) -> torch.Tensor:
        if not self.group.distributed:
            return self._run(**{argument: rows})
        parts = rows.tensor_split(self.group.world_size)
        local = self._run(**{argument: parts[self.group.rank]})
        return distributed.gather_rows(local, self.group, [len(part) for part in parts])

    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self._sharded(images, "images")

    def text(self, batch: Batch) -> torch.Tensor:
        """Features of the batch's own captions."""
        if self._text_bank is None:
            return self.text_tokens(batch.tokens)
        return self._text_bank[batch.indices.to(self._text_bank.device)]

    def text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of arbitrary token rows (e.g. augmented caption views)."""
        return self._sharded(tokens, "tokens")

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
