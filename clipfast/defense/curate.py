"""Stage 2, curate (EftCLIP Algorithm 2): victims, affected labels and the compact fine-tuning set.

Victims are the probe images whose whole-image label is a target t* that no object region grounds.
Each victim's oracle label is the grounded label of its largest object region; the affected labels
are the victims' oracle labels. The compact set is the top-k victims per affected label by
discrepancy score (ops.region_topk), each captioned with its oracle label and keeping its trigger
(so fine-tuning unlearns trigger -> t*), plus a small class-balanced clean replay set for the
affected labels and t*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.ops import region_topk
from clipfast.rundir import untied

from .scan import ScanResult

# Generic, attribute-free captions: the compact set pairs images with labels, not descriptions.
# The label comes last, where the text augmentation never drops it.
CAPTION_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a drawing of a {}.", "a picture of a {}.")


@dataclass(frozen=True)
class CurateConfig:
    victims_per_label: int = 16
    replay_per_label: int = 64
    seed: int = 0
    backend: str = untied("auto")  # region_topk's op backend (see clipfast.ops)

    def __post_init__(self):
        if self.victims_per_label < 1 or self.replay_per_label < 0:
            raise ValueError("victims_per_label must be >= 1 and replay_per_label >= 0")


@dataclass
class CompactSet:
    images: torch.Tensor  # uint8 [K, 3, H, W]
    captions: list[str]
    source_indices: torch.Tensor  # [K] probe indices
    is_victim: torch.Tensor  # [K] bool: a curated victim (trigger kept, caption = oracle label)
    victim_indices: torch.Tensor  # all victims found (probe indices), for precision / recall
    affected_labels: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def summary(self, classnames: list[str]) -> dict:
        return {
            "size": len(self),
            "victims_curated": int(self.is_victim.sum()),
            "replay": int((~self.is_victim).sum()),
            "victims_found": len(self.victim_indices),
            "affected_labels": [classnames[label] for label in self.affected_labels],
        }


def curate(scan: ScanResult, images: ProbeSet | torch.Tensor, config: CurateConfig = CurateConfig()) -> CompactSet:
    """Build the compact set from a scan of `images` (the same probe set; only the chosen images are read)."""
    if not scan.found:
        raise ValueError("curate: the scan found no target label; there is nothing to repair")
    images = as_probe_set(images)
    if len(images) != len(scan.image_label):
        raise ValueError(f"curate: {len(images)} images but the scan covered {len(scan.image_label)}")
    generator = torch.Generator().manual_seed(config.seed)
    num_labels = len(scan.classnames)
    victims = torch.cat([scan.victims(t) for t in scan.targets]).unique()
    victim_labels = torch.full_like(scan.oracle_label, -1)
    victim_labels[victims] = scan.oracle_label[victims]
    for target in scan.targets:  # a victim whose oracle also says t* gives no corrective caption
        victim_labels[victim_labels == target] = -1
    counts, top = region_topk(scan.discrepancy, victim_labels, num_labels, config.victims_per_label,
                              backend=config.backend)
    affected = [label for label in range(num_labels) if counts[label] > 0]
    chosen = top[affected].flatten()
    chosen = chosen[chosen >= 0]

    # Clean replay: images whose label is grounded, class-balanced over affected labels and targets.
    clean = scan.grounded & ~scan.candidate
    replay = []
    for label in sorted(set(affected) | set(scan.targets)):
        pool = torch.nonzero(clean & (scan.image_label == label)).flatten()
        replay.append(pool[torch.randperm(len(pool), generator=generator)[: config.replay_per_label]])
    replay = torch.cat(replay) if replay else torch.zeros(0, dtype=torch.int64)

    indices = torch.cat([chosen, replay])
    caption_labels = torch.cat([scan.oracle_label[chosen], scan.image_label[replay]])
    template = torch.randint(len(CAPTION_TEMPLATES), (len(indices),), generator=generator)
    captions = [CAPTION_TEMPLATES[int(t)].format(scan.classnames[int(label)]) for t, label in zip(template, caption_labels)]
    is_victim = torch.cat([torch.ones(len(chosen), dtype=torch.bool), torch.zeros(len(replay), dtype=torch.bool)])
    return CompactSet(images.read(indices), captions, indices, is_victim, victims, affected, list(scan.targets))
