"""Scan shards: the per-image results of probe images [lo, hi), the unit of work of a rank and of a
resumed run. Each finished shard is one file in the shard directory, written atomically and tagged
with a fingerprint of everything its results depend on, so a rerun (on any number of ranks) keeps
the shards of the same scan and refuses those of another."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipfast.errors import RunMismatchError
from clipfast.models import ClipBundle
from clipfast.ops import unpack_mask_bits
from clipfast.rundir import tied_settings, write_atomically

from .config import ScanConfig
from .result import ImageColumns


@dataclass
class ScanShard(ImageColumns):
    """The per-image columns of probe images [lo, hi), plus the trigger regions of their causal
    candidates. Decisions need every shard (scan() gathers them)."""

    lo: int = field(kw_only=True)
    hi: int = field(kw_only=True)
    width: int = field(kw_only=True)  # of the probe images (to unpack trigger_masks)
    # probe index -> its largest-drop region, where the drop passes min_causal_drop; bit-packed
    # (ops.pack_mask_bits, 8x smaller): every rank receives every shard's masks
    trigger_masks: dict[int, torch.Tensor] = field(kw_only=True)

    def unpacked_trigger_masks(self) -> dict[int, torch.Tensor]:
        return {i: unpack_mask_bits(packed, self.width) for i, packed in self.trigger_masks.items()}


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def scan_fingerprint(config: ScanConfig, classnames: list[str], n: int, bundle: ClipBundle,
                     grounding_bundle: ClipBundle | None) -> dict:
    """What a shard's results depend on: the tied settings, the vocabulary, the probe set's size
    and the models (by name and size)."""
    models = [[b.name, sum(p.numel() for p in b.model.parameters())] for b in (bundle, grounding_bundle) if b]
    return {"settings": tied_settings(config), "classnames": list(classnames), "probe_images": n, "models": models}


class ShardDirectory:
    """The shard files of one scan: shard k of `count` is shard-<k>-of-<count>.pt."""

    def __init__(self, directory: str | Path, count: int, fingerprint: dict):
        self.directory, self.count, self.fingerprint = Path(directory), count, fingerprint

    def path(self, index: int) -> Path:
        return self.directory / f"shard-{index:05d}-of-{self.count:05d}.pt"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def load(self, index: int) -> ScanShard:
        path = self.path(index)
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as error:  # a file that is not ours; atomic writes mean never a partial one
            raise RunMismatchError(f"{path} is not a scan shard ({type(error).__name__}: {error})") from error
        if not isinstance(payload, dict) or payload.get("fingerprint") != self.fingerprint:
            raise RunMismatchError(f"{path} holds results of a scan with other settings, probe set or vocabulary; "
                                   "use a new directory")
        return ScanShard(**payload["shard"])

    def save(self, index: int, shard: ScanShard) -> None:
        payload = {"fingerprint": self.fingerprint, "shard": asdict(shard)}
        write_atomically(self.path(index), lambda file: torch.save(payload, file))
