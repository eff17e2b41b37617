"""Is a repaired WaNet model's residual ASR the backdoor, or any warp's pull towards the target? (issue 17)

Before the trusted model's target bound (repair.py, d15be4e) the trusted WaNet cases kept 2.8-3.8 %
ASR after repair at strength 6 (clean-model floors 1.3-2.6 %) under every repair variant tried
(results/wanet_repair_sweep.jsonl, warp_unlearning.jsonl). ASR
counts every non-target test image the attacker's warp sends to the target, so it mixes two things:
what the backdoor still does for *that* warp, and how often the model calls any warped (or plain)
image the target. This separates them on the saved scans of a finished matrix run's trusted WaNet
rows, for the poisoned model, defend's default repair and the trusted clean model:

- target share of the non-target test images: plain; warped by the attacker's field; warped by
  other fields of the same form and strength (WaNetTrigger with other pattern seeds: the
  trigger-agnostic control); by the attacker's field at half and 1.5x its strength;
- and the excess of the attacker's warp over the control fields: the part that is the backdoor's.

    python benchmarks/wanet_residual.py --commit bf4142a

Rows go to `--out` (JSON lines), one per case and model, as they end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
from pathlib import Path

from clipfast.data.world import zero_shot_prompts
from clipfast.defense.curate import CurateConfig, curate
from clipfast.defense.repair import RepairConfig, repair
from clipfast.defense.unlearning import recover_triggers
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.models import ZeroShotClassifier
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import evaluation_world
from repair_variants import append_row, matrix_cases, saved_case, trusted_model

CONTROL_SEEDS = range(1000, 1008)  # other WaNet fields: pattern seeds no recipe of the matrix uses


def target_shares(bundle, classnames, images, trigger, target) -> dict:
    """Target share of `images` (non-target test images) plain, under the attacker's warp, its half
    and 1.5x strengths, and under each control field of the same strength."""
    classifier = ZeroShotClassifier(bundle, classnames, prompts=zero_shot_prompts)

    def share(batch):
        return round(float((classifier.predict(batch)[0][:, 0] == target).float().mean()), 4)

    controls = [share(dataclasses.replace(trigger, pattern_seed=seed).apply(images)) for seed in CONTROL_SEEDS]
    attacker = share(trigger.apply(images))
    return {"plain": share(images), "attacker_warp": attacker,
            "attacker_warp_half": share(dataclasses.replace(trigger, strength=trigger.strength / 2).apply(images)),
            "attacker_warp_1.5x": share(dataclasses.replace(trigger, strength=trigger.strength * 1.5).apply(images)),
            "control_warps": controls, "control_median": statistics.median(controls),
            "attacker_excess_over_control_median": round(attacker - statistics.median(controls), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose trusted WaNet rows, models and scans to reuse")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "wanet_residual.jsonl")
    args = parser.parse_args(argv)
    cache, settings = default_cache_dir(), DemoConfig()
    test = evaluation_world(settings.test_size)
    segmenter = ClassicalSegmenter()
    for row in [row for row in matrix_cases(args.commit, None, ["trusted"]) if row["config"].startswith("wanet")]:
        case = saved_case(row, args.commit, cache, settings)
        if case is None:
            print(f"{row['config']} seed {row['seed']}: no saved scan, skipped", flush=True)
            continue
        recipe, bundle, pairs, scan = case
        probe, target, trigger = pairs.images[: settings.probe_size], recipe.target_label, recipe.make_trigger()
        images = test.images[test.labels != target]
        trusted = trusted_model(row, recipe, cache)
        models = {"poisoned": bundle, "trusted clean": trusted}
        triggers = recover_triggers(scan, probe, 0, segmenter)  # as defend does
        repaired = copy.deepcopy(bundle)
        with tempfile.TemporaryDirectory() as work:
            result = repair(repaired, curate(scan, probe, CurateConfig(), triggers), scan, probe, work,
                            prompts=zero_shot_prompts, config=RepairConfig(progress=False), triggers=triggers,
                            trusted_bundle=trusted)
        # "default repair": defend's, with the trusted model's target bound since d15be4e (rows of
        # d15be4e-de270a5: target_bound true; since: target_bound_weight); rows with neither field are the
        # repair before it.
        models["default repair"] = repaired
        for name, model in models.items():
            append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]), "model": name,
                        "target_bound_weight": result.target_bound_weight if name == "default repair" else None,
                        "ca": evaluate(model, test)["ca"], "asr_matrix_row": float(row["asr_repaired"]),
                        **target_shares(model, scan.classnames, images, trigger, target)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
