"""Per-image trigger evidence that does not depend on the trigger's size, pattern or position.

Every probe image i gets an *explaining region*: the region the model under test itself says
carries its label L_i (the region whose crop gives L_i the highest probability, among those whose
crop's top label is L_i), or, where no crop says L_i, the region whose removal (filled with the
image's median colour) takes away the largest share of p(L_i), if that share reaches
min_causal_drop. Then the *transplant test*: that region's pixels are pasted, at the same place,
onto `transplant_recipients` other probe images (of other labels, whose largest region the paste
barely touches), and the share of them the model then labels L_i is the region's flip rate.

A real object explains its own image but does not override other images' objects: its flip rate
is low. A trigger overrides whatever it is pasted on (that is what an attack success rate is): its
flip rate is high, whatever its size, pattern or position. An image-wide trigger has no explaining
region that flips others; the trusted oracle's discordance (decide.py) sees those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from clipfast.defense.transplant import fill_with_median, overlap_fraction, paste_regions

ClassProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 images [K, 3, H, W] -> softmax [K, C] on the host


def _in_chunks(class_probs: ClassProbs, images: torch.Tensor, chunk: int) -> torch.Tensor:
    if len(images) == 0:
        return torch.zeros(0, 0)
    return torch.cat([class_probs(part) for part in images.split(chunk)])


@torch.no_grad()
def removal_drops(class_probs: ClassProbs, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  probs: torch.Tensor, chunk: int, per_image: bool) -> torch.Tensor:
    """For images [K, 3, H, W] with region masks [K, M, H, W] (all-False rows are padding), the share
    of p(label) that filling each region with the image's median colour takes away: float [K, M]
    (0 for padding). Encoded `chunk` images at a time, or one image's removals at a time."""
    count, regions = masks.shape[:2]
    real = masks.flatten(2).any(-1)
    index = torch.nonzero(real)  # [R, 2]: (image, region)
    drops = torch.zeros(count, regions)
    if len(index) == 0:
        return drops
    removed = fill_with_median(images[index[:, 0]], masks[index[:, 0], index[:, 1]])
    if per_image:
        sizes = real.sum(1).tolist()
        out = torch.cat([class_probs(part) for part in removed.split([s for s in sizes if s])])
    else:
        out = _in_chunks(class_probs, removed, chunk)
    kept = out.gather(1, labels[index[:, 0]][:, None]).squeeze(1)
    before = probs[index[:, 0]]
    drops[index[:, 0], index[:, 1]] = (before - kept) / before
    return drops


@dataclass
class RecipientPool:
    """The probe images transplants are pasted onto: the first few readable images of a shard, with
    their labels and largest region (a fixed set, so results do not depend on the batching)."""

    images: torch.Tensor  # uint8 [R, 3, H, W]
    labels: torch.Tensor  # int64 [R]
    largest: torch.Tensor  # bool [R, H, W]: each one's largest region (all-False when it has none)
    indices: torch.Tensor  # int64 [R]: their probe indices

    def recipients(self, donor: int, label: int, mask: torch.Tensor, count: int, max_overlap: float,
                   size_ratio: float) -> torch.Tensor:
        """Up to `count` pool positions for probe image `donor`'s region `mask` with label `label`:
        other images with another label whose largest region is at least size_ratio times the pasted
        region and covered by it at most max_overlap, in an order that depends on the donor's probe
        index alone. (An image's label follows its largest object: a pasted object smaller than the
        recipient's own should not take the label over; a trigger does, whatever its size.)"""
        eligible = (self.labels != label) & (self.indices != donor)
        eligible &= self.largest.flatten(1).sum(1) >= size_ratio * mask.sum()
        eligible &= overlap_fraction(mask.expand_as(self.largest), self.largest) <= max_overlap
        positions = torch.nonzero(eligible).flatten()
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(donor))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        return positions[rank[positions].argsort()][:count]


@torch.no_grad()
def flip_rates(class_probs: ClassProbs, donors: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
               donor_indices: torch.Tensor, pool: RecipientPool, count: int, max_overlap: float, size_ratio: float,
               chunk: int, min_recipients: int = 1) -> torch.Tensor:
    """Transplant test: float [K], the share of recipients that donor k's region masks[k] (pasted
    at its place) turns to labels[k]; -1 where fewer than min_recipients qualify."""
    rates = torch.full((len(donors),), -1.0)
    plans = [pool.recipients(int(i), int(label), mask, count, max_overlap, size_ratio)
             for i, label, mask in zip(donor_indices, labels, masks)]
    owner = torch.tensor([k for k, plan in enumerate(plans) for _ in plan], dtype=torch.int64)
    if len(owner) == 0:
        return rates
    chosen = torch.cat(plans)
    pasted = paste_regions(pool.images[chosen], donors[owner], masks[owner])
    predicted = _in_chunks(class_probs, pasted, chunk).argmax(1)
    flipped = (predicted == labels[owner]).float()
    tested = torch.bincount(owner, minlength=len(donors))
    rates_sum = torch.zeros(len(donors)).index_add_(0, owner, flipped)
    has = tested >= max(1, min_recipients)
    rates[has] = rates_sum[has] / tested[has]
    return rates
