"""How often a patch victim's oracle label is its true class, named by its largest other region (the
scan's first guess) or with its trigger inpainted (clipfast/defense/scan/victim_labels.py): on the
saved scans of a matrix run made before the inpainted naming (their oracle labels are the first
guess), relabelled here with the run's cached models (the trusted one in trusted mode).

    python benchmarks/victim_labels.py --commit e353012 --modes self
    python benchmarks/victim_labels.py --commit 578d79f --modes trusted

Rows (JSON lines, `--out`): patch victims, how many labels changed, and the share right before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.oracle import ClassicalSegmenter
from repair_variants import RESULTS, append_row, matrix_cases, relabel, saved_case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="a matrix run from before e1fd052, whose models and scans to reuse")
    parser.add_argument("--configs", nargs="+", default=None, help="matrix configuration names (default: all)")
    parser.add_argument("--modes", nargs="+", default=["self", "trusted"], choices=["self", "trusted"])
    parser.add_argument("--out", type=Path, default=RESULTS / "victim_labels.jsonl")
    args = parser.parse_args(argv)
    cache, settings = default_cache_dir(), DemoConfig()
    segmenter = ClassicalSegmenter()  # the matrix's oracle
    for row in matrix_cases(args.commit, args.configs, args.modes):
        case = saved_case(row, args.commit, cache, settings)
        if case is None or not any(trigger.kind == "patch" for trigger in case[3].triggers):
            continue
        recipe, bundle, pairs, scan = case
        probe, truth = pairs.images[: settings.probe_size], pairs.labels[: settings.probe_size]
        before = scan.oracle_label.clone()
        relabel(scan, row, recipe, bundle, probe, cache, segmenter)
        victims = torch.cat([torch.as_tensor(t.patch_indices, dtype=torch.long) for t in scan.triggers if t.kind == "patch"])
        append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                    "oracle_mode": row["oracle_mode"], "patch_victims": len(victims),
                    "changed": int((before[victims] != scan.oracle_label[victims]).sum()),
                    "right_before": round(float((before[victims] == truth[victims]).float().mean()), 3),
                    "right_after": round(float((scan.oracle_label[victims] == truth[victims]).float().mean()), 3)},
                   args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
