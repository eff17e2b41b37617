"""Segment-anything as the oracle's segmenter: the automatic mask generator (every region of an
image), and the prompted predictor (masks for given boxes or points). Weights come from a local
checkpoint file; nothing is downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Segmentation, Segmenter, check_images, pack_masks

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


def load_sam(checkpoint: str | os.PathLike, model_type: str = "vit_b", device: str | torch.device = "cpu"):
    """Build segment-anything's `model_type` and load its weights from a local checkpoint, safely
    (weights_only) and with errors that say what is wrong."""
    from segment_anything import sam_model_registry

    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path} (download sam_{model_type}_*.pth from the "
                                "segment-anything release page, or use the built-in segmenter)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"{path} is not a loadable SAM checkpoint: {error}") from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    sam = sam_model_registry[model_type](checkpoint=None)
    # Checked here, not by load_state_dict: that raises a bare RuntimeError on shape mismatches.
    expected = sam.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                  if key in state_dict and getattr(state_dict[key], "shape", None) != value.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not fit SAM {model_type}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} of another "
                         f"shape (e.g. {mismatched[:3]}); is model_type right?")
    sam.load_state_dict(state_dict)
    return sam.to(device).eval()


@dataclass
class SamSegmenter(Segmenter):
    """SAM's automatic mask generator. Thresholds are SAM's own (see SamAutomaticMaskGenerator)."""

    sam: torch.nn.Module
    max_masks: int = 16
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    name: str = field(default="sam", init=False)

    def __post_init__(self):
        from segment_anything import SamAutomaticMaskGenerator

        try:
            self._generator = SamAutomaticMaskGenerator(
                self.sam, points_per_side=self.points_per_side, points_per_batch=self.points_per_batch,
                pred_iou_thresh=self.pred_iou_thresh, stability_score_thresh=self.stability_score_thresh,
                box_nms_thresh=self.box_nms_thresh, min_mask_region_area=self.min_mask_region_area,
            )
        except ImportError as error:  # segment-anything imports cv2 only for the small-region cleanup
            raise ImportError(f"SamSegmenter: min_mask_region_area > 0 needs opencv-python ({error}); "
                              "install it or leave min_mask_region_area at 0") from error

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> Segmentation:
        check_images(images)
        height, width = images.shape[2:]
        per_image, scores = [], []
        for image in images:
            records = self._generator.generate(image.permute(1, 2, 0).cpu().numpy())
            if records:
                per_image.append(torch.from_numpy(np.stack([r["segmentation"] for r in records])))
                scores.append(torch.tensor([r["predicted_iou"] for r in records]))
            else:
                per_image.append(torch.zeros(0, height, width, dtype=torch.bool))
                scores.append(torch.zeros(0))
        return pack_masks(per_image, height, width, self.max_masks, scores)


@dataclass
class SamPromptPredictor:
    """SAM's prompted predictor: the best mask for each box (x0, y0, x1, y1) or point prompt of one
    image. Not a Segmenter (it finds no regions by itself): it turns regions someone already located,
    e.g. a trigger box the scan reports, into pixel masks."""

    sam: torch.nn.Module

    def __post_init__(self):
        from segment_anything import SamPredictor

        self._predictor = SamPredictor(self.sam)

    @torch.no_grad()
    def segment_prompts(self, image: torch.Tensor, boxes: torch.Tensor | None = None,
                        points: torch.Tensor | None = None) -> Segmentation:
        """image uint8 [3, H, W]; boxes float [K, 4] in pixels; points float [K, 2] (x, y) foreground
        clicks, one mask per point. Returns one image's masks in prompt order (not re-sorted)."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"segment_prompts: image must be a uint8 tensor [3, H, W], got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        check_images(image[None])
        if (boxes is None) == (points is None):
            raise ValueError("segment_prompts: give exactly one of boxes or points")
        prompts = boxes if boxes is not None else points
        kind, size = ("boxes", 4) if boxes is not None else ("points", 2)
        if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] != size:
            got = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
            raise ValueError(f"segment_prompts: {kind} must be a tensor [K, {size}], got {got}")
        self._predictor.set_image(image.permute(1, 2, 0).cpu().numpy())
        masks, scores = [], []
        for prompt in prompts.detach().float().cpu().numpy():
            if boxes is not None:
                out, iou, _ = self._predictor.predict(box=prompt, multimask_output=False)
            else:
                out, iou, _ = self._predictor.predict(point_coords=prompt[None], point_labels=np.array([1]),
                                                      multimask_output=False)
            masks.append(torch.from_numpy(out[0]))
            scores.append(float(iou[0]))
        height, width = image.shape[1:]
        stacked = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
        return Segmentation(stacked[None], torch.tensor([len(masks)]), torch.tensor([scores], dtype=torch.float32))
