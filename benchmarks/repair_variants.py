"""Repair settings measured on the efficacy matrix without rerunning it: curate + repair again on the
cached models and saved scans of a finished matrix run, with some CurateConfig / RepairConfig fields
changed, and CA / ASR on the test world after.

A matrix case costs ~35 s on this 2-core CPU (model, scan, repair, baseline, evaluations); a variant
here costs ~12 s (repair and one evaluation), so a sweep over the whole matrix is minutes, not hours.
The cases are the CSV rows of `--commit` whose target was found; each reuses the case's cached model
(the matrix trained it into `$CLIPFAST_CACHE/models`) and the scan that run saved
(`$CLIPFAST_CACHE/efficacy/<commit>/<case key>/defense/scan.pt`). Scans are reused, not redone:
a variant that changes the scan needs the matrix itself. Rows go to `--out` (JSON lines) as they end.

    python benchmarks/repair_variants.py --commit b0d5586 --configs "badnet 6px centre" \\
        --variant default --variant replay_per_label=150 --variant replay_per_label=150,lr=1e-4

A variant is a comma-separated list of FIELD=VALUE over CurateConfig and RepairConfig fields (the
field names as they are, `seed` setting both; `default` changes nothing). `--relabel` names the saved
scans' patch victims with their trigger inpainted first (scan/victim_labels.py), as scans saved since
e1fd052 are: the same repairs with either labelling, e.g. across repair seeds:

    python benchmarks/repair_variants.py --commit e353012 --modes self --configs "badnet 6px centre" \
        --variant seed=0 --variant seed=1 --variant seed=2 [--relabel]
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from clipfast.bench.efficacy import MATRIX, _recipe
from clipfast.data.probe import as_probe_set
from clipfast.data.world import zero_shot_prompts
from clipfast.defense.curate import CurateConfig, curate
from clipfast.defense.pipeline import SCAN_NAME, load_scan
from clipfast.defense.repair import RepairConfig, repair
from clipfast.defense.scan import ScanConfig
from clipfast.defense.scan.victim_labels import relabel_patch_victims
from clipfast.defense.unlearning import recover_triggers
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.eval import evaluate
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model, evaluation_world, optimized_patch_recipe, trusted_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def parse_variant(text: str) -> tuple[CurateConfig, RepairConfig]:
    """'default' or 'field=value,...' over CurateConfig and RepairConfig (values parsed as JSON, else strings)."""
    fields = {"curate": {f.name for f in dataclasses.fields(CurateConfig)},
              "repair": {f.name for f in dataclasses.fields(RepairConfig)}}
    changes: dict[str, dict] = {"curate": {}, "repair": {"progress": False}}
    for item in [] if text == "default" else text.split(","):
        name, _, value = item.partition("=")
        owners = [owner for owner, names in fields.items() if name in names]
        if not owners or not value:
            raise SystemExit(f"variant {text!r}: {name!r} is not a CurateConfig or RepairConfig field "
                             f"(or has no value)")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        for owner in owners:  # `seed`: both configs
            changes[owner][name] = parsed
    return CurateConfig(**changes["curate"]), RepairConfig(**changes["repair"])


def matrix_cases(commit: str, configs: list[str] | None, modes: list[str]) -> list[dict]:
    with (RESULTS / "efficacy.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["commit"].startswith(commit)]
    rows = [row for row in rows if row["target_found"] == "True" and row["oracle_mode"] in modes
            and (not configs or row["config"] in configs)]
    if not rows:
        raise SystemExit(f"no found-target rows of commit {commit!r} match in {RESULTS / 'efficacy.csv'}")
    return rows


def append_row(row: dict, path: Path) -> None:
    """Print a result row and append it to the JSON-lines file `path` as it ends."""
    print(json.dumps(row), flush=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def saved_case(row: dict, commit: str, cache: Path, settings: DemoConfig):
    """(recipe, cached model, poisoned pairs, saved scan) of a matrix row, or None without a saved scan."""
    scans = sorted((cache / "efficacy").glob(f"{commit}*/{row['case_key']}/defense/{SCAN_NAME}"))
    if not scans:
        return None
    config = next(config for config in MATRIX if config.name == row["config"])
    recipe = optimized_patch_recipe(_recipe(config, int(row["seed"]), float(row["rate"]), settings), cache / "models")
    bundle, pairs, _ = cached_world_model(recipe, cache / "models")
    return recipe, bundle, pairs, load_scan(scans[0])


def trusted_model(row: dict, recipe, cache: Path):
    """The row's trusted clean model (trusted mode), else None."""
    return cached_world_model(trusted_recipe(recipe), cache / "models")[0] if row["oracle_mode"] == "trusted" else None


def relabel(scan, row: dict, recipe, bundle, probe, cache: Path, segmenter) -> None:
    """Name the saved scan's patch victims as scans since e1fd052 do (trigger inpainted), with the
    row's grounding model: the trusted clean model in trusted mode, the suspect in self mode."""
    relabel_patch_victims(scan, as_probe_set(probe), segmenter, bundle, trusted_model(row, recipe, cache),
                          zero_shot_prompts, ScanConfig(progress=False))


def repaired_on_test(bundle, scan, probe, recipe, test, segmenter, curate_config: CurateConfig,
                     repair_config: RepairConfig, trusted=None) -> dict:
    """Curate and repair a copy of bundle from `scan` as defend does (trusted: the trusted model in
    trusted mode), then CA / ASR on the test world."""
    model = copy.deepcopy(bundle)
    triggers = recover_triggers(scan, probe, curate_config.seed, segmenter)  # as defend does
    compact = curate(scan, probe, curate_config, triggers)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        # the demo's prompts: the held-out estimate (and any early stop) are the matrix's
        result = repair(model, compact, scan, probe, work, prompts=zero_shot_prompts, config=repair_config,
                        triggers=triggers, trusted_bundle=trusted)
    seconds = time.perf_counter() - start
    after = evaluate(model, test, recipe.make_trigger(), recipe.target_label)
    return {"compact_set_size": len(compact), "ca_repaired": after["ca"], "asr_repaired": after["asr"],
            "repair_steps": result.train.step, "repair_asr_estimate": result.estimates.get("asr_estimate"),
            "seconds_repair": round(seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose rows, models and scans to reuse")
    parser.add_argument("--configs", nargs="+", default=None, help="matrix configuration names (default: all)")
    parser.add_argument("--modes", nargs="+", default=["self", "trusted"], choices=["self", "trusted"])
    parser.add_argument("--variant", action="append", default=None, help="FIELD=VALUE,... or 'default' (repeatable)")
    parser.add_argument("--relabel", action="store_true",
                        help="name the patch victims with their trigger inpainted first (scans saved before e1fd052)")
    parser.add_argument("--out", type=Path, default=Path("repair_variants.jsonl"))
    args = parser.parse_args(argv)
    variants = [(text, *parse_variant(text)) for text in args.variant or ["default"]]
    cache, settings = default_cache_dir(), DemoConfig()
    test = evaluation_world(settings.test_size)
    segmenter = ClassicalSegmenter()  # the matrix's oracle (clipfast demo's)
    for row in matrix_cases(args.commit, args.configs, args.modes):
        case = saved_case(row, args.commit, cache, settings)
        if case is None:
            print(f"{row['config']} seed {row['seed']} ({row['oracle_mode']}): no saved scan, skipped", flush=True)
            continue
        recipe, bundle, pairs, scan = case
        probe = pairs.images[: settings.probe_size]
        if args.relabel:
            relabel(scan, row, recipe, bundle, probe, cache, segmenter)
        trusted = trusted_model(row, recipe, cache)
        for text, curate_config, repair_config in variants:
            out = {"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                   "oracle_mode": row["oracle_mode"], "relabel": args.relabel, "variant": text,
                   "ca_poisoned": float(row["ca_poisoned"]),
                   "asr_clean_model": float(row["asr_clean_model"]),
                   **repaired_on_test(bundle, scan, probe, recipe, test, segmenter, curate_config, repair_config,
                                      trusted)}
            append_row(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
