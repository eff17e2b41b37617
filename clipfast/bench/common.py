"""What every benchmark row carries (time, device, versions, commit) and how rows are saved."""

from __future__ import annotations

import csv
import datetime
import os
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


class CsvWriter:
    """Appends rows to a CSV file one at a time, each on disk when write() returns (header first when
    the file is new), so a run cut off at any point keeps every row it finished."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), fields

    def write(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    writer = CsvWriter(path, fields)
    for row in rows:
        writer.write(row)
    print(f"appended {len(rows)} rows to {path}")
