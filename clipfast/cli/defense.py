"""`clipfast scan | repair | defend` on a user's model, probe set and vocabulary, on one process or
under torchrun."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import CliError, add_model_options, load_bundle, non_negative_int, positive_int


def defense_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast.defense import RepairConfig, ScanConfig
    from clipfast.defense.scan.config import AUTO_REGIONS, ENGINES, REGION_MODES
    from clipfast.models.precision import PRECISIONS
    from clipfast.ops import BACKENDS
    from clipfast.oracle import SAM_MODEL_TYPES, SEGMENTER_NAMES
    from clipfast.rundir import untied_fields
    from clipfast.train.sharding import SHARDING_MODES

    scan, repair = ScanConfig(), RepairConfig()
    add_model_options(parser, default_model=None)
    data = parser.add_argument_group("probe set and vocabulary")
    data.add_argument("--probe", required=True, type=Path,
                      help="probe images: an ImageFolder directory (class per folder), a CSV file (image,caption), "
                      "or webdataset .tar shards (one file, or a directory of them)")
    data.add_argument("--vocab", required=True,
                      help="label vocabulary: a text file with one label per line, or 'world' for the synthetic world's")
    data.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                      help="corrupt or missing probe images: skip and count them, or fail (default: skip)")
    data.add_argument("--workers", type=non_negative_int, default=2,
                      help="processes decoding probe images ahead of the scan, per rank (default: 2)")
    oracle = parser.add_argument_group("oracle")
    oracle.add_argument("--oracle", choices=SEGMENTER_NAMES, default="builtin", help="segmenter (default: builtin)")
    oracle.add_argument("--sam-checkpoint", help="segment-anything weights file (for --oracle sam)")
    oracle.add_argument("--sam-model-type", default="vit_b", choices=SAM_MODEL_TYPES)
    oracle.add_argument("--trusted-model", help="a trusted clean CLIP that grounds the regions: an open_clip "
                        "architecture (with --trusted-pretrained) or hf-hub:org/repo (default: none, the model under "
                        "test grounds its own crops)")
    oracle.add_argument("--trusted-pretrained", help="open_clip pretrained tag of --trusted-model")
    oracle.add_argument("--trusted-checkpoint", help="weights of the trusted clean CLIP (a clipfast checkpoint needs "
                        "no --trusted-model)")
    oracle.add_argument("--grounding-regions", choices=REGION_MODES, default=scan.grounding_regions,
                        help="how the grounding model (the trusted one, or the model itself) sees the regions it "
                        f"names: crops name small objects better than packed sequences (default: {scan.grounding_regions})")
    oracle.add_argument("--no-mirror-test", dest="mirror_test", action="store_false",
                        help="without --trusted-model: skip the mirror and object-alone tests, self mode's only "
                        "evidence of image-wide triggers (blends, signals, warps), and their 3 extra encodes per "
                        "probe image")
    oracle.add_argument("--backend", default=scan.backend, choices=("auto",) + BACKENDS,
                        help=f"op backend (default: {scan.backend})")
    # The config field each speed option sets; the untied ones never change results (rundir.untied).
    speed_fields = {"--engine": (ScanConfig, "engine"), "--regions": (ScanConfig, "regions"),
                    "--precision": (ScanConfig, "precision"), "--compile": (ScanConfig, "compile"),
                    "--batch-size": (ScanConfig, "batch_size"), "--shard-size": (ScanConfig, "shard_size"),
                    "--accumulation-steps": (RepairConfig, "accumulation_steps"),
                    "--grad-checkpointing": (RepairConfig, "grad_checkpointing"), "--sharding": (RepairConfig, "sharding"),
                    "--checkpoint-every": (RepairConfig, "checkpoint_every")}
    neutral = [flag for flag, (config, name) in speed_fields.items() if name in untied_fields(config)]
    speed = parser.add_argument_group(f"speed ({', '.join(neutral)} never change results; the others can, and "
                                      "the output directory records them)")
    speed.add_argument("--engine", choices=ENGINES, default=scan.engine,
                       help=f"fast or the straightforward reference pipeline, for comparison (default: {scan.engine})")
    speed.add_argument("--regions", choices=REGION_MODES + (AUTO_REGIONS,), default=scan.regions,
                       help="the model's own region embeddings (the trigger evidence): re-encode each region's crop, "
                       "or packed (each region its own sequence of masked patches, all in one encoder pass); auto: "
                       "packed without a trusted model, crop with one (default: %(default)s)")
    speed.add_argument("--precision", choices=PRECISIONS, default=scan.precision,
                       help="scan encoder precision (auto: bf16 where native)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the encoder and the repair step")
    speed.add_argument("--batch-size", type=positive_int, default=scan.batch_size,
                       help=f"probe images per scan batch, per rank (default: {scan.batch_size})")
    speed.add_argument("--shard-size", type=positive_int, default=scan.shard_size,
                       help="probe images per scan shard: the unit of work of a rank and of a resumed run "
                       f"(default: {scan.shard_size})")
    speed.add_argument("--accumulation-steps", type=positive_int, default=repair.accumulation_steps,
                       help="repair micro-batches per step")
    speed.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in repair")
    speed.add_argument("--sharding", choices=SHARDING_MODES, default=repair.sharding,
                       help="under torchrun, repair with the model replicated (ddp) or its image tower sharded across "
                       f"ranks (fsdp: for models whose training state does not fit one GPU) (default: {repair.sharding})")
    speed.add_argument("--checkpoint-every", type=positive_int, default=repair.checkpoint_every,
                       help="repair steps between checkpoints: what an interrupted repair can lose; each writes the "
                       f"whole training state, so raise it for big models (default: {repair.checkpoint_every})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a rerun resumes here)")


def run_defense(args: argparse.Namespace, stage: str) -> int:
    """stage: "scan" (scan only), "repair" (curate + repair from the scan in --out) or "defend" (both)."""
    from clipfast import distributed
    from clipfast.data import read_vocabulary
    from clipfast.data.world import CLASSES

    labels = list(CLASSES) if args.vocab == "world" else read_vocabulary(args.vocab)
    if stage == "repair":
        from clipfast.defense.pipeline import SCAN_NAME

        if not (args.out / SCAN_NAME).exists():
            raise CliError(f"{args.out} holds no finished scan: run `clipfast scan ... --out {args.out}` first "
                           "(or `clipfast defend` to scan and repair in one go)")
    try:
        group, args.device = distributed.init_from_environment(args.device)  # torchrun: one process per GPU / CPU slot
        return _run_defense_on_rank(args, stage != "scan", labels, group)
    finally:
        distributed.shutdown()


def _run_defense_on_rank(args: argparse.Namespace, run_repair: bool, labels: list[str], group) -> int:
    from clipfast.data import open_probe_set
    from clipfast.defense import CurateConfig, DefenseConfig, RepairConfig, ScanConfig, defend
    from clipfast.models import load_model
    from clipfast.oracle import make_segmenter
    from clipfast.rundir import save_json

    bundle = load_bundle(args)
    probe = open_probe_set(args.probe, bundle.image_size, on_error=args.on_error, workers=args.workers)
    if probe.skipped:
        print(f"skipped {len(probe.skipped)} unusable probe entries (first: {probe.skipped[0]})", file=sys.stderr)
    if args.oracle == "sam" and not args.sam_checkpoint:
        raise CliError("--oracle sam needs --sam-checkpoint")
    oracle_options = ({"checkpoint": args.sam_checkpoint, "model_type": args.sam_model_type, "device": args.device}
                      if args.oracle == "sam" else {})
    try:
        segmenter = make_segmenter(args.oracle, **oracle_options)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    trusted = None
    if args.trusted_model or args.trusted_checkpoint:
        trusted = load_model(args.trusted_model, pretrained=args.trusted_pretrained, checkpoint=args.trusted_checkpoint,
                             device=args.device)
    elif args.trusted_pretrained:
        raise CliError("--trusted-pretrained needs --trusted-model")
    prompts = None
    if args.vocab == "world":
        from clipfast.data.world import zero_shot_prompts as prompts
    progress = not args.no_progress and group.is_main
    try:
        config = DefenseConfig(
            scan=ScanConfig(backend=args.backend, progress=progress, engine=args.engine, regions=args.regions,
                            grounding_regions=args.grounding_regions, mirror_test=args.mirror_test,
                            precision=args.precision, compile=args.compile, batch_size=args.batch_size,
                            shard_size=args.shard_size),
            curate=CurateConfig(backend=args.backend),
            repair=RepairConfig(progress=progress, engine=args.engine, compile=args.compile and args.engine == "fast",
                                accumulation_steps=args.accumulation_steps,
                                grad_checkpointing=args.grad_checkpointing, sharding=args.sharding,
                                checkpoint_every=args.checkpoint_every))
    except ValueError as error:
        raise CliError(str(error)) from None
    identity = {"model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
                "probe": str(args.probe.resolve()), "oracle": args.oracle, "sam_checkpoint": args.sam_checkpoint,
                "trusted": [args.trusted_model, args.trusted_pretrained, args.trusted_checkpoint]}
    outcome = defend(bundle, labels, probe, segmenter, args.out, prompts=prompts, grounding_bundle=trusted,
                     config=config, identity=identity, run_repair=run_repair)
    if not group.is_main:
        return outcome.verdict.exit_code
    report = outcome.summary(probe)
    save_json(report, args.out / "report.json")
    scan = outcome.scan
    if report["unreadable_probe_images"]:
        print(f"{report['scan']['unreadable']} probe images could not be decoded and were left out "
              f"(first: {report['unreadable_probe_images'][0]}); see report.json", file=sys.stderr)
    if not scan.found:
        print(f"no target label found in {len(scan.image_label)} probe images: the model is left alone")
    else:
        print(f"target label(s): {', '.join(labels[t] for t in scan.targets)}; "
              f"trigger box(es): {[t.box for t in scan.triggers]}; victims: {sum(len(scan.victims(t)) for t in scan.targets)}")
    if outcome.repaired_model_path:
        print(f"repaired model: {outcome.repaired_model_path} (repair estimates: {json.dumps(outcome.repair.estimates)})")
    print(f"report: {args.out / 'report.json'}")
    print(f"VERDICT: {outcome.verdict.message}")
    return outcome.verdict.exit_code
