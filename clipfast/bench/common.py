"""What every benchmark row carries (time, device, versions, commit) and how rows are saved."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import torch

from clipfast.ops import backends
from clipfast.perf import device_name
from clipfast.provenance import git_commit


def code_commit() -> str:
    """The code's commit ($CLIPFAST_COMMIT, or the checkout's), else the one recorded at build time."""
    return git_commit() or str(backends.BUILD_INFO.get("commit", "unknown"))


def run_stamp(device: str, mode: str) -> dict:
    """The columns that say when, where and with what a benchmark ran."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), torch=torch.__version__, triton=triton_version, commit=code_commit(),
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
