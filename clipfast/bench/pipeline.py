"""`clipfast bench --suite pipeline`: the reference pipeline against the fast one, same model, data and
machine, in one run.

Stages (--stages):
- scan: probe images/s and regions/s of ScanConfig(engine="reference") vs engine="fast" (crop
  regions, packed regions, and packed regions named from crops), the region encoder's FLOPs per image and utilisation, and how far the decisions
  agree with the reference (same targets, victim-set Jaccard).
- repair: steady-state samples/s and model FLOPs utilisation of the fp32 reference loop vs the fast
  loop (autocast, fused AdamW, torch.compile on a GPU), on CleanCLIP's objective with a frozen text tower.
- defend: end-to-end scan -> curate -> repair wall time, reference vs fast, with CA/ASR after; and
  the CleanCLIP-style baseline's wall time to reach the fast defence's ASR on the same poisoned model.
- capacity: scan and one repair epoch of big models (random weights) on one GPU, peak memory; only
  when asked for (--stages capacity), each model's outcome a row (out of memory or any other failure too).

quick (a small CPU): the demo world's poisoned tiny model (trained into the cache on first use,
~3 min). full (GPU): ViT-B-16 / ViT-L-14 with random weights on 224 px images and a fixed oracle
giving 16 or 32 regions per image; defend still runs on the demo world (the only poisoned model).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from clipfast import distributed
import torch.nn.functional as F

from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.demo import BASELINE_SEED_OFFSET, DemoConfig, default_cache_dir
from clipfast.defense.baseline import BaselineConfig, cleanclip_baseline
from clipfast.defense.pipeline import DefenseConfig, defend
from clipfast.defense.repair import RepairConfig
from clipfast.defense.scan import ScanConfig, scan, scanner
from clipfast.eval import evaluate
from clipfast.models import ClipBundle, freeze_text_tower, load_model
from clipfast.models.packed import check_vision_tower, tower_flops
from clipfast.ops import region_patches
from clipfast.oracle import ClassicalSegmenter
from clipfast.oracle.base import Segmentation, Segmenter
from clipfast.perf import matrix_rate, synchronize
from clipfast.recipes import cached_world_model, evaluation_world
from clipfast.train import TrainConfig, train
from clipfast.train.cleanclip import CleanCLIPObjective

from .common import open_rows
from .ops import blob_masks, cell_masks

FIELDS = ["timestamp", "device", "torch", "triton", "commit", "mode", "stage", "model", "variant", "sizes", "seconds",
          "throughput", "unit", "speedup_vs_reference", "mfu", "agreement"]
STAGES = ("scan", "repair", "defend", "capacity")
SCAN_VARIANTS = ("reference", "fast crop", "fast crop fp32", "fast crop prefetch=0", "fast crop prefetch=2",
                 "fast packed", "fast packed coverage=0.5", "fast hybrid")
# What a run measures unless told: the token-rule variant is an analysis of packed's FLOPs (issue 14),
# asked for by name, so the GPU check's timed stages keep their size.
DEFAULT_SCAN_VARIANTS = tuple(v for v in SCAN_VARIANTS if v != "fast packed coverage=0.5")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                        help="pipeline suite: stages (default: scan repair defend; capacity too with --full)")
    parser.add_argument("--probe", type=int, default=None, help="pipeline suite: probe images per scan")
    parser.add_argument("--models", nargs="+", default=None,
                        help="pipeline suite, full mode: open_clip architectures (default: ViT-B-16 ViT-L-14)")
    parser.add_argument("--regions", nargs="+", type=int, default=[16, 32],
                        help="pipeline suite, full mode: oracle regions per image")
    parser.add_argument("--region-shapes", nargs="+", choices=FixedOracle.SHAPES, default=["discs"],
                        help="pipeline suite, full mode: the fixed oracle's regions: overlapping discs and/or "
                             "cells partitioning the image")
    parser.add_argument("--scan-variants", nargs="+", choices=SCAN_VARIANTS, default=list(DEFAULT_SCAN_VARIANTS),
                        help="pipeline suite: scan variants (the reference is always run; default: all but "
                             "'fast packed coverage=0.5')")
    parser.add_argument("--repair-steps", type=int, default=30, help="pipeline suite: steps per repair measurement")
    parser.add_argument("--capacity-models", nargs="+", default=["ViT-L-14", "ViT-H-14", "ViT-bigG-14"])


class FixedOracle(Segmenter):
    """`regions` masks per image, generated once and handed out for every batch: an oracle of known
    cost (about zero), so the scan benchmark measures clipfast's work, not a segmenter's. (Generating
    them per batch cost ~10 s per 256 images at 32 regions on one CPU thread: the fast scans would
    have timed the mask generator.) shape: "discs", overlapping discs of assorted sizes (blob_masks:
    their areas add up to ~2-4 images, so packed sequences hold that many images' tokens), or
    "cells", a partition of the image (cell_masks: disjoint, one image's area in all)."""

    SHAPES = ("discs", "cells")
    BLOCK = 64  # images per generated block, block k from seed k: an image's masks go by its position in
    # the batch alone, whatever batch sizes were asked for before (the bank was once drawn from seed n
    # at the first call larger than it: a scan that segmented more images at once, as the causal tests
    # may, changed the masks every later scan with the same oracle saw)

    def __init__(self, regions: int, shape: str = "discs"):
        if shape not in self.SHAPES:
            raise ValueError(f"FixedOracle shape must be one of {self.SHAPES}, got {shape!r}")
        self.regions, self.shape = regions, shape
        self._bank: Segmentation | None = None

    def _block(self, seed: int, height: int, width: int) -> torch.Tensor:
        if self.shape == "cells":
            masks = cell_masks(self.BLOCK, self.regions, height, width, "cpu", seed=seed)
        else:
            masks = blob_masks(self.BLOCK, self.regions + 1, height, width, "cpu", seed=seed)[:, :-1]
        masks[..., 0, 0] |= ~masks.flatten(2).any(-1)  # never empty
        return masks

    def segment(self, images: torch.Tensor) -> Segmentation:
        n, _, height, width = images.shape
        bank = self._bank
        if bank is not None and tuple(bank.masks.shape[-2:]) != (height, width):
            bank = None
        have = 0 if bank is None else len(bank)
        if have < n:
            blocks = [self._block(k, height, width) for k in range(have // self.BLOCK, -(-n // self.BLOCK))]
            masks = torch.cat(([bank.masks] if bank is not None else []) + blocks)
            bank = Segmentation(masks, torch.full((len(masks),), self.regions), torch.ones(len(masks), self.regions))
        self._bank = bank
        return Segmentation(bank.masks[:n], bank.counts[:n], bank.scores[:n])


def _world_images(n: int, size: int) -> torch.Tensor:
    images = generate_world(n, seed=11).images
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="nearest")


def _demo_model(device: str) -> tuple[ClipBundle, object]:
    """The demo's poisoned model from the cache; under torchrun rank 0 trains it if missing, alone."""
    ranks = distributed.current()
    if not ranks.is_main:
        ranks.barrier()
    bundle, pairs, _ = cached_world_model(DemoConfig().recipe, default_cache_dir() / "models", device=device)
    if ranks.is_main:
        ranks.barrier()
    return bundle, pairs


def _random_model(name: str, device: str) -> ClipBundle:
    """An open_clip architecture with random weights, the same ones every run (seed 0): what the
    regions of a random model say decides how many images take the causal test's removal encodes,
    and unseeded runs depend on what consumed the global RNG before (the two unseeded ViT-B-16 runs
    of pipeline.csv, 7d8551a and 1c46e2b, need not have measured the same model)."""
    torch.manual_seed(0)
    return load_model(name, device=device)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _row(stage, model, variant, sizes, seconds, throughput, unit, reference_seconds=None, mfu=None, agreement=""):
    return dict(stage=stage, model=model, variant=variant, sizes=sizes, seconds=f"{seconds:.3f}",
                throughput=f"{throughput:.4g}", unit=unit,
                speedup_vs_reference=f"{reference_seconds / seconds:.2f}" if reference_seconds else "",
                mfu="" if mfu is None else f"{mfu:.3f}", agreement=agreement)


class CountingGrounder:
    """A scan's separate grounding model (scorers.make_grounder), counting what it encodes: whole
    images, the regions submitted whole batches at a time, and those named one by one (the fast
    engine's lazy naming, scanner.name_until_grounded, and the passing donors' other regions)."""

    def __init__(self, scorer):
        self.scorer, self.images, self.submitted, self.named = scorer, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    @property
    def crops(self) -> int:
        return self.submitted + self.named

    def submit(self, images, masks, object_regions):
        self.images += len(images)
        self.submitted += int((object_regions & masks.flatten(2).any(-1)).sum())
        return self.scorer.submit(images, masks, object_regions)

    def class_probs(self, images):
        self.images += len(images)
        return self.scorer.class_probs(images)

    def region_probs(self, images, masks):
        self.named += len(masks)
        return self.scorer.region_probs(images, masks)


@contextmanager
def counting_grounders() -> Iterator[list[CountingGrounder]]:
    """Every scan inside counts its separate grounding model's encodes (one CountingGrounder per scan,
    appended in order; none for a scan whose suspect grounds its own regions)."""
    counters, make = [], scanner.make_grounder

    def counting(bundle, grounding_bundle, classnames, prompts, config, suspect=None, classifier=None):
        grounder = make(bundle, grounding_bundle, classnames, prompts, config, suspect, classifier)
        if grounder is suspect:
            return grounder
        counters.append(CountingGrounder(grounder))
        return counters[-1]

    scanner.make_grounder = counting
    try:
        yield counters
    finally:
        scanner.make_grounder = make


def _encoder_flops(bundle: ClipBundle, images: torch.Tensor, oracle: Segmenter, config: ScanConfig,
                   grounder: CountingGrounder | None) -> int:
    """FLOPs of the encoder passes that embed the scan's images and scored regions in self mode (models.
    packed.tower_flops on the sequences each mode runs: a whole image per crop, or the packed sequences;
    with packed regions named from crops, the packed pass and the crops and images the grounding model
    counted, `grounder`). The causal and transplant tests' whole-image encodes are not counted: they are
    not region encodes, and how many there are depends on what the regions said: bench_scan's `removal
    encodes/image` rows (ViT-B-16 with seed 0's weights at 6295c15, 12 images x 16 discs: 10.7 per image
    crop, 1.3 packed)."""
    visual = check_vision_tower(bundle.model)
    config = config.for_oracle(trusted=False, packable=True)  # the regions the scan ran ("auto" resolved)
    whole = 1 + visual.grid_size[0] * visual.grid_size[1]
    segmentation = oracle.segment(images)
    scored = segmentation.valid & segmentation.masks.flatten(2).any(-1)
    lengths = [torch.full((len(images),), whole)]
    if config.regions == "crop":
        lengths.append(torch.full((int(scored.sum()),), whole))
    if grounder is not None:
        lengths.append(torch.full((grounder.crops + grounder.images,), whole))
    if config.regions == "packed":
        masks = bundle.resize_masks(segmentation.masks.to(bundle.device)) & scored.to(bundle.device)[..., None, None]
        kept = region_patches(bundle.resize(images), masks, visual.grid_size, min_coverage=config.packed_min_coverage,
                              background=config.crop_background).offsets.diff().cpu()
        lengths.append(1 + kept[kept > 0])
    return tower_flops(visual, torch.cat(lengths))


def bench_scan(bundle: ClipBundle, name: str, images: torch.Tensor, oracle: Segmenter, sizes: str, device: str,
               rows: list[dict], variants=DEFAULT_SCAN_VARIANTS) -> None:
    kwargs = dict(prompts=zero_shot_prompts)
    scan(bundle, list(CLASSES), images[:8], oracle, config=ScanConfig(progress=False), **kwargs)  # warm-up
    results, seconds, grounders = {}, {}, {}
    # The fast path's own choices, each set by hand once: fp32 instead of auto precision, the oracle
    # prefetch thread off and on (auto picks it on GPUs only).
    crop = ScanConfig(progress=False, regions="crop")
    configs = {"reference": ScanConfig(progress=False, engine="reference"), "fast crop": crop,
               "fast crop fp32": replace(crop, precision="fp32"),
               "fast crop prefetch=0": replace(crop, prefetch=0),
               "fast crop prefetch=2": replace(crop, prefetch=2),
               "fast packed": ScanConfig(progress=False, regions="packed", grounding_regions="packed"),
               # the token rule's cost: a patch is a region's token only from half its pixels on (the
               # default, any pixel, repeats a patch on a boundary in every region it touches)
               "fast packed coverage=0.5": ScanConfig(progress=False, regions="packed", grounding_regions="packed",
                                                      packed_min_coverage=0.5),
               # packed trigger evidence, regions named from crops (self mode's default, as here: the
               # suspect encodes its regions packed, and crops those the scan's grounding reads)
               "fast hybrid": ScanConfig(progress=False, regions="packed")}
    for variant in ["reference"] + [v for v in variants if v != "reference"]:
        config = configs[variant]
        synchronize(device)
        with counting_grounders() as counters:
            results[variant], seconds[variant] = _timed(lambda: scan(bundle, list(CLASSES), images, oracle,
                                                                     config=config, **kwargs))
        grounders[variant] = counters[0] if counters else None
    peak = matrix_rate(device) * 1e12
    reference = results["reference"]
    for variant, result in results.items():
        regions = int(result.region_counts.sum())
        agreement = "" if variant == "reference" else _agreement(reference, result)
        if variant.startswith(("fast packed", "fast hybrid")) and "fast crop" in results:  # the mode it would replace
            agreement += "; vs fast crop: " + _agreement(results["fast crop"], result)
        flops = _encoder_flops(bundle, images, oracle, configs[variant], grounders[variant])
        rows.append(_row("scan", name, variant, sizes, seconds[variant], len(images) / seconds[variant], "images/s",
                         seconds["reference"] if variant != "reference" else None,
                         flops / seconds[variant] / peak, agreement))
        rows.append(_row("scan", name, variant, sizes, seconds[variant], regions / seconds[variant], "regions/s",
                         seconds["reference"] if variant != "reference" else None))
        rows.append(_row("scan", name, variant, sizes, seconds[variant], flops / len(images) / 1e9,
                         "encoder GFLOP/image"))
        # The region stage alone (the scan less its causal/transplant evidence, whose whole-image
        # encodes no region mode changes): what the region mode decides.
        stage = result.seconds["regions"]
        rows.append(_row("scan", name, variant, sizes, stage, len(images) / stage, "images/s region stage",
                         reference.seconds["regions"] if variant != "reference" else None))
        # What the rest of the scan's time went on: the causal test's whole-image encodes (one per
        # region of each image that no scored region explains), which depend on the region mode.
        removals = int(result.region_counts[result.explaining_drop >= 0].sum())
        rows.append(_row("scan", name, variant, sizes, seconds[variant] - stage, removals / len(images),
                         "removal encodes/image"))


def _agreement(reference, result) -> str:
    same_labels = float((reference.image_label == result.image_label).float().mean())
    text = f"image labels {same_labels:.3f}; targets {'same' if reference.targets == result.targets else 'DIFFER'}"
    for target in reference.targets:
        a, b = set(reference.victims(target).tolist()), set(result.victims(target).tolist())
        text += f"; victims Jaccard {len(a & b) / max(1, len(a | b)):.3f}"
    return text


def bench_repair(bundle: ClipBundle, name: str, images: torch.Tensor, captions: list[str], batch_size: int,
                 steps: int, device: str, rows: list[dict]) -> None:
    """Steady-state samples/s (the last log interval: compilation and warm-up excluded)."""
    fast_extra = dict(compile=True) if device == "cuda" else {}
    measured = {}
    for variant, speed in (("reference", dict(precision="fp32", fused_optimizer=False)), ("fast", fast_extra)):
        model = copy.deepcopy(bundle)
        freeze_text_tower(model.model)
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-5, warmup_steps=1, eval_every=0,
                             checkpoint_every=10**9, save_checkpoints=False, log_every=max(1, steps // 3),
                             progress=False, **speed)
        objective = CleanCLIPObjective(captions, model.tokenizer, 0.0, text_view=False)
        with tempfile.TemporaryDirectory() as out_dir:
            result = train(model, images, captions, config, out_dir, objective=objective)
            if not distributed.current().is_main:  # rank 0 writes the log (global samples/s)
                continue
            last = [line for line in result.log_path.read_text().splitlines() if '"train"' in line][-1]
        record = json.loads(last)
        measured[variant] = record
        reference_rate = measured["reference"]["samples_per_s"]
        rows.append(_row("repair step", name, variant, f"batch={batch_size} steps={steps}",
                         batch_size / record["samples_per_s"], record["samples_per_s"], "samples/s",
                         batch_size / reference_rate if variant != "reference" else None, record.get("mfu")))
        del model


def bench_defend(device: str, probe_size: int, rows: list[dict]) -> None:
    demo = DemoConfig()
    bundle, pairs = _demo_model(device)
    recipe, test = demo.recipe, evaluation_world(demo.test_size)
    probe = pairs.images[:probe_size]
    trigger, target = recipe.make_trigger(), recipe.target_label
    outcomes, seconds = {}, {}
    for variant, defense in (("reference", DefenseConfig(scan=ScanConfig(progress=False, engine="reference"),
                                                         repair=RepairConfig(progress=False, engine="reference"))),
                             ("fast", DefenseConfig(scan=ScanConfig(progress=False), repair=RepairConfig(progress=False)))):
        model = copy.deepcopy(bundle)
        with tempfile.TemporaryDirectory() as out_dir:
            _, seconds[variant] = _timed(lambda: defend(model, list(CLASSES), probe, ClassicalSegmenter(), out_dir,
                                                        prompts=zero_shot_prompts, config=defense))
        outcomes[variant] = evaluate(model, test, trigger, target)
    for variant, metrics in outcomes.items():
        rows.append(_row("defend", "demo world", variant, f"probe={probe_size}", seconds[variant],
                         probe_size / seconds[variant], "images/s",
                         seconds["reference"] if variant != "reference" else None,
                         agreement=f"CA {metrics['ca']:.3f} ASR {metrics['asr']:.3f}"))

    goal = outcomes["fast"]["asr"]
    model = copy.deepcopy(bundle)
    clean = generate_world(demo.baseline_size, seed=recipe.seed + BASELINE_SEED_OFFSET)
    config = BaselineConfig(steps=500, eval_every=10, progress=False)  # measured: 1500 steps leave ASR at 0.97
    with tempfile.TemporaryDirectory() as out_dir:
        result, baseline_seconds = _timed(lambda: cleanclip_baseline(
            model, clean.images, clean.captions, out_dir, config,
            eval_fn=lambda b: evaluate(b, test, trigger, target), stop_when=lambda m: m["asr"] <= goal))
    reached = result.last_eval is not None and result.last_eval["asr"] <= goal
    rows.append(_row("defend", "demo world", "CleanCLIP baseline", f"clean set={demo.baseline_size}",
                     baseline_seconds, probe_size / baseline_seconds, "images/s",
                     agreement=(f"{'reached' if reached else 'did NOT reach'} ASR {goal:.3f} in {result.step} steps; "
                                f"CA {result.last_eval['ca']:.3f} ASR {result.last_eval['asr']:.3f}")))
    rows.append(_row("defend", "demo world", "fast vs baseline", "baseline = the reference here", seconds["fast"],
                     probe_size / seconds["fast"], "images/s", baseline_seconds,
                     agreement="" if reached else "a lower bound: the baseline never reached the ASR"))


def bench_capacity(models: list[str], device: str, rows: list[dict]) -> None:
    """Big models on one GPU: scan 64 images x 16 regions, then one repair epoch (256 samples, batch 32,
    activation checkpointing, bf16, frozen text), no checkpoint written. Any failure of one model (out
    of memory, a full disk, anything) is that model's row, and the next model runs."""
    cuda = device == "cuda"
    for name in models:
        bundle = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            bundle = _random_model(name, device)
            images = _world_images(256, bundle.image_size)
            scan(bundle, list(CLASSES), images[:64], FixedOracle(16), prompts=zero_shot_prompts,
                 config=ScanConfig(progress=False, batch_size=16, encode_batch=256))
            captions = generate_world(256, seed=11).captions
            freeze_text_tower(bundle.model)
            config = TrainConfig(steps=256 // 32, batch_size=32, lr=1e-5, warmup_steps=1, eval_every=0,
                                 checkpoint_every=10**9, save_checkpoints=False, grad_checkpointing=True,
                                 progress=False)
            with tempfile.TemporaryDirectory() as out_dir:
                result = train(bundle, images, captions, config, out_dir,
                               objective=CleanCLIPObjective(captions, bundle.tokenizer, 0.0, text_view=False))
            outcome = f"ok, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "ok"
            rows.append(_row("capacity", name, "scan + 1 repair epoch", "64 images x 16 regions; 256 samples",
                             time.perf_counter() - start, result.samples_per_s, "samples/s", mfu=result.mfu,
                             agreement=outcome))
        except Exception as error:  # noqa: BLE001 - one model's failure is its row; the next model still runs
            what = "OUT OF MEMORY" if isinstance(error, torch.cuda.OutOfMemoryError) else "FAILED"
            message = (str(error).splitlines() or [""])[0][:200]
            rows.append(_row("capacity", name, "scan + 1 repair epoch", "", time.perf_counter() - start, 0.0, "-",
                             agreement=f"{what}: {type(error).__name__}: {message}"))
        finally:
            del bundle


def run(args: argparse.Namespace, device: str, mode: str) -> list[dict]:
    stages = args.stages or ["scan", "repair", "defend"]  # capacity: only when asked for (--stages capacity)
    if distributed.current().distributed and set(stages) - {"scan", "repair"}:
        raise SystemExit("under torchrun, the pipeline suite runs the scan and repair stages (--stages scan repair)")
    rows = open_rows(getattr(args, "results", None), "pipeline", FIELDS, device, mode)  # on disk as measured
    if "scan" in stages:
        if mode == "quick":
            bundle, pairs = _demo_model(device)
            probe = args.probe or 2000
            print(f"scan: demo model, {probe} probe images ...", flush=True)
            bench_scan(bundle, "demo tiny", pairs.images[:probe], ClassicalSegmenter(), f"probe={probe} builtin oracle",
                       device, rows, args.scan_variants)
        else:
            for name in args.models or ["ViT-B-16", "ViT-L-14"]:
                bundle = _random_model(name, device)
                images = _world_images(args.probe or 512, bundle.image_size)
                for shape in args.region_shapes:
                    for regions in args.regions:
                        print(f"scan: {name}, {len(images)} images x {regions} regions ({shape}) ...", flush=True)
                        sizes = f"images={len(images)} regions={regions}" + ("" if shape == "discs" else f" {shape}")
                        bench_scan(bundle, name, images, FixedOracle(regions, shape), sizes, device, rows,
                                   args.scan_variants)
                del bundle
    if "repair" in stages:
        steps = args.repair_steps
        plan = ([("demo tiny", 64, steps)] if mode == "quick" else
                [(name, 64 if name == "ViT-B-16" else 32, steps) for name in args.models or ["ViT-B-16", "ViT-L-14"]])
        for name, batch_size, steps in plan:
            print(f"repair: {name}, batch {batch_size} ...", flush=True)
            bundle = _demo_model(device)[0] if name == "demo tiny" else _random_model(name, device)
            world = generate_world(batch_size * 4, seed=11)
            images = world.images if name == "demo tiny" else _world_images(batch_size * 4, bundle.image_size)
            bench_repair(bundle, name, images, world.captions, batch_size, steps, device, rows)
            del bundle
    if "defend" in stages:
        print("defend: demo world, reference vs fast, then the CleanCLIP-style baseline ...", flush=True)
        bench_defend(device, args.probe or 5000, rows)
    if "capacity" in stages:
        bench_capacity(args.capacity_models, device, rows)

    table = list(rows)  # stamped as they were measured
    print(f"\n{'stage':12s} {'model':11s} {'variant':24s} {'seconds':>9s} {'throughput':>22s} {'x ref':>7s} {'mfu':>6s}  agreement")
    for row in table:
        print(f"{row['stage']:12s} {row['model']:11s} {row['variant']:24s} {float(row['seconds']):9.3f} "
              f"{float(row['throughput']):12.4g} {row['unit']:9s} {row['speedup_vs_reference'] or '-':>7s} "
              f"{row['mfu'] or '-':>6s}  {row['agreement']}")
    if distributed.current().is_main:
        plot_speedups(table, args.results / "pipeline.png")
    return table


def plot_speedups(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in table if r["speedup_vs_reference"] and r["unit"] in ("images/s", "samples/s")]
    bars = [(f"{r['stage']}\n{r['model']}\n{r['variant']}\n{r['sizes']}", float(r["speedup_vs_reference"])) for r in shown]
    if not bars:
        return
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(bars)), 4.5))
    # Red: faster but not the reference's decisions.
    colours = ["tab:red" if "DIFFER" in r["agreement"] else "tab:green" for r in shown]
    axis.bar(range(len(bars)), [b[1] for b in bars], color=colours)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    axis.set_ylabel("speed-up over the reference (x)")
    axis.set_title(f"clipfast fast pipeline vs reference — {table[0]['device']} ({table[0]['mode']})", fontsize=9)
    for k, (_, value) in enumerate(bars):
        axis.text(k, value, f"{value:.1f}x", ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
