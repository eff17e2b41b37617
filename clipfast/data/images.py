"""Decoding users' image files, and the machinery every file-backed dataset shares.

Images are decoded with PIL to 8-bit RGB uint8 tensors [3, H, W]: grayscale, palette and CMYK are
converted, 16-bit images are scaled down to 8 bits (not clipped), and transparent images are
composited over white. Images over MAX_PIXELS are refused before their pixels are decoded
(decompression bombs). With verify=True every file is checked once up front (opened and verified by
PIL): with on_error="skip" unusable files are listed in `skipped` as (path, reason); with
on_error="raise" the first one raises a ValueError naming the file and the reason. Some damage (e.g.
a truncated JPEG) only shows when the pixels are decoded; __getitem__ then raises
UnreadableImageError naming the file. verify=False skips the up-front pass (very large sets: each
image is read once, when it is used, and the reader counts what fails; see data/probe.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
from PIL import Image

from clipfast.errors import ClipfastError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
ON_ERROR_POLICIES: tuple[str, ...] = ("skip", "raise")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit greyscale
_ALPHA_BACKGROUND = (255, 255, 255)
# PIL's own decompression-bomb limit (~89 megapixels): larger images are refused, not decoded.
MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


class UnreadableImageError(ClipfastError, ValueError):
    """An image file that cannot be opened or decoded; the message names the file and the reason."""


@dataclass
class ImageRecord:
    path: str
    label: int | None
    caption: str | None


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert would clip 16-bit values at 255; scale 0..65535 to 0..255 instead.
        values = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, image_size: int | None = None) -> torch.Tensor:
    """Decode `path` to a uint8 RGB tensor [3, H, W], resized to image_size x image_size if given.

    The resize squashes (no crop), so content near the borders, e.g. a corner trigger, is kept.
    Raises UnreadableImageError naming the file when it cannot be decoded.
    """
    return decode_image(path, image_size, name=path)


def decode_image(source: str | IO[bytes], image_size: int | None = None, name: str | None = None) -> torch.Tensor:
    """load_image for a path or an open binary file (e.g. a tar member); `name` goes in errors."""
    name = name or str(source)
    try:
        with _open_image(source) as image:
            image.load()
            rgb = _to_rgb8(image)
    except Exception as error:  # PIL signals corrupt data with many exception types
        raise UnreadableImageError(f"cannot decode image {name!r}: {describe(error)}") from error
    if image_size is not None:
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _open_image(source: str | IO[bytes]) -> Image.Image:
    """Image.open (header only) that refuses images over MAX_PIXELS before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our message
        image = Image.open(source)
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ValueError(f"{width} x {height} pixels exceeds the limit of {MAX_PIXELS} (clipfast.data.images.MAX_PIXELS)")
    return image


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def check_image(source: str | IO[bytes]) -> str | None:
    """Why `source` is not a usable image, or None when PIL opens and verifies it."""
    if isinstance(source, str):
        if not os.path.exists(source):
            return "file not found"
        if not os.path.isfile(source):
            return "not a regular file"
    try:
        with _open_image(source) as image:
            image.verify()
    except Exception as error:  # PIL signals corrupt data with many exception types
        return describe(error)
    return None


class CheckedImageDataset(torch.utils.data.Dataset):
    """Shared machinery: validates arguments, checks every candidate once and loads lazily."""

    def __init__(
        self,
        candidates: list[tuple[ImageRecord, str | None]],
        source: str,
        image_size: int | None,
        on_error: str,
        verify: bool = True,
    ) -> None:
        """candidates: each record with a problem already known (e.g. an empty CSV cell) or None."""
        self.image_size = image_size
        self.on_error = on_error
        self.records: list[ImageRecord] = []
        self.skipped: list[tuple[str, str]] = []
        for record, problem in candidates:
            if problem is None and verify:
                problem = self._check(record)
            if problem is None:
                self.records.append(record)
            elif on_error == "raise":
                raise ValueError(f"unusable image {record.path!r} in {source}: {problem}")
            else:
                self.skipped.append((record.path, problem))
        if not self.records:
            detail = f" ({len(self.skipped)} skipped, first: {self.skipped[0][0]!r}: {self.skipped[0][1]})" if self.skipped else ""
            raise ValueError(f"no usable images in {source}{detail}")

    @staticmethod
    def _check_options(image_size: int | None, on_error: str) -> None:
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")

    def __len__(self) -> int:
        return len(self.records)

    def _check(self, record: ImageRecord) -> str | None:
        return check_image(record.path)

    def _load(self, index: int) -> torch.Tensor:
        return load_image(self.records[index].path, self.image_size)


