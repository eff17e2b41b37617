"""Which attention the packed region encoding (clipfast/models/packed.py) should use: every method of
varlen_attention, plus a per-sequence loop, on the sequences a real batch packs.

Sequences: `--images` whole 224 px images (197 tokens each) and their regions from the pipeline
benchmark's fixed oracle (each of `--regions` discs per image, ops.region_patches' default rule), in
the encoder's row order (models.packed.packed_layout: images, then regions sorted by length),
ViT-B-16's 12 heads of 64, fp32, random q/k/v. Reports each method's time per call (the median of
`--repeats` interleaved rounds) and its largest difference from the loop, then whole packed
ViT-B-16 forwards (random weights) with the two fastest methods. Writes
benchmarks/results/varlen_attention.json.

    python benchmarks/varlen_attention.py --images 4 --regions 16 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfast.bench.pipeline import FixedOracle
from clipfast.models import load_model
from clipfast.models.packed import (
    AttentionPlan,
    Sequences,
    check_vision_tower,
    encode_packed,
    packed_layout,
    varlen_attention,
)
from clipfast.ops import region_patches
from clipfast.perf import device_name

METHODS = ("runs", "bucketed", "padded", "nested")


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function over `repeats` rounds, one call of each per round (after a
    warm-up round): on a shared machine every method sees the same background load."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _loop(qkv, heads: int, sequences: Sequences) -> torch.Tensor:
    """One dense SDPA call per sequence: the obvious exact method, and the oracle here."""
    width = qkv.shape[1] // 3
    out = qkv.new_empty(len(qkv), width)
    bounds = sequences.offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[lo:hi].view(hi - lo, 3, heads, -1).permute(1, 2, 0, 3)
        out[lo:hi] = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(hi - lo, width)
    return out


def _measure(bundle, visual, images, num_regions: int, args) -> dict:
    masks = FixedOracle(num_regions).segment(images).masks
    regions = region_patches(images, masks, visual.grid_size, background=0.35, mean=bundle.mean, std=bundle.std)
    _, sequences = packed_layout(regions.offsets.diff(), len(images), 196)
    lengths = sequences.lengths
    tokens = int(lengths.sum())
    qkv = torch.randn(tokens, 3 * 768)
    want = _loop(qkv, 12, sequences)
    plans = {method: AttentionPlan(sequences, method, qkv.device) for method in METHODS}
    result = {"images": len(images), "regions_per_image": num_regions, "sequences": len(lengths), "tokens": tokens,
              "longest": int(lengths.max()), "buckets": [[b.length, b.count] for b in plans["bucketed"].buckets],
              "max_abs_difference_from_loop": {m: float((varlen_attention(qkv, 12, plan) - want).abs().max())
                                               for m, plan in plans.items()}}
    # The CPU jagged fallback is ~10x slower than the rest: timed once, outside the rounds.
    nested = _interleaved({"nested": lambda: varlen_attention(qkv, 12, plans["nested"])}, 1)
    fns = {"loop": lambda: _loop(qkv, 12, sequences)}
    fns |= {m: (lambda plan=plan: varlen_attention(qkv, 12, plan)) for m, plan in plans.items() if m != "nested"}
    result["attention_ms"] = {m: 1e3 * t for m, t in (_interleaved(fns, args.repeats) | nested).items()}
    if args.forward:
        pixels = bundle.preprocess(images)
        forward = {m: (lambda m=m: encode_packed(visual, pixels, regions, num_regions, attention=m))
                   for m in ("runs", "bucketed", "padded")}
        result["forward_s"] = _interleaved(forward, max(1, args.repeats // 2))
    print(json.dumps(result), flush=True)
    return result


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--regions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one whole packed ViT-B-16 forward per method")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "varlen_attention.json",
                        help="the JSON written")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    bundle = load_model("ViT-B-16")
    visual = check_vision_tower(bundle.model)
    images = torch.randint(0, 256, (args.images, 3, 224, 224), dtype=torch.uint8)
    runs = [_measure(bundle, visual, images, regions, args) for regions in args.regions]
    result = {"device": device_name("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "runs": runs}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
