"""Probe sets: the images a scan reads, by index and in batches, without holding them in memory.

A probe set is either a uint8 tensor [N, 3, H, W] already in memory (the synthetic world) or a
dataset of files (ImageFolder, caption CSV, webdataset tar shards; open_probe_set picks by path)
decoded by worker processes while the scan works. An image that cannot be decoded is not a crash and not a silent wrong result: it
comes back as zeros with readable=False, the scan counts it and leaves it out of every decision
(on_error="raise" makes it fail instead, naming the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipfast.errors import ClipfastError

from .captions import CaptionCSVDataset
from .folders import ImageFolderDataset
from .images import UnreadableImageError
from .tars import TarShardDataset

_READ_CHUNK = 64  # images per worker task in read()


class ProbeSetError(ClipfastError, ValueError):
    """A probe set that cannot be opened (missing path, no usable image, unknown layout)."""


class ProbeSet:
    """N probe images of one size. read() gets any images; batches() streams index ranges."""

    skipped: list[tuple[str, str]] = []  # (entry, why) left out when the set was indexed

    def name(self, index: int) -> str:
        """How to point a user at probe image `index` (its file, where it has one)."""
        return f"probe image {index}"

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def read(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """uint8 [K, 3, H, W] of the given probe indices (unreadable ones are zeros)."""
        raise NotImplementedError

    def batches(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(lo, uint8 images [hi - lo, 3, H, W], readable bool [hi - lo]) for each [lo, hi), in order."""
        raise NotImplementedError


class TensorProbeSet(ProbeSet):
    def __init__(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8 or images.shape[1] != 3:
            raise ValueError("probe images must be a uint8 tensor [N, 3, H, W]")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def read(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def batches(self, ranges):
        for lo, hi in ranges:
            yield lo, self.images[lo:hi], torch.ones(hi - lo, dtype=torch.bool)


class _Decoded(Dataset):
    """(image, readable) of a dataset whose items are (image, ...) and may raise UnreadableImageError."""

    def __init__(self, dataset: Dataset, image_shape: tuple[int, int, int], on_error: str):
        self.dataset, self.image_shape, self.on_error = dataset, image_shape, on_error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.dataset[index][0], True
        except UnreadableImageError:
            if self.on_error == "raise":
                raise
            return torch.zeros(self.image_shape, dtype=torch.uint8), False


def _stack(items: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([image for image, _ in items]), torch.tensor([ok for _, ok in items], dtype=torch.bool)


class DatasetProbeSet(ProbeSet):
    """A dataset of files (ImageFolderDataset, CaptionCSVDataset, TarShardDataset) that decodes to image_size x image_size, read by
    `workers` processes (0: in this process) a few batches ahead of the scan."""

    def __init__(self, dataset: Dataset, image_size: int, workers: int = 2, on_error: str = "skip"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be skip or raise, got {on_error!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if getattr(dataset, "image_size", image_size) != image_size:
            raise ValueError(f"the dataset decodes to {dataset.image_size} px, the probe set needs {image_size}")
        self.dataset, self.workers = dataset, workers
        self._decoded = _Decoded(dataset, (3, image_size, image_size), on_error)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return getattr(self.dataset, "skipped", [])

    def name(self, index: int) -> str:
        records = getattr(self.dataset, "records", None)
        return records[index].path if records is not None else super().name(index)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._decoded.image_shape

    def read(self, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long).tolist()
        if not indices:
            return torch.zeros((0, *self.image_shape), dtype=torch.uint8)
        chunks = [indices[lo : lo + _READ_CHUNK] for lo in range(0, len(indices), _READ_CHUNK)]  # spread over workers
        return torch.cat([images for images, _ in self._load(chunks)])

    def batches(self, ranges):
        for (lo, _), (images, readable) in zip(ranges, self._load([list(range(lo, hi)) for lo, hi in ranges])):
            yield lo, images, readable

    def _load(self, index_lists: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = min(self.workers, len(index_lists))
        return iter(DataLoader(self._decoded, batch_sampler=index_lists, num_workers=workers, collate_fn=_stack,
                               prefetch_factor=2 if workers else None))


def open_probe_set(path: str | os.PathLike, image_size: int, *, on_error: str = "skip", workers: int = 2) -> DatasetProbeSet:
    """The probe images stored at `path`, decoded to image_size x image_size as they are read:
    webdataset tar shards (a .tar file, or a folder holding .tar files), a CSV file of image,caption
    rows, or an ImageFolder tree (root/<class>/<image>). Files are only indexed here, not checked:
    a million-image folder opens at once, and unreadable images are counted when they are decoded."""
    path = Path(path)
    options = {"image_size": image_size, "on_error": on_error, "verify": False}
    is_tar = path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))
    try:
        dataset = (TarShardDataset(path, **options) if is_tar else
                   CaptionCSVDataset(path, **options) if path.is_file() else ImageFolderDataset(path, **options))
    except (FileNotFoundError, ValueError) as error:
        raise ProbeSetError(str(error)) from None
    return DatasetProbeSet(dataset, image_size, workers=workers, on_error=on_error)


def as_probe_set(probe: ProbeSet | torch.Tensor) -> ProbeSet:
    return probe if isinstance(probe, ProbeSet) else TensorProbeSet(probe)
