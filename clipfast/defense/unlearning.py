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
A trigger confirmed by its victims' backgrounds alone (a warp: no additive estimate reproduces it)
cannot be put on other images; its victims, with corrective captions, carry it into the compact
set, and held-out victims alone measure the repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfast.data.probe import ProbeSet

from .scan import ScanResult
from .scan.confirm import add_pattern, estimate_pattern
from .transplant import paste_regions


@dataclass
class RecoveredTrigger:
    target: int
    kind: str  # patch | image-wide
    donors: torch.Tensor  # uint8 [P, 3, H, W]: patch victims (patch triggers)
    masks: torch.Tensor  # bool [P, H, W]: their trigger regions
    pattern: torch.Tensor | None  # float [3, H, W]: the additive estimate (image-wide triggers)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 images [K, 3, H, W] with the trigger on: a patch from a randomly drawn victim, pasted
        at its place, or the additive pattern."""
        if self.kind == "patch":
            pick = torch.randint(len(self.donors), (len(images),), generator=generator)
            return paste_regions(images, self.donors[pick], self.masks[pick])
        return add_pattern(images, self.pattern)


def recover_triggers(scan: ScanResult, probe: ProbeSet, seed: int = 0) -> list[RecoveredTrigger]:
    """The scan's triggers that can be put on other images: patches with victims to take them from,
    image-wide triggers the pattern test confirmed (not one confirmed by its backgrounds alone)."""
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
    return recovered


def with_triggers(images: torch.Tensor, triggers: list[RecoveredTrigger], seed: int) -> torch.Tensor:
    """images with one of the recovered triggers on each (cycling through the targets)."""
    generator = torch.Generator().manual_seed(seed)
    out = images.clone()
    for k, trigger in enumerate(triggers):
        rows = torch.arange(k, len(images), len(triggers))
        out[rows] = trigger.apply(images[rows], generator)
    return out
