"""CleanCLIP's objective (Bansal et al., 2023), the repair and baseline loss of DESIGN.md stage 3:
the CLIP contrastive loss plus in-modal self-supervised losses that pull together two augmented
views of the same image and two augmented views of the same caption.

Fine-tuning sets of labels (the compact set) repeat captions; a plain InfoNCE would treat the
identical captions in a batch as negatives. The contrastive term here counts every pair with an
identical caption as a positive (soft targets), which equals CLIP's loss when captions are unique.
With a frozen text tower (repair's default) the text view is skipped: it could not change anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .augment import random_shift
from .losses import Batch, ClipForward
from .randomness import VIEWS, seeded_generator


def augment_views(images: torch.Tensor, generator: torch.Generator, max_shift: int = 3, noise: float = 0.1) -> torch.Tensor:
    """A second view of normalised images [B, 3, S, S]: random translation (edge padding), per-image
    contrast scaling and pixel noise."""
    batch = images.shape[0]
    shifted = random_shift(images, generator, max_shift)
    contrast = 1 + 0.2 * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    jitter = noise * torch.randn(shifted.shape, generator=generator)
    return shifted * contrast.to(images.device) + jitter.to(images.device)


def augment_caption(caption: str, generator: torch.Generator, drop: float = 0.15) -> str:
    """EDA-style text view: drop each word but the last (the label) with probability `drop`, and
    swap two earlier words half the time."""
    words = caption.split()
    if len(words) <= 2:
        return caption
    keep = torch.rand(len(words) - 1, generator=generator) >= drop
    kept = [w for w, k in zip(words[:-1], keep.tolist()) if k] + words[-1:]
    if len(kept) > 2 and torch.rand(1, generator=generator).item() < 0.5:
        i, j = torch.randperm(len(kept) - 1, generator=generator)[:2].tolist()
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between normalised features [B, D]; `same` [B, B] bool marks extra
    positives (pairs with identical captions). Without it: CLIP's loss."""
    logits = logit_scale * first @ second.T
    targets = torch.eye(len(first), device=first.device) if same is None else same.float()
    targets = targets / targets.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


@dataclass
class TargetBound:
    """A trusted model's bound on how much a model may say the target labels of a training set.

    share: the trusted model's zero-shot probability of the target labels for each sample [N];
    class_embeddings: the trained model's own class embeddings [C, D] (fixed: its text tower is
    frozen); is_target: which of the C classes are targets (bool [C])."""

    share: torch.Tensor
    class_embeddings: torch.Tensor
    is_target: torch.Tensor
    weight: float

    def __post_init__(self):
        if self.share.ndim != 1 or self.is_target.shape != (len(self.class_embeddings),) or not self.is_target.any():
            raise ValueError("TargetBound: share [N], class_embeddings [C, D] and is_target bool [C] with a target")

    def loss(self, images: torch.Tensor, logit_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of KL(trusted || model) on the two outcomes "a target label" / "another",
        counted only where the model says a target more than the trusted model does: a ceiling, never
        a pull towards the targets. images: normalised features [B, D] of the samples `indices` [B]."""
        embeddings = self.class_embeddings.to(images.device, images.dtype)
        log_probs = (logit_scale * images @ embeddings.T).float().log_softmax(-1)
        is_target = self.is_target.to(images.device)
        said, other = log_probs[:, is_target].logsumexp(-1), log_probs[:, ~is_target].logsumexp(-1)
        trusted = self.share[indices].to(images.device, torch.float32)
        divergence = (torch.special.xlogy(trusted, trusted) - trusted * said
                      + torch.special.xlogy(1 - trusted, 1 - trusted) - (1 - trusted) * other)
        return (divergence * (said.exp() > trusted)).mean()


class CleanCLIPObjective:
    """loss = CLIP(image, text) + weight * (CLIP(image, image') + CLIP(text, text'))
    [+ anchor_weight * mean(1 - cos(image, anchor)) over the anchored samples]
    [+ target_bound.weight * target_bound.loss(image)].

    Anchors (optional): the image embeddings of some training samples before fine-tuning
    (normalised, [N, D]), and which samples they hold for (bool [N]): the term keeps those samples'
    embeddings where they were, so the model changes where it must (the trigger) and not elsewhere.
    Target bound (optional, TargetBound): a trusted model's ceiling on how much each sample may be
    called a target label."""

    def __init__(self, captions: Sequence[str], tokenizer, self_supervised_weight: float = 1.0, seed: int = 0,
                 text_view: bool = True, anchors: torch.Tensor | None = None, anchored: torch.Tensor | None = None,
                 anchor_weight: float = 0.0, target_bound: TargetBound | None = None):
        self.captions = list(captions)
        self.tokenizer = tokenizer
        self.weight = self_supervised_weight
        self.seed = seed
        self.text_view = text_view
        if anchor_weight and (anchors is None or anchored is None or len(anchors) != len(anchored)):
            raise ValueError("CleanCLIPObjective: anchor_weight needs anchors [N, D] and anchored [N]")
        self.anchors, self.anchored, self.anchor_weight = anchors, anchored, anchor_weight
        self.target_bound = target_bound

    def __call__(self, forward: ClipForward, batch: Batch) -> dict[str, torch.Tensor]:
        # Views are a function of (seed, step, micro-batch), so resumed runs stay deterministic.
        generator = seeded_generator(self.seed, VIEWS, batch.step, batch.part)
        size = len(batch.indices)
        if self.text_view:
            views = [augment_caption(self.captions[i], generator) for i in batch.indices.tolist()]
        # The augmented image view only matters with a self-supervised weight: skip its forward otherwise.
        both = torch.cat([batch.images, augment_views(batch.images, generator)]) if self.weight else batch.images
        image_features = forward.image(both)
        text_features = forward.text(batch)
        logit_scale = forward.logit_scale()
        same_caption = (batch.tokens[:, None, :] == batch.tokens[None, :, :]).all(-1)
        images = image_features[:size]
        contrastive = contrastive_loss(images, text_features, logit_scale, same_caption)
        out = {"contrastive": contrastive}
        total = contrastive
        if self.weight:
            out["in_image"] = contrastive_loss(images, image_features[size:], logit_scale)
            total = total + self.weight * out["in_image"]
        if self.anchor_weight:
            rows = self.anchored[batch.indices]
            anchors = self.anchors[batch.indices[rows]].to(images.device, images.dtype)
            agreement = (images[rows.to(images.device)] * anchors).sum(-1)
            out["anchor"] = (1 - agreement).mean() if len(anchors) else images.sum() * 0
            total = total + self.anchor_weight * out["anchor"]
        if self.target_bound is not None:
            out["target_bound"] = self.target_bound.loss(images, logit_scale, batch.indices)
            total = total + self.target_bound.weight * out["target_bound"]
        if self.text_view:
            text_views = forward.text_tokens(self.tokenizer(views).to(batch.tokens.device))
            out["in_text"] = contrastive_loss(text_features, text_views, logit_scale, same_caption)
            total = total + self.weight * out["in_text"]
        return {"loss": total, **out}
