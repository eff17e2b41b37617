"""Inference image embeddings at speed: autocast precision, optional torch.compile, chunked batches.

open_clip's attention runs through nn.MultiheadAttention with need_weights=False, which calls
scaled_dot_product_attention (flash / memory-efficient kernels on a GPU), so fused attention needs
nothing here. ViTs gain nothing from channels-last (their only convolution is the patchify).
"""

from __future__ import annotations

import torch

from .bundle import ClipBundle

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: any GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up defensively
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None means plain fp32 (auto: bf16 where it is native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return torch.bfloat16 if precision == "bf16" else None


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
