"""Why a packed-region scan's repair costs more clean accuracy than a crop scan's (issue 14).

packed_efficacy.py found it: on the 18 self-mode patch cases, packed scans lead to repairs that lose
0.67 CA points (median) against crop's 0.28 at the same code. Here, per self-mode patch case of a
finished efficacy matrix run: the crop scan that run saved, a packed scan of the same model and
probe set (run here once, cached beside the matrix's scans), and

- how well each scan's region labels serve the compact set, against the world's true labels:
  the victims' oracle labels (their captions), the share of probe images grounded (a region's label
  is the image's), the share of grounded images whose whole-image label is right (the replay pool's
  captions) and of ungrounded ones (what grounding turns away);
- repairs (curate + repair as defend does, CA / ASR on the test world) from the crop scan, the
  packed scan, and the packed scan with columns taken from the crop scan: `grounded` (which images
  the replay may draw), `oracle_label` (the victims' captions), or both.

Rows go to `--out` as JSON lines as they end.

    python benchmarks/packed_ca_causes.py --commit e353012 --configs "badnet 6px top-left" ...
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path

import torch

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.curate import CurateConfig
from clipfast.defense.pipeline import load_scan, save_scan
from clipfast.defense.repair import RepairConfig
from clipfast.defense.scan import ScanResult, scan
from clipfast.demo import DemoConfig, default_cache_dir
from clipfast.oracle import ClassicalSegmenter
from clipfast.provenance import git_commit
from clipfast.recipes import evaluation_world
from repair_variants import append_row, matrix_cases, repaired_on_test, saved_case

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("crop", "packed", "packed, crop's grounded", "packed, crop's oracle labels",
        "packed, crop's grounded and oracle labels")


def share(mask: torch.Tensor) -> float | None:
    """The share of True in a bool tensor (None when it is empty)."""
    return round(float(mask.float().mean()), 4) if mask.numel() else None


def label_quality(scanned: ScanResult, truth: torch.Tensor) -> dict:
    """How right the labels the compact set takes from a scan are (shares of the probe set's images)."""
    victims = torch.cat([scanned.victims(t) for t in scanned.targets]).unique()
    right = scanned.image_label == truth
    grounded = scanned.grounded & scanned.readable
    return {"victims": len(victims), "victim_oracle_right": share(scanned.oracle_label[victims] == truth[victims]),
            "grounded": share(grounded), "grounded_right": share(right[grounded]),
            "ungrounded_right": share(right[scanned.readable & ~grounded])}


def with_columns(base: ScanResult, donor: ScanResult, names: tuple[str, ...]) -> ScanResult:
    """base with the columns `names` taken from donor (a scan of the same probe set)."""
    mixed = copy.copy(base)
    for name in names:
        setattr(mixed, name, getattr(donor, name))
    return mixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the matrix run whose models and crop scans to reuse")
    parser.add_argument("--configs", nargs="+", default=None, help="matrix configuration names (default: all)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="the scans to repair from (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "packed_ca_causes.jsonl")
    args = parser.parse_args(argv)
    commit = git_commit()
    cache, settings = default_cache_dir(), DemoConfig()
    test = evaluation_world(settings.test_size)
    segmenter = ClassicalSegmenter()  # the matrix's oracle (clipfast demo's)
    # the pure packed scan: packed sequences name the regions too (ScanConfig.grounding_regions)
    packed_config = replace(settings.defense.scan, regions="packed", grounding_regions="packed", progress=False)
    for row in matrix_cases(args.commit, args.configs, ["self"]):
        case = saved_case(row, args.commit, cache, settings)
        if case is None or row["family"] != "patch":
            continue
        recipe, bundle, pairs, crop = case
        probe, truth = pairs.images[: settings.probe_size], pairs.labels[: settings.probe_size]
        packed_path = cache / "efficacy" / "packed" / row["case_key"] / "scan.pt"
        if packed_path.exists():
            packed = load_scan(packed_path)
        else:
            packed = scan(copy.deepcopy(bundle), list(CLASSES), probe, segmenter, prompts=zero_shot_prompts,
                          config=packed_config)
            packed_path.parent.mkdir(parents=True, exist_ok=True)
            save_scan(packed, packed_path)
        scans = {"crop": crop, "packed": packed,
                 "packed, crop's grounded": with_columns(packed, crop, ("grounded",)),
                 "packed, crop's oracle labels": with_columns(packed, crop, ("oracle_label",)),
                 "packed, crop's grounded and oracle labels": with_columns(packed, crop, ("grounded", "oracle_label"))}
        scans = {name: scanned for name, scanned in scans.items() if name in args.arms}
        quality = {"crop": label_quality(crop, truth), "packed": label_quality(packed, truth)}
        for name, scanned in scans.items():
            out = {"config": row["config"], "seed": int(row["seed"]), "oracle_mode": "self", "scan": name,
                   "ca_poisoned": float(row["ca_poisoned"]), "asr_clean_model": float(row["asr_clean_model"]),
                   **quality.get(name, {}),
                   **repaired_on_test(bundle, scanned, probe, recipe, test, segmenter, CurateConfig(),
                                      RepairConfig(progress=False)),
                   "crop_scan_commit": args.commit, "commit": commit}
            append_row(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
