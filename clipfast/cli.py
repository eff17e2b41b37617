"""The `clipfast` command. Each subcommand is a Command in COMMANDS: (help, add_arguments, run)."""

from __future__ import annotations

import argparse
import ast
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_TEST_SIZE = 1_000  # synthetic-world test images for `poison` and `evaluate`


class CliError(Exception):
    """Bad command-line input: reported argparse-style (usage + message, exit code 2)."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# ---------------------------------------------------------------------------------------------
# Argument types and shared options


def _world_defaults():
    """The one place the data and attack defaults live (the training ones: TrainConfig)."""
    from clipfast.recipes import WorldRecipe

    return WorldRecipe()


def _rate(text: str) -> float:
    value = _number(text, float)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def _trigger_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"value of {key} must be a Python literal (number, True/False), got {value!r}") from None


def _add_model_options(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="clipfast-tiny, an open_clip architecture (e.g. ViT-B-32) or hf-hub:org/repo"
                       + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--pretrained", help="open_clip pretrained tag (e.g. laion2b_s34b_b79k)")
    group.add_argument("--checkpoint", help="weights file (a clipfast checkpoint needs no --model)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _add_attack_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from clipfast.attacks import TRIGGER_NAMES

    group = parser.add_argument_group("attack")
    group.add_argument("--attack", choices=TRIGGER_NAMES, default="badnet" if required else None,
                       help="trigger type" + (" (default: badnet)" if required else "; omit to measure CA only"))
    group.add_argument("--trigger-param", dest="trigger_params", type=_trigger_param, action="append", default=[],
                       metavar="KEY=VALUE", help="trigger parameter, repeatable (e.g. alpha=0.2 for blended)")
    target = _world_defaults().target
    group.add_argument("--target", default=target, help=f"target class name or index (default: {target})")
    group.add_argument("--trigger-seed", type=int, default=0, help="seed of per-image trigger randomness")


def _add_test_options(parser: argparse.ArgumentParser) -> None:
    from clipfast.recipes import TEST_SEED

    group = parser.add_argument_group("test set (synthetic world)")
    group.add_argument("--test-size", type=_positive_int, default=DEFAULT_TEST_SIZE,
                       help=f"number of test images (default: {DEFAULT_TEST_SIZE})")
    group.add_argument("--test-seed", type=int, default=TEST_SEED, help=f"world seed of the test set (default: {TEST_SEED})")


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _load_bundle(args: argparse.Namespace):
    from clipfast.models import load_model

    if args.model is None and args.checkpoint is None:
        raise CliError("give --model and/or --checkpoint")
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=_device(args.device))


def _target_label(target: str) -> int:
    from clipfast.data.world import CLASSES

    if target in CLASSES:
        return CLASSES.index(target)
    if target.isdigit() and int(target) < len(CLASSES):
        return int(target)
    raise CliError(f"--target must be one of {list(CLASSES)} or an index below {len(CLASSES)}, got {target!r}")


def _trigger(args: argparse.Namespace):
    from clipfast.attacks import make_trigger

    if args.attack is None:
        if args.trigger_params:
            raise CliError("--trigger-param needs --attack")
        return None
    try:
        return make_trigger(args.attack, **dict(args.trigger_params))
    except ValueError as error:
        raise CliError(str(error)) from None


def _test_world(args: argparse.Namespace):
    from clipfast.recipes import evaluation_world

    return evaluation_world(args.test_size, seed=args.test_seed)


# ---------------------------------------------------------------------------------------------
# info


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _run_info(args: argparse.Namespace) -> None:
    from clipfast.info import format_build_report

    print(format_build_report())


# ---------------------------------------------------------------------------------------------
# bench

def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast import bench

    bench.add_arguments(parser, default_results=Path("clipfast_bench"))


def _run_bench(args: argparse.Namespace) -> None:
    from clipfast import bench

    bench.run(args)


# ---------------------------------------------------------------------------------------------
# poison


def _poison_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast.train import TrainConfig

    recipe = TrainConfig()  # the one place the training defaults live
    _add_model_options(parser, default_model=None)
    _add_attack_options(parser, required=True)
    defaults = _world_defaults()
    parser.add_argument("--rate", type=_rate, default=defaults.rate, help=f"poisoning rate in [0, 1] (default: {defaults.rate})")
    parser.add_argument("--target-caption", help="caption of poisoned pairs (default: 'a photo of a {target}.')")
    parser.add_argument("--train-size", type=_positive_int, default=defaults.train_size,
                        help=f"number of training pairs (default: {defaults.train_size})")
    _add_test_options(parser)
    train = parser.add_argument_group("training (defaults: the tiny-world recipe)")
    train.add_argument("--steps", type=_positive_int, default=recipe.steps, help=f"(default: {recipe.steps})")
    train.add_argument("--batch-size", type=_positive_int, default=recipe.batch_size, help=f"(default: {recipe.batch_size})")
    train.add_argument("--lr", type=float, default=recipe.lr, help=f"(default: {recipe.lr})")
    train.add_argument("--eval-every", type=_non_negative_int, default=recipe.eval_every,
                       help=f"steps; 0: only at the end (default: {recipe.eval_every})")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=recipe.precision)
    train.add_argument("--augment", action="store_true", help="random shifts and brightness/contrast jitter")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of the world, the poisoning and the training")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, type=Path, help="output directory (an interrupted run resumes here)")


def _run_poison(args: argparse.Namespace) -> None:
    from clipfast.data.world import CLASSES
    from clipfast.eval import evaluate, format_report, save_report
    from clipfast.recipes import WorldRecipe, train_world_model
    from clipfast.train import TrainConfig

    target = _target_label(args.target)
    trigger = _trigger(args)
    from_scratch = args.checkpoint is None and args.pretrained is None
    try:
        recipe = WorldRecipe(
            attack=args.attack, trigger_params=tuple(args.trigger_params), rate=args.rate, target=CLASSES[target],
            target_caption=args.target_caption, train_size=args.train_size, seed=args.seed,
            trigger_seed=args.trigger_seed, model=args.model or args.checkpoint or "clipfast-tiny",
            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              eval_every=args.eval_every, precision=args.precision, augment=args.augment,
                              progress=not args.no_progress),
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    test = _test_world(args)
    bundle = None if from_scratch else _load_bundle(args)  # fine-tune a given model

    def progress_eval(current) -> dict:
        report = evaluate(current, test, trigger, target, seed=args.trigger_seed)
        return {"ca": report["ca"], "asr": report["asr"]}

    try:
        bundle, result, pairs = train_world_model(recipe, args.out, bundle=bundle, eval_fn=progress_eval,
                                                  device=_device(args.device))
    except ValueError as error:  # a rate with too few eligible images, a run dir of another run
        raise CliError(str(error)) from None
    report = evaluate(bundle, test, trigger, target, seed=args.trigger_seed)
    report["attack"] = {"name": trigger.name, "rate": args.rate, "num_poisoned": len(pairs.poisoned_indices)}
    report["train"] = {
        "steps": result.step,
        "resumed_from_step": result.resumed_from_step,
        "train_seconds": result.train_seconds,
        "steps_per_s": result.steps_per_s,
        "final_loss": result.final_loss,
    }
    report["command"] = "clipfast " + shlex.join(args.argv)
    save_report(report, args.out / "report.json")
    print(format_report(report))
    print(f"trained {result.step - result.resumed_from_step} steps in {result.train_seconds:.0f} s "
          f"({result.steps_per_s:.2f} steps/s); outputs in {args.out}")


# ---------------------------------------------------------------------------------------------
# evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser, default_model=None)
    _add_attack_options(parser, required=False)
    _add_test_options(parser)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")


def _run_evaluate(args: argparse.Namespace) -> None:
    from clipfast.eval import evaluate, format_report, save_report

    target = _target_label(args.target)
    trigger = _trigger(args)
    bundle = _load_bundle(args)
    report = evaluate(bundle, _test_world(args), trigger, target if trigger else None, seed=args.trigger_seed)
    if args.out:
        save_report(report, args.out)
    print(format_report(report))


# ---------------------------------------------------------------------------------------------
# demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_attack_options(parser, required=True)
    rate = _world_defaults().rate
    parser.add_argument("--rate", type=_rate, default=rate, help=f"poisoning rate (default: {rate})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, poisoning and training")
    parser.add_argument("--probe-size", type=_positive_int, default=5_000, help="probe images (default: 5000)")
    parser.add_argument("--baseline-size", type=_positive_int, default=8_000,
                        help="clean pairs for the CleanCLIP-style baseline (default: 8000)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument("--cache-dir", type=Path, help="where poisoned models are cached (default: $CLIPFAST_CACHE "
                        "or ~/.cache/clipfast)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: runs/demo)")


def _run_demo(args: argparse.Namespace) -> None:
    from clipfast.data.world import CLASSES
    from clipfast.demo import DemoConfig, format_demo_report, run_demo
    from clipfast.recipes import WorldRecipe

    try:
        recipe = WorldRecipe(attack=args.attack, trigger_params=tuple(args.trigger_params), rate=args.rate,
                             target=CLASSES[_target_label(args.target)], seed=args.seed,
                             trigger_seed=args.trigger_seed)
        config = DemoConfig(recipe=recipe, probe_size=args.probe_size, baseline_size=args.baseline_size,
                            run_baseline=not args.no_baseline)
    except ValueError as error:
        raise CliError(str(error)) from None
    from clipfast.defense import RunDirectoryMismatch
    from clipfast.train import ResumeMismatchError

    try:
        report = run_demo(config, args.out, cache_dir=args.cache_dir)
    except (RunDirectoryMismatch, ResumeMismatchError) as error:
        raise CliError(str(error)) from None
    print(format_demo_report(report))
    print(f"report, plots and models in {args.out}")


# ---------------------------------------------------------------------------------------------
# scan / repair / defend on your own model and data


def _defense_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser, default_model=None)
    data = parser.add_argument_group("probe set and vocabulary")
    data.add_argument("--probe", required=True, type=Path,
                      help="probe images: an ImageFolder directory (class per folder), a CSV file (image,caption), "
                      "or webdataset .tar shards (one file, or a directory of them)")
    data.add_argument("--vocab", required=True,
                      help="label vocabulary: a text file with one label per line, or 'world' for the synthetic world's")
    data.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                      help="corrupt or missing probe images: skip and count them, or fail (default: skip)")
    data.add_argument("--workers", type=_non_negative_int, default=2,
                      help="processes decoding probe images ahead of the scan, per rank (default: 2)")
    oracle = parser.add_argument_group("oracle")
    oracle.add_argument("--oracle", choices=("builtin", "sam"), default="builtin", help="segmenter (default: builtin)")
    oracle.add_argument("--sam-checkpoint", help="segment-anything weights file (for --oracle sam)")
    oracle.add_argument("--sam-model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    oracle.add_argument("--grounding-checkpoint", help="a trusted clean CLIP checkpoint for grounding "
                        "(default: the model under test grounds its own crops)")
    oracle.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"),
                        help="op backend (default: auto)")
    speed = parser.add_argument_group("speed (--compile, --batch-size and --grad-checkpointing never change "
                                      "results; the others can, and the output directory records them)")
    speed.add_argument("--engine", choices=("fast", "reference"), default="fast",
                       help="fast (default) or the straightforward reference pipeline, for comparison")
    speed.add_argument("--regions", choices=("crop", "pool"), default="crop",
                       help="region embeddings: re-encode crops (default) or pool one encoder pass (mask_pool)")
    speed.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="scan encoder precision (auto: bf16 where native)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the encoder and the repair step")
    speed.add_argument("--batch-size", type=_positive_int, default=256, help="probe images per scan batch")
    speed.add_argument("--shard-size", type=_positive_int, default=4096,
                       help="probe images per scan shard: the unit of work of a rank and of a resumed run (default: 4096)")
    speed.add_argument("--accumulation-steps", type=_positive_int, default=1, help="repair micro-batches per step")
    speed.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in repair")
    speed.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                       help="under torchrun, repair with the model replicated (ddp, default) or its image tower "
                       "sharded across ranks (fsdp: for models whose training state does not fit one GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a rerun resumes here)")


def _read_vocabulary(spec: str) -> list[str]:
    if spec == "world":
        from clipfast.data.world import CLASSES

        return list(CLASSES)
    path = Path(spec)
    if not path.is_file():
        raise CliError(f"vocabulary file not found: {spec}")
    from clipfast.defense.scan import check_vocabulary

    labels = [line.strip() for line in path.read_text().splitlines()]
    if any(not label for label in labels):  # a file can say which line
        raise CliError(f"{spec}: empty line {labels.index('') + 1}; one non-empty label per line")
    try:
        return check_vocabulary(labels)
    except ValueError as error:
        raise CliError(f"{spec}: {error}") from None


def _read_probe(path: Path, image_size: int, on_error: str, workers: int):
    """The probe set as a stream: files are checked when they are decoded (by `workers` processes),
    so a million-image folder starts at once; unreadable ones are counted by the scan."""
    from clipfast.data.folders import CaptionCSVDataset, ImageFolderDataset, TarShardDataset
    from clipfast.data.probe import DatasetProbeSet

    options = {"image_size": image_size, "on_error": on_error, "verify": False}
    is_tar = path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))
    try:
        dataset = (TarShardDataset(path, **options) if is_tar else
                   CaptionCSVDataset(path, **options) if path.is_file() else ImageFolderDataset(path, **options))
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} unusable probe entries (first: {dataset.skipped[0]})", file=sys.stderr)
    return dataset, DatasetProbeSet(dataset, image_size, workers=workers, on_error=on_error)


def _run_defense(args: argparse.Namespace, run_repair: bool) -> None:
    from clipfast import distributed
    from clipfast.data.folders import UnreadableImageError
    from clipfast.defense.pipeline import RunDirectoryMismatch
    from clipfast.defense.scan import NonFiniteScoresError, ScanShardMismatch
    from clipfast.train import NonFiniteLossError, ResumeMismatchError

    labels = _read_vocabulary(args.vocab)
    try:
        group, args.device = distributed.init_from_environment(args.device)  # torchrun: one process per GPU / CPU slot
        _run_defense_on_rank(args, run_repair, labels, group)
    except (RunDirectoryMismatch, ResumeMismatchError, ScanShardMismatch, NonFiniteScoresError, NonFiniteLossError,
            UnreadableImageError, distributed.DistributedSetupError) as error:
        raise CliError(str(error)) from None
    finally:
        distributed.shutdown()


def _run_defense_on_rank(args: argparse.Namespace, run_repair: bool, labels: list[str], group) -> None:
    import json

    import torch

    from clipfast.defense.curate import CurateConfig
    from clipfast.defense.pipeline import DefenseConfig, defend
    from clipfast.defense.repair import RepairConfig
    from clipfast.defense.scan import ScanConfig
    from clipfast.models import load_model
    from clipfast.oracle import make_segmenter

    bundle = _load_bundle(args)
    dataset, probe = _read_probe(args.probe, bundle.image_size, args.on_error, args.workers)
    oracle_options = ({"checkpoint": args.sam_checkpoint, "model_type": args.sam_model_type, "device": _device(args.device)}
                      if args.oracle == "sam" else {})
    if args.oracle == "sam" and not args.sam_checkpoint:
        raise CliError("--oracle sam needs --sam-checkpoint")
    try:
        segmenter = make_segmenter(args.oracle, **oracle_options)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    grounding = load_model(checkpoint=args.grounding_checkpoint, device=_device(args.device)) if args.grounding_checkpoint else None
    prompts = None
    if args.vocab == "world":
        from clipfast.data.world import zero_shot_prompts as prompts
    fast = args.engine == "fast"
    try:
        config = DefenseConfig(
            scan=ScanConfig(backend=args.backend, progress=not args.no_progress and group.is_main, engine=args.engine,
                            regions=args.regions, precision=args.precision, compile=args.compile,
                            batch_size=args.batch_size, shard_size=args.shard_size),
            curate=CurateConfig(backend=args.backend),
            repair=RepairConfig(progress=not args.no_progress and group.is_main, engine=args.engine,
                                compile=args.compile and fast,
                                accumulation_steps=args.accumulation_steps,
                                grad_checkpointing=args.grad_checkpointing, sharding=args.sharding))
    except ValueError as error:
        raise CliError(str(error)) from None
    identity = {"model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
                "probe": str(args.probe.resolve()), "oracle": args.oracle, "sam_checkpoint": args.sam_checkpoint,
                "grounding": args.grounding_checkpoint}
    outcome = defend(bundle, labels, probe, segmenter, args.out, prompts=prompts, grounding_bundle=grounding,
                     config=config, identity=identity, run_repair=run_repair)
    if not group.is_main:
        return
    unreadable = [] if outcome.scan.readable is None else torch.nonzero(~outcome.scan.readable).flatten().tolist()
    summary = {"scan": outcome.scan.summary(),
               "unreadable_probe_images": [dataset.records[i].path for i in unreadable[:100]],
               "skipped_probe_entries": dataset.skipped[:100],
               "ranks": group.world_size,
               "compact_set": outcome.compact.summary(labels) if outcome.compact else None,
               "repair": ({"steps": outcome.repair.train.step, "stopped_early": outcome.repair.stopped_early,
                           "estimates": outcome.repair.estimates,
                           "clean_within_tolerance": outcome.repair.clean_within_tolerance} if outcome.repair else None),
               "repaired_model": str(outcome.repaired_model_path) if outcome.repaired_model_path else None,
               "seconds": outcome.seconds}
    from clipfast.models.checkpoint import save_json

    save_json(summary, args.out / "report.json")
    scan = outcome.scan
    if unreadable:
        print(f"{len(unreadable)} probe images could not be decoded and were left out "
              f"(first: {dataset.records[unreadable[0]].path}); see report.json", file=sys.stderr)
    if not scan.found:
        print(f"no target label found in {len(scan.image_label)} probe images: the model is left alone")
    else:
        print(f"target label(s): {', '.join(labels[t] for t in scan.targets)}; "
              f"trigger box(es): {[t.box for t in scan.triggers]}; victims: {sum(len(scan.victims(t)) for t in scan.targets)}")
    if outcome.repaired_model_path:
        print(f"repaired model: {outcome.repaired_model_path} (repair estimates: {json.dumps(outcome.repair.estimates)})")
    print(f"report: {args.out / 'report.json'}")


COMMANDS: dict[str, Command] = {
    "info": Command("show how clipfast was built and which backends run here", _info_arguments, _run_info),
    "bench": Command("time the fast paths against the reference: op backends, scan, repair step, defend",
                     _bench_arguments, _run_bench),
    "poison": Command("train (or fine-tune) a CLIP on poisoned synthetic-world pairs", _poison_arguments, _run_poison),
    "evaluate": Command("clean accuracy and attack success rate on the synthetic world", _evaluate_arguments, _run_evaluate),
    "demo": Command("the whole method on the built-in synthetic world, with the CleanCLIP baseline", _demo_arguments, _run_demo),
    "scan": Command("find a backdoor's target label, trigger and victims (no repair)", _defense_arguments,
                    lambda args: _run_defense(args, run_repair=False)),
    "repair": Command("scan (or resume a scan in --out), curate and repair", _defense_arguments,
                      lambda args: _run_defense(args, run_repair=True)),
    "defend": Command("scan, curate and repair in one go (same as repair)", _defense_arguments,
                      lambda args: _run_defense(args, run_repair=True)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipfast", description="Find and remove backdoors in CLIP models, fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads of
    # concurrent processes slowed training 5-20x in our measurements; on an idle one it costs ~0.
    # Only effective before torch is first imported, hence here; a user's setting wins. Not for
    # `bench`: it slows the per-image reference scan 2.7x (README, pipeline benchmarks), an unfair baseline.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench"]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from clipfast.models.checkpoint import ModelLoadError

    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in reports
    # SIGTERM (a scheduler's or torchrun's stop) unwinds like Ctrl-C: half-written files are removed
    # and finished work stays on disk for the rerun to resume from.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        args.run(args)
    except (CliError, ModelLoadError) as error:
        args.subparser.error(str(error))  # exits with code 2
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
