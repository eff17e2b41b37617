"""clipfast.attacks: backdoor triggers and poisoning of image-caption data."""

from clipfast.attacks.poison import PoisonedPairs, poison_pairs
from clipfast.attacks.triggers import (
    BLEND_PATTERNS,
    PATCH_PATTERNS,
    PATCH_POSITIONS,
    TRIGGER_NAMES,
    BadNetTrigger,
    BlendedTrigger,
    LabelConsistentTrigger,
    SIGTrigger,
    Trigger,
    WaNetTrigger,
    make_trigger,
    trigger_parameters,
)

__all__ = [
    "BLEND_PATTERNS",
    "PATCH_PATTERNS",
    "PATCH_POSITIONS",
    "TRIGGER_NAMES",
    "BadNetTrigger",
    "BlendedTrigger",
    "LabelConsistentTrigger",
    "PoisonedPairs",
    "SIGTrigger",
    "Trigger",
    "WaNetTrigger",
    "make_trigger",
    "poison_pairs",
    "trigger_parameters",
]
