"""ClipBundle: an open_clip model together with everything needed to feed, describe and rebuild it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text import encode_text

DEFAULT_BATCH_SIZE = 256


@dataclass
class ClipBundle:
    """A CLIP model plus its tokenizer and image preprocessing.

    `architecture` (an open_clip model name, an "hf-hub:" id or a clipfast tiny name) and
    `vocabulary` (the compact tokenizer's words, tiny models only) are what a checkpoint needs to
    rebuild the model with no other file.
    """

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    architecture: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocabulary: tuple[str, ...] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images [N, 3, H, W] -> normalised float32 on the model's device.

        Same geometry as open_clip's eval transform: resize the shorter side to image_size
        (bicubic, antialiased), centre-crop, then normalise with the model's mean/std.
        """
        x = self.resize(images)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """preprocess's geometry without its normalisation: images [N, 3, H, W] on the model's device
        at image_size, unchanged (uint8 stays uint8) when they are that size already, else resized
        to float [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device)
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x if x.dtype == torch.uint8 else x.float()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self._to_input_geometry(x, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)

    def resize_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks [B, M, H, W] through preprocess's geometry (nearest neighbour): bool [B, M, S, S],
        aligned with the encoder's input pixels."""
        if masks.shape[-2:] == (self.image_size, self.image_size):
            return masks
        resized = self._to_input_geometry(masks.flatten(0, 1)[:, None].float(), mode="nearest")[:, 0]
        return resized.view(*masks.shape[:2], self.image_size, self.image_size) > 0.5

    def _to_input_geometry(self, x: torch.Tensor, **interpolation) -> torch.Tensor:
        """Resize [N, C, H, W] so the shorter side is image_size, then centre-crop to a square."""
        size = self.image_size
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = F.interpolate(x, size=new_size, **interpolation)
        top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        return x[..., top : top + size, left : left + size]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, normalize: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """Image embeddings [N, D] (inference only; batched so large uint8 sets stay on the CPU)."""
        _require_nonempty(images, "images")
        chunks = [
            self.model.encode_image(self.preprocess(images[start : start + batch_size]), normalize=normalize).float()
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], normalize: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """Text embeddings [N, D] (inference only)."""
        texts = list(texts)
        _require_nonempty(texts, "texts")
        chunks = [
            encode_text(self.model, self.tokenizer(texts[start : start + batch_size]).to(self.device), normalize=normalize).float()
            for start in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks)


def _is_text_parameter(name: str) -> bool:
    return not name.startswith("visual.")  # open_clip keeps the image tower under `visual`


def freeze_text_tower(model: nn.Module) -> None:
    """Stop gradients into everything but the image tower (text tower, logit scale)."""
    for name, parameter in model.named_parameters():
        if _is_text_parameter(name):
            parameter.requires_grad_(False)


def text_tower_trains(model: nn.Module) -> bool:
    """Whether any parameter outside the image tower would receive gradients."""
    return any(parameter.requires_grad for name, parameter in model.named_parameters() if _is_text_parameter(name))


def _require_nonempty(items, what: str) -> None:
    if len(items) == 0:
        raise ValueError(f"no {what} to encode")
