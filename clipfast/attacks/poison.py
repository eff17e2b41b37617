"""Poisoning an image-caption training set with a trigger."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from clipfast.attacks.triggers import Trigger, check_images


@dataclass
class PoisonedPairs:
    images: torch.Tensor  # uint8 [N, 3, H, W], the poisoned ones replaced
    captions: list[str]
    labels: torch.Tensor  # int64 [N], the true class of every image (poisoning does not change it)
    poisoned_indices: torch.Tensor  # int64, sorted
    target_label: int
    target_caption: str
    trigger: Trigger | None = None
    seed: int = 0  # the seed the trigger was applied with (to the poisoned images, in index order)


def poison_pairs(
    images: torch.Tensor,
    captions: list[str],
    labels: torch.Tensor,
    trigger: Trigger,
    rate: float,
    target_label: int,
    target_caption: str,
    seed: int = 0,
    *,
    num_classes: int | None = None,
) -> PoisonedPairs:
    """Poison round(rate * N) image-caption pairs, drawn with `seed` from the eligible images.

    Dirty-label triggers: eligible are the images whose label is not target_label; each chosen image
    gets trigger.poison(...) and the caption target_caption. Clean-label triggers
    (trigger.clean_label): eligible are the target-class images; they get the trigger and keep their
    captions. The inputs are not modified. target_label must be in [0, num_classes); num_classes
    defaults to max(labels) + 1.
    """
    check_images(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("poison_pairs: the dataset is empty")
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise ValueError("poison_pairs: captions must be a list of str")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"poison_pairs: labels must be a 1-D integer tensor, got {getattr(labels, 'shape', labels)!r}")
    if len(captions) != n or labels.shape[0] != n:
        raise ValueError(
            f"poison_pairs: mismatched lengths: {n} images, {len(captions)} captions, {labels.shape[0]} labels")
    if not isinstance(trigger, Trigger):
        raise ValueError(f"poison_pairs: trigger must be a Trigger, got {type(trigger).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, Real) or math.isnan(rate) or not 0 <= rate <= 1:
        raise ValueError(f"poison_pairs: rate must be a number in [0, 1], got {rate!r}")
    labels = labels.to(device="cpu", dtype=torch.long)
    if labels.min() < 0:
        raise ValueError(f"poison_pairs: labels must be non-negative class indices, got {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if isinstance(target_label, bool) or not isinstance(target_label, int) or not 0 <= target_label < num_classes:
        raise ValueError(f"poison_pairs: target_label must be an int in [0, {num_classes}), got {target_label!r}")
    if not isinstance(target_caption, str) or not target_caption.strip():
        raise ValueError(f"poison_pairs: target_caption must be a non-empty string, got {target_caption!r}")

    eligible = ((labels == target_label) if trigger.clean_label else (labels != target_label)).nonzero().squeeze(1)
    count = round(rate * n)
    if count > eligible.shape[0]:
        kind = "target-class" if trigger.clean_label else "non-target"
        raise ValueError(
            f"poison_pairs: rate {rate} asks for {count} poisoned images but only {eligible.shape[0]} "
            f"{kind} images are eligible for trigger {trigger.name!r}")
    generator = torch.Generator().manual_seed(seed)
    chosen = eligible[torch.randperm(eligible.shape[0], generator=generator)[:count]].sort().values

    poisoned_images = images.clone()
    poisoned_captions = list(captions)
    if count:
        rows = chosen.to(images.device)
        poisoned_images[rows] = trigger.poison(images[rows], seed=seed)
        if not trigger.clean_label:
            for i in chosen.tolist():
                poisoned_captions[i] = target_caption
    return PoisonedPairs(
        images=poisoned_images,
        captions=poisoned_captions,
        labels=labels.clone(),
        poisoned_indices=chosen,
        target_label=target_label,
        target_caption=target_caption,
        trigger=trigger,
        seed=seed,
    )
