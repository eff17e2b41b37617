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

from clipfast.defense.transplant import fill_with_median, paste_regions

ClassProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 images [K, 3, H, W] -> softmax [K, C] on the host


def in_chunks(class_probs: ClassProbs, images: torch.Tensor, chunk: int) -> torch.Tensor:
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
        out = in_chunks(class_probs, removed, chunk)
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

    def recipients(self, donors: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, count: int,
                   max_overlap: float, size_ratio: float) -> list[torch.Tensor]:
        """Per donor k (probe index donors[k], region masks[k] with label labels[k]): up to `count` pool
        positions of other images with another label whose largest region is at least size_ratio
        times the pasted region and covered by it at most max_overlap, in an order that depends on
        the donor's probe index alone. (An image's label follows its largest object: a pasted object
        smaller than the recipient's own should not take the label over; a trigger does, whatever its
        size.) All donors' overlaps at once: one product of the flattened masks per donor chunk
        (pixel counts, exact in float32 below 2^24 pixels an image)."""
        objects = self.largest.flatten(1).float()  # [R, HW]
        sizes = objects.sum(1)
        plans = []
        for lo in range(0, len(donors), 64):  # bounds the [chunk, HW] float copy of the masks
            pasted = masks[lo: lo + 64].flatten(1).float()
            covered = pasted @ objects.T  # [k, R]: pixels of recipient r's object under donor k's region
            eligible = (self.labels[None] != labels[lo: lo + 64, None]) & (self.indices[None] != donors[lo: lo + 64, None])
            eligible &= sizes[None] >= size_ratio * pasted.sum(1)[:, None]
            eligible &= covered / sizes.clamp(min=1)[None] <= max_overlap
            for row, donor in zip(eligible, donors[lo: lo + 64].tolist()):
                order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(donor))
                plans.append(order[row[order]][:count])
        return plans


@torch.no_grad()
def flip_rates(class_probs: ClassProbs, donors: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
               donor_indices: torch.Tensor, pool: RecipientPool, count: int, max_overlap: float, size_ratio: float,
               chunk: int, min_recipients: int = 1, min_rate: float | None = None) -> torch.Tensor:
    """Transplant test: float [K], the share of recipients that donor k's region masks[k] (pasted
    at its place) turns to labels[k]; -1 where fewer than min_recipients qualify.

    min_rate: the rate that decides (ScanConfig.min_flip_rate), to stop early where it can no longer
    be reached. A donor with n recipients needs c = ceil(min_rate * n) flips, so if none of its first
    n - c + 1 recipients flips it cannot get there: those are encoded first, and only donors with a
    flip among them get the rest. Which donors reach min_rate, and their rates, are exactly those of
    the full test; a donor stopped early gets rate 0 (none of the recipients it was tested on
    flipped; its full rate is below min_rate). Most explaining regions are real objects that flip
    nothing, so this skips about (c - 1) / n of the test's encodes (3 of 8 by default). None: every
    recipient of every donor."""
    rates = torch.full((len(donors),), -1.0)
    plans = pool.recipients(donor_indices, labels, masks, count, max_overlap, size_ratio)
    sizes = torch.tensor([len(plan) for plan in plans], dtype=torch.int64)
    if min_rate is None:
        first = sizes
    else:  # n - c + 1 with c = ceil(min_rate * n) (the tolerance keeps 0.5 * 8 at 4)
        first = torch.minimum(sizes, sizes - torch.ceil(min_rate * sizes - 1e-9).long() + 1)
    flipped, tested = torch.zeros(len(donors)), torch.zeros(len(donors), dtype=torch.int64)

    def encode(parts: list[torch.Tensor]) -> None:
        owner = torch.tensor([k for k, part in enumerate(parts) for _ in part], dtype=torch.int64)
        if len(owner) == 0:
            return
        chosen = torch.cat(parts)
        pasted = paste_regions(pool.images[chosen], donors[owner], masks[owner])
        predicted = in_chunks(class_probs, pasted, chunk).argmax(1)
        flipped.index_add_(0, owner, (predicted == labels[owner]).float())
        tested.index_add_(0, owner, torch.ones_like(owner))

    encode([plan[: int(n)] for plan, n in zip(plans, first)])
    encode([plan[int(n):] if flipped[k] > 0 else plan[:0] for k, (plan, n) in enumerate(zip(plans, first))])
    has = sizes >= max(1, min_recipients)
    rates[has] = flipped[has] / tested[has]
    return rates
