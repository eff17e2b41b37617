"""ImageFolder trees: root/<class>/<image>, labelled by the index of the class folder in sorted order."""

from __future__ import annotations

import os

import torch

from .images import IMAGE_EXTENSIONS, CheckedImageDataset, ImageRecord


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


class ImageFolderDataset(CheckedImageDataset):
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
