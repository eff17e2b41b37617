"""Confirming an image-wide trigger: the pattern transplant.

An image-wide target rests on discordance alone (the trusted model disagrees with the suspect on its
victims), and two clean models disagree on some images too: a clean suspect that confuses a class
more often than the trusted model looks like a target by that count. What only a backdoor does is
respond to a *pattern*: the victims' mean minus clean images' mean estimates an additive trigger
(exact for SIG-like signals, first order for blending); added to clean images of other labels, it
turns most of them to the target in the suspect (that is what its attack success rate means) and
almost none in the trusted model, which sees the same pixels. A confusion's mean difference is
object-like, so it moves both models alike, or neither. A target is confirmed when the suspect
flips at least min_flip_rate of the images and the trusted model fewer than that (measured: Blended
3 % victims' pattern flipped the suspect on 89 % of 400 clean images, the trusted model on 1 %; a
clean suspect's over-predicted class: 0.7 % vs 1.8 %). A warp (WaNet) has no additive estimate, so
it cannot be confirmed this way: it stays unreported rather than guessed.
"""

from __future__ import annotations

from typing import Callable

import torch

from clipfast.data.probe import ProbeSet
from clipfast.models import ClipBundle, ZeroShotClassifier

from .result import ScanResult

PATTERN_IMAGES = 400  # clean images the pattern is added to


def estimate_pattern(probe: ProbeSet, victims: torch.Tensor, clean: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float [3, H, W]: mean of the victims minus the mean of a sample of clean images as large."""
    generator = torch.Generator().manual_seed(seed)
    sample = clean[torch.randperm(len(clean), generator=generator)[: max(64, len(victims))]]
    return probe.read(victims).float().mean(0) - probe.read(sample).float().mean(0)


def add_pattern(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (images.float() + pattern).round().clamp(0, 255).to(torch.uint8)


def pattern_flips(result: ScanResult, target: int, probe: ProbeSet, bundle: ClipBundle,
                  grounding_bundle: ClipBundle | None, prompts: Callable[[str], list[str]] | None,
                  seed: int = 0) -> tuple[float, float]:
    """(suspect, trusted) shares of clean images of other labels turned to `target` by the victims'
    estimated pattern (trusted: 0 without a trusted model)."""
    clean = result.clean_indices()
    victims = result.victims(target)
    recipients = clean[result.image_label[clean] != target][:PATTERN_IMAGES]
    if len(victims) == 0 or len(recipients) == 0:
        return 0.0, 0.0
    images = add_pattern(probe.read(recipients), estimate_pattern(probe, victims, clean, seed))
    kwargs = {} if prompts is None else {"prompts": prompts}

    def flips(model: ClipBundle) -> float:
        predicted = ZeroShotClassifier(model, result.classnames, **kwargs).predict(images)[0][:, 0]
        return float((predicted == target).float().mean())

    return flips(bundle), (flips(grounding_bundle) if grounding_bundle is not None else 0.0)
