"""A patch victim's oracle label: what the grounding model names the image's largest object once the
trigger is inpainted (transplant.inpaint) and the image segmented again.

The scan's first guess (scanner.py) is the grounding model's label of the largest region other than
the trigger. That region is whole when the trigger sits beside the object; when it sits on the
object (a centre patch, a label-consistent patch on its target-class object, a patch at a random
place) the region is the object with a hole, cropped with the hole filled by the background, and
the grounding model often names something else. The oracle label is the victim's caption in the
compact set and says which held-out victims the repair's ASR estimate counts, so a wrong one teaches
the repair a wrong class and counts a right answer as an attack.

Measured on saved scans of the efficacy matrix (`python benchmarks/victim_labels.py`, rows in
benchmarks/results/victim_labels.jsonl), the share of patch victims whose oracle label is their true
class: 6 px centre patch 0.65 -> 0.85 (self) / 0.88 (trusted), optimised centre patch 0.55 -> 0.93 /
0.59 -> 0.86, random place 0.80 -> 0.86; corner patches unchanged but for 2 of 30 bottom-left victims
(1.00 -> 0.93). The repairs (matrix rows at e1fd052): optimised centre ASR 4.86 -> 3.30 % (self),
3.50 -> 3.01 (trusted), 6 px centre 2.65 -> 3.70 / 1.63 -> 2.34; over three repair seeds on the saved
scans the optimised patch gains and the 6 px centre patch loses about a point (`benchmarks/
repair_variants.py --variant seed=0..2 [--relabel]`, rows in benchmarks/results/repair_seeds.jsonl).
This runs only after the decision, on found patch targets: it changes no target decision, so the
false-alarm rate on clean models is untouched.
"""

from __future__ import annotations

from typing import Callable

import torch

from clipfast.data.probe import ProbeSet
from clipfast.defense.transplant import inpaint
from clipfast.models import ClipBundle
from clipfast.oracle import Segmenter

from .config import ScanConfig
from .result import ScanResult
from .scorers import make_grounder


def trigger_free_labels(images: torch.Tensor, triggers: torch.Tensor, segmenter: Segmenter, grounder,
                        batch_size: int) -> torch.Tensor:
    """int64 [K]: the grounder's (a RegionScorer) label of the largest oracle region of each uint8
    image [K, 3, H, W] with its trigger region (bool [K, H, W]) inpainted, where the trigger sat on
    that object: at least half of its pixels are the object's once inpainted (the midpoint between
    "beside" and "on"). -1 elsewhere: a trigger beside the object left it whole, and the first guess
    named it so (inpainting it from an object's edge only adds a bump: without this rule an ad-hoc run
    renamed 3 of the 31 victims of the 10 px corner patch, for the worse; with it they keep their
    labels), or the oracle finds no region."""
    labels = []
    for lo in range(0, len(images), batch_size):
        masks = triggers[lo:lo + batch_size]
        filled = inpaint(images[lo:lo + batch_size], masks)
        segmentation = segmenter.segment(filled)
        scores = grounder.submit(filled, segmentation.masks, segmentation.valid).result()
        largest = segmentation.masks[:, 0] & segmentation.valid[:, 0, None, None]
        on_object = 2 * (largest & masks).flatten(1).sum(1) >= masks.flatten(1).sum(1).clamp(min=1)
        labels.append(torch.where(segmentation.valid[:, 0] & on_object, scores.region_label[:, 0], -1))
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)


def relabel_patch_victims(result: ScanResult, probe: ProbeSet, segmenter: Segmenter, bundle: ClipBundle,
                          grounding_bundle: ClipBundle | None, prompts: Callable[[str], list[str]] | None,
                          config: ScanConfig) -> ScanResult:
    """result with each patch target's patch victims' oracle_label from trigger_free_labels where
    their trigger sat on their object (the first guess stays elsewhere)."""
    patches = [trigger for trigger in result.triggers if trigger.kind == "patch" and len(trigger.patch_indices)]
    if not patches:
        return result
    grounder = make_grounder(bundle, grounding_bundle, result.classnames, prompts, config)
    for trigger in patches:
        indices = torch.as_tensor(trigger.patch_indices, dtype=torch.long)
        labels = trigger_free_labels(probe.read(indices), trigger.region_masks, segmenter, grounder, config.batch_size)
        result.oracle_label[indices] = torch.where(labels >= 0, labels, result.oracle_label[indices])
    return result
