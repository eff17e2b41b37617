"""The efficacy matrix's cases defended with packed regions (ScanConfig.regions="packed") instead of
crops, to compare with the matrix's crop rows of the same code (issue 14: may packed be the default?).
`--grounding-regions` says how the grounding model names the regions (ScanConfig.grounding_regions:
crop, the default, or packed too; rows before that option existed, at fbe86dc, named packed).

Each case runs as the matrix runs it (clipfast.bench.efficacy.run_case: cached model, scan, curate,
repair, evaluation on the test world) without the CleanCLIP-style baseline, which does not depend on
the region mode. Rows (the matrix's CSV fields plus regions and commit) go to `--out` as JSON lines
as they end. `--regions crop` runs the same cases with crops, for a comparison within one commit
when the matrix's crop rows are from older code.

    python benchmarks/packed_efficacy.py --families patch --modes self
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from clipfast.bench.efficacy import MATRIX, quiet, run_case
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.provenance import git_commit
from repair_variants import append_row

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["patch"], help="matrix families (default: patch)")
    parser.add_argument("--configs", nargs="+", default=None, help="matrix configuration names (default: all of the families)")
    parser.add_argument("--modes", nargs="+", default=["self"], choices=["self", "trusted"])
    parser.add_argument("--regions", default="packed", choices=["packed", "crop"])
    parser.add_argument("--grounding-regions", default="crop", choices=["crop", "packed"])
    parser.add_argument("--out", type=Path, default=RESULTS / "packed_efficacy.jsonl")
    args = parser.parse_args(argv)
    commit = git_commit()
    settings = quiet(DemoConfig())
    settings = replace(settings, run_baseline=False,
                       defense=replace(settings.defense, scan=replace(settings.defense.scan, regions=args.regions,
                                                                         grounding_regions=args.grounding_regions)))
    for mode in args.modes:
        for config in (c for c in MATRIX if c.family in args.families and (not args.configs or c.name in args.configs)):
            for seed in config.seeds:
                with tempfile.TemporaryDirectory() as work:
                    row = run_case(config, seed, replace(settings, oracle_mode=mode), Path(work), default_cache_dir())
                append_row(row | {"regions": args.regions, "grounding_regions": args.grounding_regions, "commit": commit},
                           args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
