"""`clipfast bench` with its results appended to benchmarks/results/ (ops.csv, pipeline.csv,
pipeline.png). See clipfast/bench/__init__.py.

    python benchmarks/run.py [--quick | --full] [--suite ops pipeline] [suite options]
"""

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    from clipfast import bench

    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser, default_results=Path(__file__).resolve().parent / "results")
    sys.exit(bench.run(parser.parse_args()))
