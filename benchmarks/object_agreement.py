"""Whether the oracle's largest region is the image's object: the gate of self mode's image-wide tests.

The mirror test and the object-alone test (clipfast/defense/scan/decide.py) read each probe image's
largest region, shown alone, as its object. decide.MIN_OBJECT_AGREEMENT runs them only where the
object alone keeps the whole image's label for most of the probe set. This script measures that
share (a) on every saved self-mode scan of the efficacy matrix (the world's built-in segmenter; the
newest saved scan of each case) and (b) on fresh scans of the clean models with the built-in
segmenter and with regions blind to the content (the pipeline bench's fixed oracle: discs or cells),
saying for (b) which labels the two tests flag when they are run regardless of the gate, and which
targets the scan reports with it.

    python benchmarks/object_agreement.py --seeds 0 1 2 3 4 --probe 2000

Writes benchmarks/results/object_agreement.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipfast.bench.common import code_commit
from clipfast.bench.efficacy import MATRIX, _recipe, select
from clipfast.bench.pipeline import FixedOracle
from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.pipeline import SCAN_NAME, load_scan
from clipfast.defense.scan import ScanConfig, scan
from clipfast.defense.scan.decide import (IMAGE_WIDE_TESTS, MIN_OBJECT_AGREEMENT, mirror_label_test, object_agreement,
                                          object_alone_test)
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import cached_world_model

RESULTS = Path(__file__).resolve().parent / "results"


def saved_scans(cache: Path) -> list[dict]:
    """The newest saved self-mode scan of each matrix case (case keys tie the settings, not the code)."""
    newest = {}
    for path in (cache / "efficacy").glob(f"*/*/defense/{SCAN_NAME}"):
        key = path.parts[-3]
        if key not in newest or path.stat().st_mtime > newest[key].stat().st_mtime:
            newest[key] = path
    rows = []
    for key, path in sorted(newest.items()):
        result = load_scan(path)
        agreement = object_agreement(result)
        if agreement is None:  # trusted mode, or saved before the objects alone were labelled
            continue
        rows.append({"case_key": key, "commit": path.parts[-4], "agreement": round(agreement, 4),
                     "targets": [result.classnames[t] for t in result.targets]})
    return rows


def ungated_flags(result, config: ScanConfig) -> dict[str, list[str]]:
    """The labels each image-wide test flags on a scan's columns, the gate left out."""
    significance = config.significance / IMAGE_WIDE_TESTS
    mirror = mirror_label_test(result, len(CLASSES), significance, config.min_count)[1]
    alone = object_alone_test(result, len(CLASSES), significance, config.min_count)[1]
    return {"mirror": [CLASSES[k] for k in mirror], "object_alone": [CLASSES[k] for k in alone]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--probe", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "object_agreement.json")
    args = parser.parse_args()
    settings, cache, config = DemoConfig(), default_cache_dir(), ScanConfig(progress=False)
    saved = saved_scans(cache)
    values = [row["agreement"] for row in saved]
    print(f"saved self-mode scans: {len(saved)}, agreement {min(values):.3f}-{max(values):.3f}", flush=True)
    fresh = []
    for matrix_config, seed in select(MATRIX, ["clean model"], args.seeds):
        bundle, pairs, _ = cached_world_model(_recipe(matrix_config, seed, 0.0, settings), cache / "models")
        for name, oracle in (("classical", ClassicalSegmenter()), ("discs:16", FixedOracle(16, "discs")),
                             ("cells:16", FixedOracle(16, "cells"))):
            result = scan(bundle, list(CLASSES), pairs.images[: args.probe], oracle, prompts=zero_shot_prompts,
                          config=config)
            row = {"model": f"clean seed {seed}", "oracle": name, "agreement": round(result.object_agreement, 4),
                   "gate_passed": result.object_agreement >= MIN_OBJECT_AGREEMENT,
                   "flagged_without_gate": ungated_flags(result, config),
                   "targets": [CLASSES[t] for t in result.targets]}
            print(json.dumps(row), flush=True)
            fresh.append(row)
    args.out.write_text(json.dumps({"commit": code_commit(), "min_object_agreement": MIN_OBJECT_AGREEMENT,
                                    "probe": args.probe, "saved_scans": saved, "fresh_scans": fresh}, indent=1) + "\n")


if __name__ == "__main__":
    main()
