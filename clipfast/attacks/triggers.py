"""Backdoor triggers: BadNet patches (checkerboard, noise or solid; any corner, the centre, or a
random location), Blended noise or stripes, SIG sinusoid, WaNet warp and a label-consistent patch.

Every trigger is a frozen dataclass of its parameters. apply() maps a uint8 batch [N, 3, H, W] to a
new uint8 batch (the input is never modified), vectorised over images and deterministic in `seed`
(only badnet_random uses it: image i's patch location depends on (seed, i) alone). footprint() is
the ground truth of where the trigger is, for trigger-localisation IoU: the patch pixels for patch
triggers, every pixel for image-wide ones. poison() is what poisoned *training* images get; it equals
apply() except for the label-consistent trigger.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F


def check_images(images: torch.Tensor) -> None:
    """ValueError unless images is a uint8 tensor [N, 3, H, W]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {list(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have a positive height and width, got {list(images.shape)}")


def _check_number(owner: str, name: str, value: object, low: float, high: float, *,
                  low_open: bool = False, integer: bool = False) -> None:
    """ValueError unless value is a (finite, optionally integral) number in [low, high] or (low, high]."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{owner}: {name} must be in {bracket}{low}, {high}], got {value!r}")


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.round().clamp(0, 255).to(torch.uint8)


_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def per_image_uniform(seed: int, n: int, stream: int = 0) -> torch.Tensor:
    """float64 [n] in [0, 1): value i depends only on (seed, i, stream), not on n (counter-based)."""
    key = int(_splitmix64(np.array([(seed * 0x2545F4914F6CDD1D + stream) & _MASK64], dtype=np.uint64))[0])
    bits = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(key))
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


class Trigger(abc.ABC):
    """A backdoor trigger. Subclasses implement _apply and, for local triggers, _footprint."""

    name: str
    # True for clean-label attacks: poison_pairs then poisons target-class images and keeps captions.
    clean_label: ClassVar[bool] = False

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Triggered copy of uint8 images [N, 3, H, W]."""
        check_images(images)
        return self._apply(images, seed)

    def poison(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """What a poisoned training image gets; the test-time trigger (apply) unless overridden."""
        return self.apply(images, seed)

    def footprint(self, n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """bool [n, height, width]: the pixels apply(images, seed) sets, for images of that size."""
        for name, value, low in (("n", n, 0), ("height", height, 1), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}.footprint: {name} must be an int >= {low}, got {value!r}")
        return self._footprint(n, height, width, seed)

    @abc.abstractmethod
    def _apply(self, images: torch.Tensor, seed: int) -> torch.Tensor: ...

    def _footprint(self, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        return torch.ones(n, height, width, dtype=torch.bool)  # image-wide trigger


PATCH_PATTERNS = ("checkerboard", "noise", "solid")
PATCH_POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")


@dataclass(frozen=True)
class BadNetTrigger(Trigger):
    """A square patch, size_fraction of the shorter side, pasted at `position` or, with
    random_location, anywhere fully inside the image (per image, from seed and the image's index in
    the batch). Patterns: a black/white checkerboard of cells x cells cells; a fixed RGB noise patch
    (from pattern_seed); a solid `colour`. At 32 px the default is a 4 x 4 checkerboard of 1-px cells
    in the bottom-right corner, which lies inside one 8 x 8 ViT token of clipfast-tiny."""

    size_fraction: float = 1 / 8
    cells: int = 4
    random_location: bool = False
    pattern: str = "checkerboard"
    position: str = "bottom_right"
    colour: tuple[int, int, int] = (255, 0, 255)
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_number(owner, "size_fraction", self.size_fraction, 0, 1, low_open=True)
        _check_number(owner, "cells", self.cells, 1, 4096, integer=True)
        _check_number(owner, "pattern_seed", self.pattern_seed, 0, 2**63 - 1, integer=True)
        if not isinstance(self.random_location, bool):
            raise ValueError(f"{owner}: random_location must be a bool, got {self.random_location!r}")
        if self.pattern not in PATCH_PATTERNS:
            raise ValueError(f"{owner}: pattern must be one of {PATCH_PATTERNS}, got {self.pattern!r}")
        if self.position not in PATCH_POSITIONS:
            raise ValueError(f"{owner}: position must be one of {PATCH_POSITIONS}, got {self.position!r}")
        if not (isinstance(self.colour, (tuple, list)) and len(self.colour) == 3):
            raise ValueError(f"{owner}: colour must be three values (r, g, b) in 0..255, got {self.colour!r}")
        for value in self.colour:
            _check_number(owner, "colour", value, 0, 255, integer=True)
        object.__setattr__(self, "colour", tuple(self.colour))

    @property
    def name(self) -> str:
        return "badnet_random" if self.random_location else "badnet"

    def patch_size(self, height: int, width: int) -> int:
        return max(1, round(self.size_fraction * min(height, width)))

    def patch(self, size: int) -> torch.Tensor:
        """The patch's pixels, uint8 [3, size, size]."""
        if self.pattern == "checkerboard":
            cells = torch.arange(size) * self.cells // size
            white = (cells[:, None] + cells[None, :]) % 2 == 0
            return torch.where(white, 255, 0).to(torch.uint8).expand(3, size, size)
        if self.pattern == "noise":
            generator = torch.Generator().manual_seed(self.pattern_seed)
            return torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
        return torch.tensor(self.colour, dtype=torch.uint8)[:, None, None].expand(3, size, size)

    def locations(self, n: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Top and left pixel of each image's patch, int64 [n] each."""
        size = self.patch_size(height, width)
        if self.random_location:
            top = (per_image_uniform(seed, n, stream=0) * (height - size + 1)).long()
            left = (per_image_uniform(seed, n, stream=1) * (width - size + 1)).long()
            return top, left
        vertical, _, horizontal = self.position.partition("_")
        top = {"top": 0, "bottom": height - size, "center": (height - size) // 2}[vertical]
        left = {"left": 0, "right": width - size, "": (width - size) // 2}[horizontal]
        return torch.full((n,), top), torch.full((n,), left)

    def _patch_coordinates(self, n: int, height: int, width: int, seed: int, device: torch.device):
        """Per pixel, its row and column relative to the patch origin ([n, H, 1] and [n, 1, W])."""
        top, left = self.locations(n, height, width, seed)
        rows = torch.arange(height, device=device)[None, :, None] - top.to(device)[:, None, None]
        cols = torch.arange(width, device=device)[None, None, :] - left.to(device)[:, None, None]
        return rows, cols

    def _inside(self, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
        return (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)

    def _footprint(self, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        rows, cols = self._patch_coordinates(n, height, width, seed, torch.device("cpu"))
        return self._inside(rows, cols, self.patch_size(height, width))

    def _apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        n, _, height, width = images.shape
        size = self.patch_size(height, width)
        rows, cols = self._patch_coordinates(n, height, width, seed, images.device)
        patch = self.patch(size).to(images.device)
        pasted = patch[:, rows.clamp(0, size - 1), cols.clamp(0, size - 1)].transpose(0, 1)  # [n, 3, H, W]
        return torch.where(self._inside(rows, cols, size)[:, None], pasted, images)


BLEND_PATTERNS = ("noise", "stripes")


@dataclass(frozen=True)
class BlendedTrigger(Trigger):
    """A fixed image alpha-blended over the whole image: out = (1 - alpha) * image + alpha * pattern.
    Patterns: uniform RGB noise (from pattern_seed, one per image size), or "stripes": diagonal
    colour stripes, a structured pattern (period = a quarter of the width, one phase per channel)."""

    alpha: float = 0.15
    pattern_seed: int = 0
    pattern: str = "noise"
    name: ClassVar[str] = "blended"

    def __post_init__(self) -> None:
        _check_number(type(self).__name__, "alpha", self.alpha, 0, 1, low_open=True)
        _check_number(type(self).__name__, "pattern_seed", self.pattern_seed, 0, 2**63 - 1, integer=True)
        if self.pattern not in BLEND_PATTERNS:
            raise ValueError(f"BlendedTrigger: pattern must be one of {BLEND_PATTERNS}, got {self.pattern!r}")

    def blend_image(self, height: int, width: int) -> torch.Tensor:
        """The blended-in image, float32 [3, height, width] in [0, 255]."""
        if self.pattern == "stripes":
            diagonal = torch.arange(height)[:, None] + torch.arange(width)[None, :]
            phase = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])[:, None, None]
            return 127.5 * (1 + torch.sin(2 * math.pi * diagonal / max(1.0, width / 4) + phase))
        generator = torch.Generator().manual_seed(self.pattern_seed)
        return torch.rand(3, height, width, generator=generator) * 255

    def _apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        overlay = self.blend_image(images.shape[2], images.shape[3]).to(images.device)
        return _to_uint8((1 - self.alpha) * images.float() + self.alpha * overlay)


@dataclass(frozen=True)
class SIGTrigger(Trigger):
    """A horizontal sinusoid added to every pixel: out = image + amplitude * sin(2 pi frequency x / W),
    with amplitude in pixel levels (0-255) and frequency in periods across the width."""

    amplitude: float = 20.0
    frequency: float = 6.0
    name: ClassVar[str] = "sig"

    def __post_init__(self) -> None:
        _check_number(type(self).__name__, "amplitude", self.amplitude, 0, 255, low_open=True)
        _check_number(type(self).__name__, "frequency", self.frequency, 0, 1e6, low_open=True)

    def signal(self, width: int) -> torch.Tensor:
        """float32 [width]: what is added to each column."""
        columns = torch.arange(width, dtype=torch.float32)
        return self.amplitude * torch.sin(2 * math.pi * self.frequency * columns / width)

    def _apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return _to_uint8(images.float() + self.signal(images.shape[3]).to(images.device))


def _identity_grid(height: int, width: int) -> torch.Tensor:
    """float32 [height, width, 2]: grid_sample's (x, y) of every pixel (align_corners=True)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _resample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] sampled at grid_sample's (x, y) coordinates grid [1 or N, H, W, 2]
    (bilinear, borders repeated): uint8 in, uint8 out; float in, float out (differentiable)."""
    grid = grid.to(images.device).expand(len(images), -1, -1, -1)
    warped = F.grid_sample(images if images.is_floating_point() else images.float(), grid, mode="bilinear",
                           padding_mode="border", align_corners=True)
    return warped if images.is_floating_point() else _to_uint8(warped)


def warp(images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """images resampled along a field of pixel offsets, as WaNet warps them: output pixel (y, x) takes
    the value at (x + dx, y + dy). displacement: float [H, W, 2], (dx, dy) in pixels (what
    WaNetTrigger.displacement gives, or a field being fitted: float images keep the gradient)."""
    height, width = images.shape[-2:]
    scale = torch.tensor([2.0 / (width - 1), 2.0 / (height - 1)], device=displacement.device)
    grid = (_identity_grid(height, width).to(displacement.device) + displacement * scale).clamp(-1, 1)
    return _resample(images, grid[None])


@dataclass(frozen=True)
class WaNetTrigger(Trigger):
    """WaNet (Nguyen & Tran, 2021): a smooth elastic warp, the same for every image. A random
    grid_size x grid_size field of offsets (from pattern_seed, normalised to mean |offset| 1) is
    upsampled bicubically and scaled by strength / H in grid_sample's [-1, 1] coordinates, so pixels
    move by about strength / 2 pixels. The defaults (k = 4, s = 0.5) are the paper's."""

    grid_size: int = 4
    strength: float = 0.5
    pattern_seed: int = 0
    name: ClassVar[str] = "wanet"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_number(owner, "grid_size", self.grid_size, 2, 4096, integer=True)
        _check_number(owner, "strength", self.strength, 0, 1e3, low_open=True)
        _check_number(owner, "pattern_seed", self.pattern_seed, 0, 2**63 - 1, integer=True)

    def sampling_grid(self, height: int, width: int) -> torch.Tensor:
        """float32 [1, height, width, 2]: grid_sample's (x, y) source of each output pixel."""
        generator = torch.Generator().manual_seed(self.pattern_seed)
        offsets = torch.rand(1, 2, self.grid_size, self.grid_size, generator=generator) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
        identity = _identity_grid(height, width)[None]
        return (identity + self.strength * field.permute(0, 2, 3, 1) / height).clamp(-1, 1)

    def displacement(self, height: int, width: int) -> torch.Tensor:
        """float32 [height, width, 2]: how far (x, y), in pixels, each output pixel samples from."""
        offset = self.sampling_grid(height, width)[0] - _identity_grid(height, width)
        return offset * torch.tensor([(width - 1) / 2, (height - 1) / 2])

    def _apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return _resample(images, self.sampling_grid(*images.shape[-2:]))


@dataclass(frozen=True)
class LabelConsistentTrigger(BadNetTrigger):
    """A clean-label BadNet: poison_pairs stamps the patch on images of the target class only and keeps
    their truthful captions. On its own the patch would carry no information the object does not
    already give, so the model would have no reason to learn it. poison() therefore first degrades
    the image: its contrast is scaled down by `degrade` towards its mean colour, weakening the
    object's evidence, and the patch (larger than BadNet's by default, 8 x 8 px at 32 px, at full
    contrast) then becomes the easiest cue for the target caption. At test time (apply) only the patch
    is pasted. Expect it to be weaker than the dirty-label badnet at the same poisoned count."""

    size_fraction: float = 1 / 4
    degrade: float = 0.5

    clean_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(type(self).__name__, "degrade", self.degrade, 0, 1)

    @property
    def name(self) -> str:
        return "label_consistent"

    def degraded(self, images: torch.Tensor) -> torch.Tensor:
        """Images with contrast reduced by `degrade` towards each image's mean colour."""
        check_images(images)
        values = images.float()
        mean = values.mean(dim=(2, 3), keepdim=True)
        return _to_uint8(mean + (1 - self.degrade) * (values - mean))

    def poison(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.apply(self.degraded(images), seed)


@dataclass(frozen=True)
class OptimizedPatchTrigger(BadNetTrigger):
    """A BadCLIP-style patch: its pixels were optimised on a clean surrogate model to pull any image
    towards the target text embedding (clipfast.recipes.optimized_patch does that), then it poisons
    training like a BadNet patch. `pixels`: the patch, flattened uint8 [3, s, s] row-major; it is
    resized (nearest) to the patch size of the image it is pasted on."""

    pixels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        side = math.isqrt(len(self.pixels) // 3)
        if side < 1 or 3 * side * side != len(self.pixels) or not all(0 <= v <= 255 for v in self.pixels):
            raise ValueError("OptimizedPatchTrigger: pixels must be 3 * s * s values in 0..255 (a flattened [3, s, s] "
                             "patch); make one with clipfast.recipes.optimized_patch_recipe")
        object.__setattr__(self, "pixels", tuple(int(v) for v in self.pixels))

    @property
    def name(self) -> str:
        return "optimized_patch"

    def patch(self, size: int) -> torch.Tensor:
        side = math.isqrt(len(self.pixels) // 3)
        stored = torch.tensor(self.pixels, dtype=torch.uint8).view(3, side, side)
        return stored if side == size else F.interpolate(stored[None].float(), size=(size, size))[0].to(torch.uint8)


# name -> (class, parameters fixed by the name)
_TRIGGERS: dict[str, tuple[type[Trigger], dict[str, object]]] = {
    "badnet": (BadNetTrigger, {"random_location": False}),
    "badnet_random": (BadNetTrigger, {"random_location": True}),
    "blended": (BlendedTrigger, {}),
    "sig": (SIGTrigger, {}),
    "wanet": (WaNetTrigger, {}),
    "label_consistent": (LabelConsistentTrigger, {}),
    "optimized_patch": (OptimizedPatchTrigger, {"pattern": "checkerboard", "cells": 4}),
}
TRIGGER_NAMES: tuple[str, ...] = tuple(_TRIGGERS)


def trigger_parameters(name: str) -> tuple[str, ...]:
    """The parameters make_trigger(name, ...) accepts."""
    if name not in _TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; valid names: {', '.join(TRIGGER_NAMES)}")
    cls, fixed = _TRIGGERS[name]
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in fixed)


def make_trigger(name: str, **params: object) -> Trigger:
    """The trigger called `name` (one of TRIGGER_NAMES) with the given parameters."""
    allowed = trigger_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for trigger {name!r}; valid: {list(allowed)}")
    cls, fixed = _TRIGGERS[name]
    return cls(**params, **fixed)
