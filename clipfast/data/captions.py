"""Image-caption pairs from a CSV file."""

from __future__ import annotations

import csv
import os

import torch

from .images import CheckedImageDataset, ImageRecord


class CaptionCSVDataset(CheckedImageDataset):
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
