"""How many encoder FLOPs the packed region encoding saves over crop mode, and what decides it.

Crop mode runs the tower once per image plus once per region (1 + M whole sequences); the packed
encoding runs the whole image plus one short sequence per region, as long as the patches its mask
keeps (ops.region_patches). The saving therefore depends on how much of the image the regions
cover together, and on the token rule: with min_coverage 0 (the scan's default, any covered pixel
keeps a patch) a region's border patches are its tokens too, so neighbouring regions share them.

Counted, not timed (models.packed.tower_flops on the sequences each mode would run; the scan's
mode-independent causal and transplant encodes are left out, as in the pipeline benchmark), for
ViT-B-16 at 224 px, `--images` random images, per region count, oracle layout and min_coverage:
- discs: the pipeline benchmark's fixed oracle (discs of assorted sizes that overlap, as a
  segment-anything-style oracle's multi-granularity masks do);
- partition: a Voronoi partition of the image into M cells (FixedOracle's "cells": disjoint regions
  covering it once, the premise of "about one image's tokens per image");
- ideal: the bound no oracle beats, the whole image plus M sequences that hold every patch exactly
  once between them (one class token each): the share of crop mode's FLOPs the packed encoding
  cannot go below while every region keeps a patch (a coverage rule that leaves a small cell no
  patch drops its sequence too, and goes a hair below it).
Writes benchmarks/results/packed_flops.json.

    python benchmarks/packed_flops.py --images 64 --regions 16 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipfast.bench.pipeline import FixedOracle, _encoder_flops
from clipfast.defense.scan import ScanConfig
from clipfast.models import load_model
from clipfast.models.packed import check_vision_tower, tower_flops


def share_row(regions: int, layout: str, coverage: float | None, crop: float, packed: float) -> dict:
    """One result row (FLOPs per image of each mode), printed as it is made."""
    row = {"regions": regions, "layout": layout, "min_coverage": coverage,
           "crop_gflop_per_image": round(crop / 1e9, 1), "packed_gflop_per_image": round(packed / 1e9, 1),
           "packed_share_of_crop": round(packed / crop, 4),
           "packed_images_equivalent": round(packed / (crop / (1 + regions)), 2)}
    print(json.dumps(row), flush=True)
    return row


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--regions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--min-coverage", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "packed_flops.json")
    args = parser.parse_args(argv)
    bundle = load_model("ViT-B-16")
    images = torch.randint(0, 256, (args.images, 3, 224, 224), dtype=torch.uint8)
    visual = check_vision_tower(bundle.model)
    whole = 1 + visual.grid_size[0] * visual.grid_size[1]
    rows = []
    for regions in args.regions:
        for layout, oracle in (("discs", FixedOracle(regions)), ("partition", FixedOracle(regions, "cells"))):
            crop = _encoder_flops(bundle, images, oracle, ScanConfig(regions="crop")) / len(images)
            for coverage in args.min_coverage:
                config = ScanConfig(regions="packed", grounding_regions="packed", packed_min_coverage=coverage)
                packed = _encoder_flops(bundle, images, oracle, config) / len(images)
                rows.append(share_row(regions, layout, coverage, crop, packed))
        patches = torch.full((regions,), (whole - 1) // regions) + (torch.arange(regions) < (whole - 1) % regions)
        ideal = tower_flops(visual, torch.cat([torch.tensor([whole]), 1 + patches]))
        rows.append(share_row(regions, "ideal", None, (1 + regions) * tower_flops(visual, torch.tensor([whole])), ideal))
    summary = {"model": "ViT-B-16 224 px (random weights)", "images": args.images, "whole_image_tokens": whole,
               "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
