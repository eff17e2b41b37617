"""Stage 1, scan (EftCLIP Algorithm 1): find the backdoor's target label and trigger.

For every probe image i: L_i = the poisoned model's top label on the whole image; the oracle
segments the image and every object-sized region becomes a crop (ops.mask_crop, square boxes) or,
for the suspect's own scores in self mode, a packed sequence of its patches (ScanConfig.regions);
S_i = the labels of L_i that the grounding model gives some object region with probability >=
grounding_threshold; P_i = L_i minus S_i, refined by dropping labels the poisoned model itself
gives to an object region (its top label). Then a causal refinement (evidence.py): L_i stays in P_i
only if removing some region that is NOT object-sized takes away at least `min_causal_drop` of
p(L_i). Across the probe set, a label is a target when it lands in P_i far more often than the
other labels' rate predicts (decide.py). The trigger of each victim is its region with the largest
drop. In self mode an image-wide trigger has no such region (the suspect's own crops carry it), and
two tests look for it instead: a label whose images a horizontal flip relabels far more often than
it relabels the label's objects shown alone (decide.mirror_label_test), and a label whole images get
from other labels' objects shown alone far more often than the other way round
(decide.object_alone_test).

Only the top-1 label is used (k = 1 in DESIGN.md): a grounding threshold >= 0.5 makes "some
region's probability for L_i passes the threshold" a property region_score reports without
materialising [B, M, C] probabilities.

The package, in the order the data flows:
- config.py   ScanConfig
- scorers.py  the RegionScorer protocol and its two engines, fast and reference
- scanner.py  the shard loop: oracle, scorers, per-image columns (the mirror test's labels too),
              the causal and transplant tests (evidence.py)
- shards.py   a shard's results, and the shard directory a resumed run reads them from
- decide.py   the probe-set-wide statistics: target labels (the mirror and object-alone tests too),
              trigger boxes
- confirm.py  the pattern and background transplants that confirm an image-wide target
- victim_labels.py  a patch victim's oracle label, with its trigger inpainted
- result.py   ImageColumns, ScanResult and the other result types
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipfast import distributed
from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.data.vocabulary import check_vocabulary
from clipfast.models import ClipBundle
from clipfast.models.packed import packable
from clipfast.oracle import Segmenter

from .config import ScanConfig
from .confirm import confirm_image_wide
from .decide import decide, decide_targets
from .result import Flips, ImageColumns, LabelTest, ScanResult, TriggerEstimate
from .scanner import STAGES, NonFiniteScoresError, ShardScanner
from .scorers import FastRegionScorer, ReferenceRegionScorer, RegionScorer, make_scorer, reference_crop
from .shards import ScanShard, ShardDirectory, scan_fingerprint, shard_ranges
from .victim_labels import relabel_patch_victims

__all__ = ["FastRegionScorer", "Flips", "ImageColumns", "LabelTest", "NonFiniteScoresError", "ReferenceRegionScorer",
           "RegionScorer", "ScanConfig", "ScanResult", "ScanShard", "ShardDirectory", "TriggerEstimate",
           "decide_targets", "make_scorer", "reference_crop", "scan"]


def scan(
    bundle: ClipBundle,
    classnames: Sequence[str],
    probe: ProbeSet | torch.Tensor,
    segmenter: Segmenter,
    *,
    prompts: Callable[[str], list[str]] | None = None,
    grounding_bundle: ClipBundle | None = None,
    config: ScanConfig = ScanConfig(),
    shard_dir: str | Path | None = None,
) -> ScanResult:
    """Run Algorithm 1 over the probe set (uint8 [N, 3, H, W] or a ProbeSet streaming from files).
    grounding_bundle is a trusted clean CLIP; without one the model under test grounds its own crops.

    The probe set is cut into shards of config.shard_size images. Under torch.distributed each rank
    scans the shards k with k % world_size == rank and the per-image results are gathered, so every
    rank reaches the decisions of a single-process run. With shard_dir, each finished shard is
    written there atomically and a rerun (on any number of ranks) scans only the missing ones.
    """
    probe = as_probe_set(probe)
    if len(probe) == 0:
        raise ValueError("scan: the probe set is empty")
    config = config.for_oracle(trusted=grounding_bundle is not None, packable=packable(bundle.model))
    classnames = check_vocabulary(classnames)
    group = distributed.current()
    ranges = shard_ranges(len(probe), config.shard_size)
    directory = None if shard_dir is None else ShardDirectory(
        shard_dir, len(ranges), scan_fingerprint(config, classnames, len(probe), bundle, grounding_bundle))
    mine = range(group.rank, len(ranges), group.world_size)
    done = {k: directory.load(k) for k in mine if directory is not None and directory.has(k)}
    todo = [(k, *ranges[k]) for k in mine if k not in done]
    seconds = dict.fromkeys(STAGES, 0.0)
    if todo:
        scanner = ShardScanner(bundle, classnames, probe, segmenter, prompts, grounding_bundle, config)
        for k, shard in scanner.run(todo):
            done[k] = shard
            if directory is not None:
                directory.save(k, shard)
        seconds = scanner.seconds
    # Every rank gets every shard; the slowest rank's stage times are the run's.
    gathered = group.all_gather_object((done, seconds))
    every = {k: shard for shards_of_rank, _ in gathered for k, shard in shards_of_rank.items()}
    seconds = {name: max(times[name] for _, times in gathered) for name in STAGES}
    result = decide(classnames, [every[k] for k in range(len(ranges))], config, seconds)
    result = confirm_image_wide(result, probe, segmenter, bundle, grounding_bundle, prompts, config.min_flip_rate,
                                config.min_background_flip)
    result = relabel_patch_victims(result, probe, segmenter, bundle, grounding_bundle, prompts, config)
    return replace(result, region_modes={"evidence": config.regions, "naming": config.grounding_regions})

