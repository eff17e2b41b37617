"""Self mode's two image-wide tests, recomputed on saved matrix scans (issue 17).

The mirror test and the object-alone test (clipfast/defense/scan/decide.py) read per-image columns
every self-mode scan since b415e9f saves: the model's labels of the image, of it mirrored, of its
largest region alone and of that alone mirrored. So both tests can be rerun, with today's code and
thresholds, on the scans of earlier matrix runs without encoding anything: which labels each flags,
the true target's p-value and the smallest p-value among the other labels (the false-alarm margin).
A scan's decisions change with the object-alone test only where it flags a label the scan did not
report; on a patch or label-consistent model, a target the patch test found stays a patch target.
For a label other than the target that a test flags, the row also says how many of the images the
test counted (the mirror: relabelled by the flip; the object-alone test: their object alone another
label) are poisoned probe images, and how many poisoned probe images the model gives that label (the
case's world is rebuilt from the cache for it, as benchmarks/repair_variants.py does).

    python benchmarks/image_wide_tests.py --commits 203bc16 9eeef2f 0c6f216 5518d1e c8e31eb b415e9f

Rows go to stdout and are appended to `--out` (JSON lines), one per case: the newest of the given
commits that saved a scan of it (`commit`), and the code that recomputed the tests (`code_commit`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from clipfast.bench.common import code_commit
from clipfast.defense.pipeline import SCAN_NAME, load_scan
from clipfast.defense.scan import ScanConfig
from clipfast.defense.scan.decide import IMAGE_WIDE_TESTS, mirror_label_test, object_alone_test
from clipfast.demo import DemoConfig, default_cache_dir
from repair_variants import saved_case

RESULTS = Path(__file__).resolve().parent / "results"


def poisoned_images(row: dict, cache: Path, count: int) -> torch.Tensor:
    """bool [count]: which of the case's probe images are poisoned (its world rebuilt from the cache)."""
    _, _, pairs, _ = saved_case(row, row["commit"][:12], cache.parent, DemoConfig())
    poisoned = torch.zeros(count, dtype=torch.bool)
    poisoned[pairs.poisoned_indices[pairs.poisoned_indices < count]] = True
    return poisoned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", nargs="+", required=True, help="self-mode matrix runs to read, newest first")
    parser.add_argument("--out", type=Path, default=RESULTS / "image_wide_tests.jsonl")
    args = parser.parse_args(argv)
    config, cache = ScanConfig(), default_cache_dir() / "efficacy"
    significance = config.significance / IMAGE_WIDE_TESTS
    with (RESULTS / "efficacy.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["oracle_mode"] == "self"]
    seen, lines, code = set(), [], code_commit()
    for commit in args.commits:
        for row in rows:
            path = cache / row["commit"][:12] / row["case_key"] / "defense" / SCAN_NAME
            if not row["commit"].startswith(commit) or row["case_key"] in seen or not path.exists():
                continue
            seen.add(row["case_key"])
            scan = load_scan(path)
            names = scan.classnames
            target = names.index(row["target"]) if row["family"] != "clean" else None
            result = {"commit": row["commit"], "code_commit": code, "config": row["config"], "seed": int(row["seed"]),
                      "family": row["family"], "target": None if target is None else row["target"],
                      "reported": row["flagged_labels"].split()}
            counted = {"mirror": scan.readable & (scan.mirror_label >= 0) & (scan.mirror_label != scan.image_label),
                       "object alone": scan.readable & (scan.object_label >= 0) & (scan.object_label != scan.image_label)}
            for name, test in (("mirror", mirror_label_test), ("object alone", object_alone_test)):
                label_test, flagged = test(scan, len(names), significance, config.min_count)
                others = [(p, names[k]) for k, p in enumerate(label_test.p_values) if k != target]
                result[name] = {"flagged": [names[k] for k in flagged],
                                "target_p": None if target is None else label_test.p_values[target],
                                "other_min_p": min(others)[0], "other_min_p_label": min(others)[1]}
                wrong = [label for label in flagged if label != target]
                if wrong:
                    poisoned = poisoned_images(row, cache, len(scan.image_label))
                    result[name]["other_flags"] = {names[label]: {
                        "counted": int((counted[name] & (scan.image_label == label)).sum()),
                        "counted_poisoned": int((counted[name] & poisoned & (scan.image_label == label)).sum()),
                        "poisoned_given_it": int((poisoned & (scan.image_label == label)).sum())} for label in wrong}
            print(json.dumps(result), flush=True)
            lines.append(json.dumps(result) + "\n")
    with args.out.open("a") as handle:
        handle.writelines(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
