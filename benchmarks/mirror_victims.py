"""How right are self mode's image-wide victims and their captions? (the mirror and object-alone tests)

Self mode's image-wide tests (clipfast/defense/scan/decide.py) take a target's images as victims by
one of two rules: the *mirror* rule, the images a horizontal flip relabels whose object shown alone
the model does not call the target, named by the mirrored image's label; and the *object-alone*
rule, every image of the target whose object alone the model does not call the target, named by
that object's label. The scan uses the rule of the test with the smaller p-value. Two things can go
wrong: a real target-class image is taken for a victim (precision), and the name is not the
victim's true class (the caption the repair trains on). This reads the saved scans of a finished
self-mode matrix run and reports, per found image-wide target, against the probe's poisoned images
the model labels the target: victims, precision, recall and the share of true victims captioned
with their true class, for both rules, the scan's own victims, and both tests' p-values. (Rows
before 9eeef2f name the rules "mirror" (no object filter) and "mirror, object alone not the target".)

    python benchmarks/mirror_victims.py --commit 9eeef2f

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
            target = scan.image_label == trigger.target
            alone = torch.nonzero(target & scan.readable & (scan.object_label != trigger.target)).flatten()
            mirror = alone[scan.mirror_label[alone] != trigger.target]
            names = {"mirror": scan.mirror_label, "object alone": scan.object_label}
            tests = {"mirror": scan.mirror_test, "object alone": scan.object_test}
            append_row({"commit": args.commit, "config": row["config"], "seed": int(row["seed"]),
                        "target": scan.classnames[trigger.target], "poisoned_labelled_target": len(truth),
                        "p_values": {rule: None if test is None else test.p_values[trigger.target]
                                     for rule, test in tests.items()},
                        "scan": victim_quality(trigger.victim_indices, truth, scan.oracle_label, labels),
                        **{rule: victim_quality(found, truth, names[rule], labels)
                           for rule, found in (("mirror", mirror), ("object alone", alone))}}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
