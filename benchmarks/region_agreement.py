"""Do packed regions (one isolated pass, clipfast/models/packed.py) tell the scan what crop regions
(one encoder pass per crop) tell it?

For each world (the demo world's poisoned model, and `--configs` patch-trigger configurations of
the efficacy matrix at `--seed`, their models trained into the cache on first use with the
efficacy benchmark's rate ladder): the first `--images` probe images, segmented by the built-in
segmenter, are scored by the fast scorer in both region modes (the per-region scores the scan
uses), then scanned end to end in both modes. Reported per world:
- regions: top-label agreement over all scored regions and over the poisoned images' regions; the
  share of the poisoned images' regions whose top label is the target (the old last-block pool mode
  had 97 % there: a region must NOT say the target when the trigger is outside it); whether each
  image is grounded (some region gives L_i >= the threshold) in both modes; the correlation of the
  regions' probabilities for their image's label;
- the poisoned images' regions split by whether they hold trigger pixels (the attack's footprint):
  the share of each that says the target;
- decisions: the targets found, the victim-set Jaccard of packed against crop, the number of
  victims and their precision / recall against the poisoned probe images; the wall time of each scan.

    python benchmarks/region_agreement.py --images 2000 --configs "badnet 6px centre"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipfast.bench.efficacy import ASR_GOAL, MATRIX, _recipe
from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.scan import ScanConfig, make_scorer, scan
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.models import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model, evaluation_world, optimized_patch_recipe

MODES = ("crop", "packed")


def world_model(name: str, seed: int, cache: Path):
    """(recipe, bundle, poisoned pairs) of the demo world or of an efficacy configuration (its
    rate ladder: the first rate whose model reaches the ASR goal, as the efficacy benchmark does)."""
    settings = DemoConfig()
    if name == "demo":
        bundle, pairs, _ = cached_world_model(settings.recipe, cache)
        return settings.recipe, bundle, pairs
    config = next(c for c in MATRIX if c.name == name)
    for rate in config.rates:
        recipe = optimized_patch_recipe(_recipe(config, seed, rate, settings), cache)
        bundle, pairs, _ = cached_world_model(recipe, cache)
        if evaluate(bundle, evaluation_world(settings.test_size), recipe.make_trigger(), recipe.target_label)["asr"] \
                >= ASR_GOAL:
            break
    return recipe, bundle, pairs


@torch.no_grad()
def region_scores(bundle, images, segmentation, mode: str, batch: int = 256):
    """The fast scorer's per-region scores in one region mode, batch by batch, concatenated."""
    classifier = ZeroShotClassifier(bundle, list(CLASSES), prompts=zero_shot_prompts)
    scorer = make_scorer(bundle, classifier, ScanConfig(regions=mode, progress=False))
    parts = [scorer.submit(images[lo:lo + batch], segmentation.masks[lo:lo + batch],
                           segmentation.valid[lo:lo + batch]).result() for lo in range(0, len(images), batch)]
    return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))


def compare(name: str, seed: int, count: int, cache: Path) -> dict:
    recipe, bundle, pairs = world_model(name, seed, cache)
    images = pairs.images[:count]
    poisoned = torch.zeros(len(images), dtype=torch.bool)
    poisoned[pairs.poisoned_indices[pairs.poisoned_indices < len(images)]] = True
    target, threshold = recipe.target_label, ScanConfig().grounding_threshold
    segmentation = ClassicalSegmenter().segment(images)
    valid = segmentation.valid & segmentation.masks.flatten(2).any(-1)
    scores = {mode: region_scores(bundle, images, segmentation, mode) for mode in MODES}
    crop, packed = scores["crop"], scores["packed"]
    on_poisoned = valid & poisoned[:, None]
    # Which regions of the poisoned images hold trigger pixels (the attack's true footprint): a
    # region must say the target only if the trigger is inside it.
    footprints = recipe.make_trigger().footprint(len(pairs.poisoned_indices), *images.shape[2:],
                                                 seed=recipe.trigger_seed)
    holds_trigger = torch.zeros_like(valid)
    for k, index in enumerate(pairs.poisoned_indices.tolist()):
        if index < len(images):
            holds_trigger[index] = (segmentation.masks[index] & footprints[k]).flatten(1).any(1)
    with_trigger, without_trigger = on_poisoned & holds_trigger, on_poisoned & ~holds_trigger
    same_label = crop.region_label == packed.region_label
    grounded = {mode: ((s.region_image_prob >= threshold) & valid).any(-1) for mode, s in scores.items()}
    a, b = crop.region_image_prob[valid], packed.region_image_prob[valid]
    result = {
        "world": name, "recipe": {"attack": recipe.attack, "trigger_params": dict(recipe.trigger_params),
                                  "rate": recipe.rate, "target": recipe.target, "seed": recipe.seed},
        "images": len(images), "poisoned_images": int(poisoned.sum()), "regions": int(valid.sum()),
        "image_label_agreement": float((crop.image_label == packed.image_label).float().mean()),
        "region_top_label_agreement": float(same_label[valid].float().mean()),
        "region_top_label_agreement_poisoned_images": float(same_label[on_poisoned].float().mean()),
        "poisoned_image_regions_saying_target": {
            mode: float((s.region_label == target)[on_poisoned].float().mean()) for mode, s in scores.items()},
        "poisoned_image_regions": {"with_trigger_pixels": int(with_trigger.sum()),
                                   "without": int(without_trigger.sum())},
        "regions_with_trigger_pixels_saying_target": {
            mode: float((s.region_label == target)[with_trigger].float().mean()) for mode, s in scores.items()},
        "regions_without_trigger_pixels_saying_target": {
            mode: float((s.region_label == target)[without_trigger].float().mean()) for mode, s in scores.items()},
        "grounded_agreement": float((grounded["crop"] == grounded["packed"]).float().mean()),
        "region_image_label_prob_correlation": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
    }
    decisions, seconds = {}, {}
    for mode in MODES:
        start = time.perf_counter()
        decisions[mode] = scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts,
                               config=ScanConfig(regions=mode, grounding_regions=mode, progress=False))
        seconds[mode] = time.perf_counter() - start
    found = {mode: [CLASSES[t] for t in r.targets] for mode, r in decisions.items()}
    jaccard = {}
    for t in set(decisions["crop"].targets) | set(decisions["packed"].targets):
        a_set, b_set = (set(decisions[m].victims(t).tolist()) if t in decisions[m].targets else set() for m in MODES)
        jaccard[CLASSES[t]] = len(a_set & b_set) / max(1, len(a_set | b_set))
    truth = set(torch.nonzero(poisoned).flatten().tolist())

    def against_truth(result) -> dict:  # the target's victims against the poisoned probe images
        found_victims = set(result.victims(target).tolist()) if target in result.targets else set()
        hits = len(found_victims & truth)
        return {"precision": hits / max(1, len(found_victims)), "recall": hits / max(1, len(truth))}

    result |= {"targets": found, "same_targets": found["crop"] == found["packed"], "victim_jaccard": jaccard,
               "victims": {m: {CLASSES[t]: len(r.victims(t)) for t in r.targets} for m, r in decisions.items()},
               "victims_against_truth": {m: against_truth(r) for m, r in decisions.items()},
               "scan_seconds": seconds}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--configs", nargs="*", default=[], help="efficacy-matrix configuration names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True, help="include the demo world")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "region_agreement.json",
                        help="the JSON written")
    args = parser.parse_args(argv)
    cache = default_cache_dir() / "models"
    worlds = (["demo"] if args.demo else []) + list(args.configs)
    results = [compare(name, args.seed, args.images, cache) for name in worlds]
    summary = {"device": "cpu", "threads": torch.get_num_threads(), "worlds": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
