"""region_topk: per-label counts and the k best-scoring entries of each label (DESIGN.md section 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from .contracts import register_contract


# The CUDA kernel's limits (kRegionTopkMaxK, kRegionTopkMaxEntries in csrc/kernels/cuda/region_topk.cuh)
# and the Triton kernel's (int32 entry offsets).
CUDA_MAX_K = 1024
CUDA_MAX_ENTRIES = 2**32 - 1
TRITON_MAX_ENTRIES = 2**31 - 1


def _limits(entries: int, k: int) -> dict[str, str]:
    """The backends that cannot take this input, and why (auto passes them over)."""
    limits = {}
    if k > CUDA_MAX_K:
        limits["cuda"] = f"k={k} is above the CUDA kernel's limit of {CUDA_MAX_K} per label"
    elif entries > CUDA_MAX_ENTRIES:
        limits["cuda"] = f"{entries} entries exceed the CUDA kernel's limit of {CUDA_MAX_ENTRIES}"
    if entries > TRITON_MAX_ENTRIES:
        limits["triton"] = f"{entries} entries exceed the Triton kernel's limit of {TRITON_MAX_ENTRIES}"
    return limits


class LabelTopK(NamedTuple):
    counts: torch.Tensor   # [num_labels] int64
    indices: torch.Tensor  # [num_labels, k] int64, best first, ties to the lower index, -1 padded


def region_topk(scores: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int, *,
                backend: str = "auto") -> LabelTopK:
    """One pass over (score, label) pairs; entries whose label is outside [0, num_labels) are ignored."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("region_topk: scores and labels must be tensors")
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"region_topk: scores and labels must be 1-d of equal length, got "
                         f"{tuple(scores.shape)} and {tuple(labels.shape)}")
    if not scores.is_floating_point() or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"region_topk: scores must be float and labels int32/int64, got {scores.dtype}, {labels.dtype}")
    if num_labels < 1 or k < 1:
        raise ValueError(f"region_topk: num_labels and k must be >= 1, got {num_labels}, {k}")
    if scores.device != labels.device:
        raise ValueError(f"region_topk: scores are on {scores.device} but labels on {labels.device}")
    scores, labels = scores.float(), labels.long()  # the kernels' types; bf16 -> fp32 is exact
    chosen = backends.resolve("region_topk", backend, scores.device, _limits(len(scores), k))
    return LabelTopK(*backends.call("region_topk", chosen, scores, labels, int(num_labels), int(k)))


if not isinstance(backends.EXTENSION, ImportError):
    register_contract("region_topk", "clipfast::region_topk")
