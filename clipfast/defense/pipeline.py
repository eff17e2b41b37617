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
from clipfast.oracle import Segmenter
from clipfast.rundir import check_same_run, remove_leftovers, save_json, tied_settings, write_atomically

from .curate import CompactSet, CurateConfig, curate
from .repair import RepairConfig, RepairResult, repair
from .unlearning import recover_triggers
from .verdict import Verdict, judge
from .scan import Flips, LabelTest, ScanConfig, ScanResult, TriggerEstimate, scan
from .scan.decide import MIN_OBJECT_AGREEMENT

CONFIG_NAME = "defense_config.json"
SCAN_NAME = "scan.pt"
SCAN_SHARDS_NAME = "scan_shards"
COMPACT_NAME = "compact_set.pt"
REPAIRED_NAME = "repaired_model.pt"


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
    verdict: Verdict

    def summary(self, probe: ProbeSet) -> dict:
        """The run as report.json holds it (probe: the scanned probe set, to name unreadable images)."""
        unreadable = torch.nonzero(~self.scan.readable).flatten().tolist()
        return {"scan": self.scan.summary(),
                "unreadable_probe_images": [probe.name(i) for i in unreadable[:100]],
                "skipped_probe_entries": probe.skipped[:100],
                "ranks": distributed.current().world_size,
                "compact_set": self.compact.summary(self.scan.classnames) if self.compact else None,
                "repair": self.repair.summary() if self.repair else None,
                "repaired_model": str(self.repaired_model_path) if self.repaired_model_path else None,
                "seconds": self.seconds,
                "verdict": self.verdict.summary()}


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
        remove_leftovers(out_dir)
    group.barrier()  # nobody writes before the clean-up, nor reads a file rank 0 is about to write
    if not ours:
        check_same_run(recorded, settings, str(out_dir))
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
    for test in ("mirror_test", "object_test"):  # absent from scans saved before them
        data[test] = LabelTest(**data[test]) if data.get(test) else None
    data.setdefault("object_agreement", None)
    unmeasured = torch.full_like(data["image_label"], -1)  # scans saved before the mirror test lack its columns
    for column in ("mirror_label", "object_label", "mirror_object_label"):
        data.setdefault(column, unmeasured)
    flips = lambda value: None if value is None else Flips(**value)  # noqa: E731 - asdict made them dicts
    data["triggers"] = [TriggerEstimate(**{**t, "pattern": flips(t["pattern"]), "background": flips(t["background"])})
                        for t in data["triggers"]]
    data["unconfirmed"] = {name: {test: flips(value) for test, value in tests.items()}
                           for name, tests in data["unconfirmed"].items()}
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
    inputs = {"classnames": list(classnames), "probe_images": len(probe_images), **(identity or {})}
    claim_run_directory(out_dir, {"inputs": inputs, **tied_settings(config)})
    seconds = {}
    start = time.perf_counter()
    if group.broadcast_object((out_dir / SCAN_NAME).exists()):  # rank 0 decides: all ranks take one branch
        scanned = load_scan(out_dir / SCAN_NAME)
    else:
        scanned = scan(bundle, classnames, probe_images, segmenter, prompts=prompts,
                     grounding_bundle=grounding_bundle, config=config.scan, shard_dir=out_dir / SCAN_SHARDS_NAME)
        save_scan(scanned, out_dir / SCAN_NAME)
        group.barrier()
    seconds["scan"] = time.perf_counter() - start
    if not scanned.found or not run_repair:
        return DefenseOutcome(scanned, None, None, seconds, None, verdict_of(scanned, None, config.repair))

    start = time.perf_counter()
    # Recovered once for curate and repair: a background-carried trigger segments every victim.
    triggers = recover_triggers(scanned, probe_images, config.curate.seed, segmenter)
    compact = curate(scanned, probe_images, config.curate, triggers)
    if group.is_main:
        write_atomically(out_dir / COMPACT_NAME, lambda file: torch.save(asdict(compact), file))
    seconds["curate"] = time.perf_counter() - start

    start = time.perf_counter()
    repaired = repair(bundle, compact, scanned, probe_images, out_dir / "repair", prompts=prompts, config=config.repair,
                      triggers=triggers, trusted_bundle=grounding_bundle)
    if group.is_main:
        save_checkpoint(bundle, out_dir / REPAIRED_NAME)
    group.barrier()
    seconds["repair"] = time.perf_counter() - start
    return DefenseOutcome(scanned, compact, repaired, seconds, out_dir / REPAIRED_NAME,
                          verdict_of(scanned, repaired, config.repair))


# What "no backdoor found" covers without a trusted model: the suspect grounds its own regions, and a
# trigger spread over the whole image is in every region it grounds; only the mirror and object-alone
# tests see those, and only the ones a horizontal flip breaks or the object shown alone has lost in
# enough victims (README, limits).
SELF_MODE_SCOPE = ("; without a trusted model (self mode) the scan sees triggers that a region of the image "
                   "carries (patches), and image-wide ones (blending, signals, warps) only where mirroring the "
                   "image or showing its object alone breaks them in enough probe images: give a trusted clean "
                   "model (--trusted-model; grounding_bundle in the Python API) to look for every image-wide trigger")


def verdict_of(scanned: ScanResult, repaired: RepairResult | None, config: RepairConfig) -> Verdict:
    if scanned.found:
        description = "; ".join(t.describe(scanned.classnames) for t in scanned.triggers)
    else:
        description = (f"no label among {len(scanned.classnames)} passed the per-label test on "
                       f"{int(scanned.readable.sum())} probe images (family-wise false-alarm rate "
                       f"{scanned.label_test.threshold * len(scanned.classnames):g})")
        if scanned.oracle_mode == "self":
            description += SELF_MODE_SCOPE
    if scanned.object_agreement is not None and scanned.object_agreement < MIN_OBJECT_AGREEMENT:
        description += (f"; self mode's image-wide tests did not run: the oracle's largest region, shown alone, kept "
                        f"the image's label for only {100 * scanned.object_agreement:.0f} % of the probe images "
                        f"(they need {100 * MIN_OBJECT_AGREEMENT:.0f} %), so it is not the images' object and the "
                        "tests' controls would not hold: use a segmenter that isolates objects, or a trusted model")
    if scanned.unconfirmed:
        # Not reported as a backdoor (clean models pass the count too: a confusion the trusted model
        # does not share, confirm.py), but the numbers are shown: a reader sees how far from a trigger it was.
        description += "; " + "; ".join(unconfirmed_text(scanned, name, tests)
                                        for name, tests in scanned.unconfirmed.items())
    estimates = repaired.estimates if repaired else {}
    return judge(scanned.found, description, repaired is not None, estimates.get("asr_hits"), estimates.get("asr_n"),
                 config.max_asr, measured_on(estimates))


def unconfirmed_text(scanned: ScanResult, name: str, tests: dict[str, Flips]) -> str:
    """What flagged an image-wide label that neither transplant test confirmed, and both tests' shares."""
    index, trusted = scanned.classnames.index(name), scanned.oracle_mode == "trusted"

    def shares(flips: Flips) -> str:
        return (f"{100 * flips.suspect:.0f} % in the model and {100 * flips.trusted:.0f} % in the trusted one"
                if trusted else f"{100 * flips.suspect:.0f} %")

    if trusted:
        test = scanned.label_test
        evidence = (f"passed the count ({test.candidates[index]} discordant images where {test.expected[index]:.1f} "
                    "were expected)")
    else:  # self mode: the image-wide tests flagged it (decide.py)
        evidence = "passed " + " and ".join(
            f"the {title} (p {test.p_values[index]:.2g})"
            for title, test in (("mirror test", scanned.mirror_test), ("object-alone test", scanned.object_test))
            if test is not None and test.p_values[index] < test.threshold)
    return (f"'{name}' {evidence} but neither transplant test confirmed it (its victims' additive pattern turned "
            f"{shares(tests['pattern'])} of clean images; other objects on its victims' backgrounds "
            f"{shares(tests['background'])}): " + ("a confusion of the model, not a trigger" if trusted else
                                                   "not reported as a trigger"))


def measured_on(estimates: dict) -> str:
    """The images the held-out ASR counted (repair.holdout_estimator's parts), for the verdict."""
    victims, pasted = estimates.get("asr_victim_n", 0), estimates.get("asr_pasted_n", 0)
    if not pasted:
        return "held-out victims"
    if estimates.get("asr_n") == victims + pasted and victims:
        return "held-out victims and clean images with the recovered trigger pasted on"
    text = "held-out clean images with the recovered trigger pasted on"
    counted = estimates.get("asr_n", pasted) - pasted
    if counted:  # self mode with a patch and an image-wide target: the image-wide target's victims count
        return (f"{text} and {counted} of {victims} held-out victims (the image-wide targets'; the others' labels "
                "are the model's own without a trusted oracle)")
    if victims:  # self mode: shown, not counted
        text += (f"; not counted: {estimates['asr_victim_hits']}/{victims} held-out victims, whose labels "
                 "are the model's own without a trusted oracle")
    return text
