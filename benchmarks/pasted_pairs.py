"""Where a patch repair's leftover ASR lies, and what extra unlearning pairs buy (issue 17's worst case,
the optimised centre patch): repairs from a finished matrix run's cached model and saved scan (as
repair_variants.py does) with the default compact set, plus `--extra` unlearning pairs on every
non-target label (clean probe images not in the set, the recovered trigger pasted on, captioned with
their own label), taken from any recipients or only from those whose largest oracle object the
pasted trigger misses. Each row: CA drop, ASR on the test world, and the ASR split by how much of each
triggered test image's object (ground-truth mask) the trigger hides.

    python benchmarks/pasted_pairs.py --commit e353012 --configs "optimized patch 6px centre" --modes self
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.curate import CAPTION_TEMPLATES, CompactSet, CurateConfig, curate
from clipfast.defense.repair import RepairConfig, repair
from clipfast.defense.scan.confirm import largest_objects
from clipfast.defense.unlearning import recover_triggers, with_triggers
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.models.zeroshot import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import evaluation_world
from repair_variants import RESULTS, append_row, matrix_cases, saved_case

RECIPIENTS = ("none", "off-object", "any")
HIDDEN_BINS = ((0.0, 1e-9), (1e-9, 0.25), (0.25, 0.5), (0.5, 1.01))  # share of the object the trigger covers


def with_extra_pairs(compact: CompactSet, scan, probe: torch.Tensor, triggers, segmenter, recipients: str,
                     per_label: int, seed: int = 1) -> CompactSet:
    if recipients == "none":
        return compact
    covered = torch.cat([trigger.masks for trigger in triggers]).any(0)  # every pixel a donor's trigger covers
    in_set = torch.zeros(len(probe), dtype=torch.bool)
    in_set[compact.source_indices] = True
    clean = torch.zeros(len(probe), dtype=torch.bool)
    clean[scan.clean_indices()] = True
    generator, picks = torch.Generator().manual_seed(seed), []
    for label in (label for label in range(len(scan.classnames)) if label not in scan.targets):
        pool = torch.nonzero(clean & ~in_set & (scan.image_label == label)).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        if recipients == "off-object":
            objects = largest_objects(probe[pool], segmenter)
            pool = pool[objects.flatten(1).any(1) & ~(objects & covered).flatten(1).any(1)]
        picks.append(pool[:per_label])
    chosen = torch.cat(picks)
    clean_views = probe[chosen]
    captions = [CAPTION_TEMPLATES[k % len(CAPTION_TEMPLATES)].format(scan.classnames[int(label)])
                for k, label in enumerate(scan.image_label[chosen])]
    no, yes = torch.zeros(len(chosen), dtype=torch.bool), torch.ones(len(chosen), dtype=torch.bool)
    return CompactSet(torch.cat([compact.images, with_triggers(clean_views, triggers, seed)]),
                      compact.captions + captions, torch.cat([compact.source_indices, chosen]),
                      torch.cat([compact.is_victim, no]), torch.cat([compact.is_synthesized, yes]),
                      torch.cat([compact.clean_views, clean_views]), torch.cat([compact.has_clean_view, yes]),
                      compact.victim_indices, compact.affected_labels, compact.targets)


def asr_by_hidden_share(model, test, trigger, target: int) -> dict:
    keep = test.labels != target
    images = test.images[keep]
    triggered = trigger.apply(images, seed=0)
    objects = test.object_masks[keep][:, 0]
    hidden = (objects & (triggered != images).any(1)).flatten(1).sum(1) / objects.flatten(1).sum(1).clamp(min=1)
    hits = ZeroShotClassifier(model, CLASSES, zero_shot_prompts).predict(triggered, k=1)[0][:, 0].cpu() == target
    return {f"hidden {lo:.2f}-{min(hi, 1.0):.2f}": f"{int(hits[(hidden >= lo) & (hidden < hi)].sum())}/"
                                                  f"{int(((hidden >= lo) & (hidden < hi)).sum())}"
            for lo, hi in HIDDEN_BINS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose models and scans to reuse")
    parser.add_argument("--configs", nargs="+", default=["optimized patch 6px centre"])
    parser.add_argument("--modes", nargs="+", default=["self"], choices=["self", "trusted"])
    parser.add_argument("--recipients", nargs="+", default=list(RECIPIENTS), choices=RECIPIENTS)
    parser.add_argument("--extra", type=int, default=16, help="extra unlearning pairs per non-target label")
    parser.add_argument("--out", type=Path, default=RESULTS / "pasted_pairs.jsonl")
    args = parser.parse_args(argv)
    cache, settings = default_cache_dir(), DemoConfig()
    test, segmenter = evaluation_world(settings.test_size), ClassicalSegmenter()
    for row in matrix_cases(args.commit, args.configs, args.modes):
        case = saved_case(row, args.commit, cache, settings)
        if case is None or row["family"] != "patch":
            continue
        recipe, bundle, pairs, scan = case
        probe = pairs.images[: settings.probe_size]
        triggers = recover_triggers(scan, probe, 0, segmenter)  # as defend does
        compact = curate(scan, probe, CurateConfig(), triggers)
        for recipients in args.recipients:
            extended = with_extra_pairs(compact, scan, probe, triggers, segmenter, recipients, args.extra)
            model = copy.deepcopy(bundle)
            with tempfile.TemporaryDirectory() as work:
                repair(model, extended, scan, probe, work, prompts=zero_shot_prompts,
                       config=RepairConfig(progress=False), triggers=triggers)
            after = evaluate(model, test, recipe.make_trigger(), recipe.target_label)
            append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                        "oracle_mode": row["oracle_mode"], "recipients": recipients,
                        "extra_pairs": len(extended) - len(compact), "compact_set_size": len(extended),
                        "ca_drop": round(float(row["ca_poisoned"]) - after["ca"], 4), "asr_repaired": after["asr"],
                        **asr_by_hidden_share(model, test, recipe.make_trigger(), recipe.target_label)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
