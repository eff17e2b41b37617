"""Inference image embeddings at speed: autocast precision, optional torch.compile, chunked batches.

open_clip's attention runs through nn.MultiheadAttention with need_weights=False, which calls
scaled_dot_product_attention (flash / memory-efficient kernels on a GPU), so fused attention needs
nothing here. ViTs gain nothing from channels-last (their only convolution is the patchify).
"""

from __future__ import annotations

import torch

from .bundle import ClipBundle
from .precision import inference_dtype


class ImageEncoder:
    """Normalised fp32 image embeddings [N, E] of preprocessed pixels [N, 3, S, S] on the model's device."""

    def __init__(self, bundle: ClipBundle, precision: str = "auto", compile: bool = False, batch_size: int = 1024):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle, self.batch_size = bundle, batch_size
        self.device = bundle.device
        self.dtype = inference_dtype(precision, self.device)
        encode = bundle.model.encode_image
        self._encode = torch.compile(encode, dynamic=True) if compile else encode

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return torch.cat([self._encode(chunk, normalize=True).float() for chunk in pixels.split(self.batch_size)])
