"""Zero-shot classification with prompt-template-averaged text embeddings."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .bundle import DEFAULT_BATCH_SIZE, ClipBundle


def default_prompts(classname: str) -> list[str]:
    return [f"a photo of a {classname}."]


class ZeroShotClassifier:
    """Classifies images by cosine similarity to one embedding per class.

    Each class embedding is the normalised mean of the normalised embeddings of its prompts
    (CLIP's prompt ensembling); it is computed once, here.
    """

    def __init__(
        self,
        bundle: ClipBundle,
        classnames: Sequence[str],
        prompts: Callable[[str], list[str]] = default_prompts,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if not classnames:
            raise ValueError("ZeroShotClassifier needs at least one class name")
        self.bundle = bundle
        self.classnames = list(classnames)
        self.batch_size = batch_size
        prompt_lists = [prompts(name) for name in self.classnames]
        if any(not prompt_list for prompt_list in prompt_lists):
            raise ValueError("every class needs at least one prompt")
        embeddings = bundle.encode_texts([p for prompt_list in prompt_lists for p in prompt_list], batch_size=batch_size)
        per_class = torch.split(embeddings, [len(prompt_list) for prompt_list in prompt_lists])
        self.class_embeddings = F.normalize(torch.stack([e.mean(dim=0) for e in per_class]), dim=-1)  # [C, D]
        self.logit_scale = bundle.logit_scale

    def encoding_with(self, bundle: ClipBundle) -> "ZeroShotClassifier":
        """These class embeddings, images encoded by `bundle` (the same model wrapped for training, say,
        whose text tower is frozen): no text is encoded again."""
        other = copy.copy(self)
        other.bundle = bundle
        return other

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities [N, C]."""
        image_embeddings = self.bundle.encode_images(images, batch_size=self.batch_size)
        return self.logit_scale * image_embeddings @ self.class_embeddings.T

    def predict(self, images: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k class indices [N, k], their softmax probabilities [N, k])."""
        probabilities = self.logits(images).softmax(dim=-1)
        top = probabilities.topk(min(k, len(self.classnames)), dim=-1)
        return top.indices, top.values
