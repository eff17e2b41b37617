"""Region scorers: one model's view of probe images and their object regions. The scan loop calls a
scorer through the RegionScorer protocol and never asks which engine it is.

- FastRegionScorer (engine "fast"): all images of a batch and their regions go through the encoder
  together under autocast, the regions as crops (ops.mask_crop, each re-encoded as a whole image) or
  packed (ops.region_patches + models.packed: each region its own short sequence of its masked
  patches, attending only within itself, all in one pass with the images); ops.region_score reduces
  them; results reach the host one batch behind, so the device never waits for the host.
- ReferenceRegionScorer (engine "reference"): the method as the public tools run it, which the fast
  path is measured against and tested to agree with. Per probe image, in a Python loop: every object
  mask's crop is cut on the host with numpy (the same sampling box and background as ops.mask_crop),
  turned into the encoder input by open_clip's own eval transform (PIL bicubic resize, centre crop,
  normalise), and the whole image and its crops are encoded as one fp32 batch; scores come from full
  logits (region_score's reference). No deliberate slowness: it is simply not batched across
  images, not mixed precision and not fused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Protocol

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image

from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.models.encoder import ImageEncoder
from clipfast.models.packed import check_vision_tower, encode_regions_packed
from clipfast.ops import RegionScores, mask_crop, reference, region_score

from .config import ScanConfig


class PendingScores(Protocol):
    def result(self) -> RegionScores:
        """The scores on the host (waits for them if they are still being computed)."""


class RegionScorer(Protocol):
    """What the scan loop needs of a model."""

    # Whether the loop may segment batches ahead of this scorer in a background thread (a scorer
    # that overlaps nothing gains nothing from it, and its timing should not include the thread).
    runs_ahead: bool
    # Whether the causal test should encode each image's region removals as a batch of their own
    # (the reference's per-image structure) rather than batching them across images.
    removals_per_image: bool

    def submit(self, images: torch.Tensor, masks: torch.Tensor, object_regions: torch.Tensor) -> PendingScores:
        """Queue the scoring of uint8 images [B, 3, H, W] and their masks [B, M, H, W]; only the
        regions marked in object_regions [B, M] are scored (host tensors, all three)."""

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the vocabulary [K, C] of whole uint8 images [K, 3, H, W], on the host."""

    def region_probs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Softmax over the vocabulary [K, C] of K regions, each seen as submit sees regions (its crop,
        or its packed sequence): region k is the non-empty mask masks[k] [H, W] of uint8 image
        images[k] [3, H, W]; on the host. For naming a few regions after submit (scanner.py)."""


def make_scorer(bundle: ClipBundle, classifier: ZeroShotClassifier, config: ScanConfig) -> RegionScorer:
    """The scorer of config.engine: the one place the engine is chosen."""
    scorer = ReferenceRegionScorer if config.engine == "reference" else FastRegionScorer
    return scorer(bundle, classifier, config)


def make_grounder(bundle: ClipBundle, grounding_bundle: ClipBundle | None, classnames: list[str],
                  prompts: Callable[[str], list[str]] | None, config: ScanConfig,
                  suspect: RegionScorer | None = None, classifier: ZeroShotClassifier | None = None) -> RegionScorer:
    """The scorer that names regions (the oracle labels): the trusted model's when there is one, else
    the suspect's, seeing regions as config.grounding_regions says; the one place that rule lives.
    suspect / classifier: the suspect's own scorer and classifier, reused where they fit."""
    naming = replace(config, regions=config.grounding_regions)
    kwargs = {} if prompts is None else {"prompts": prompts}
    if grounding_bundle is not None:
        return make_scorer(grounding_bundle, ZeroShotClassifier(grounding_bundle, classnames, **kwargs), naming)
    if suspect is not None and naming.regions == config.regions:  # one scorer when it sees regions one way
        return suspect
    return make_scorer(bundle, classifier or ZeroShotClassifier(bundle, classnames, **kwargs), naming)


class _HostCopy:
    """RegionScores on their way to the host: on a GPU the copy is queued behind the work that
    makes them and waited for only when result() is called, so the loop never blocks on the batch
    it just submitted."""

    def __init__(self, scores: RegionScores):
        if scores.image_label.device.type != "cuda":
            self.scores, self.event = RegionScores(*(t.cpu() for t in scores)), None
            return
        self.scores = RegionScores(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                                     for t in scores))
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> RegionScores:
        if self.event is not None:
            self.event.synchronize()
        return self.scores


class FastRegionScorer:
    runs_ahead = True
    removals_per_image = False

    def __init__(self, bundle: ClipBundle, classifier: ZeroShotClassifier, config: ScanConfig):
        self.bundle, self.classifier, self.config = bundle, classifier, config
        self.encoder = ImageEncoder(bundle, config.precision, config.compile, config.encode_batch)
        self.text = classifier.class_embeddings.to(bundle.device)
        if config.regions == "packed":  # a tower the packed encoding cannot take fails here, before any work
            grid = check_vision_tower(bundle.model).grid_size
            self.token_budget = config.encode_batch * (1 + grid[0] * grid[1])  # encode_batch images' tokens

    @torch.no_grad()
    def submit(self, images: torch.Tensor, masks: torch.Tensor, object_regions: torch.Tensor) -> _HostCopy:
        valid = object_regions & masks.flatten(2).any(-1)  # an empty mask has no crop
        image_embeddings, region_embeddings = self._embeddings(images, masks, valid)
        scores = region_score(image_embeddings, region_embeddings, valid.to(self.bundle.device, non_blocking=True),
                              self.text, self.classifier.logit_scale, backend=self.config.backend)
        return _HostCopy(scores)

    def _embeddings(self, images: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings [B, E] and the valid regions' embeddings [B, M, E] (zero elsewhere)."""
        bundle, config, device = self.bundle, self.config, self.bundle.device
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        pixels = bundle.preprocess(images)
        if config.regions == "packed":
            # Only the scored regions get tokens: the others' masks are emptied.
            scored = bundle.resize_masks(masks) & valid.to(device, non_blocking=True)[:, :, None, None]
            with self.encoder.autocast():  # patches written in the encoder's precision, as crops are
                image_embeddings, region_embeddings, _ = encode_regions_packed(
                    bundle, pixels.to(self.encoder.dtype or torch.float32), bundle.resize(images), scored,
                    background=config.crop_background,
                    min_coverage=config.packed_min_coverage, token_budget=self.token_budget, backend=config.backend)
            return image_embeddings, region_embeddings
        index = torch.nonzero(valid.flatten()).flatten().to(device, non_blocking=True)
        embeddings = self.encoder(torch.cat([pixels.to(self.encoder.dtype or torch.float32),
                                             self._crops(images, masks)[index]]))
        region_embeddings = embeddings.new_zeros(masks.shape[0] * masks.shape[1], embeddings.shape[1])
        region_embeddings[index] = embeddings[len(images):]
        return embeddings[: len(images)], region_embeddings.view(*masks.shape[:2], -1)

    def _crops(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Every region's crop [B * M, 3, S, S] (images and masks on the device), written in the
        encoder's precision: half the bytes under bf16."""
        bundle, config = self.bundle, self.config
        crops = mask_crop(images, masks, bundle.image_size, margin=config.crop_margin, square=config.crop_square,
                          background=config.crop_background, mean=bundle.mean, std=bundle.std,
                          out_dtype=self.encoder.dtype or torch.float32, backend=config.backend)
        return crops.crops.flatten(0, 1)

    def _probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (self.classifier.logit_scale * embeddings @ self.text.T).softmax(-1).cpu()

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self._probs(self.encoder(self.bundle.preprocess(images)))

    @torch.no_grad()
    def region_probs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros(0, self.text.shape[0])
        if self.config.regions == "packed":  # the packed pass encodes the whole images too: meant for few regions
            return self._probs(self._embeddings(images, masks[:, None], torch.ones(len(masks), 1, dtype=torch.bool))[1][:, 0])
        device = self.bundle.device
        return self._probs(self.encoder(self._crops(images.to(device), masks[:, None].to(device))))


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


class _Ready:
    """Scores that are ready now (the reference never overlaps work)."""

    def __init__(self, scores: RegionScores):
        self.scores = scores

    def result(self) -> RegionScores:
        return self.scores


class ReferenceRegionScorer:
    runs_ahead = False
    removals_per_image = True

    def __init__(self, bundle: ClipBundle, classifier: ZeroShotClassifier, config: ScanConfig):
        self.bundle, self.classifier, self.config = bundle, classifier, config
        self.transform = image_transform(bundle.image_size, is_train=False, mean=bundle.mean, std=bundle.std)

    def _encode(self, pictures: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(picture) for picture in pictures]).to(self.bundle.device)
        return self.bundle.model.encode_image(batch, normalize=True).float()

    @torch.no_grad()
    def submit(self, images: torch.Tensor, masks: torch.Tensor, object_regions: torch.Tensor) -> _Ready:
        config, rows = self.config, []
        text = self.classifier.class_embeddings
        for image, image_masks, objects in zip(images, masks, object_regions):
            array = image.permute(1, 2, 0).numpy()
            crops = [reference_crop(array, image_masks[j], config.crop_margin, config.crop_square,
                                    config.crop_background) for j in torch.nonzero(objects).flatten().tolist()]
            embeddings = self._encode([Image.fromarray(array)] + crops)
            regions = torch.zeros(1, len(objects), embeddings.shape[1], device=embeddings.device)
            regions[0, objects.to(embeddings.device)] = embeddings[1:]
            rows.append(region_score(embeddings[:1], regions, objects[None].to(embeddings.device),
                                     text.to(embeddings.device), self.classifier.logit_scale, backend="reference"))
        return _Ready(RegionScores(*(torch.cat([getattr(row, name) for row in rows]).cpu()
                                     for name in RegionScores._fields)))

    def _probs(self, pictures: list[Image.Image]) -> torch.Tensor:
        if not pictures:
            return torch.zeros(0, len(self.classifier.class_embeddings))
        embeddings = self._encode(pictures)
        text = self.classifier.class_embeddings.to(embeddings.device)
        return (self.classifier.logit_scale * embeddings @ text.T).softmax(-1).cpu()

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self._probs([Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images])

    @torch.no_grad()
    def region_probs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        config = self.config
        return self._probs([reference_crop(image.permute(1, 2, 0).numpy(), mask, config.crop_margin, config.crop_square,
                                           config.crop_background) for image, mask in zip(images, masks)])
