"""`clipfast bench --suite efficacy`: does the defence remove backdoors, across attacks, trigger
settings and seeds, without false alarms on clean models?

A case is one attack configuration and one seed: the synthetic world's model poisoned that way (or
a clean one), trained into the cache on first use; the EftCLIP defence (scan -> curate -> repair)
and the CleanCLIP-style baseline run on it, and both are scored against the world's ground truth
(clipfast/demo.py does all of that for one case). One CSV row per case is appended the moment the
case ends; a rerun skips the cases the CSV already holds for the same commit and settings, so an
interrupted matrix resumes where it stopped.

The matrix is a sweep, not a point: BadNet patches of four sizes (1.6 % to 9.8 % of the image
area), three patterns, five fixed positions and random ones, several target classes; Blended with
noise and with stripes at two alphas; SIG at two amplitudes; WaNet at two strengths;
label-consistent; clean models. The core configuration of each family runs on three seeds, the
rest of the sweep on one, clean models on five. Each configuration lists the poisoning rates to
try: the first whose poisoned model reaches ASR >= 0.9 is kept (the last one otherwise, and the
row says so), so weak attacks are measured where they work, and shown where they do not.

Filters: --attacks (family or configuration names), --seeds, --quick (the core configurations on
one seed, and one clean model). `--readme` regenerates the README's defence table from the CSV.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from clipfast.demo import ORACLE_MODES, DemoConfig, default_cache_dir, run_demo
from clipfast.eval import evaluate
from clipfast.recipes import WorldRecipe, cached_world_model, clean_recipe, evaluation_world, optimized_patch_recipe
from clipfast.rundir import tied_settings

from .common import CsvWriter, run_stamp

ASR_GOAL = 0.9  # a poisoned model is a working backdoor from this ASR on (the rate ladder's goal)

FIELDS = ["timestamp", "device", "torch", "triton", "commit", "mode", "case_key", "config", "family", "attack",
          "trigger_params", "rate", "rates_tried", "target", "seed", "oracle_mode", "target_found", "flagged_labels",
          "false_alarm", "trigger_iou", "victims_found", "victim_precision", "victim_recall", "poisoned_in_probe",
          "compact_set_size", "baseline_set_size", "ca_poisoned", "asr_poisoned", "asr_clean_model", "ca_repaired", "asr_repaired",
          "ca_baseline", "asr_baseline", "repair_steps", "repair_stopped_early", "repair_asr_estimate",
          "repair_asr_hits", "repair_asr_n", "repair_victim_hits", "repair_victim_n", "repair_pasted_hits",
          "repair_pasted_n", "repair_clean_agreement",
          "verdict", "verdict_asr_upper_bound", "trigger_kind", "seconds_model",
          "seconds_scan", "seconds_curate", "seconds_repair", "seconds_baseline", "seconds_case"]


@dataclass(frozen=True)
class AttackConfig:
    name: str  # the row's label
    family: str  # patch | image-wide | clean-label | clean
    attack: str  # a clipfast.attacks trigger name
    params: tuple[tuple[str, object], ...] = ()
    rates: tuple[float, ...] = (0.01,)  # tried in order until the poisoned model's ASR >= ASR_GOAL
    target: str = "heart"
    seeds: tuple[int, ...] = (0,)
    core: bool = False  # the family's core configuration (--quick runs only these)

    @property
    def clean(self) -> bool:
        return self.family == "clean"


def _patch(name: str, size: float, rates=(0.01, 0.03), seeds=(0,), core=False, target="heart", **params):
    return AttackConfig(name, "patch", "badnet_random" if params.pop("random", False) else "badnet",
                        (("size_fraction", size), *sorted(params.items())), rates, target, seeds, core)


# Patch sides at 32 px: 4 px (1.6 % of the area), 6 px (3.5 %), 8 px (6.3 %), 10 px (9.8 %).
MATRIX: tuple[AttackConfig, ...] = (
    _patch("badnet 4px checker corner", 4 / 32, seeds=(0, 1, 2), core=True),
    _patch("badnet 6px checker corner", 6 / 32),
    _patch("badnet 8px checker corner", 8 / 32),
    _patch("badnet 10px checker corner", 10 / 32),
    _patch("badnet 6px checker 2 cells", 6 / 32, cells=2),
    _patch("badnet 6px checker 6 cells", 6 / 32, cells=6),
    _patch("badnet 6px noise", 6 / 32, pattern="noise"),
    _patch("badnet 6px solid", 6 / 32, pattern="solid"),
    _patch("badnet 6px top-left", 6 / 32, position="top_left"),
    _patch("badnet 6px top-right", 6 / 32, position="top_right"),
    _patch("badnet 6px bottom-left", 6 / 32, position="bottom_left"),
    _patch("badnet 6px centre", 6 / 32, position="center"),
    _patch("badnet 6px random place", 6 / 32, rates=(0.03, 0.05, 0.1), random=True),
    _patch("badnet 4px target star", 4 / 32, target="star"),
    _patch("badnet 8px noise target bar", 8 / 32, pattern="noise", target="bar"),
    AttackConfig("optimized patch 6px centre", "patch", "optimized_patch",
                 (("position", "center"), ("size_fraction", 6 / 32)), (0.01, 0.03)),
    AttackConfig("blended noise a=0.15", "image-wide", "blended", (("alpha", 0.15),), (0.03, 0.05, 0.1),
                 seeds=(0, 1, 2), core=True),
    AttackConfig("blended noise a=0.08", "image-wide", "blended", (("alpha", 0.08),), (0.05, 0.1)),
    AttackConfig("blended stripes a=0.15", "image-wide", "blended", (("alpha", 0.15), ("pattern", "stripes")),
                 (0.03, 0.05, 0.1)),
    AttackConfig("blended stripes a=0.08", "image-wide", "blended", (("alpha", 0.08), ("pattern", "stripes")),
                 (0.05, 0.1)),
    AttackConfig("sig amp 20", "image-wide", "sig", (("amplitude", 20.0),), (0.01, 0.03), seeds=(0, 1, 2), core=True),
    AttackConfig("sig amp 10", "image-wide", "sig", (("amplitude", 10.0),), (0.03, 0.05, 0.1), target="ring"),
    AttackConfig("wanet strength 6", "image-wide", "wanet", (("strength", 6.0),), (0.05, 0.1), seeds=(0, 1, 2),
                 core=True),
    AttackConfig("wanet strength 3", "image-wide", "wanet", (("strength", 3.0),), (0.05, 0.1)),
    # Label-consistent poisoning can only use target-class images, about a tenth of the world (3949 of
    # 40000 on seed 1): 0.09 stays under that ceiling on every seed.
    AttackConfig("label-consistent 8px", "clean-label", "label_consistent", (), (0.05, 0.09), seeds=(0, 1, 2),
                 core=True),
    AttackConfig("clean model", "clean", "badnet", (), (0.0,), seeds=(0, 1, 2, 3, 4), core=True),
)


def quiet(settings: DemoConfig) -> DemoConfig:
    """The same settings without progress bars (untied: the case keys do not change)."""
    recipe = replace(settings.recipe, train=replace(settings.recipe.train, progress=False))
    defense = replace(settings.defense, scan=replace(settings.defense.scan, progress=False),
                      repair=replace(settings.defense.repair, progress=False))
    return replace(settings, recipe=recipe, defense=defense, baseline=replace(settings.baseline, progress=False))


def select(matrix: tuple[AttackConfig, ...], attacks: list[str] | None = None, seeds: list[int] | None = None,
           quick: bool = False) -> list[tuple[AttackConfig, int]]:
    """The (configuration, seed) cases a run takes."""
    cases = []
    for config in matrix:
        if attacks and not any(a in (config.family, config.attack, config.name) for a in attacks):
            continue
        if quick and not config.core:
            continue
        config_seeds = config.seeds[:1] if quick else config.seeds
        cases += [(config, seed) for seed in config_seeds if seeds is None or seed in seeds]
    return cases


def case_key(config: AttackConfig, seed: int, settings: DemoConfig) -> str:
    """Identifies a case's results up to the code: the configuration, the seed and every setting."""
    spec = {"config": tied_settings(config), "seed": seed, "settings": tied_settings(settings)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def done_keys(path: Path, commit: str) -> set[str]:
    if not path.exists():
        return set()
    with path.open(newline="") as handle:
        return {row["case_key"] for row in csv.DictReader(handle) if row.get("commit") == commit}


def _recipe(config: AttackConfig, seed: int, rate: float, settings: DemoConfig) -> WorldRecipe:
    """The case's world model: settings.recipe (world size, model, training) with the case's attack."""
    return replace(settings.recipe, attack=config.attack, trigger_params=config.params, rate=rate,
                   target=config.target, seed=seed, trigger_seed=seed, train=replace(settings.recipe.train, seed=seed))


def clean_model_asr(recipe: WorldRecipe, test, cache_dir: Path) -> float:
    """The case's trigger and target on the never-poisoned model of the same world and seed: how
    often triggered images are called the target without any backdoor. A trigger that covers the
    object (a centre patch) or a target other classes are confused with raises it (1.6 to 2.5 % on
    the tiny world, against 0.3 to 1 % for corner patches), and no repair can go below it, so
    repaired ASRs are read against it."""
    clean, _, _ = cached_world_model(clean_recipe(recipe), cache_dir / "models")
    return evaluate(clean, test, recipe.make_trigger(), recipe.target_label)["asr"]


def run_case(config: AttackConfig, seed: int, settings: DemoConfig, work_dir: Path, cache_dir: Path) -> dict:
    """Train (or reuse) the case's model, climbing its rate ladder, then defend it and run the
    baseline (as `clipfast demo` does, with `settings`); returns the case's CSV row (no run stamp)."""
    start = time.perf_counter()
    test = evaluation_world(settings.test_size)
    rates_tried = []
    for rate in config.rates:
        recipe = optimized_patch_recipe(_recipe(config, seed, rate, settings), cache_dir / "models")
        rates_tried.append(rate)
        bundle, _, _ = cached_world_model(recipe, cache_dir / "models")
        asr = evaluate(bundle, test, recipe.make_trigger(), recipe.target_label)["asr"]
        if config.clean or asr >= ASR_GOAL:
            break
    asr_clean = asr if config.clean else clean_model_asr(recipe, test, cache_dir)
    seconds_model = time.perf_counter() - start
    report = run_demo(replace(settings, recipe=recipe), work_dir, cache_dir=cache_dir)
    models, victims, repair = report["models"], report["victims"], report["repair"] or {}
    estimates = repair.get("estimates", {})
    seconds = report["seconds"]
    flagged = report["targets_found"]
    return {
        "config": config.name, "family": config.family, "attack": recipe.make_trigger().name,
        "trigger_params": json.dumps(dict(config.params), sort_keys=True), "rate": recipe.rate,
        "rates_tried": " ".join(str(r) for r in rates_tried), "target": config.target, "seed": seed,
        "oracle_mode": settings.oracle_mode, "target_found": None if config.clean else report["target_found"],
        "flagged_labels": " ".join(flagged), "false_alarm": bool(flagged) if config.clean else None,
        "trigger_iou": report["trigger_iou"], "victims_found": victims["found"],
        "victim_precision": victims["precision"], "victim_recall": victims["recall"],
        "poisoned_in_probe": report["attack"]["poisoned_in_probe"], "compact_set_size": report["compact_set_size"],
        "baseline_set_size": report["baseline_set_size"],
        "ca_poisoned": models["poisoned"]["ca"], "asr_poisoned": models["poisoned"]["asr"],
        "asr_clean_model": asr_clean,
        "ca_repaired": models["EftCLIP repair"]["ca"], "asr_repaired": models["EftCLIP repair"]["asr"],
        "ca_baseline": models.get("CleanCLIP baseline", {}).get("ca"),
        "asr_baseline": models.get("CleanCLIP baseline", {}).get("asr"),
        "repair_steps": repair.get("steps", 0), "repair_stopped_early": repair.get("stopped_early"),
        "repair_asr_estimate": estimates.get("asr_estimate"), "repair_clean_agreement": estimates.get("clean_agreement"),
        # what the verdict counted, then the estimate's two parts: held-out victims, and clean images
        # with the trigger pasted on (repair.holdout_estimator: self mode counts the latter alone)
        "repair_asr_hits": estimates.get("asr_hits"), "repair_asr_n": estimates.get("asr_n"),
        "repair_victim_hits": estimates.get("asr_victim_hits"), "repair_victim_n": estimates.get("asr_victim_n"),
        "repair_pasted_hits": estimates.get("asr_pasted_hits"), "repair_pasted_n": estimates.get("asr_pasted_n"),
        "verdict": report["verdict"]["status"], "verdict_asr_upper_bound": report["verdict"]["asr_upper_bound"],
        "trigger_kind": " ".join(t["kind"] for t in report["scan"]["triggers"]),
        "seconds_model": round(seconds_model, 1), "seconds_scan": seconds.get("scan"),
        "seconds_curate": seconds.get("curate"), "seconds_repair": seconds.get("repair"),
        "seconds_baseline": seconds.get("baseline"), "seconds_case": round(time.perf_counter() - start, 1),
    }


def run_matrix(cases: list[tuple[AttackConfig, int]], settings: DemoConfig, results: Path, device: str,
               mode: str, cache_dir: Path | None = None, failures: list[str] | None = None) -> list[dict]:
    """Run the cases not yet in results/efficacy.csv for this commit and these settings; each row is
    appended as soon as its case ends. A case that raises is reported (traceback on stderr, a line in
    `failures`) and the matrix goes on: one broken case must not cost the hours of the others.
    Returns the rows run now."""
    cache_dir = Path(cache_dir or default_cache_dir())
    csv_path = results / "efficacy.csv"
    stamp = run_stamp(device, mode)
    finished = done_keys(csv_path, stamp["commit"])
    writer = CsvWriter(csv_path, FIELDS)
    rows = []
    for number, (config, seed) in enumerate(cases, 1):
        key = case_key(config, seed, settings)
        if key in finished:
            print(f"[{number}/{len(cases)}] {config.name} seed {seed}: in {csv_path} already", flush=True)
            continue
        print(f"[{number}/{len(cases)}] {config.name} seed {seed} ...", flush=True)
        work_dir = cache_dir / "efficacy" / stamp["commit"] / key
        try:
            row = {**run_stamp(device, mode), "case_key": key, **run_case(config, seed, settings, work_dir, cache_dir)}
        except Exception as error:  # noqa: BLE001 - reported below and in the run's exit status
            traceback.print_exc()
            message = f"{config.name} seed {seed} ({settings.oracle_mode}): {type(error).__name__}: {error}"
            print(f"    FAILED: {message}", flush=True)
            if failures is not None:
                failures.append(message)
            continue
        writer.write(row)
        rows.append(row)
        print(f"    t* {'-' if row['target_found'] is None else row['target_found']}, flagged "
              f"[{row['flagged_labels']}], ASR {row['asr_poisoned']} -> {row['asr_repaired']} (baseline "
              f"{row['asr_baseline']}), CA {row['ca_poisoned']} -> {row['ca_repaired']}, {row['seconds_case']} s",
              flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attacks", nargs="+", default=None,
                        help="efficacy suite: families (patch, image-wide, clean-label, clean), trigger names or "
                        "configuration names")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="efficacy suite: only these seeds")
    parser.add_argument("--oracle-modes", nargs="+", choices=ORACLE_MODES, default=list(ORACLE_MODES),
                        help="efficacy suite: self (the suspect grounds its own crops) and/or trusted (a clean "
                        "model of another seed grounds them); default: both")
    parser.add_argument("--readme", action="store_true",
                        help="efficacy suite: regenerate the README's defence table and the plot from the CSV "
                        "instead of running cases")


def run(args: argparse.Namespace, device: str, mode: str) -> list[dict]:
    """The suite's entry point (rows are written by run_matrix as cases end, so none are returned)."""
    results = Path(args.results)
    failures: list[str] = []
    if not args.readme:
        cases = select(MATRIX, args.attacks, args.seeds, quick=args.quick)
        for oracle_mode in args.oracle_modes:
            print(f"efficacy, oracle {oracle_mode}: {len(cases)} cases, rows to {results / 'efficacy.csv'}", flush=True)
            # The baseline does not depend on the oracle: it runs with the first mode only.
            settings = DemoConfig(oracle_mode=oracle_mode, run_baseline=oracle_mode == args.oracle_modes[0])
            run_matrix(cases, quiet(settings), results, device, mode, failures=failures)
    rows = read_rows(results / "efficacy.csv")
    if rows:
        from .efficacy_report import plot_efficacy, update_readme

        plot_efficacy(rows, results / "efficacy.png")
        if args.readme:
            update_readme(rows, Path(__file__).resolve().parents[2] / "README.md")
    if failures:
        raise RuntimeError(f"efficacy: {len(failures)} case(s) failed (the others' rows are in the CSV):\n  "
                           + "\n  ".join(failures))
    return []


def _blank(value) -> bool:
    """A CSV cell with no value (a column the case did not measure)."""
    return value in (None, "", "None")


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows, the latest one of each (configuration, seed, oracle mode)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        latest = {}
        for row in csv.DictReader(handle):
            latest[row["config"], row["seed"], row["oracle_mode"]] = row
    # The baseline does not depend on the oracle (run() runs it with the first mode only): a row
    # without one takes the same case's from the other mode, when that row measured the same poisoned
    # model. Models retrained on another machine differ (training is not bitwise reproducible across
    # machines: the 'blended noise a=0.08' model poisoned to 96.4 % ASR on one, 86.0 % on another),
    # so the poisoned CA / ASR must match; otherwise the row shows no baseline rather than another model's.
    baselines = {(row["config"], row["seed"], row["ca_poisoned"], row["asr_poisoned"]): row
                 for row in latest.values() if not _blank(row.get("asr_baseline"))}
    for row in latest.values():
        other = baselines.get((row["config"], row["seed"], row["ca_poisoned"], row["asr_poisoned"]))
        if _blank(row.get("asr_baseline")) and other is not None:
            row.update(ca_baseline=other["ca_baseline"], asr_baseline=other["asr_baseline"])
    return list(latest.values())


def summarise(rows: list[dict]) -> list[dict]:
    """Per oracle mode and configuration (in matrix order): seeds, t* found count, median and worst
    ASR/CA."""
    order = {config.name: k for k, config in enumerate(MATRIX)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["oracle_mode"], row["config"]), []).append(row)
    out = []
    for mode, name in sorted(groups, key=lambda g: (g[0], order.get(g[1], len(order)), g[1])):
        group = groups[mode, name]
        number = lambda key: [float(r[key]) for r in group if not _blank(r.get(key))]  # noqa: E731
        found = [r["target_found"] == "True" for r in group if r["target_found"] not in ("", "None")]
        out.append({
            "config": name, "oracle_mode": mode, "family": group[0]["family"], "seeds": len(group),
            "rates": sorted({r["rate"] for r in group}),
            "found": sum(found), "of": len(found),
            "false_alarms": sum(r["false_alarm"] == "True" for r in group),
            # backdoored models where a label other than the target was flagged (a wrong finding)
            "wrong_labels": sum(bool(set(r["flagged_labels"].split()) - {r["target"]}) for r in group
                                if r["family"] != "clean"),
            "removed": sum(r["verdict"] == "removed" for r in group),
            "baseline_seeds": len(number("asr_baseline")),  # fewer than seeds where a row has none (read_rows)
            **{f"{stat}_{key}": (None if not number(key) else
                                 (statistics.median(number(key)) if stat == "median" else
                                  (max if key.startswith("asr") else min)(number(key))))
               for key in ("asr_poisoned", "asr_repaired", "asr_baseline", "asr_clean_model", "ca_poisoned",
                           "ca_repaired", "ca_baseline")
               for stat in ("median", "worst")},
        })
    return out
