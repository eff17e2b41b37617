"""The `clipfast` command. Each subcommand is a Command in COMMANDS: (help, add_arguments, run).

The command line parses, calls and prints: defaults come from the config dataclasses, results
summarise themselves, and every ClipfastError (bad input, a run directory of another run, broken
weights) is reported as a usage error with exit code 2. scan / repair / defend end with a verdict;
a backdoor found and not (shown to be) removed exits with code 3.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from clipfast.errors import ClipfastError

from .defense import defense_arguments, run_defense
from .options import CliError, Command
from .world import demo_arguments, evaluate_arguments, poison_arguments, run_demo_command, run_evaluate, run_poison

__all__ = ["COMMANDS", "CliError", "Command", "build_parser", "main"]


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _run_info(args: argparse.Namespace) -> None:
    from clipfast.info import format_build_report

    print(format_build_report())


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfast import bench

    bench.add_arguments(parser, default_results=Path("clipfast_bench"))


def _run_bench(args: argparse.Namespace) -> None:
    from clipfast import bench

    bench.run(args)


COMMANDS: dict[str, Command] = {
    "info": Command("show how clipfast was built and which backends run here", _info_arguments, _run_info),
    "bench": Command("time the fast paths against the reference: op backends, scan, repair step, defend",
                     _bench_arguments, _run_bench),
    "poison": Command("train (or fine-tune) a CLIP on poisoned synthetic-world pairs", poison_arguments, run_poison),
    "evaluate": Command("clean accuracy and attack success rate on the synthetic world", evaluate_arguments, run_evaluate),
    "demo": Command("the whole method on the built-in synthetic world, with the CleanCLIP baseline", demo_arguments, run_demo_command),
    "scan": Command("find a backdoor's target label, trigger and victims (no repair)", defense_arguments,
                    lambda args: run_defense(args, "scan")),
    "repair": Command("curate and repair from the finished scan in --out (run `clipfast scan` first)",
                      defense_arguments, lambda args: run_defense(args, "repair")),
    "defend": Command("scan, curate and repair in one go", defense_arguments,
                      lambda args: run_defense(args, "defend")),
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
    # Idle OpenMP threads sleep instead of spinning, so that concurrent processes on a shared CPU do
    # not starve each other (README, "Pipeline benchmarks"). Only effective before torch is first
    # imported, hence here; a user's setting wins. Not for `bench`: it slows the per-image reference
    # scan, which would make the baseline unfairly slow.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench"]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in reports
    # SIGTERM (a scheduler's or torchrun's stop) unwinds like Ctrl-C: half-written files are removed
    # and finished work stays on disk for the rerun to resume from.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        code = args.run(args)
    except ClipfastError as error:
        args.subparser.error(str(error))  # exits with code 2
    return code or 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)

