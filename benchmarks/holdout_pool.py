"""Is the held-out ASR estimate low because of the images it pastes the trigger on? (issue 17)

The repair's held-out ASR estimate (clipfast/defense/repair.py, holdout_estimator) pastes the
recovered trigger on held-out *clean* probe images, scan.clean_indices(): readable, without trigger
evidence, and grounded (some region's crop names the image's label), i.e. images the suspect names
confidently. The measured ASR counts every non-target test image. On the self-mode patch cases the
estimate sat below the measured ASR (median -0.64 points at 3f200b2), so the question here is whether
the grounded images, harder to flip than the rest, are why.

For every found-target patch row of `--commit` with a saved scan (as benchmarks/repair_variants.py
finds them), this curates and repairs with the defaults as defend does, then estimates the ASR of the
repaired model three ways, beside the measured ASR on the test world:

  grounded      the repair's own estimate (its pool: readable, no trigger evidence, grounded), 512 images
  all_512       the pool without the grounding condition (readable, no trigger evidence), 512 images
  all_2048      the same wider pool, 2048 images

Each estimate is (hits, n, rate) of the pasted images (self mode counts those alone). Two
diagnostics no defender has, to split what is left: the true trigger on the probe's own unpoisoned
non-target images (`seen_true`: the probe set is the suspect's training data, so this is the measured
ASR's protocol on images the model was trained on) and the recovered trigger pasted on the test
world's non-target images (`unseen_recovered`: the estimate's protocol on images it never saw). Rows
go to `--out` (JSON lines) as they end, and a summary of each rate's error (rate - measured) prints.

    python benchmarks/holdout_pool.py --commit 3f200b2 --modes self
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from clipfast.data.world import zero_shot_prompts
from clipfast.defense.curate import CurateConfig, curate
from clipfast.defense.repair import RepairConfig, holdout_estimator, repair
from clipfast.defense.unlearning import recover_triggers, with_triggers
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.eval.metrics import attack_success_rate
from clipfast.models.zeroshot import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import evaluation_world
from repair_variants import append_row, matrix_cases, saved_case

POOLS = {"grounded": (False, 512), "all_512": (True, 512), "all_2048": (True, 2048)}  # (drop grounding, size)


def pool_estimates(model, scan, compact, probe, triggers, config: RepairConfig) -> dict:
    """The pasted-image ASR estimate of `model` per pool of POOLS: (hits, n, rate)."""
    out = {}
    for name, (drop_grounding, size) in POOLS.items():
        # clean_indices() is readable & grounded & ~candidate: every image grounded drops the condition
        pool_scan = dataclasses.replace(scan, grounded=torch.ones_like(scan.grounded)) if drop_grounding else scan
        estimate = holdout_estimator(pool_scan, compact, probe, zero_shot_prompts, size, config.seed, triggers)(model)
        out[name] = (estimate["asr_pasted_hits"], estimate["asr_pasted_n"],
                     estimate["asr_pasted_hits"] / max(estimate["asr_pasted_n"], 1))
    return out


def diagnostics(model, scan, pairs, probe_size: int, test, recipe, triggers) -> dict:
    """seen_true and unseen_recovered (the docstring's): attack success rates, each (hits, n, rate)."""
    classifier = ZeroShotClassifier(model, scan.classnames, zero_shot_prompts)
    target = recipe.target_label
    seen = torch.ones(probe_size, dtype=torch.bool)
    seen[pairs.poisoned_indices[pairs.poisoned_indices < probe_size]] = False
    seen &= pairs.labels[:probe_size] != target
    seen_rate = attack_success_rate(classifier, pairs.images[:probe_size][seen], pairs.labels[:probe_size][seen],
                                    recipe.make_trigger(), target)
    others = test.images[test.labels != target]
    pasted = with_triggers(others, triggers, seed=1)
    hits = int((classifier.predict(pasted, k=1)[0][:, 0].cpu() == target).sum())
    n_seen = int(seen.sum())
    return {"seen_true": (round(seen_rate * n_seen), n_seen, seen_rate),
            "unseen_recovered": (hits, len(others), hits / len(others))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose rows, models and scans to reuse")
    parser.add_argument("--configs", nargs="+", default=None, help="matrix configuration names (default: all patch ones)")
    parser.add_argument("--modes", nargs="+", default=["self"], choices=["self", "trusted"])
    parser.add_argument("--out", type=Path, default=Path("holdout_pool.jsonl"))
    args = parser.parse_args(argv)
    cache, settings = default_cache_dir(), DemoConfig()
    test = evaluation_world(settings.test_size)
    segmenter = ClassicalSegmenter()  # the matrix's oracle
    curate_config, repair_config = CurateConfig(), RepairConfig(progress=False)
    errors = {name: [] for name in [*POOLS, "seen_true", "unseen_recovered"]}
    for row in matrix_cases(args.commit, args.configs, args.modes):
        case = None if row["family"] != "patch" else saved_case(row, args.commit, cache, settings)
        if case is None:
            continue
        recipe, bundle, pairs, scan = case
        probe = pairs.images[: settings.probe_size]
        model = copy.deepcopy(bundle)
        triggers = recover_triggers(scan, probe, curate_config.seed, segmenter)  # as defend does
        compact = curate(scan, probe, curate_config, triggers)
        with tempfile.TemporaryDirectory() as work:
            repair(model, compact, scan, probe, work, prompts=zero_shot_prompts, config=repair_config, triggers=triggers)
        measured = evaluate(model, test, recipe.make_trigger(), recipe.target_label)
        estimates = pool_estimates(model, scan, compact, probe, triggers, repair_config)
        estimates.update(diagnostics(model, scan, pairs, settings.probe_size, test, recipe, triggers))
        for name, (_, _, rate) in estimates.items():
            errors[name].append(rate - measured["asr"])
        append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                    "oracle_mode": row["oracle_mode"], "asr_measured": measured["asr"], "ca_repaired": measured["ca"],
                    "asr_clean_model": float(row["asr_clean_model"]), **{f"est_{k}": v for k, v in estimates.items()},
                    "n_grounded": int((scan.readable & scan.grounded & ~scan.candidate).sum()),
                    "n_ungrounded": int((scan.readable & ~scan.grounded & ~scan.candidate).sum())}, args.out)
    for name, values in errors.items():
        if values:
            print(f"{name:>10}: estimate - measured, median {100 * statistics.median(values):+.2f} points, "
                  f"range {100 * min(values):+.2f} .. {100 * max(values):+.2f}, "
                  f"mean |error| {100 * statistics.mean(map(abs, values)):.2f} ({len(values)} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
