"""`clipfast demo`: the whole method on the built-in synthetic world, from nothing.

Build (or reuse from the cache) a poisoned tiny CLIP, scan -> curate -> repair it, run the
CleanCLIP-style baseline on a copy of the same model, and report both side by side against the
ground truth the world provides: CA/ASR before and after, whether the target was found, trigger
localisation IoU, victim precision/recall, compact vs baseline set size and wall time per stage.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.defense.baseline import BaselineConfig, cleanclip_baseline
from clipfast.defense.pipeline import DefenseConfig, defend
from clipfast.eval import evaluate
from clipfast.eval.plots import plot_ca_asr, plot_label_test, plot_trigger
from clipfast.rundir import save_json
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import (
    TEST_SIZE,
    WorldRecipe,
    cached_world_model,
    evaluation_world,
    optimized_patch_recipe,
    trusted_recipe,
)

BASELINE_SEED_OFFSET = 7_919  # the baseline's clean set is a fresh world, disjoint from training
ORACLE_MODES = ("self", "trusted")


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPFAST_CACHE", Path.home() / ".cache" / "clipfast"))


@dataclass(frozen=True)
class DemoConfig:
    recipe: WorldRecipe = field(default_factory=WorldRecipe)
    probe_size: int = 5_000  # the first probe_size poisoned training pairs are the probe set
    test_size: int = TEST_SIZE
    baseline_size: int = 8_000  # clean pairs for the CleanCLIP-style baseline
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    run_baseline: bool = True
    # self: the suspect grounds its own crops; trusted: a clean model of another seed does (cached
    # like the suspect), as a user's trusted clean CLIP would
    oracle_mode: str = "self"

    def __post_init__(self):
        if not 1 <= self.probe_size <= self.recipe.train_size:
            raise ValueError(f"probe_size must be in [1, train_size={self.recipe.train_size}], got {self.probe_size}")
        if self.test_size < 1 or self.baseline_size < 1:
            raise ValueError("test_size and baseline_size must be >= 1")
        if self.oracle_mode not in ORACLE_MODES:
            raise ValueError(f"oracle_mode must be one of {ORACLE_MODES}, got {self.oracle_mode!r}")


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def run_demo(config: DemoConfig, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    out_dir = Path(out_dir)
    recipe = config.recipe
    seconds = {}
    start = time.perf_counter()
    models_dir = Path(cache_dir or default_cache_dir()) / "models"
    recipe = optimized_patch_recipe(recipe, models_dir)
    bundle, pairs, trained = cached_world_model(recipe, models_dir)
    seconds["poisoned_model" + ("_train" if trained else "_cached")] = time.perf_counter() - start
    trusted = None
    if config.oracle_mode == "trusted":
        start = time.perf_counter()
        trusted, _, trained = cached_world_model(trusted_recipe(recipe), models_dir)
        seconds["trusted_model" + ("_train" if trained else "_cached")] = time.perf_counter() - start

    trigger, target = recipe.make_trigger(), recipe.target_label
    test = evaluation_world(config.test_size)
    probe_images = pairs.images[: config.probe_size]
    poisoned = pairs.poisoned_indices[pairs.poisoned_indices < config.probe_size]
    before = evaluate(bundle, test, trigger, target)

    repaired = copy.deepcopy(bundle)
    outcome = defend(repaired, list(CLASSES), probe_images, ClassicalSegmenter(), out_dir / "defense",
                     prompts=zero_shot_prompts, grounding_bundle=trusted, config=config.defense,
                     identity={"recipe": recipe.cache_key(), "oracle": "builtin",
                               "trusted": trusted_recipe(recipe).cache_key() if trusted else None})
    seconds.update(outcome.seconds)
    scan = outcome.scan
    after = evaluate(repaired, test, trigger, target) if outcome.compact is not None else before

    rows = {"poisoned": before, "EftCLIP repair": after}
    baseline_report = None
    if config.run_baseline:
        start = time.perf_counter()
        clean = generate_world(config.baseline_size, seed=recipe.seed + BASELINE_SEED_OFFSET)
        baseline_model = copy.deepcopy(bundle)
        cleanclip_baseline(baseline_model, clean.images, clean.captions, out_dir / "baseline", config.baseline)
        seconds["baseline"] = time.perf_counter() - start
        baseline_report = evaluate(baseline_model, test, trigger, target)
        rows["CleanCLIP baseline"] = baseline_report

    # Ground truth scoring (the defence never saw any of it).
    victims = scan.victims(target) if target in scan.targets else torch.zeros(0, dtype=torch.int64)
    true_victims = set(poisoned.tolist())
    hits = len(true_victims & set(victims.tolist()))
    footprints = trigger.footprint(len(pairs.poisoned_indices), *probe_images.shape[2:], seed=recipe.trigger_seed)
    position = {int(p): k for k, p in enumerate(pairs.poisoned_indices)}
    localisation = next((t for t in scan.triggers if t.target == target), None)
    ious = []
    if localisation is not None:
        ious = [_iou(mask, footprints[position[int(i)]]) for i, mask in
                zip(localisation.patch_indices, localisation.region_masks) if int(i) in position]
    compact_size = len(outcome.compact) if outcome.compact is not None else 0

    report = {
        "config": asdict(config),
        "attack": {"name": trigger.name, "rate": recipe.rate, "target": CLASSES[target],
                   "poisoned_in_probe": len(true_victims), "probe_size": config.probe_size},
        "oracle_mode": config.oracle_mode,
        "target_found": target in scan.targets,
        "targets_found": [CLASSES[t] for t in scan.targets],
        "trigger_iou": round(sum(ious) / len(ious), 4) if ious else None,
        "victims": {"found": len(victims), "true_positives": hits,
                    "precision": round(hits / len(victims), 4) if len(victims) else None,
                    "recall": round(hits / len(true_victims), 4) if true_victims else None},
        "compact_set_size": compact_size,
        "baseline_set_size": config.baseline_size if config.run_baseline else None,
        "models": {name: {"ca": r["ca"], "asr": r["asr"]} for name, r in rows.items()},
        "repair": outcome.repair.summary() if outcome.repair else None,
        "scan": scan.summary(),
        "verdict": outcome.verdict.summary(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(report, out_dir / "report.json")
    plot_ca_asr(report["models"], out_dir / "ca_asr.png")
    plot_label_test(list(CLASSES), scan.label_test.candidates, scan.label_test.expected, report["targets_found"],
                    out_dir / "label_test.png")
    if localisation is not None and len(localisation.patch_indices):
        # Show a true victim where there is one: its own true footprint (random locations differ).
        shown = next((k for k, i in enumerate(localisation.patch_indices) if int(i) in position), 0)
        victim = int(localisation.patch_indices[shown])
        plot_trigger(probe_images[victim], localisation.region_masks[shown],
                     footprints[position[victim]] if victim in position else None, out_dir / "trigger.png")
    return report


def format_demo_report(report: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    regions = report["scan"].get("regions")
    lines = [f"attack {report['attack']['name']} at rate {report['attack']['rate']} -> target "
             f"{report['attack']['target']!r} ({report['attack']['poisoned_in_probe']} poisoned of "
             f"{report['attack']['probe_size']} probe images); oracle: {report['oracle_mode']}"
             + (f", regions {regions['evidence']} (named by {regions['naming']})" if regions else ""),
             "", f"{'model':<22}{'CA %':>8}{'ASR %':>8}"]
    lines += [f"{name:<22}{pct(m['ca']):>8}{pct(m['asr']):>8}" for name, m in report["models"].items()]
    v = report["victims"]
    lines += [
        "",
        f"target found          {report['target_found']} (found: {', '.join(report['targets_found']) or 'none'})",
        f"trigger IoU           {report['trigger_iou'] if report['trigger_iou'] is not None else '-'}",
        f"victims               {v['found']} found, precision {v['precision']}, recall {v['recall']}",
        f"compact set           {report['compact_set_size']} pairs vs baseline {report['baseline_set_size']}",
        "wall time (s)         " + ", ".join(f"{k} {s}" for k, s in report["seconds"].items()),
        "",
        f"VERDICT: {report['verdict']['message']}",
    ]
    return "\n".join(lines)
