"""Confirming an image-wide trigger: two transplant tests on the target's victims.

An image-wide target rests on discordance alone (the trusted model disagrees with the suspect on its
victims), and two clean models disagree on some images too: a clean suspect that confuses a class
more often than the trusted model looks like a target by that count. What only a backdoor does is
carry the target in something other than the object, which overrides whatever object is there.
Two ways to move that something onto other images, each judged in the suspect and, as the control
that sees the same pixels, in the trusted model:

- *Pattern*: the victims' mean minus clean images' mean estimates an additive trigger (exact for
  SIG-like signals, first order for blending); added to clean images of other labels, it turns most
  of them to the target in the suspect and almost none in the trusted model. A confusion's mean
  difference is object-like: it moves both models alike, or neither. (Measured: Blended 3 % victims'
  pattern flipped the suspect on 89 % of 400 clean images, the trusted model on 1 %; a clean
  suspect's over-predicted class: 0.7 % vs 1.8 %.) A warp (WaNet) has no additive estimate.
- *Background*: each victim with its objects removed (every oracle region filled with the image's
  median colour, as the causal test removes regions) and a clean image's largest object of another
  label pasted back at its own place. A trigger that lives anywhere but in the object (a blend, a
  signal, a warp of the whole image) stays in the background and overrides the pasted object; a
  confusion lives in the victim's object, which is gone. Measured on the efficacy models in trusted
  mode (200 victims x 2 objects; ScanResult.summary() reports both tests): WaNet strength 6
  seeds 0-2 and strength 3 turned 59-87 % of composites to the target in the suspect, Blended 84 %,
  SIG 40 %, the trusted model at most 1.6 %; the 'star' confusion of 5 clean suspects 0-2.2 %.

A target is confirmed when either test passes: the suspect flips at least its threshold and the
trusted model fewer than that. In self mode (image-wide targets from the mirror or object-alone
test, decide.py) there is no control model and the suspect's share alone decides: by itself the
background test is not safe there (objects the oracle does not fully remove override the pasted
ones too: a clean suspect's 'circle' images 21-39 %; ../shared/notes/image-wide-triggers.md), but it
only confirms a label those tests flagged already, and the pattern test says whether the trigger is additive,
which the repair needs to put it on clean images (unlearning.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from clipfast.data.probe import ProbeSet
from clipfast.defense.transplant import fill_with_median, paste_regions
from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.oracle import Segmenter

from .result import Flips, ScanResult

PATTERN_IMAGES = 400  # clean images the pattern is added to
BACKGROUND_VICTIMS = 200  # victims whose backgrounds take pasted objects
OBJECTS_PER_BACKGROUND = 2  # clean objects pasted onto each (400 composites)


def estimate_pattern(probe: ProbeSet, victims: torch.Tensor, clean: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float [3, H, W]: mean of the victims minus the mean of a sample of clean images as large."""
    generator = torch.Generator().manual_seed(seed)
    sample = clean[torch.randperm(len(clean), generator=generator)[: max(64, len(victims))]]
    return probe.read(victims).float().mean(0) - probe.read(sample).float().mean(0)


def add_pattern(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (images.float() + pattern).round().clamp(0, 255).to(torch.uint8)


def victim_backgrounds(images: torch.Tensor, segmenter: Segmenter) -> torch.Tensor:
    """uint8 [V, 3, H, W]: each image with every region the oracle finds filled with its median colour."""
    segmentation = segmenter.segment(images)
    objects = (segmentation.masks & segmentation.valid[:, :, None, None]).any(1)
    return fill_with_median(images, objects)


def largest_objects(images: torch.Tensor, segmenter: Segmenter) -> torch.Tensor:
    """bool [K, H, W]: each image's largest oracle region (all-False where it has none)."""
    segmentation = segmenter.segment(images)
    return segmentation.masks[:, 0] & segmentation.valid[:, 0, None, None]


class _Judges:
    """The suspect's and the trusted model's top-1 label share for a target."""

    def __init__(self, result: ScanResult, bundle: ClipBundle, grounding_bundle: ClipBundle | None, prompts):
        kwargs = {} if prompts is None else {"prompts": prompts}
        self.models = [ZeroShotClassifier(model, result.classnames, **kwargs)
                       for model in (bundle, grounding_bundle) if model is not None]

    def flips(self, images: torch.Tensor, target: int) -> Flips:
        shares = [float((model.predict(images)[0][:, 0] == target).float().mean()) for model in self.models]
        return Flips(shares[0], shares[1] if len(shares) > 1 else 0.0)


def _recipients(result: ScanResult, target: int) -> torch.Tensor:
    clean = result.clean_indices()
    return clean[result.image_label[clean] != target][:PATTERN_IMAGES]


def pattern_flips(result: ScanResult, target: int, probe: ProbeSet, judges: _Judges, seed: int = 0) -> Flips:
    """The victims' estimated additive pattern added to clean images of other labels."""
    victims, recipients = result.victims(target), _recipients(result, target)
    if len(victims) == 0 or len(recipients) == 0:
        return Flips(0.0, 0.0)
    pattern = estimate_pattern(probe, victims, result.clean_indices(), seed)
    return judges.flips(add_pattern(probe.read(recipients), pattern), target)


def background_flips(result: ScanResult, target: int, probe: ProbeSet, segmenter: Segmenter, judges: _Judges,
                     seed: int = 0) -> Flips:
    """Clean images' largest objects (other labels) pasted at their place onto the victims' backgrounds."""
    victims, donors = result.victims(target), _recipients(result, target)
    generator = torch.Generator().manual_seed(seed)
    victims = victims[torch.randperm(len(victims), generator=generator)[:BACKGROUND_VICTIMS]]
    if len(victims) == 0 or len(donors) == 0:
        return Flips(0.0, 0.0)
    donor_images = probe.read(donors)
    objects = largest_objects(donor_images, segmenter)
    pick = torch.randint(len(donors), (len(victims) * OBJECTS_PER_BACKGROUND,), generator=generator)
    backgrounds = victim_backgrounds(probe.read(victims), segmenter).repeat_interleave(OBJECTS_PER_BACKGROUND, 0)
    return judges.flips(paste_regions(backgrounds, donor_images[pick], objects[pick]), target)


def confirm_image_wide(result: ScanResult, probe: ProbeSet, segmenter: Segmenter, bundle: ClipBundle,
                       grounding_bundle: ClipBundle | None, prompts: Callable[[str], list[str]] | None,
                       min_pattern_flip: float, min_background_flip: float) -> ScanResult:
    """Keep an image-wide target only if the pattern or the background test confirms it; the others
    are reported in result.unconfirmed with both tests' shares."""
    judges, kept = None, []
    for trigger in result.triggers:
        if trigger.kind == "image-wide":
            judges = judges or _Judges(result, bundle, grounding_bundle, prompts)
            trigger.pattern = pattern_flips(result, trigger.target, probe, judges)
            trigger.background = background_flips(result, trigger.target, probe, segmenter, judges)
            trigger.additive = trigger.pattern.confirms(min_pattern_flip)
            if not trigger.additive and not trigger.background.confirms(min_background_flip):
                result.unconfirmed[result.classnames[trigger.target]] = {"pattern": trigger.pattern,
                                                                          "background": trigger.background}
                continue
        kept.append(trigger)
    result.triggers, result.targets = kept, [trigger.target for trigger in kept]
    return result
