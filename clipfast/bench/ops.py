"""`clipfast bench --suite ops`: every backend of mask_crop, mask_pool, region_score and region_topk against the
reference (and torch.compile / sort baselines), ratios measured in one run, plus achieved GB/s or
TFLOP/s against the machine's measured copy bandwidth and bf16 matrix rate.

    clipfast bench --suite ops --quick --ops region_topk --results /tmp/bench

Prints a table and appends CSV rows (device, versions, commit), each row as soon as it is measured.
Never asserts speed: the numbers are for reading.
"""

from __future__ import annotations

import argparse

import torch

from clipfast.ops import backends, mask_crop, mask_pool, pack_mask_bits, reference, region_score, region_topk
from clipfast.perf import copy_bandwidth, device_name, matrix_rate, timed_ms

from .common import open_rows

FIELDS = ["timestamp", "device", "torch", "triton", "commit", "mode", "op", "variant", "sizes", "dtype", "ms",
          "speedup_vs_reference", "achieved", "unit", "roofline", "fraction_of_roofline"]

# Sizes: `full` is realistic for a GPU (a ViT-B/16 scan batch), `quick` fits a small CPU in minutes.
SIZES = {
    "full": dict(crop=dict(B=256, M=32, H=224, W=224, S=224), pool=dict(B=256, M=32, H=224, W=224, grid=14, D=768,
                                                                            heads=12),
                 score=dict(B=4096, M=32, C=1000, D=768), topk=dict(N=1_000_000, L=1000, k=64)),
    "quick": dict(crop=dict(B=8, M=16, H=224, W=224, S=224), pool=dict(B=16, M=32, H=224, W=224, grid=14, D=768,
                                                                           heads=12),
                  score=dict(B=128, M=32, C=1000, D=768), topk=dict(N=1_000_000, L=1000, k=64)),
}


def blob_masks(batch, num_masks, height, width, device, seed=0):
    """Realistic segmenter output: discs of assorted sizes (a few empty), not pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    cy = torch.randint(0, height, (batch, num_masks, 1, 1), generator=gen)
    cx = torch.randint(0, width, (batch, num_masks, 1, 1), generator=gen)
    radius = torch.randint(4, max(5, min(height, width) // 3), (batch, num_masks, 1, 1), generator=gen)
    masks = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    masks[:, -1] = False  # padding
    return masks.to(device)


def cell_masks(batch, num_masks, height, width, device, seed=0):
    """A partition of each image into num_masks disjoint cells (the pixels nearest each of num_masks
    random points: a Voronoi tessellation), as a segmenter that assigns every pixel to one region
    returns them (superpixels, SAM's automatic masks after overlap removal). Together with
    blob_masks' overlapping discs it brackets what region encoders see: disjoint regions are the
    packed encoding's best case (about one image's tokens for all of an image's regions)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    cy = torch.randint(0, height, (batch, num_masks, 1, 1), generator=gen)
    cx = torch.randint(0, width, (batch, num_masks, 1, 1), generator=gen)
    nearest = ((yy - cy) ** 2 + (xx - cx) ** 2).argmin(1)  # [B, H, W]; ties to the lower index
    masks = nearest[:, None] == torch.arange(num_masks)[None, :, None, None]
    return masks.to(device)


def usable_backends(op: str, device: str) -> list[str]:
    names = []
    for name in backends.BACKENDS:
        try:
            backends.resolve(op, name, torch.device(device))
            names.append(name)
        except backends.BackendUnavailable:
            pass
    return names


def measure(rows, op: str, variant: str, fn, min_run_time: float, **work) -> None:
    """Time fn and append its row (work: the bytes or flops it moves or does). A variant that fails
    (a kernel that does not compile or launch on this machine) is a row saying so, and the suite goes on."""
    try:
        ms = timed_ms(fn, min_run_time)
    except Exception as error:  # noqa: BLE001 - any failure of one variant is reported; the others still run
        rows.append(dict(op=op, variant=variant, error=f"{type(error).__name__}: {error}".splitlines()[0][:200],
                         **work))
        return
    rows.append(dict(op=op, variant=variant, ms=ms, **work))


def bench_mask_crop(size, device, rows, min_run_time):
    images = torch.randint(0, 256, (size["B"], 3, size["H"], size["W"]), dtype=torch.uint8, device=device)
    masks = blob_masks(size["B"], size["M"], size["H"], size["W"], device)
    out_elems = size["B"] * size["M"] * 3 * size["S"] ** 2
    # Bytes a perfect kernel moves: every mask once, the image pixels once, the bf16 crops once.
    moved = masks.numel() + images.numel() + 2 * out_elems
    for name in usable_backends("mask_crop", device):
        fn = lambda name=name: mask_crop(images, masks, size["S"], margin=0.1, square=True, out_dtype=torch.bfloat16,
                                         backend=name)
        measure(rows, "mask_crop", name, fn, min_run_time if name != "reference" else 0.1, bytes=moved)


def bench_mask_pool(size, device, rows, min_run_time):
    grid = size["grid"]
    features = torch.randn(size["B"], grid * grid, size["D"], device=device, dtype=torch.bfloat16)
    logits = torch.randn(size["B"], size["heads"], grid * grid, device=device)
    masks = blob_masks(size["B"], size["M"], size["H"], size["W"], device)
    packed, width = pack_mask_bits(masks)
    out_bytes = size["B"] * size["M"] * size["D"] * 2
    for name in usable_backends("mask_pool", device):
        for variant, m, w in (("", masks, None), ("+packed", packed, width)):
            fn = lambda name=name, m=m, w=w: mask_pool(features, m, (grid, grid), logits=logits, packed_width=w,
                                                       backend=name)
            moved = m.numel() + features.numel() * 2 + logits.numel() * 4 + out_bytes
            measure(rows, "mask_pool", name + variant, fn, min_run_time, bytes=moved)


def bench_region_score(size, device, rows, min_run_time, compile_baseline):
    gen = torch.Generator().manual_seed(0)
    B, M, C, D = size["B"], size["M"], size["C"], size["D"]
    images = torch.randn(B, D, generator=gen).to(device, torch.bfloat16)
    regions = torch.randn(B, M, D, generator=gen).to(device, torch.bfloat16)
    valid = (torch.rand(B, M, generator=gen) > 0.2).to(device)
    text = torch.randn(C, D, generator=gen).to(device, torch.bfloat16)
    flops = 2 * B * (M + 1) * C * D
    for name in usable_backends("region_score", device):
        fn = lambda name=name: region_score(images, regions, valid, text, 100.0, backend=name)
        measure(rows, "region_score", name, fn, min_run_time, flops=flops)
    if compile_baseline:
        compiled = torch.compile(reference.region_score)
        fn = lambda: compiled(images, regions, valid, text, 100.0)
        measure(rows, "region_score", "torch.compile(reference)", fn, min_run_time, flops=flops)


def sort_topk(scores, labels, num_labels, k):
    """The straightforward selection: two stable sorts (score, then label), per-label segments."""
    keep = (labels >= 0) & (labels < num_labels)
    index = torch.nonzero(keep).flatten()
    order = index[torch.sort(-scores[index], stable=True).indices]
    order = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels[order], minlength=num_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=scores.device) - starts[labels[order]]
    top = torch.full((num_labels, k), -1, dtype=torch.int64, device=scores.device)
    take = rank < k
    top[labels[order][take], rank[take]] = order[take]
    return counts, top


def bench_region_topk(size, device, rows, min_run_time):
    gen = torch.Generator().manual_seed(0)
    N, L, k = size["N"], size["L"], size["k"]
    scores = torch.rand(N, generator=gen).to(device)
    labels = torch.randint(0, L, (N,), generator=gen).to(device)
    want = region_topk(scores, labels, L, k, backend="cpu" if device == "cpu" else "reference")
    assert torch.equal(sort_topk(scores, labels, L, k)[1], want.indices), "sort baseline disagrees with the op"
    moved = N * (4 + 8)
    for name in usable_backends("region_topk", device):
        fn = lambda name=name: region_topk(scores, labels, L, k, backend=name)
        measure(rows, "region_topk", name, fn, min_run_time if name != "reference" else 0.1, bytes=moved)
    measure(rows, "region_topk", "torch.sort baseline", lambda: sort_topk(scores, labels, L, k), min_run_time,
            bytes=moved)


SIZE_KEYS = {"mask_crop": "crop", "mask_pool": "pool", "region_score": "score", "region_topk": "topk"}


def run(args: argparse.Namespace, device: str, mode: str) -> list[dict]:
    """Time args.ops at the mode's sizes; print the table and return its CSV rows."""
    size = SIZES[mode]
    compile_baseline = args.compile_baseline if args.compile_baseline is not None else device == "cuda"
    torch.manual_seed(0)
    print(f"device: {device_name(device)}; measuring copy bandwidth and bf16 matrix rate ...", flush=True)
    bandwidth, tflops = copy_bandwidth(device), matrix_rate(device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {tflops:.1f} TFLOP/s", flush=True)

    table = open_rows(getattr(args, "results", None), "ops", FIELDS, device, mode)
    reference_ms: dict[str, float] = {}

    class Measured:
        """What the bench_* functions append to: each measurement becomes a table row (and a CSV row) at once."""

        @staticmethod
        def append(row: dict) -> None:
            sizes = " ".join(f"{k}={v}" for k, v in size[SIZE_KEYS[row["op"]]].items())
            if "error" in row:  # a failed variant: its message in the unit column
                table.append(dict(op=row["op"], variant=row["variant"], sizes=sizes, dtype="bf16", ms="nan",
                                  speedup_vs_reference="", achieved="nan", unit=f"FAILED: {row['error']}",
                                  roofline="", fraction_of_roofline="nan"))
                print(f"  {row['op']} {row['variant']}: FAILED: {row['error']}", flush=True)
                return
            if row["variant"] == "reference":
                reference_ms[row["op"]] = row["ms"]
            if "flops" in row:
                achieved, unit, roof = row["flops"] / (row["ms"] * 1e-3) / 1e12, "TFLOP/s", tflops
            else:
                achieved, unit, roof = row["bytes"] / (row["ms"] * 1e-3) / 1e9, "GB/s", bandwidth
            ref = reference_ms.get(row["op"])
            table.append(dict(
                op=row["op"], variant=row["variant"], sizes=sizes, dtype="bf16",
                ms=f"{row['ms']:.3f}", speedup_vs_reference=f"{ref / row['ms']:.2f}" if ref else "",
                achieved=f"{achieved:.2f}", unit=unit, roofline=f"{roof:.1f}",
                fraction_of_roofline=f"{achieved / roof:.3f}"))
            printed = table[-1]
            print(f"  {printed['op']} {printed['variant']}: {float(printed['ms']):.3f} ms", flush=True)

    rows = Measured()
    runners = {"mask_crop": lambda: bench_mask_crop(size["crop"], device, rows, args.min_run_time),
               "mask_pool": lambda: bench_mask_pool(size["pool"], device, rows, args.min_run_time),
               "region_score": lambda: bench_region_score(size["score"], device, rows, args.min_run_time,
                                                          compile_baseline),
               "region_topk": lambda: bench_region_topk(size["topk"], device, rows, args.min_run_time)}
    for op in args.ops:
        print(f"{op} ...", flush=True)
        try:
            runners[op]()
        except Exception as error:  # noqa: BLE001 - inputs or a baseline failed: a row, then the next op
            rows.append(dict(op=op, variant="(inputs)", error=f"{type(error).__name__}: {error}".splitlines()[0][:200]))

    print(f"\n{'op':13s} {'variant':26s} {'ms':>10s} {'x ref':>7s} {'achieved':>16s} {'of roofline':>11s}")
    for row in table:
        print(f"{row['op']:13s} {row['variant']:26s} {float(row['ms']):10.3f} {row['speedup_vs_reference'] or '-':>7s} "
              f"{float(row['achieved']):9.2f} {row['unit'][:7]:7s}{float(row['fraction_of_roofline']):11.1%}")
    return table
