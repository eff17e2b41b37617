"""region_topk: per-label counts and the k best-scoring entries of each label (DESIGN.md section 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends


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
    chosen = backends.resolve("region_topk", backend, scores.device)
    return LabelTopK(*backends.call("region_topk", chosen, scores, labels, int(num_labels), int(k)))


def _fake(scores, labels, num_labels, k):
    return scores.new_empty(num_labels, dtype=torch.int64), scores.new_empty((num_labels, k), dtype=torch.int64)


if not isinstance(backends.EXTENSION, ImportError):
    torch.library.register_fake("clipfast::region_topk")(_fake)
