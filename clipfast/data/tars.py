"""Webdataset tar shards, read by index.

Not the webdataset library's readers: its streaming pipeline has no random access by index (every
rank and every resumed run would read the shards from the start), and its indexed reader (wids
0.1.11) groups only adjacent members into a sample, drops members whose PAX long names it cannot
parse (printing a warning to stdout), and holds an mmap that cannot be pickled into DataLoader
workers. Python's tarfile reads any tar; the index below is member offsets only.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import IO

import torch

from .images import IMAGE_EXTENSIONS, CheckedImageDataset, ImageRecord, UnreadableImageError, check_image, decode_image, describe


WEBDATASET_IMAGE_EXTENSIONS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)


class TarShardDataset(CheckedImageDataset):
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
            raise ValueError(f"{tar_path!r} is not a readable uncompressed tar file: {describe(error)}") from error
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
                    problem = f"bad .cls or .txt member: {describe(error)}"
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
            return check_image(self._member_bytes(record.path))
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
