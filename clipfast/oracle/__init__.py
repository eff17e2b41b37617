"""clipfast.oracle: class-agnostic segmenters that cut probe images into regions (DESIGN.md stage 1).

make_segmenter("builtin") is the weight-free ClassicalSegmenter; make_segmenter("sam",
checkpoint=..., model_type=...) is segment-anything's automatic mask generator on local weights.
"""

from __future__ import annotations

import dataclasses

from .base import Segmentation, Segmenter, check_images, pack_flat_masks, pack_masks
from .classical import ClassicalSegmenter
from .sam import SAM_MODEL_TYPES, SamPromptPredictor, SamSegmenter, load_sam

SEGMENTER_NAMES: tuple[str, ...] = ("builtin", "sam")
_SAM_LOAD_OPTIONS = ("checkpoint", "model_type", "device")

__all__ = [
    "SAM_MODEL_TYPES", "SEGMENTER_NAMES", "ClassicalSegmenter", "SamPromptPredictor", "SamSegmenter",
    "Segmentation", "Segmenter", "check_images", "load_sam", "make_segmenter", "pack_flat_masks", "pack_masks",
]


def _settable_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"make_segmenter({name!r}): unknown option(s) {unknown}; valid: {sorted(allowed)}")


def make_segmenter(name: str, **options) -> Segmenter:
    """The segmenter called `name` (one of SEGMENTER_NAMES), configured by `options`:
    "builtin": any ClassicalSegmenter field; "sam": checkpoint and model_type (required), device, and
    any SamSegmenter field but `sam`."""
    if name == "builtin":
        _check_options(name, options, _settable_fields(ClassicalSegmenter))
        return ClassicalSegmenter(**options)
    if name == "sam":
        # Every option is checked before the (slow) model build.
        _check_options(name, options, (_settable_fields(SamSegmenter) - {"sam"}) | set(_SAM_LOAD_OPTIONS))
        missing = [key for key in ("checkpoint", "model_type") if key not in options]
        if missing:
            raise ValueError(f"make_segmenter('sam') needs {' and '.join(missing)}: a local segment-anything "
                             f"checkpoint file and its model type (one of {', '.join(SAM_MODEL_TYPES)})")
        load_options = {key: options.pop(key) for key in _SAM_LOAD_OPTIONS if key in options}
        return SamSegmenter(load_sam(**load_options), **options)
    raise ValueError(f"unknown segmenter {name!r}; valid names: {', '.join(SEGMENTER_NAMES)}")
