"""CleanCLIP's objective (Bansal et al., 2023), the repair and baseline loss of DESIGN.md stage 3:
the CLIP contrastive loss plus in-modal self-supervised losses that pull together two augmented
views of the same image and two augmented views of the same caption.

Fine-tuning sets of labels (the compact set) repeat captions; a plain InfoNCE would treat the
identical captions in a batch as negatives. The contrastive term here counts every pair with an
identical caption as a positive (soft targets), which equals CLIP's loss when captions are unique.
With a frozen text tower (repair's default) the text view is skipped: it could not change anything.
"""

from __future__ import annotations

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


def _collapse(log_probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[B, C] log-probabilities -> [B, 2]: log P(one of `classes`), log P(any other)."""
    inside = torch.zeros(log_probs.shape[1], dtype=torch.bool, device=log_probs.device)
    inside[classes.to(log_probs.device)] = True
    return torch.stack([log_probs[:, inside].logsumexp(-1), log_probs[:, ~inside].logsumexp(-1)], -1)


class CleanCLIPObjective:
    """loss = CLIP(image, text) + weight * (CLIP(image, image') + CLIP(text, text'))
    [+ anchor_weight * mean(1 - cos(image, anchor)) over the anchored samples]
    [+ teacher_weight * mean KL(teacher || model) over the taught samples].

    Anchors (optional): the image embeddings of some training samples before fine-tuning
    (normalised, [N, D]), and which samples they hold for (bool [N]): the term keeps those samples'
    embeddings where they were, so the model changes where it must (the trigger) and not elsewhere.
    Teacher (optional): a trusted model's zero-shot class probabilities of some samples ([N, C],
    which: bool [N]) and the model's own class embeddings ([C, D], fixed: a frozen text tower); the
    term pulls the model's zero-shot distribution of those samples to the teacher's."""

    def __init__(self, captions: Sequence[str], tokenizer, self_supervised_weight: float = 1.0, seed: int = 0,
                 text_view: bool = True, anchors: torch.Tensor | None = None, anchored: torch.Tensor | None = None,
                 anchor_weight: float = 0.0, teacher_probs: torch.Tensor | None = None,
                 taught: torch.Tensor | None = None, class_embeddings: torch.Tensor | None = None,
                 teacher_weight: float = 0.0, teacher_classes: torch.Tensor | None = None):
        self.captions = list(captions)
        self.tokenizer = tokenizer
        self.weight = self_supervised_weight
        self.seed = seed
        self.text_view = text_view
        if anchor_weight and (anchors is None or anchored is None or len(anchors) != len(anchored)):
            raise ValueError("CleanCLIPObjective: anchor_weight needs anchors [N, D] and anchored [N]")
        self.anchors, self.anchored, self.anchor_weight = anchors, anchored, anchor_weight
        if teacher_weight and (teacher_probs is None or taught is None or class_embeddings is None
                               or len(teacher_probs) != len(taught)
                               or teacher_probs.shape[1] != len(class_embeddings)):
            raise ValueError("CleanCLIPObjective: teacher_weight needs teacher_probs [N, C], taught [N] and "
                             "class_embeddings [C, D]")
        self.teacher_probs, self.taught, self.class_embeddings = teacher_probs, taught, class_embeddings
        self.teacher_weight = teacher_weight
        self.teacher_classes = teacher_classes

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
        if self.teacher_weight:
            rows = self.taught[batch.indices]
            teacher = self.teacher_probs[batch.indices[rows]].to(images.device, torch.float32)
            own = logit_scale * images[rows.to(images.device)] @ self.class_embeddings.to(images.device, images.dtype).T
            own = own.float().log_softmax(-1)
            if self.teacher_classes is None:
                divergence = F.kl_div(own, teacher, reduction="batchmean")
            else:
                # Only how much these classes are said, against the rest, and only where the model says
                # them more than the teacher: a bound, never a pull towards them.
                own, teacher = _collapse(own, self.teacher_classes), _collapse(teacher.log(), self.teacher_classes).exp()
                above = (own[:, 0].exp() > teacher[:, 0]).float()
                per_sample = F.kl_div(own, teacher, reduction="none").sum(-1)
                divergence = (per_sample * above).sum() / max(len(own), 1)
            out["teacher"] = divergence if len(teacher) else images.sum() * 0
            total = total + self.teacher_weight * out["teacher"]
        if self.text_view:
            text_views = forward.text_tokens(self.tokenizer(views).to(batch.tokens.device))
            out["in_text"] = contrastive_loss(text_features, text_views, logit_scale, same_caption)
            total = total + self.weight * out["in_text"]
        return {"loss": total, **out}
