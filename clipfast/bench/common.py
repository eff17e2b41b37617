"""What every benchmark row carries (time, device, versions, commit) and how rows are saved."""

from __future__ import annotations

import csv
import datetime
import subprocess
from pathlib import Path

import torch

from clipfast.ops import backends
from clipfast.perf import device_name


def git_commit() -> str:
    """The checkout's commit when clipfast runs from one, else the commit recorded at build time."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return str(backends.BUILD_INFO.get("commit", "unknown"))[:12]


def run_stamp(device: str, mode: str) -> dict:
    """The columns that say when, where and with what a benchmark ran."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), torch=torch.__version__, triton=triton_version, commit=git_commit(),
                mode=mode)


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
