"""Stage 2, curate (EftCLIP Algorithm 2): victims, affected labels and the compact fine-tuning set.

Victims are the scan's candidates labelled with a target t*. Each victim's oracle label is the
grounding model's label of its largest region that is not the trigger; the affected labels are the
victims' oracle labels. The compact set is the top-k victims per affected label by discrepancy score
(ops.region_topk), each captioned with its oracle label and keeping its trigger (so fine-tuning
unlearns trigger -> t*); a small class-balanced clean replay set for the affected labels and t*; and
unlearning pairs: clean images of every other label with the recovered trigger put back on
(unlearning.py), captioned with their own label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.ops import region_topk
from clipfast.rundir import untied

from .scan import ScanResult
from .unlearning import recover_triggers, with_triggers

# Generic, attribute-free captions: the compact set pairs images with labels, not descriptions.
# The label comes last, where the text augmentation never drops it.
CAPTION_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a drawing of a {}.", "a picture of a {}.")


@dataclass(frozen=True)
class CurateConfig:
    victims_per_label: int = 16
    # Clean replay per label: probe images whose label a region grounds, captioned with the model's
    # own label (self-labelled: no outside data) and anchored to their pre-repair embeddings. Measured
    # on the demo model (5000 test images): 32 per label lost 2.1 CA points in repair, 150 lost 0.3, at
    # the same ASR; replay only as anchors without their captions lost 0.8-1.0.
    replay_per_label: int = 150
    # clean images of every label with the recovered trigger put back on (unlearning.py), captioned
    # with their own label: the model unlearns the trigger for every source class
    synthesized_per_label: int = 32
    seed: int = 0
    backend: str = untied("auto")  # region_topk's op backend (see clipfast.ops)

    def __post_init__(self):
        if self.victims_per_label < 1 or self.replay_per_label < 0 or self.synthesized_per_label < 0:
            raise ValueError("victims_per_label must be >= 1, replay_per_label and synthesized_per_label >= 0")


@dataclass
class CompactSet:
    images: torch.Tensor  # uint8 [K, 3, H, W]
    captions: list[str]
    source_indices: torch.Tensor  # [K] probe indices
    is_victim: torch.Tensor  # [K] bool: a curated victim (trigger kept, caption = oracle label)
    is_synthesized: torch.Tensor  # [K] bool: a clean image with the recovered trigger put on (caption = its label)
    clean_views: torch.Tensor  # uint8 [K, 3, H, W]: each image without the recovered trigger (victims: as they are)
    victim_indices: torch.Tensor  # all victims found (probe indices), for precision / recall
    affected_labels: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def summary(self, classnames: list[str]) -> dict:
        return {
            "size": len(self),
            "victims_curated": int(self.is_victim.sum()),
            "replay": int((~self.is_victim & ~self.is_synthesized).sum()),
            "synthesized": int(self.is_synthesized.sum()),
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

    # Clean replay: images whose label is grounded, class-balanced over all labels; unlearning pairs:
    # other clean images of every label, the recovered trigger put on (captioned with their own label:
    # on a target-class image the trigger must not matter either).
    clean = torch.zeros(len(images), dtype=torch.bool)
    clean[scan.clean_indices()] = True
    # Unlearning pairs need a trigger that can be put on other images (a warp confirmed by its
    # victims' backgrounds cannot: its victims carry it alone, unlearning.py).
    triggers = recover_triggers(scan, images, config.seed)
    counts = (config.replay_per_label, config.synthesized_per_label if triggers else 0)
    parts: list[list[torch.Tensor]] = [[], []]  # replay, unlearning pairs
    for label in range(num_labels):  # every label, the targets too: a class-balanced set keeps every class
        pool = torch.nonzero(clean & (scan.image_label == label)).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        start = 0
        for part, count in zip(parts, counts):  # as many as the label has, in this order
            part.append(pool[start: start + count])
            start += count
    replay, synthesized = (torch.cat(part) for part in parts)

    indices = torch.cat([chosen, replay, synthesized])
    caption_labels = torch.cat([scan.oracle_label[chosen], scan.image_label[indices[len(chosen):]]])
    template = torch.randint(len(CAPTION_TEMPLATES), (len(indices),), generator=generator)
    captions = [CAPTION_TEMPLATES[int(t)].format(scan.classnames[int(label)]) for t, label in zip(template, caption_labels)]
    kinds = torch.cat([torch.full((len(part),), kind) for kind, part in enumerate((chosen, replay, synthesized))])
    clean_views = images.read(indices)
    pictures = clean_views.clone()
    if triggers:
        pictures[kinds == 2] = with_triggers(pictures[kinds == 2], triggers, config.seed)
    return CompactSet(pictures, captions, indices, kinds == 0, kinds == 2, clean_views, victims, affected,
                      list(scan.targets))
