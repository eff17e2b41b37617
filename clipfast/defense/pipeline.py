"""defend = scan -> curate -> repair, with every stage's output written atomically to one run
directory so that a rerun with the same directory resumes where the last one stopped (the scan
shard by shard, the repair from its last checkpoint), and refuses to mix runs with different
settings. Under torch.distributed every rank runs defend: the scan's shards and the repair's batches
are split across ranks, and rank 0 writes the shared outputs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from clipfast import distributed
from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.models import ClipBundle, save_checkpoint
from clipfast.models.checkpoint import save_json, write_atomically
from clipfast.oracle import Segmenter

from .curate import CompactSet, CurateConfig, curate
from .repair import RepairConfig, RepairResult, repair
from .scan import RESULT_NEUTRAL_SETTINGS, LabelTest, ScanConfig, ScanResult, TriggerEstimate, scan

CONFIG_NAME = "defense_config.json"
SCAN_NAME = "scan.pt"
SCAN_SHARDS_NAME = "scan_shards"
COMPACT_NAME = "compact_set.pt"
REPAIRED_NAME = "repaired_model.pt"


class RunDirectoryMismatch(ValueError):
    """The output directory holds a run made with different settings."""


@dataclass(frozen=True)
class DefenseConfig:
    scan: ScanConfig = field(default_factory=ScanConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)


@dataclass
class DefenseOutcome:
    scan: ScanResult
    compact: CompactSet | None  # None when no backdoor was found (the model is left alone)
    repair: RepairResult | None
    seconds: dict[str, float]
    repaired_model_path: Path | None


# Settings that do not change results (progress bars, op backend, the scan's batching) do not tie
# a run directory; everything else does. The number of ranks does not tie either: a run may resume
# on more or fewer processes.
_UNTIED = {"scan": RESULT_NEUTRAL_SETTINGS, "curate": {"backend"}, "repair": {"progress", "compile", "grad_checkpointing", "sharding"}}


def _tied_settings(config: DefenseConfig, identity: dict) -> dict:
    stages = {name: {k: v for k, v in asdict(getattr(config, name)).items() if k not in untied}
              for name, untied in _UNTIED.items()}
    return {"inputs": identity, **stages}


def claim_run_directory(out_dir: Path, settings: dict) -> None:
    """Record the settings of the run in out_dir, or check they equal the recorded ones (every rank
    checks; rank 0 writes), and clear temporary files a killed run left behind."""
    group = distributed.current()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONFIG_NAME
    settings = json.loads(json.dumps(settings))  # normalise tuples etc. as JSON would
    recorded = json.loads(path.read_text()) if path.exists() else None
    ours = recorded is None or recorded == settings
    if group.is_main and ours:  # temporary files of a killed run (write_atomically's) are garbage now
        for leftover in out_dir.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)
    group.barrier()  # nobody writes before the clean-up, nor reads a file rank 0 is about to write
    if not ours:
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise RunDirectoryMismatch(f"{out_dir} holds a run with different settings (differences in: "
                                   f"{', '.join(changed)}); use a new output directory")
    if recorded is None and group.is_main:
        save_json(settings, path)


def save_scan(result: ScanResult, path: Path) -> None:
    """Written by rank 0 only."""
    if not distributed.current().is_main:
        return
    write_atomically(path, lambda file: torch.save(asdict(result), file))


def load_scan(path: Path) -> ScanResult:
    data = torch.load(path, weights_only=True)
    data["label_test"] = LabelTest(**data["label_test"])
    data["triggers"] = [TriggerEstimate(**t) for t in data["triggers"]]
    return ScanResult(**data)


def defend(bundle: ClipBundle, classnames: list[str], probe_images: ProbeSet | torch.Tensor, segmenter: Segmenter,
           out_dir: str | Path, *, prompts: Callable[[str], list[str]] | None = None,
           grounding_bundle: ClipBundle | None = None, config: DefenseConfig = DefenseConfig(),
           identity: dict | None = None, run_repair: bool = True) -> DefenseOutcome:
    """Scan, and if a backdoor is found curate and (unless run_repair is False) repair bundle.model
    in place. `identity` describes the inputs (model, probe set, oracle) so that a run directory is
    never reused for others; a rerun resumes from what the directory holds."""
    out_dir, probe_images = Path(out_dir), as_probe_set(probe_images)
    group = distributed.current()
    claim_run_directory(out_dir, _tied_settings(config, {"classnames": list(classnames),
                                                         "probe_images": len(probe_images), **(identity or {})}))
    seconds = {}
    start = time.perf_counter()
    if group.broadcast_object((out_dir / SCAN_NAME).exists()):  # rank 0 decides: all ranks take one branch
        found = load_scan(out_dir / SCAN_NAME)
    else:
        found = scan(bundle, classnames, probe_images, segmenter, prompts=prompts,
                     grounding_bundle=grounding_bundle, config=config.scan, shard_dir=out_dir / SCAN_SHARDS_NAME)
        save_scan(found, out_dir / SCAN_NAME)
        group.barrier()
    seconds["scan"] = time.perf_counter() - start
    if not found.found or not run_repair:
        return DefenseOutcome(found, None, None, seconds, None)

    start = time.perf_counter()
    compact = curate(found, probe_images, config.curate)
    if group.is_main:
        write_atomically(out_dir / COMPACT_NAME, lambda file: torch.save(asdict(compact), file))
    seconds["curate"] = time.perf_counter() - start

    start = time.perf_counter()
    repaired = repair(bundle, compact, found, probe_images, out_dir / "repair", prompts=prompts, config=config.repair)
    if group.is_main:
        save_checkpoint(bundle, out_dir / REPAIRED_NAME)
    group.barrier()
    seconds["repair"] = time.perf_counter() - start
    return DefenseOutcome(found, compact, repaired, seconds, out_dir / REPAIRED_NAME)
