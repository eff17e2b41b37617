"""What several `clipfast` commands share: argument types, option groups, and turning parsed
arguments into models, triggers and test sets."""

from __future__ import annotations

import argparse
import ast
import math
from dataclasses import dataclass
from typing import Callable

from clipfast.errors import ClipfastError


class CliError(ClipfastError):
    """Bad command-line input: reported argparse-style (usage + message, exit code 2)."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def world_defaults():
    """The one place the data and attack defaults live (the training ones: TrainConfig)."""
    from clipfast.recipes import WorldRecipe

    return WorldRecipe()


def rate_type(text: str) -> float:
    value = number(text, float)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def trigger_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"value of {key} must be a Python literal (number, True/False), got {value!r}") from None


def add_model_options(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="clipfast-tiny, an open_clip architecture (e.g. ViT-B-32) or hf-hub:org/repo"
                       + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--pretrained", help="open_clip pretrained tag (e.g. laion2b_s34b_b79k)")
    group.add_argument("--checkpoint", help="weights file (a clipfast checkpoint needs no --model)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_attack_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from clipfast.attacks import TRIGGER_NAMES

    group = parser.add_argument_group("attack")
    group.add_argument("--attack", choices=TRIGGER_NAMES, default="badnet" if required else None,
                       help="trigger type" + (" (default: badnet)" if required else "; omit to measure CA only"))
    group.add_argument("--trigger-param", dest="trigger_params", type=trigger_param, action="append", default=[],
                       metavar="KEY=VALUE", help="trigger parameter, repeatable (e.g. alpha=0.2 for blended)")
    target = world_defaults().target
    group.add_argument("--target", default=target, help=f"target class name or index (default: {target})")
    group.add_argument("--trigger-seed", type=int, default=0, help="seed of per-image trigger randomness")


def add_test_options(parser: argparse.ArgumentParser) -> None:
    from clipfast.recipes import TEST_SEED, TEST_SIZE

    group = parser.add_argument_group("test set (synthetic world)")
    group.add_argument("--test-size", type=positive_int, default=TEST_SIZE,
                       help=f"number of test images (default: {TEST_SIZE})")
    group.add_argument("--test-seed", type=int, default=TEST_SEED, help=f"world seed of the test set (default: {TEST_SEED})")


def resolve_device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_bundle(args: argparse.Namespace):
    from clipfast.models import load_model

    if args.model is None and args.checkpoint is None:
        raise CliError("give --model and/or --checkpoint")
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=resolve_device(args.device))


def target_label(target: str) -> int:
    from clipfast.data.world import CLASSES

    if target in CLASSES:
        return CLASSES.index(target)
    if target.isdigit() and int(target) < len(CLASSES):
        return int(target)
    raise CliError(f"--target must be one of {list(CLASSES)} or an index below {len(CLASSES)}, got {target!r}")


def parse_trigger(args: argparse.Namespace):
    from clipfast.attacks import make_trigger

    if args.attack is None:
        if args.trigger_params:
            raise CliError("--trigger-param needs --attack")
        return None
    try:
        return make_trigger(args.attack, **dict(args.trigger_params))
    except ValueError as error:
        raise CliError(str(error)) from None


def test_world(args: argparse.Namespace):
    from clipfast.recipes import evaluation_world

    return evaluation_world(args.test_size, seed=args.test_seed)
