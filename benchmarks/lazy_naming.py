"""How many region crops the grounding model still encodes now that it names lazily (issue 14).

A grounding model of its own (a trusted model, or self mode's crop naming of packed evidence) used to
encode every region of every probe image as a crop, and the whole images again. The scan reads of it
only whether some region grounds each image's label, the largest region's label and, for the few
donors that pass the transplant test, the largest other region's label; the fast engine now names
just those (scan/scanner.py: name_until_grounded). This script scans trained matrix models both ways
(lazy, and every region named as before) with the demo's settings and says, per case and oracle mode:
the regions the scan scores, the crops the grounding model encoded (whole images included), the scan
seconds both ways, and whether every column of the two scans is identical.

    python benchmarks/lazy_naming.py --attacks "badnet 4px checker corner" "blended noise a=0.15" \
        "wanet strength 6" "clean model" --seeds 0 --probe 5000 [--oracle discs:16]

Models come from the matrix cache (~/.cache/clipfast/models; a case whose model is not there is
trained first, ~4 min here). Rows go to stdout and are appended to `--out` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipfast.bench.common import code_commit
from clipfast.bench.efficacy import MATRIX, _recipe, select
from clipfast.bench.pipeline import CountingGrounder, FixedOracle, counting_grounders
from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.scan import ScanConfig, scan, scanner
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model, optimized_patch_recipe, trusted_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def timed_scan(bundle, probe, trusted, segmenter, lazy: bool) -> tuple[object, float, CountingGrounder]:
    """One scan with the demo's scan settings; lazy=False names every region, as before."""
    eager = property(lambda self: False, lambda self, value: None)  # every region named, as the reference does
    if not lazy:
        scanner.ShardScanner.name_lazily = eager
    try:
        with counting_grounders() as counters:
            start = time.perf_counter()
            result = scan(bundle, list(CLASSES), probe, segmenter, prompts=zero_shot_prompts,
                          grounding_bundle=trusted, config=ScanConfig(progress=False))
            return result, time.perf_counter() - start, counters[0]
    finally:
        if not lazy:
            del scanner.ShardScanner.name_lazily


def columns(result) -> dict[str, torch.Tensor]:
    out = {name: value for name, value in vars(result).items() if isinstance(value, torch.Tensor)}
    out["targets"] = torch.tensor(result.targets)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", choices=["self", "trusted"], default=["self", "trusted"])
    parser.add_argument("--probe", type=int, default=5000)
    parser.add_argument("--oracle", default="classical", help="classical (the world's segmenter: ~1.2 regions an "
                        "image) or SHAPE:N, the pipeline bench's fixed oracle (discs or cells, N regions an image)")
    parser.add_argument("--out", type=Path, default=RESULTS / "lazy_naming.jsonl")
    args = parser.parse_args()
    settings, cache = DemoConfig(), default_cache_dir()
    if args.oracle == "classical":
        segmenter = ClassicalSegmenter()
    else:
        shape, count = args.oracle.split(":")
        segmenter = FixedOracle(int(count), shape)
    commit = code_commit()
    for config, seed in select(MATRIX, args.attacks, args.seeds):
        # the first rate of the matrix's ladder whose model the cache holds (else the first, trained now)
        ladder = [optimized_patch_recipe(_recipe(config, seed, rate, settings), cache / "models") for rate in config.rates]
        recipe = next((r for r in ladder if (cache / "models" / r.cache_key()).exists()), ladder[0])
        bundle, pairs, _ = cached_world_model(recipe, cache / "models")
        probe = pairs.images[: args.probe]
        for mode in args.modes:
            trusted = cached_world_model(trusted_recipe(recipe), cache / "models")[0] if mode == "trusted" else None
            timed_scan(bundle, probe[:256], trusted, segmenter, True)  # warm-up: the first scan of a process is slower
            runs = {}
            for lazy in (False, True, False, True):  # alternated: the machine's speed drifts
                runs.setdefault(lazy, []).append(timed_scan(bundle, probe, trusted, segmenter, lazy))
            eager, lazy = runs[False][0], runs[True][0]
            same = all(torch.equal(value, columns(lazy[0])[name]) for name, value in columns(eager[0]).items())
            row = {"commit": commit, "config": config.name, "seed": seed, "rate": recipe.rate, "oracle_mode": mode,
                   "oracle": args.oracle,
                   "probe": len(probe), "regions_scored": eager[2].submitted,
                   # crops the grounding model encoded (eager: every region, then the passing donors'
                   # other regions once more at the end), and whole images
                   "grounding_crops_eager": eager[2].crops, "grounding_crops_lazy": lazy[2].named,
                   "grounding_images_eager": eager[2].images, "grounding_images_lazy": lazy[2].images,
                   "regions_per_image": round(eager[2].submitted / len(probe), 3),
                   "crops_per_image_lazy": round(lazy[2].named / len(probe), 3),
                   "seconds_eager": [round(s, 2) for _, s, _ in runs[False]],
                   "seconds_lazy": [round(s, 2) for _, s, _ in runs[True]],
                   "region_stage_eager": [round(r.seconds["regions"], 2) for r, _, _ in runs[False]],
                   "region_stage_lazy": [round(r.seconds["regions"], 2) for r, _, _ in runs[True]],
                   "targets": [CLASSES[t] for t in lazy[0].targets], "identical_columns": same}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
