"""The synthetic-world commands: `poison` (train a poisoned or clean tiny CLIP), `evaluate` (CA and
ASR) and `demo` (the whole method on the built-in world, with the baseline)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from clipfast.errors import ClipfastError

from .options import (
    CliError,
    add_attack_options,
    add_model_options,
    add_test_options,
    load_bundle,
    non_negative_int,
    parse_trigger,
    positive_int,
    rate_type,
    resolve_device,
    target_label,
    test_world,
    world_defaults,
)


def poison_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast.train import TrainConfig

    recipe = TrainConfig()  # the one place the training defaults live
    add_model_options(parser, default_model=None)
    add_attack_options(parser, required=True)
    defaults = world_defaults()
    parser.add_argument("--rate", type=rate_type, default=defaults.rate, help=f"poisoning rate in [0, 1] (default: {defaults.rate})")
    parser.add_argument("--target-caption", help="caption of poisoned pairs (default: 'a photo of a {target}.')")
    parser.add_argument("--train-size", type=positive_int, default=defaults.train_size,
                        help=f"number of training pairs (default: {defaults.train_size})")
    add_test_options(parser)
    train = parser.add_argument_group("training (defaults: the tiny-world recipe)")
    train.add_argument("--steps", type=positive_int, default=recipe.steps, help=f"(default: {recipe.steps})")
    train.add_argument("--batch-size", type=positive_int, default=recipe.batch_size, help=f"(default: {recipe.batch_size})")
    train.add_argument("--lr", type=float, default=recipe.lr, help=f"(default: {recipe.lr})")
    train.add_argument("--eval-every", type=non_negative_int, default=recipe.eval_every,
                       help=f"steps; 0: only at the end (default: {recipe.eval_every})")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=recipe.precision)
    train.add_argument("--augment", action="store_true", help="random shifts and brightness/contrast jitter")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of the world, the poisoning and the training")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, type=Path, help="output directory (an interrupted run resumes here)")


def run_poison(args: argparse.Namespace) -> None:
    from clipfast.data.world import CLASSES
    from clipfast.eval import evaluate, format_report, save_report
    from clipfast.demo import default_cache_dir
    from clipfast.recipes import WorldRecipe, optimized_patch_recipe, train_world_model
    from clipfast.train import TrainConfig

    target = target_label(args.target)
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
        # an optimized patch is made on a clean surrogate model, cached like the demo's models
        recipe = optimized_patch_recipe(recipe, default_cache_dir() / "models")
        trigger = recipe.make_trigger()
    except ValueError as error:
        raise CliError(str(error)) from None
    test = test_world(args)
    bundle = None if from_scratch else load_bundle(args)  # fine-tune a given model

    def progress_eval(current) -> dict:
        report = evaluate(current, test, trigger, target, seed=args.trigger_seed)
        return {"ca": report["ca"], "asr": report["asr"]}

    try:
        bundle, result, pairs = train_world_model(recipe, args.out, bundle=bundle, eval_fn=progress_eval,
                                                  device=resolve_device(args.device))
    except ValueError as error:  # e.g. a rate with too few eligible images
        if isinstance(error, ClipfastError):
            raise
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




def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, default_model=None)
    add_attack_options(parser, required=False)
    add_test_options(parser)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")


def run_evaluate(args: argparse.Namespace) -> None:
    from clipfast.eval import evaluate, format_report, save_report

    target = target_label(args.target)
    trigger = parse_trigger(args)
    bundle = load_bundle(args)
    report = evaluate(bundle, test_world(args), trigger, target if trigger else None, seed=args.trigger_seed)
    if args.out:
        save_report(report, args.out)
    print(format_report(report))




def demo_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast.demo import DemoConfig

    demo, world = DemoConfig(), world_defaults()
    add_attack_options(parser, required=True)
    parser.add_argument("--rate", type=rate_type, default=world.rate, help=f"poisoning rate (default: {world.rate})")
    parser.add_argument("--seed", type=int, default=world.seed, help="seed of the world, poisoning and training")
    parser.add_argument("--probe-size", type=positive_int, default=demo.probe_size,
                        help=f"probe images (default: {demo.probe_size})")
    parser.add_argument("--baseline-size", type=positive_int, default=demo.baseline_size,
                        help=f"clean pairs for the CleanCLIP-style baseline (default: {demo.baseline_size})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument("--trusted", action="store_true",
                        help="trusted oracle: a clean model of another seed (trained into the cache on first use) "
                        "grounds the regions, as a user's trusted clean CLIP would (default: the suspect grounds "
                        "its own crops)")
    parser.add_argument("--cache-dir", type=Path, help="where poisoned models are cached (default: $CLIPFAST_CACHE "
                        "or ~/.cache/clipfast)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: runs/demo)")


def run_demo_command(args: argparse.Namespace) -> None:
    from clipfast.data.world import CLASSES
    from clipfast.demo import DemoConfig, format_demo_report, run_demo
    from clipfast.recipes import WorldRecipe

    try:
        recipe = WorldRecipe(attack=args.attack, trigger_params=tuple(args.trigger_params), rate=args.rate,
                             target=CLASSES[target_label(args.target)], seed=args.seed,
                             trigger_seed=args.trigger_seed)
        config = DemoConfig(recipe=recipe, probe_size=args.probe_size, baseline_size=args.baseline_size,
                            run_baseline=not args.no_baseline,
                            oracle_mode="trusted" if args.trusted else "self")
    except ValueError as error:
        raise CliError(str(error)) from None
    report = run_demo(config, args.out, cache_dir=args.cache_dir)
    print(format_demo_report(report))
    print(f"report, plots and models in {args.out}")
