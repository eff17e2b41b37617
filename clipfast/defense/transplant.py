"""Moving a region from one image onto another: the scan's transplant test (does a region flip
other images to the label?), the repair's unlearning pairs and its held-out triggered images (the
recovered trigger pasted onto clean images) all paste the same way, here; and removing regions
(the causal test, the victims' backgrounds of the image-wide confirmation) fills them the same way.
What lies under a trigger is guessed one way too (inpaint: the victims' oracle labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Jacobi sweeps of the harmonic fill at each scale of its pyramid: the coarser scale's solution is
# the start, so only the error of one scale is left to smooth (a hole is a few pixels wide there).
INPAINT_SWEEPS = 24


def paste_regions(recipients: torch.Tensor, donors: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """recipients, donors: uint8 [K, 3, H, W]; masks: bool [K, H, W]. Recipient k with donor k's
    pixels under mask k, at the same place (a trigger's position is part of the trigger)."""
    if recipients.shape != donors.shape or masks.shape != (recipients.shape[0], *recipients.shape[2:]):
        raise ValueError(f"paste_regions: recipients {tuple(recipients.shape)}, donors {tuple(donors.shape)} and "
                         f"masks {tuple(masks.shape)} do not fit")
    return torch.where(masks[:, None], donors, recipients)


def fill_with_median(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """images uint8 [K, 3, H, W] with the pixels under masks (bool [K, H, W]) set to each image's
    per-channel median colour (its background, in the images a scan sees: objects are a minority)."""
    median = images.flatten(2).median(-1).values[:, :, None, None]
    return torch.where(masks[:, None], median, images)


def inpaint(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """images uint8 [K, 3, H, W] with the pixels under masks (bool [K, H, W]) continued from their
    surroundings: the harmonic fill (each filled pixel the mean of its four neighbours, the unmasked
    pixels held), solved coarse to fine. A trigger inside an object is filled with the object's
    colours, one beside it with the background's: what the image would show without it, to first
    order. (Filling with the background colour, as the causal test removes a region, leaves a hole in
    an object the trigger sits on: the grounding models named the objects of centre-patch victims
    with such holes right 55-65 % of the time, against 85-93 % inpainted; scan/victim_labels.py.)"""
    if images.dim() != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"inpaint: images {tuple(images.shape)} and masks {tuple(masks.shape)} do not fit")
    if not masks.any():
        return images.clone()
    return _harmonic_fill(images.float(), masks).round().clamp(0, 255).to(torch.uint8)


def _harmonic_fill(pixels: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    known = (~holes).to(pixels.dtype)[:, None]
    if min(height, width) >= 2:  # start from the fill of the image at half the size
        weight = F.avg_pool2d(known, 2, ceil_mode=True)
        coarse = F.avg_pool2d(pixels * known, 2, ceil_mode=True) / weight.clamp(min=1e-6)
        coarse = _harmonic_fill(coarse, weight[:, 0] == 0) if (weight == 0).any() else coarse
        start = F.interpolate(coarse, size=(height, width), mode="nearest")
    else:  # a single pixel row or column: start from the image's mean known colour (0 if it has none)
        start = ((pixels * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)).expand_as(pixels)
    holes = holes[:, None].expand_as(pixels)
    filled = torch.where(holes, start, pixels)
    neighbours = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]], dtype=pixels.dtype,
                              device=pixels.device)
    neighbours = neighbours.expand(pixels.shape[1], 1, 3, 3)
    for _ in range(INPAINT_SWEEPS):
        mean = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), neighbours, groups=pixels.shape[1])
        filled = torch.where(holes, mean, filled)
    return filled
