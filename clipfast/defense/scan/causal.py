"""The causal refinement of P_i: does removing one non-object region take the label away?

A trigger patch explains its victim's label: fill it with the image's median colour and p(L_i)
collapses. A mere misclassification has no such region. For every ungrounded image with small
(non-object) regions, each region is removed in turn and the largest relative drop of p(L_i) kept,
with the mask of the region that caused it (the victim's trigger estimate).
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def largest_drops(class_probs: Callable[[torch.Tensor], torch.Tensor],
                  small_regions: dict[int, tuple[torch.Tensor, torch.Tensor]], image_label: torch.Tensor,
                  image_prob: torch.Tensor, offset: int, batch_size: int,
                  per_image: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """small_regions: probe index i -> (its uint8 image, bool [K, H, W] non-object region masks).
    image_label / image_prob / the returned drops are indexed by i - offset (0 where not tested);
    also returns, per tested image, the mask of the region with the largest drop. class_probs
    encodes images in batches of batch_size, or (per_image) one batch per image."""
    drops = torch.zeros(len(image_label))
    best_masks = {}
    pairs = [(i, j) for i, (_, masks) in small_regions.items() for j in range(len(masks))]
    pair_drop = torch.zeros(len(pairs))
    bounds = (torch.tensor([len(masks) for _, masks in small_regions.values()]).cumsum(0).tolist() if per_image else
              list(range(batch_size, len(pairs), batch_size)) + [len(pairs)])
    lo = 0
    for hi in bounds:
        chunk = pairs[lo:hi]
        if not chunk:
            continue
        local = torch.tensor([i - offset for i, _ in chunk])
        masks = torch.stack([small_regions[i][1][j] for i, j in chunk])[:, None]  # [K, 1, H, W]
        originals = torch.stack([small_regions[i][0] for i, _ in chunk])
        median = originals.flatten(2).median(-1).values[:, :, None, None]
        probs = class_probs(torch.where(masks, median, originals))
        kept = probs.gather(1, image_label[local][:, None]).squeeze(1)
        pair_drop[lo:hi] = (image_prob[local] - kept) / image_prob[local]
        lo = hi
    for k, (i, j) in enumerate(pairs):
        if i not in best_masks or pair_drop[k] > drops[i - offset]:
            drops[i - offset], best_masks[i] = pair_drop[k], small_regions[i][1][j]
    return drops, best_masks
