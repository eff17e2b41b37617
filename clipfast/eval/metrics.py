"""Clean accuracy (CA) and attack success rate (ASR) of a zero-shot classifier."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipfast.models.bundle import ClipBundle
from clipfast.models.zeroshot import ZeroShotClassifier


def _top1(classifier: ZeroShotClassifier, images: torch.Tensor) -> torch.Tensor:
    if len(images) == 0:
        raise ValueError("no test images")
    return classifier.predict(images, k=1)[0][:, 0].cpu()


def clean_accuracy(classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose top-1 zero-shot class is their label."""
    return float((_top1(classifier, images) == labels.cpu()).float().mean())


def triggered_victims(images: torch.Tensor, labels: torch.Tensor, trigger, target_label: int, seed: int = 0) -> torch.Tensor:
    """The images whose true class is not the target, with the trigger applied."""
    keep = labels != target_label
    if not keep.any():
        raise ValueError(f"every test image is of the target class {target_label}; ASR is undefined")
    return trigger.apply(images[keep], seed=seed)


def attack_success_rate(
    classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, trigger, target_label: int, seed: int = 0
) -> float:
    """Fraction of triggered test images whose true class is not the target that are classified as the target."""
    predictions = _top1(classifier, triggered_victims(images, labels, trigger, target_label, seed))
    return float((predictions == target_label).float().mean())


def evaluate(
    bundle: ClipBundle,
    test_samples,
    trigger=None,
    target_label: int | None = None,
    classnames: Sequence[str] | None = None,
    prompts: Callable[[str], list[str]] | None = None,
    seed: int = 0,
) -> dict:
    """CA, ASR (when a trigger and target are given), test-set sizes and per-class accuracy.

    test_samples: anything with .images (uint8 [N, 3, H, W]) and .labels (int64 [N]); classnames and
    prompts default to the synthetic world's.
    """
    if classnames is None or prompts is None:
        from clipfast.data.world import CLASSES, zero_shot_prompts

        classnames = CLASSES if classnames is None else classnames
        prompts = zero_shot_prompts if prompts is None else prompts
    if (trigger is None) != (target_label is None):
        raise ValueError("give both a trigger and a target label to measure ASR, or neither")
    classifier = ZeroShotClassifier(bundle, classnames, prompts)
    labels = test_samples.labels.cpu()
    correct = _top1(classifier, test_samples.images) == labels
    per_class = {
        name: round(float(correct[labels == index].float().mean()), 4)
        for index, name in enumerate(classnames)
        if (labels == index).any()
    }
    report = {
        "model": bundle.name,
        "ca": round(float(correct.float().mean()), 4),
        "asr": None,
        "n": len(labels),
        "n_asr": 0,
        "target_label": target_label,
        "target_class": None if target_label is None else classnames[target_label],
        "per_class_accuracy": per_class,
    }
    if trigger is not None:
        asr = attack_success_rate(classifier, test_samples.images, labels, trigger, target_label, seed)
        report["asr"] = round(asr, 4)
        report["n_asr"] = int((labels != target_label).sum())
    return report
