"""`clipfast bench`: the fast paths against the reference, ratios measured in one run on one machine.

    clipfast bench                          # every suite; --full sizes on a GPU, --quick on a CPU
    clipfast bench --suite ops --ops region_topk
    clipfast bench --suite pipeline --quick --results benchmarks/results

Suites: `ops` (clipfast/bench/ops.py: every op backend against its reference, with rooflines),
`pipeline` (clipfast/bench/pipeline.py: scan, a repair step, end-to-end defend and the CleanCLIP-style
baseline, reference pipeline against fast) and `efficacy` (clipfast/bench/efficacy.py: the defence
over a matrix of attacks x seeds, CA/ASR before and after; hours on a CPU). Each prints a table and
appends CSV rows (device, versions, commit) to RESULTS/<suite>.csv; pipeline and efficacy also write
a plot. The ops and pipeline suites write each row as soon as it is measured (a run cut off keeps
every row it finished). Never asserts speed.

Under torchrun (`torchrun --nproc_per_node 8 -m clipfast.cli bench --suite pipeline --stages scan
repair`) the scan and repair stages run on every rank, as `clipfast defend` would, and rank 0 reports
them, with the number of ranks in the device column.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from clipfast import distributed

from . import efficacy, ops, pipeline
from .common import append_csv

# suite -> (run, CSV fields, whether run() writes its rows itself as they are measured)
SUITES = {"ops": (ops.run, ops.FIELDS, True), "pipeline": (pipeline.run, pipeline.FIELDS, True),
          "efficacy": (efficacy.run, efficacy.FIELDS, False)}


def add_arguments(parser: argparse.ArgumentParser, default_results: Path) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="realistic GPU sizes (ViT-B-16/ViT-L-14, B=256 ops)")
    mode.add_argument("--quick", action="store_true", help="sizes for a small CPU (the demo world)")
    parser.add_argument("--suite", nargs="+", default=["ops", "pipeline"], choices=list(SUITES),
                        help="default: ops pipeline (efficacy takes hours: ask for it)")
    parser.add_argument("--results", type=Path, default=default_results,
                        help=f"folder the CSVs (and the pipeline plot) go to (default: {default_results})")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per op measurement")
    parser.add_argument("--ops", nargs="+", default=list(ops.SIZE_KEYS), choices=list(ops.SIZE_KEYS),
                        help="ops suite: which ops")
    parser.add_argument("--compile-baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="ops suite: also time torch.compile of the reference region_score (default: on a GPU)")
    pipeline.add_arguments(parser)
    efficacy.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    ranks, device = distributed.init_from_environment("auto")
    device = device.split(":")[0]  # under torchrun, "cuda" is this rank's GPU (init set it current)
    mode = "full" if args.full or (not args.quick and device == "cuda") else "quick"
    if ranks.distributed and args.suite != ["pipeline"]:
        raise SystemExit("under torchrun, bench runs the pipeline suite only (--suite pipeline)")
    quiet = open(os.devnull, "w") if not ranks.is_main else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            for suite in args.suite:
                print(f"== {suite} ({mode}) ==", flush=True)
                suite_run, fields, streams = SUITES[suite]
                rows = suite_run(args, device, mode)
                if streams:
                    continue  # every row is on disk already (common.open_rows)
                if ranks.distributed:
                    rows = [row | {"device": f"{row['device']} x{ranks.world_size} ranks"} for row in rows]
                if ranks.is_main and rows:
                    append_csv(args.results / f"{suite}.csv", fields, rows)
    finally:
        if quiet:
            quiet.close()
        distributed.shutdown()
    return 0
