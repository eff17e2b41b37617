"""Tiny CLIP architectures for the synthetic world (built with open_clip's own CLIP class).

"clipfast-tiny" has about 0.43 M parameters: trained from scratch on the synthetic world with
TrainConfig's defaults (1800 steps, about 100 s on two CPU cores) it reaches CA >= 90 % and BadNet
ASR >= 95 % (README, "Poisoning the tiny CLIP"). The text side is easy (a vocabulary of about 50
words), so its tower is one narrow layer; the image tower does the work.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Sequence

from open_clip.model import CLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg

from .tokenizer import CompactTokenizer

# vocab_size is left out: it follows from the word list the compact tokenizer is built from.
TINY_ARCHITECTURES: dict[str, dict] = {
    "clipfast-tiny": {
        "embed_dim": 128,
        # Patch 8 keeps the 4x4 BadNet patch inside one grid-aligned token (with patch 4, 1 % poisoning
        # was not learned: ASR 4 %).
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
    },
}


def default_vocabulary() -> list[str]:
    """Words of the synthetic world (captions and zero-shot prompts)."""
    from clipfast.data.world import world_vocabulary  # imported late: only fresh tiny models need it

    return list(world_vocabulary())


def tiny_model_config(architecture: str, vocab_size: int) -> dict:
    config = copy.deepcopy(TINY_ARCHITECTURES[architecture])
    config["text_cfg"]["vocab_size"] = vocab_size
    return config


def build_tiny(architecture: str, vocabulary: Sequence[str] | None = None) -> tuple[CLIP, CompactTokenizer]:
    """A randomly initialised tiny CLIP and its compact tokenizer (seed torch beforehand)."""
    words = default_vocabulary() if vocabulary is None else list(vocabulary)
    context_length = TINY_ARCHITECTURES[architecture]["text_cfg"]["context_length"]
    tokenizer = CompactTokenizer(words, context_length)
    config = tiny_model_config(architecture, tokenizer.vocab_size)
    model = CLIP(**config)
    # open_clip's default (OpenAI) mean/std, as create_model would attach
    set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=config["vision_cfg"]["image_size"])))
    return model, tokenizer
