"""Stage 2, curate (EftCLIP Algorithm 2): victims, affected labels and the compact fine-tuning set.

Victims are the scan's candidates labelled with a target t*. Each victim's oracle label is the
grounding model's label of its largest region that is not the trigger; the affected labels are the
victims' oracle labels. The compact set is the top-k victims per affected label by discrepancy score
(ops.region_topk), each captioned with its oracle label and keeping its trigger (so fine-tuning
unlearns trigger -> t*; a patch victim is also anchored to its view with the trigger region filled);
for a non-target label with no such victim (every non-target label when the victims are mostly
target-class images), as many unlearning pairs: clean images of that label with
the recovered trigger put back on (unlearning.py), captioned with their own label, and for a patch
trigger as many as top each label up to a minimum of trigger-bearing images; and a small
class-balanced clean replay set of every label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.ops import region_topk
from clipfast.rundir import untied

from .scan import ScanResult
from .transplant import fill_with_median
from .unlearning import RecoveredTrigger, recover_triggers, with_triggers

# Generic, attribute-free captions: the compact set pairs images with labels, not descriptions.
# The label comes last, where the text augmentation never drops it.
CAPTION_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a drawing of a {}.", "a picture of a {}.")


@dataclass(frozen=True)
class CurateConfig:
    # Trigger-bearing images per label: the label's top victims by discrepancy, captioned with their
    # oracle label; a non-target label without a curated victim (the attack drew none from it), and
    # every non-target label when the victims are mostly target-class images (label-consistent
    # poisoning), gets as many clean images of its own with the recovered trigger put on
    # (unlearning.py) instead, captioned with their own label: every source class unlearns the trigger.
    victims_per_label: int = 16
    # Clean replay per label: probe images whose label a region grounds, captioned with the model's
    # own label (self-labelled: no outside data) and anchored to their pre-repair embeddings.
    replay_per_label: int = 60
    # Patch triggers: every non-target label carries at least this many trigger-bearing images, its
    # curated victims topped up with unlearning pairs. A patch's victims are few (the matrix's probe
    # sets hold 33 poisoned images among 5000: 3-5 victims per label, ~40 trigger-bearing images in a
    # set of ~640), too few to unlearn a patch that lies on the object: the two centre patches kept
    # 2.3-3.7 % ASR over 3 repair seeds in both modes (clean-model floor 1.7-1.9 %). Topped up to 8
    # (repairs on the e1fd052 / e353012 / 578d79f matrices' saved scans with repair_variants.py, rows
    # in benchmarks/results/top_up_sweep.jsonl, each with its variant in today's fields; the sweep's
    # top-up also capped victims and the pairs of a label without a victim at 8, not 16), the
    # centre cases reached 1.7-3.1 % for +0.4 CA points on them (mean 0.63 -> 1.06, worst 1.46); over
    # the 18 patch cases (repair seed 0) self ASR median 0.97 -> 0.81 %, worst 3.70 -> 2.62, CA drop
    # median 0.28 -> 0.41, worst 1.36 -> 1.28; trusted 0.81 -> 0.80 %, worst 3.01 -> 3.08, CA drop
    # 0.34 -> 0.36, worst 1.30 -> 1.08. 4 left the centre at 2.0-3.3 %; 16 reached 1.6-2.6 % for
    # 0.9-2.2 CA points. (The whole matrix at this rule: the README's table.) Other triggers keep
    # the rule above: an image-wide trigger has tens to hundreds of victims, and composites did not
    # lower a warp's ASR (below).
    triggered_per_label: int = 8
    seed: int = 0
    backend: str = untied("auto")  # region_topk's op backend (see clipfast.ops)
    # Why these counts (repairs rerun on the b366873 efficacy matrix's cached models and scans, then
    # the whole matrix at b0d5586; notes of issue 17): the previous set (victims + 32 pasted images on
    # every label + 150 replay per label, ~1850 images) lost 0.60 CA points (median over trusted patch
    # cases, up to 1.70). Pasted images beside victims cost clean accuracy, per pair and not because a
    # pasted patch hides the object (e353012 self optimised centre patch, pairs added on every non-target label: +97
    # on recipients whose object the patch misses, ASR 4.86 -> 2.56 %, CA drop 1.18 -> 1.66; +144 on
    # any recipients, 1.92 %, 2.32; benchmarks/pasted_pairs.py); without any, label-consistent models kept 20-48 % ASR, with
    # them on labels lacking a victim only, 15 %. 40 replay per label lost 0.70 points (median), 60 lost
    # 0.33 (up to 1.02) at a patch ASR of 0.98 % (median). The set stays under 800 images, a tenth of
    # the CleanCLIP-style baseline's 8000.

    def __post_init__(self):
        if self.victims_per_label < 1 or self.replay_per_label < 0 or self.triggered_per_label < 0:
            raise ValueError("victims_per_label must be >= 1, replay_per_label and triggered_per_label >= 0")


@dataclass
class CompactSet:
    images: torch.Tensor  # uint8 [K, 3, H, W]
    captions: list[str]
    source_indices: torch.Tensor  # [K] probe indices
    is_victim: torch.Tensor  # [K] bool: a curated victim (trigger kept, caption = oracle label)
    is_synthesized: torch.Tensor  # [K] bool: a clean image with the recovered trigger put on (caption = its label)
    clean_views: torch.Tensor  # uint8 [K, 3, H, W]: each image without the recovered trigger
    has_clean_view: torch.Tensor  # [K] bool: clean_views[k] is a trigger-free view repair anchors to
    # (replay: the image itself; unlearning pair: the image before the paste; patch victim: its trigger
    # region filled as the causal test fills it). False for victims without a recovered region
    # (image-wide triggers, warps): their view is the image as it is, and it is not anchored.
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


def curate(scan: ScanResult, images: ProbeSet | torch.Tensor, config: CurateConfig = CurateConfig(),
           triggers: list[RecoveredTrigger] | None = None) -> CompactSet:
    """Build the compact set from a scan of `images` (the same probe set; only the chosen images are
    read). triggers: the scan's triggers as unlearning.recover_triggers puts them on other images
    (defend recovers them once, with the scan's segmenter, for curate and repair); default: recovered
    here without a segmenter, so a trigger carried by its victims' backgrounds has its victims alone."""
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
    # other clean images of each non-target label without a curated victim, the recovered trigger put
    # on, captioned with their own label.
    clean = torch.zeros(len(images), dtype=torch.bool)
    clean[scan.clean_indices()] = True
    # Unlearning pairs need a trigger that can be put on other images (unlearning.py). For a warp,
    # composites (a clean object on a victim's background) on every non-target label, beside the
    # victims, did not lower the test ASR (4 trusted WaNet cases: median 3.1 -> 3.2 %, CA drop 1.38 ->
    # 1.37): it gets them, like any trigger, only on labels without a curated victim.
    if triggers is None:
        triggers = recover_triggers(scan, images, config.seed)
    curated_victims = torch.bincount(scan.oracle_label[chosen], minlength=num_labels)
    # Victims that are mostly target-class images (label-consistent poisoning: in trusted mode the
    # matrix's cases have 9-16 % of victims of other labels, every other attack 96-100 %; a majority
    # rule, since a poisoning draw that takes all sources has about 1 / #labels of them in the target
    # class) come with captions that correct nothing: then every non-target label gets pasted images.
    # Self-grounded oracle labels hide this (the suspect calls a degraded target-class image's crop
    # something else): a stated limit, see the README.
    uncorrected = bool(len(victims)) and bool(torch.isin(scan.oracle_label[victims], torch.tensor(scan.targets))
                                              .float().mean() >= 0.5)
    # A patch trigger's few victims per label are topped up with pasted pairs (CurateConfig.triggered_per_label).
    patch_triggers = bool(triggers) and all(trigger.kind == "patch" for trigger in triggers)
    parts: list[list[torch.Tensor]] = [[], []]  # replay, unlearning pairs
    for label in range(num_labels):  # every label, the targets too: a class-balanced set keeps every class
        # (a target-class image with the trigger on is the target either way: nothing to unlearn there)
        needs = uncorrected or not curated_victims[label]
        pasted = config.victims_per_label if triggers and needs and label not in scan.targets else 0
        if patch_triggers and label not in scan.targets:  # topped up to triggered_per_label
            pasted = max(pasted, config.triggered_per_label - int(curated_victims[label]))
        pool = torch.nonzero(clean & (scan.image_label == label)).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        start = 0
        for part, count in zip(parts, (config.replay_per_label, pasted)):  # as many as the label has, in this order
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
    # A patch victim's clean view: its explaining region (the trigger the transplant test confirmed)
    # filled with its background. Anchoring the victim to what the model said about that view teaches
    # "ignore the patch" on the very images the attack hit, besides the caption's "this is L".
    # Measured (11 self-mode patch cases of the d8395e4 matrix, repairs rerun on their cached models
    # and scans): test ASR mean 1.06 -> 0.91 %, worst 2.30 -> 1.96 %, lower in 8 of 11; CA drop mean
    # 0.35 -> 0.55 points (median 0.24 -> 0.42, worst 1.04 -> 1.34). Single repairs vary by about as
    # much between reruns (notes of issue 17): the gain is in the tail, not a guarantee per case.
    has_clean_view = kinds != 0
    regions = {int(index): mask for estimate in scan.triggers if estimate.kind == "patch"
               for index, mask in zip(estimate.patch_indices, estimate.region_masks)}
    rows = [row for row in range(len(chosen)) if int(chosen[row]) in regions]
    if rows:
        masks = torch.stack([regions[int(chosen[row])] for row in rows])
        clean_views[rows] = fill_with_median(clean_views[rows], masks)
        has_clean_view[rows] = True
    return CompactSet(pictures, captions, indices, kinds == 0, kinds == 2, clean_views, has_clean_view, victims,
                      affected, list(scan.targets))
