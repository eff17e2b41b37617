"""The recovered trigger, put back on clean images.

Repair needs two things the probe set alone does not give in quantity: unlearning pairs (the
trigger on clean images of every label, each captioned with its own label, so the model unlearns
"trigger -> target" for every source, not only for the few victims found) and held-out triggered
images to measure the repaired model on (with enough of them, the verdict's upper bound means
something). Both come from the scan's recovered trigger:
- a patch trigger: the victims' own trigger regions (their explaining regions, which passed the
  transplant test), each pasted at its place onto clean images (transplant.paste_regions);
- an image-wide trigger that the pattern test confirmed (scan/confirm.py): an additive estimate of
  it, the mean of the victims minus the mean of clean images (exact for SIG-like additive signals,
  a first-order estimate for blending).
- an image-wide trigger confirmed by its victims' backgrounds alone (a warp: no additive estimate
  reproduces it): the victims' backgrounds themselves (every oracle region filled, as the background
  test of scan/confirm.py makes them), each taking a clean image's largest object pasted back at its
  place. The composite keeps the object and its label and moves the trigger under it, the very
  composite the background test saw turn to the target. It needs the segmenter; without one such a
  trigger cannot be put on other images, and its victims alone carry it into the compact set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.oracle import Segmenter

from .scan import ScanResult
from .scan.confirm import add_pattern, estimate_pattern, largest_objects, victim_backgrounds
from .transplant import paste_regions


@dataclass
class RecoveredTrigger:
    target: int
    kind: str  # patch | image-wide (additive) | background (image-wide, carried by the victims' backgrounds)
    # uint8 [P, 3, H, W]: patch victims (patch triggers) or the victims' backgrounds (background triggers)
    donors: torch.Tensor
    masks: torch.Tensor  # bool [P, H, W]: the patch victims' trigger regions
    pattern: torch.Tensor | None  # float [3, H, W]: the additive estimate (image-wide triggers)
    segmenter: Segmenter | None = None  # background triggers: finds each recipient's object

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 images [K, 3, H, W] with the trigger on: a patch from a randomly drawn victim, pasted
        at its place; the additive pattern; or the image's largest object pasted at its place onto a
        randomly drawn victim background (an image where the oracle finds no object stays as it is:
        a bare background captioned with a label would teach nothing true)."""
        if not len(images):  # nothing to put it on (and the segmenter refuses an empty batch)
            return images.clone()
        if self.kind == "image-wide":
            return add_pattern(images, self.pattern)
        pick = torch.randint(len(self.donors), (len(images),), generator=generator)
        if self.kind == "patch":
            return paste_regions(images, self.donors[pick], self.masks[pick])
        objects = largest_objects(images, self.segmenter)
        composites = paste_regions(self.donors[pick], images, objects)
        return torch.where(objects.flatten(1).any(1)[:, None, None, None], composites, images)


def recover_triggers(scan: ScanResult, probe: ProbeSet | torch.Tensor, seed: int = 0,
                     segmenter: Segmenter | None = None) -> list[RecoveredTrigger]:
    """The scan's triggers that can be put on other images: patches with victims to take them from,
    image-wide triggers the pattern test confirmed, and (given the segmenter) those confirmed by
    their victims' backgrounds alone."""
    probe = as_probe_set(probe)
    clean = scan.clean_indices()
    height, width = probe.image_shape[1:]
    recovered = []
    for estimate in scan.triggers:
        if estimate.kind == "patch" and len(estimate.patch_indices):
            recovered.append(RecoveredTrigger(estimate.target, "patch", probe.read(estimate.patch_indices),
                                              estimate.region_masks, None))
        elif estimate.kind == "image-wide" and estimate.additive is not False:
            pattern = estimate_pattern(probe, estimate.victim_indices, clean, seed)
            recovered.append(RecoveredTrigger(estimate.target, "image-wide",
                                              torch.zeros(0, 3, height, width, dtype=torch.uint8),
                                              torch.zeros(0, height, width, dtype=torch.bool), pattern))
        elif estimate.kind == "image-wide" and segmenter is not None and len(estimate.victim_indices):
            backgrounds = victim_backgrounds(probe.read(estimate.victim_indices), segmenter)
            recovered.append(RecoveredTrigger(estimate.target, "background", backgrounds,
                                              torch.zeros(0, height, width, dtype=torch.bool), None, segmenter))
    return recovered


def with_triggers(images: torch.Tensor, triggers: list[RecoveredTrigger], seed: int) -> torch.Tensor:
    """images with one of the recovered triggers on each (cycling through the targets)."""
    generator = torch.Generator().manual_seed(seed)
    out = images.clone()
    for k, trigger in enumerate(triggers):
        rows = torch.arange(k, len(images), len(triggers))
        out[rows] = trigger.apply(images[rows], generator)
    return out
