"""Datasets of real images for users: an ImageFolder tree (root/<class>/<image>) and a CSV of
image-caption pairs.

Images are decoded with PIL to 8-bit RGB uint8 tensors [3, H, W]: grayscale, palette and CMYK are
converted, 16-bit images are scaled down to 8 bits (not clipped), and transparent images are
composited over white. Every file is checked once up front (opened and verified by PIL): with
on_error="skip" unusable files are listed in `skipped` as (path, reason); with on_error="raise" the
first one raises a ValueError naming the file and the reason. Some damage (e.g. a truncated JPEG)
only shows when the pixels are decoded; __getitem__ then raises UnreadableImageError naming the file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
ON_ERROR_POLICIES: tuple[str, ...] = ("skip", "raise")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit greyscale
_ALPHA_BACKGROUND = (255, 255, 255)


class UnreadableImageError(ValueError):
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
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb8(image)
    except Exception as error:  # PIL signals corrupt data with many exception types
        raise UnreadableImageError(f"cannot decode image {path!r}: {_describe(error)}") from error
    if image_size is not None:
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _check_image(path: str) -> str | None:
    """Why `path` is not a usable image, or None when PIL opens and verifies it."""
    if not os.path.exists(path):
        return "file not found"
    if not os.path.isfile(path):
        return "not a regular file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL signals corrupt data with many exception types
        return _describe(error)
    return None


class _CheckedImageDataset(torch.utils.data.Dataset):
    """Shared machinery: validates arguments, checks every candidate once and loads lazily."""

    def __init__(
        self,
        candidates: list[tuple[ImageRecord, str | None]],
        source: str,
        image_size: int | None,
        on_error: str,
    ) -> None:
        """candidates: each record with a problem already known (e.g. an empty CSV cell) or None."""
        self.image_size = image_size
        self.on_error = on_error
        self.records: list[ImageRecord] = []
        self.skipped: list[tuple[str, str]] = []
        for record, problem in candidates:
            problem = problem or _check_image(record.path)
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

    def _load(self, index: int) -> torch.Tensor:
        return load_image(self.records[index].path, self.image_size)


def _list_images(folder: str) -> list[str]:
    """Image files (by extension) under `folder`, recursively, sorted, hidden entries left out."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [
            os.path.join(directory, name)
            for name in sorted(files)
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


class ImageFolderDataset(_CheckedImageDataset):
    """Images in root/<class>/..., labelled by the index of their class folder in sorted order.

    Files whose extension is not in IMAGE_EXTENSIONS are ignored; images with one are checked.
    __getitem__ returns (uint8 tensor [3, H, W] RGB, label int).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, on_error: str = "skip") -> None:
        self._check_options(image_size, on_error)
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        self.root = root
        self.classes: list[str] = sorted(
            name for name in os.listdir(root)
            if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
        )
        if not self.classes:
            raise ValueError(f"no usable images in {root!r}: it has no class subfolders (expected root/<class>/<image>)")
        candidates = [
            (ImageRecord(path=path, label=label, caption=None), None)
            for label, name in enumerate(self.classes)
            for path in _list_images(os.path.join(root, name))
        ]
        super().__init__(candidates, f"image folder {root!r}", image_size, on_error)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._load(index), self.records[index].label


class CaptionCSVDataset(_CheckedImageDataset):
    """Image-caption pairs from a CSV file with a header row.

    image_column holds paths, absolute or relative to the CSV's folder; caption_column the captions.
    Rows with an empty path or caption are skipped (or raise) like unusable images.
    __getitem__ returns (uint8 tensor [3, H, W] RGB, caption str).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_size: int | None = None,
        on_error: str = "skip",
        image_column: str = "image",
        caption_column: str = "caption",
        delimiter: str = ",",
    ) -> None:
        self._check_options(image_size, on_error)
        csv_path = os.fspath(csv_path)
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"caption CSV {csv_path!r} does not exist or is not a file")
        self.csv_path = csv_path
        base = os.path.dirname(os.path.abspath(csv_path))
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in columns]
            if missing:
                raise ValueError(f"caption CSV {csv_path!r} lacks column(s) {missing}; its columns are {columns}")
            rows = list(reader)
        candidates = []
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            image_cell = (row[image_column] or "").strip()
            caption = (row[caption_column] or "").strip()
            path = os.path.join(base, image_cell)  # an absolute cell replaces base
            problem = None
            if not image_cell:
                path, problem = f"{csv_path}:{line}", "empty image path"
            elif not caption:
                problem = f"empty caption (line {line})"
            candidates.append((ImageRecord(path=path, label=None, caption=caption), problem))
        super().__init__(candidates, f"caption CSV {csv_path!r}", image_size, on_error)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self._load(index), self.records[index].caption
