"""Op benchmarks (every backend against the reference, rooflines, CSV): `clipfast bench` with its
results appended to benchmarks/results/ops.csv. See clipfast/bench.py.

    python benchmarks/ops.py [--quick | --full] [--ops OP ...] [--compile-baseline]
"""

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    from clipfast import bench

    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser, default_csv=Path(__file__).resolve().parent / "results" / "ops.csv")
    sys.exit(bench.run(parser.parse_args()))
