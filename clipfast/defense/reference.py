"""The reference scan: the method as the public tools run it, which the fast path is measured
against and tested to agree with (ScanConfig(engine="reference")).

Per probe image, in a Python loop: every object mask's crop is cut on the host with numpy (the same
sampling box and background as ops.mask_crop), turned into the encoder input by open_clip's own
eval transform (PIL bicubic resize, centre crop, normalise), and the whole image and its crops are
encoded as one fp32 batch; scores come from full logits (ops' pure-PyTorch region_score); the
causal test encodes each image's region removals as one batch. No deliberate slowness: it is simply
not batched across images, not mixed precision and not fused. (Repair's reference is the fp32 loop
with torch's standard AdamW: RepairConfig(engine="reference").)
"""

from __future__ import annotations

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image

from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.ops import RegionScores, reference, region_score


def reference_crop(image: np.ndarray, mask: torch.Tensor, margin: float, square: bool, background: float) -> Image.Image:
    """One region crop as a PIL image: the mask's sampling box (reference.mask_box), pixels outside
    the mask or the image set to the background grey. image: uint8 [H, W, 3]; mask: bool [H, W]."""
    y0, x0, y1, x1 = reference.mask_box(mask, margin, square)
    height, width = mask.shape
    canvas = np.full((y1 - y0, x1 - x0, 3), round(background * 255), dtype=np.uint8)
    iy0, ix0, iy1, ix1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    inside = mask[iy0:iy1, ix0:ix1].numpy()[..., None]
    canvas[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = np.where(inside, image[iy0:iy1, ix0:ix1], canvas[0, 0])
    return Image.fromarray(canvas)


class _Done:
    """A result that is ready now (the reference never overlaps work)."""

    def __init__(self, scores: RegionScores):
        self.scores = scores

    def result(self) -> RegionScores:
        return self.scores


class ReferenceRegionScorer:
    """One model's view of probe images and their object regions, image by image, in fp32."""

    def __init__(self, bundle: ClipBundle, classifier: ZeroShotClassifier, config):
        self.bundle, self.classifier, self.config = bundle, classifier, config
        self.transform = image_transform(bundle.image_size, is_train=False, mean=bundle.mean, std=bundle.std)

    def _encode(self, pictures: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(picture) for picture in pictures]).to(self.bundle.device)
        return self.bundle.model.encode_image(batch, normalize=True).float()

    @torch.no_grad()
    def submit(self, images: torch.Tensor, masks: torch.Tensor, object_regions: torch.Tensor) -> _Done:
        config, rows = self.config, []
        text = self.classifier.class_embeddings
        for image, image_masks, objects in zip(images, masks, object_regions):
            array = image.permute(1, 2, 0).numpy()
            crops = [reference_crop(array, image_masks[j], config.crop_margin, config.crop_square,
                                    config.crop_background) for j in torch.nonzero(objects).flatten().tolist()]
            embeddings = self._encode([Image.fromarray(array)] + crops)
            regions = torch.zeros(1, len(objects), embeddings.shape[1], device=embeddings.device)
            regions[0, objects.to(embeddings.device)] = embeddings[1:]
            rows.append(region_score(embeddings[:1], regions, objects[None].to(embeddings.device), text.to(embeddings.device),
                                     self.classifier.logit_scale, backend="reference"))
        return _Done(RegionScores(*(torch.cat([getattr(row, name) for row in rows]).cpu() for name in RegionScores._fields)))

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the vocabulary [K, C] of whole uint8 images [K, 3, H, W] (one batch)."""
        embeddings = self._encode([Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images])
        text = self.classifier.class_embeddings.to(embeddings.device)
        return (self.classifier.logit_scale * embeddings @ text.T).softmax(-1).cpu()
