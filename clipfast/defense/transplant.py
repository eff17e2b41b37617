"""Moving a region from one image onto another: the scan's transplant test (does a region flip
other images to the label?), the repair's unlearning pairs and its held-out triggered images (the
recovered trigger pasted onto clean images) all paste the same way, here; and removing regions
(the causal test, the victims' backgrounds of the image-wide confirmation) fills them the same way."""

from __future__ import annotations

import torch


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


def overlap_fraction(masks: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """float [K]: the share of object k's pixels that mask k covers (0 for an empty object)."""
    covered = (masks & objects).flatten(1).sum(1).float()
    return covered / objects.flatten(1).sum(1).clamp(min=1).float()
