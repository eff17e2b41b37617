"""Datasets of real images for users: an ImageFolder tree (root/<class>/<image>), a CSV of
image-caption pairs and webdataset tar shards (key.jpg + key.cls / key.txt members).

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

import csv
import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
ON_ERROR_POLICIES: tuple[str, ...] = ("skip", "raise")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit greyscale
_ALPHA_BACKGROUND = (255, 255, 255)
# PIL's own decompression-bomb limit (~89 megapixels): larger images are refused, not decoded.
MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


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
    return decode_image(path, image_size, name=path)


def decode_image(source: str | IO[bytes], image_size: int | None = None, name: str | None = None) -> torch.Tensor:
    """load_image for a path or an open binary file (e.g. a tar member); `name` goes in errors."""
    name = name or str(source)
    try:
        with _open_image(source) as image:
            image.load()
            rgb = _to_rgb8(image)
    except Exception as error:  # PIL signals corrupt data with many exception types
        raise UnreadableImageError(f"cannot decode image {name!r}: {_describe(error)}") from error
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
        raise ValueError(f"{width} x {height} pixels exceeds the limit of {MAX_PIXELS} (clipfast.data.folders.MAX_PIXELS)")
    return image


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _check_image(source: str | IO[bytes]) -> str | None:
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
        return _check_image(record.path)

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

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, on_error: str = "skip",
                 verify: bool = True) -> None:
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
        super().__init__(candidates, f"image folder {root!r}", image_size, on_error, verify)

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
        verify: bool = True,
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
        super().__init__(candidates, f"caption CSV {csv_path!r}", image_size, on_error, verify)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self._load(index), self.records[index].caption


WEBDATASET_IMAGE_EXTENSIONS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)


class TarShardDataset(_CheckedImageDataset):
    """Samples of webdataset tar shards: members sharing a key (the member path up to the first dot
    of its file name, webdataset's convention) form a sample; its image is the member with an image
    extension, its label an integer in `<key>.cls`, its caption the text of `<key>.txt`.

    The shards are indexed once (member offsets, no pixel is read), so any sample is read by one
    seek: ranks and workers each read exactly their own samples, and a resumed run starts where it
    stopped. __getitem__ returns (uint8 tensor [3, H, W] RGB, label int, or the caption when the
    sample has no .cls).
    """

    def __init__(self, shards: str | os.PathLike | list[str | os.PathLike], image_size: int | None = None,
                 on_error: str = "skip", verify: bool = True) -> None:
        self._check_options(image_size, on_error)
        self.shards = _tar_paths(shards)
        self._locations: dict[str, tuple[str, int, int]] = {}  # record path -> (tar, offset, size)
        self._handles: dict[str, IO[bytes]] = {}
        self._handles_pid = os.getpid()
        candidates = []
        for tar_path in self.shards:
            candidates += self._index(tar_path)
        super().__init__(candidates, f"tar shards {self.shards[0]!r}{' ...' if len(self.shards) > 1 else ''}",
                         image_size, on_error, verify)

    def _index(self, tar_path: str) -> list[tuple[ImageRecord, str | None]]:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path, "r:") as archive:  # uncompressed: members are seekable
                for member in archive:
                    if not member.isfile():
                        continue
                    folder, name = os.path.split(member.name)
                    stem, dot, extension = name.partition(".")
                    if dot and not name.startswith("."):
                        samples.setdefault(os.path.join(folder, stem), {})[extension.lower()] = member
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"{tar_path!r} is not a readable uncompressed tar file: {_describe(error)}") from error
        candidates = []
        with open(tar_path, "rb") as file:
            for key, members in samples.items():
                path = f"{tar_path}::{key}"
                image = next((members[e] for e in WEBDATASET_IMAGE_EXTENSIONS if e in members), None)
                label, caption, problem = None, None, None
                try:
                    if "cls" in members:
                        label = int(self._read(file, members["cls"]).decode().strip())
                    if "txt" in members:
                        caption = self._read(file, members["txt"]).decode("utf-8").strip() or None
                except (ValueError, UnicodeDecodeError) as error:
                    problem = f"bad .cls or .txt member: {_describe(error)}"
                if image is None:
                    problem = f"no image member (has: {', '.join(sorted(members))})"
                else:
                    self._locations[path] = (tar_path, image.offset_data, image.size)
                candidates.append((ImageRecord(path=path, label=label, caption=caption), problem))
        return candidates

    @staticmethod
    def _read(file: IO[bytes], member: tarfile.TarInfo) -> bytes:
        file.seek(member.offset_data)
        return file.read(member.size)

    def _member_bytes(self, path: str) -> io.BytesIO:
        tar_path, offset, size = self._locations[path]
        if self._handles_pid != os.getpid():  # a forked worker must not share its parent's file offsets
            self._handles, self._handles_pid = {}, os.getpid()
        handle = self._handles.get(tar_path)
        if handle is None:
            handle = self._handles[tar_path] = open(tar_path, "rb")
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise UnreadableImageError(f"cannot decode image {path!r}: the tar member is truncated")
        return io.BytesIO(data)

    def _check(self, record: ImageRecord) -> str | None:
        try:
            return _check_image(self._member_bytes(record.path))
        except UnreadableImageError as error:
            return str(error)

    def _load(self, index: int) -> torch.Tensor:
        path = self.records[index].path
        return decode_image(self._member_bytes(path), self.image_size, name=path)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to worker processes
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | str | None]:
        record = self.records[index]
        return self._load(index), record.label if record.label is not None else record.caption


def _tar_paths(shards) -> list[str]:
    """A tar file, a folder of .tar files, or a list of tar files, as a sorted list of paths."""
    if isinstance(shards, (str, os.PathLike)):
        shards = os.fspath(shards)
        if os.path.isdir(shards):
            paths = sorted(os.path.join(shards, name) for name in os.listdir(shards) if name.endswith(".tar"))
            if not paths:
                raise ValueError(f"no .tar shards in {shards!r}")
            return paths
        shards = [shards]
    paths = [os.fspath(path) for path in shards]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"tar shard(s) not found: {missing[:4]}")
    if not paths:
        raise ValueError("no tar shards given")
    return paths
