"""How right are the mirror test's victims and their captions? (self mode, image-wide targets)

The mirror test (clipfast/defense/scan/decide.py) takes a target's images that a horizontal flip
relabels as its victims and names each by the mirrored image's label. Two things can go wrong: a
real target-class image the flip happens to relabel is taken for a victim (precision), and the
flip's label is not the victim's true class (the caption the repair trains on). This reads the saved
scans of a finished self-mode matrix run and reports, per found image-wide target: victims found,
precision and recall against the probe's poisoned images the model labels the target, the share of
true victims captioned with their true class, and the same for a stricter rule that also drops
victims whose object shown alone is labelled the target (a target-class object, or a trigger the
object keeps).

    python benchmarks/mirror_victims.py --commit b415e9f

Rows go to stdout and are appended to `--out` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipfast.demo import DemoConfig, default_cache_dir
from repair_variants import RESULTS, append_row, matrix_cases, saved_case


def victim_quality(found: torch.Tensor, truth: torch.Tensor, captions: torch.Tensor, labels: torch.Tensor) -> dict:
    """found / truth: probe indices; captions: oracle label per probe image; labels: true classes."""
    hits = found[torch.isin(found, truth)]
    return {"found": len(found), "precision": round(len(hits) / max(len(found), 1), 3),
            "recall": round(len(hits) / max(len(truth), 1), 3),
            "caption_right": round(float((captions[hits] == labels[hits]).float().mean()), 3) if len(hits) else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the self-mode matrix run (commit prefix) to read")
    parser.add_argument("--out", type=Path, default=RESULTS / "mirror_victims.jsonl")
    args = parser.parse_args(argv)
    settings, cache = DemoConfig(), default_cache_dir()
    for row in matrix_cases(args.commit, None, ["self"]):
        case = saved_case(row, args.commit, cache, settings)
        if case is None:
            continue
        recipe, _, pairs, scan = case
        for trigger in scan.triggers:
            if trigger.kind != "image-wide" or trigger.target != recipe.target_label:
                continue
            poisoned = pairs.poisoned_indices[pairs.poisoned_indices < len(scan.image_label)]
            truth = poisoned[scan.image_label[poisoned] == trigger.target]
            labels = pairs.labels[: len(scan.image_label)]
            found = trigger.victim_indices
            strict = found[scan.object_label[found] != trigger.target]
            append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                        "target": scan.classnames[trigger.target], "poisoned_labelled_target": len(truth),
                        "mirror": victim_quality(found, truth, scan.oracle_label, labels),
                        "mirror, object alone not the target": victim_quality(strict, truth, scan.oracle_label,
                                                                              labels)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
