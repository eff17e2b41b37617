"""The training loop shared by poisoning and repair."""

from .losses import Batch, ClipContrastiveObjective, ClipForward, Objective
from .loop import NonFiniteLossError, TrainConfig, TrainResult, batch_indices, lr_at, train

__all__ = [
    "Batch",
    "ClipContrastiveObjective",
    "ClipForward",
    "NonFiniteLossError",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "batch_indices",
    "lr_at",
    "train",
]
