"""What every benchmark row carries (time, device, versions, commit) and how rows are saved: each
row on disk as soon as it is measured (open_rows), so a run cut off at any point keeps every row it
finished."""

from __future__ import annotations

import csv
import datetime
import os
from pathlib import Path

import torch

from clipfast import distributed
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
        if not new_file:
            self._upgrade_header()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


    def _upgrade_header(self) -> None:
        """A file written before columns were added gets the current header, its rows the new columns
        empty (rewritten atomically), so old and new rows stay one table."""
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames == self.fields:
                return
            old_fields, rows = list(reader.fieldnames or []), list(reader)
        dropped = set(old_fields) - set(self.fields)
        if dropped:
            raise ValueError(f"{self.path} has columns this writer does not know: {sorted(dropped)}")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    writer = CsvWriter(path, fields)
    for row in rows:
        writer.write(row)
    print(f"appended {len(rows)} rows to {path}")


class Rows(list):
    """A suite's result rows: each appended row is stamped (run_stamp: when, where, with what) and,
    on rank 0, written to the suite's CSV at once; the stamped rows stay in the list for the suite's
    printed table and plot."""

    def __init__(self, writer: CsvWriter | None, device: str, mode: str, device_suffix: str = ""):
        super().__init__()
        self.writer, self.device, self.mode, self.device_suffix = writer, device, mode, device_suffix

    def append(self, row: dict) -> None:
        row = run_stamp(self.device, self.mode) | row
        super().append(row)
        if self.writer is not None:
            self.writer.write(row | {"device": row["device"] + self.device_suffix})

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def open_rows(results: Path | None, suite: str, fields: list[str], device: str, mode: str) -> Rows:
    """The rows of `suite`, streamed to results/<suite>.csv (None: kept in memory only). Under
    torchrun only rank 0 writes, with the number of ranks in the device column."""
    ranks = distributed.current()
    writer = CsvWriter(Path(results) / f"{suite}.csv", fields) if results is not None and ranks.is_main else None
    if writer is not None:
        print(f"rows go to {writer.path} as they are measured", flush=True)
    return Rows(writer, device, mode, f" x{ranks.world_size} ranks" if ranks.distributed else "")
