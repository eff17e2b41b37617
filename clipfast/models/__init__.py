"""CLIP models: loading (tiny, open_clip, hf-hub, checkpoints), tokenization, zero-shot heads."""

from .bundle import ClipBundle, freeze_text_tower, text_tower_trains
from .checkpoint import ModelLoadError, read_checkpoint, save_checkpoint
from .loading import load_model
from .tiny import TINY_ARCHITECTURES
from .tokenizer import CompactTokenizer
from .zeroshot import ZeroShotClassifier

__all__ = [
    "ClipBundle",
    "CompactTokenizer",
    "ModelLoadError",
    "TINY_ARCHITECTURES",
    "ZeroShotClassifier",
    "freeze_text_tower",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "text_tower_trains",
]
