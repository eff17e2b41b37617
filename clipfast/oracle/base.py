"""The oracle's segmenter interface: images in, a padded batch of region masks out.

Any class-agnostic segmenter plugs in by subclassing Segmenter (see classical.py, sam.py). Its
masks go to region crops through clipfast.ops.mask_crop, which takes exactly this padded layout.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Segmentation:
    masks: torch.Tensor   # bool [N, M, H, W], largest region first, padded with empty masks
    counts: torch.Tensor  # int64 [N], real masks per image
    scores: torch.Tensor  # float32 [N, M], the segmenter's confidence per mask (0 for padding)

    def __post_init__(self) -> None:
        shapes_fit = self.counts.shape == self.masks.shape[:1] and self.scores.shape == self.masks.shape[:2]
        if self.masks.dim() != 4 or not shapes_fit:
            raise ValueError(f"Segmentation: masks [N, M, H, W] {tuple(self.masks.shape)}, counts [N] "
                             f"{tuple(self.counts.shape)} and scores [N, M] {tuple(self.scores.shape)} disagree")

    def __len__(self) -> int:
        return self.masks.shape[0]

    @staticmethod
    def cat(parts: Sequence["Segmentation"]) -> "Segmentation":
        """The segmentations of consecutive batches as one (all must share M, H and W)."""
        if not parts:
            raise ValueError("Segmentation.cat: nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        return Segmentation(torch.cat([p.masks for p in parts]), torch.cat([p.counts for p in parts]),
                            torch.cat([p.scores for p in parts]))

    @property
    def valid(self) -> torch.Tensor:
        """bool [N, M]: which mask slots hold a real region."""
        return torch.arange(self.masks.shape[1], device=self.counts.device) < self.counts[:, None]


def pack_masks(per_image: Sequence[torch.Tensor], height: int, width: int, max_masks: int,
               scores: Sequence[torch.Tensor] | None = None) -> Segmentation:
    """Pack per-image [k_i, H, W] masks (any k_i, also 0) into one padded batch, keeping the
    max_masks largest regions of each image, largest first; equal areas keep their input order.
    Masks with no pixels are dropped. scores: per image float [k_i] (default 1 for every mask)."""
    if scores is not None and len(scores) != len(per_image):
        raise ValueError(f"pack_masks: {len(scores)} score lists for {len(per_image)} images")
    flat, image_index, flat_scores = [], [], []
    for i, image_masks in enumerate(per_image):
        if image_masks.dim() != 3 or tuple(image_masks.shape[1:]) != (height, width):
            raise ValueError(f"pack_masks: image {i}'s masks must be [k, {height}, {width}], "
                             f"got {tuple(image_masks.shape)}")
        k = image_masks.shape[0]
        image_scores = torch.ones(k) if scores is None else torch.as_tensor(scores[i]).float().reshape(-1).cpu()
        if image_scores.shape[0] != k:
            raise ValueError(f"pack_masks: image {i} has {k} masks but {image_scores.shape[0]} scores")
        flat.append(image_masks)
        image_index.append(torch.full((k,), i, dtype=torch.int64))
        flat_scores.append(image_scores)
    if not per_image:
        return pack_flat_masks(torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0, dtype=torch.int64),
                               0, max_masks)
    return pack_flat_masks(torch.cat(flat), torch.cat(image_index), len(per_image), max_masks, torch.cat(flat_scores))


def pack_flat_masks(masks: torch.Tensor, image_index: torch.Tensor, num_images: int, max_masks: int,
                    scores: torch.Tensor | None = None) -> Segmentation:
    """pack_masks for masks already stacked: masks bool [K, H, W] of all images, image_index int
    [K] (which image each belongs to, in [0, num_images)), scores float [K]. Ties in area keep the
    order of the stack."""
    if max_masks < 1:
        raise ValueError(f"max_masks must be >= 1, got {max_masks}")
    if masks.dim() != 3 or image_index.shape != masks.shape[:1]:
        raise ValueError(f"pack_flat_masks: need masks [K, H, W] and image_index [K], got "
                         f"{tuple(masks.shape)} and {tuple(image_index.shape)}")
    if len(image_index) and not 0 <= int(image_index.min()) <= int(image_index.max()) < num_images:
        raise ValueError(f"pack_flat_masks: image_index must lie in [0, {num_images})")
    masks, image_index = masks.bool().cpu(), image_index.long().cpu()
    k, height, width = masks.shape
    scores = torch.ones(k) if scores is None else scores.float().cpu()
    areas = masks.flatten(1).sum(1)
    # Sort by image, then area (descending), then position: one lexsort instead of a loop over images.
    order = torch.from_numpy(np.lexsort((np.arange(k), -areas.numpy(), image_index.numpy())))
    order = order[areas[order] > 0]
    image_of = image_index[order]
    counts = torch.bincount(image_of, minlength=num_images)
    first = torch.cumsum(counts, 0) - counts  # position of each image's first mask in `order`
    rank = torch.arange(len(order)) - first[image_of]
    kept = rank < max_masks
    order, image_of, rank = order[kept], image_of[kept], rank[kept]
    packed = torch.zeros(num_images, max_masks, height, width, dtype=torch.bool)
    packed_scores = torch.zeros(num_images, max_masks, dtype=torch.float32)
    packed[image_of, rank] = masks[order]
    packed_scores[image_of, rank] = scores[order]
    return Segmentation(packed, counts.clamp(max=max_masks), packed_scores)


class Segmenter(abc.ABC):
    """A class-agnostic segmenter: finds object-like regions, names none of them."""

    name: str = "segmenter"

    @abc.abstractmethod
    def segment(self, images: torch.Tensor) -> Segmentation:
        """images: uint8 [N, 3, H, W] RGB. Returns the padded region masks of every image."""


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else ""
        raise ValueError(f"segmenter: images must be uint8 [N, 3, H, W] RGB, got {shape} {dtype}")
    if images.shape[0] == 0:
        raise ValueError("segmenter: no images to segment (empty batch)")
