"""Which code produced a result: the commit recorded in benchmark rows and in the build record.

Dependency-free (setup.py imports it before torch is configured)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Set it where the code runs from a copy without .git (e.g. a tree sent to a GPU machine).
COMMIT_ENV = "CLIPFAST_COMMIT"


def git_commit(directory: str | os.PathLike | None = None) -> str | None:
    """$CLIPFAST_COMMIT if set; else the short HEAD of the git checkout holding `directory` (default:
    this package), with "-dirty" when tracked files differ from it (results under benchmarks/results
    do not count: a benchmark writing its rows does not change the code that made them); None outside
    a checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    cwd = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")
