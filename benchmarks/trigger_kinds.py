"""Is a target a patch or an image-wide trigger? The evidence behind decide.py's rule, from the saved
scans of finished efficacy matrix runs: for every found target, its victims, those with patch evidence,
and whether the patch victims alone pass the label test (decide_targets with the patch evidence as the
candidates), beside the kind the scan reported.

    python benchmarks/trigger_kinds.py --commits 31e5e48 d8395e4 68f76cd 01f10af e353012

Scans are read from `$CLIPFAST_CACHE/efficacy/<commit>/<case key>/defense/scan.pt` (only the matrix
runs made on this machine have them); rows go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import csv
import json

import torch

from clipfast.defense.pipeline import SCAN_NAME, load_scan
from clipfast.defense.scan import ScanConfig, decide_targets
from clipfast.demo import default_cache_dir
from repair_variants import RESULTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", nargs="+", required=True, help="matrix runs (commit prefixes) to read")
    args = parser.parse_args(argv)
    cache = default_cache_dir() / "efficacy"
    with (RESULTS / "efficacy.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if any(row["commit"].startswith(c) for c in args.commits)]
    for row in rows:
        paths = sorted(cache.glob(f"{row['commit'][:7]}*/{row['case_key']}/defense/{SCAN_NAME}"))
        if not paths:
            continue
        scan = load_scan(paths[0])
        sources = torch.where(scan.reference_label >= 0, scan.reference_label, scan.oracle_label)
        test, patch_targets = decide_targets(scan.image_label, scan.patch_evidence & scan.readable, sources,
                                             len(scan.classnames), ScanConfig())
        for trigger in scan.triggers:
            print(json.dumps({"commit": row["commit"][:7], "config": row["config"], "seed": int(row["seed"]),
                              "oracle_mode": row["oracle_mode"], "target": scan.classnames[trigger.target],
                              "kind_reported": trigger.kind, "victims": len(trigger.victim_indices),
                              "patch_victims": len(trigger.patch_indices),
                              "patch_victims_significant": trigger.target in patch_targets,
                              "patch_p_value": test.p_values[trigger.target], "threshold": test.threshold}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
