"""What a scan finds: per-image columns over the probe set, the per-label test and the triggers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class ImageColumns:
    """Per-image results of consecutive probe images, one tensor per column (length K each). An
    image that could not be decoded has readable False and the empty() values everywhere else."""

    readable: torch.Tensor  # bool: the image could be decoded (unreadable ones take part in nothing)
    image_label: torch.Tensor  # int64: L_i, the model's whole-image top label (-1 when unreadable)
    image_prob: torch.Tensor  # its probability
    grounded: torch.Tensor  # bool: L_i in S_i (some region's crop grounds it, for the grounding model)
    reference_label: torch.Tensor  # int64: the trusted model's whole-image label (-1: self oracle, no trusted model)
    discordant: torch.Tensor  # bool: the trusted model confidently says another label and grounds L_i nowhere
    explaining_drop: torch.Tensor  # share of p(L_i) removing the explaining region takes away (-1: not measured)
    flip_rate: torch.Tensor  # transplant test of the explaining region (evidence.py); -1: no region or no recipient
    discrepancy: torch.Tensor  # p_i(L_i) - max_j q_ij(L_i) over the regions
    oracle_label: torch.Tensor  # int64: the grounding model's label of the largest region that does not explain L_i, -1 if none
    region_counts: torch.Tensor  # int64: regions the oracle found
    # The mirror test (self mode, decide.mirror_label_test); -1: not measured (trusted mode, or off)
    mirror_label: torch.Tensor  # int64: the model's label of the horizontally mirrored image
    object_label: torch.Tensor  # int64: its label of the image's largest region alone (the rest median-filled)
    mirror_object_label: torch.Tensor  # int64: its label of that object alone, mirrored

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(ImageColumns))

    @classmethod
    def empty(cls, size: int) -> "ImageColumns":
        """`size` rows of what an unreadable image gets."""
        false, zero, unmeasured = torch.zeros(size, dtype=torch.bool), torch.zeros(size), torch.full((size,), -1.0)
        none, count = torch.full((size,), -1, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)
        return ImageColumns(readable=false, image_label=none, image_prob=zero, grounded=false, reference_label=none,
                            discordant=false, explaining_drop=unmeasured, flip_rate=unmeasured, discrepancy=zero,
                            oracle_label=none, region_counts=count, mirror_label=none, object_label=none,
                            mirror_object_label=none)

    @classmethod
    def cat(cls, parts: list["ImageColumns"]) -> "ImageColumns":
        """The columns of consecutive parts as one."""
        return ImageColumns(**{name: torch.cat([getattr(part, name) for part in parts]) for name in cls.names()})

    def columns(self) -> "ImageColumns":
        """Just the per-image columns (of a subclass that carries more)."""
        return ImageColumns(**{name: getattr(self, name) for name in self.names()})

    def slice(self, lo: int, hi: int) -> "ImageColumns":
        return ImageColumns(**{name: getattr(self, name)[lo:hi] for name in self.names()})

    def where_readable(self) -> "ImageColumns":
        """The same rows with every unreadable one reset to the empty() values."""
        empty = ImageColumns.empty(len(self))
        return ImageColumns(**{name: torch.where(self.readable, getattr(self, name), getattr(empty, name))
                               for name in self.names()})

    def __len__(self) -> int:
        return len(self.readable)

    @property
    def oracle_mode(self) -> str:
        """'trusted' when a trusted model labelled the images (reference labels), else 'self'."""
        return "trusted" if bool((self.reference_label >= 0).any()) else "self"


@dataclass
class LabelTest:
    """The per-label evidence behind the target decision."""

    predicted: list[int]  # n_l: images whose whole-image label is l
    # c_l: of those, candidates (trigger evidence), less the two largest source classes (the mirror
    # test: those the mirror relabels, none left out)
    candidates: list[int]
    expected: list[float]  # e_l = n_l * (pooled candidate rate of the other labels; the mirror test: l's own rate alone)
    p_values: list[float]  # P(X >= c_l), X ~ Binomial(n_l, that rate)
    threshold: float  # Bonferroni-corrected significance level
    sources: list[int]  # distinct source classes among label l's candidates


@dataclass(frozen=True)
class Flips:
    """A transplant test's outcome (confirm.py): shares of transplanted images labelled the target by
    the suspect and by the trusted model (0 without one)."""

    suspect: float
    trusted: float

    def confirms(self, threshold: float) -> bool:
        return self.suspect >= threshold and self.trusted < threshold


@dataclass
class TriggerEstimate:
    target: int
    kind: str  # "patch" (its victims with a region that flips other images are by themselves significant) or "image-wide"
    victim_indices: torch.Tensor  # [V] probe indices of the victims
    patch_indices: torch.Tensor  # [P] the victims whose explaining region passed the transplant test
    region_masks: torch.Tensor  # bool [P, H, W]: their trigger regions
    flip_rates: torch.Tensor  # [P]: those regions' transplant flip rates
    consensus_mask: torch.Tensor  # bool [H, W]: pixels in >= half of the trigger regions
    box: tuple[int, int, int, int] | None  # (y0, x0, y1, x1) of the consensus; None when empty (image-wide, or a moving patch)
    # image-wide only (confirm.py): the pattern and background transplant tests (shares turned to the
    # target in the suspect and the trusted model), and whether the additive pattern confirmed it (the
    # repair then has the pattern to put on clean images; otherwise only the victims carry the trigger)
    pattern: Flips | None = None
    background: Flips | None = None
    additive: bool | None = None

    def describe(self, classnames: list[str]) -> str:
        where = (f"patch trigger at box {self.box}" if self.kind == "patch" and self.box else
                 "patch trigger at varying places" if self.kind == "patch" else
                 "image-wide trigger, not additive (its victims' backgrounds carry it, no mean pattern does)"
                 if self.additive is False else "image-wide trigger")
        return f"target '{classnames[self.target]}', {where}, {len(self.victim_indices)} victims"


@dataclass
class ScanResult(ImageColumns):
    """The per-image columns of the whole probe set, plus the probe-set-wide decisions."""

    classnames: list[str] = field(kw_only=True)
    patch_evidence: torch.Tensor = field(kw_only=True)  # bool [N]: the explaining region passed the transplant test
    candidate: torch.Tensor = field(kw_only=True)  # bool [N]: trigger evidence (patch evidence, or discordant)
    label_test: LabelTest = field(kw_only=True)
    targets: list[int] = field(kw_only=True)
    triggers: list[TriggerEstimate] = field(kw_only=True)
    seconds: dict[str, float] = field(default_factory=dict, kw_only=True)
    # labels that passed the per-label test as image-wide targets but neither transplant test
    # (confirm.py): label -> {"pattern": Flips, "background": Flips}
    unconfirmed: dict[str, dict[str, Flips]] = field(default_factory=dict, kw_only=True)
    # how the regions were encoded: the suspect's trigger evidence and the grounding model's naming
    # ("crop" | "packed"; ScanConfig.regions resolved for the oracle mode). Empty in scans saved before.
    region_modes: dict[str, str] = field(default_factory=dict, kw_only=True)
    # self mode: the object-controlled mirror test behind image-wide targets (decide.mirror_label_test;
    # candidates: images the mirror relabels, expected: n_l times the label's upper rate on objects
    # alone); None where it did not run (trusted mode, ScanConfig.mirror_test off, scans saved before)
    mirror_test: LabelTest | None = field(default=None, kw_only=True)
    # self mode: the object-alone flow test behind image-wide targets (decide.object_alone_test;
    # candidates: a_l, images labelled l whose object alone is labelled another label, over l's sources
    # but its two largest; expected: (a_l + b_l) / 2, b_l the flow the other way); None as mirror_test
    object_test: LabelTest | None = field(default=None, kw_only=True)
    # self mode: the share of probe images whose largest region alone keeps the image's label; the two
    # tests above run only from decide.MIN_OBJECT_AGREEMENT on (None: not measured, or saved before)
    object_agreement: float | None = field(default=None, kw_only=True)

    @property
    def found(self) -> bool:
        """Whether a backdoor (a target label) was found."""
        return bool(self.targets)

    def clean_indices(self) -> torch.Tensor:
        """Probe indices of readable images without trigger evidence whose label a region grounds."""
        return torch.nonzero(self.readable & self.grounded & ~self.candidate).flatten()

    def victims(self, target: int) -> torch.Tensor:
        """Probe indices whose whole-image label is the target and a candidate (Algorithm 2)."""
        return torch.nonzero(self.candidate & (self.image_label == target)).flatten()

    def summary(self) -> dict:
        return {
            "target_found": self.found,
            "targets": [self.classnames[t] for t in self.targets],
            "probe_images": len(self.image_label),
            "unreadable": int((~self.readable).sum()),
            "mean_regions_per_image": float(self.region_counts.float().mean()),
            "oracle_mode": self.oracle_mode,
            "regions": self.region_modes,
            "discordant": int(self.discordant.sum()),
            "transplant_positive": int(self.patch_evidence.sum()),
            "candidates": int(self.candidate.sum()),
            "label_test": {name: {"predicted": n, "candidates": c, "expected": round(e, 3), "p_value": p}
                           for name, n, c, e, p in zip(self.classnames, self.label_test.predicted,
                                                       self.label_test.candidates, self.label_test.expected,
                                                       self.label_test.p_values)},
            "significance_threshold": self.label_test.threshold,
            "mirror_test": None if self.mirror_test is None else {
                name: {"predicted": n, "mirror_changed": c, "expected": round(e, 3), "p_value": p}
                for name, n, c, e, p in zip(self.classnames, self.mirror_test.predicted, self.mirror_test.candidates,
                                            self.mirror_test.expected, self.mirror_test.p_values)},
            "object_test": None if self.object_test is None else {
                name: {"predicted": n, "whole_not_object": a, "object_not_whole": round(2 * e) - a, "p_value": p}
                for name, n, a, e, p in zip(self.classnames, self.object_test.predicted, self.object_test.candidates,
                                            self.object_test.expected, self.object_test.p_values)},
            "object_agreement": self.object_agreement,
            "unconfirmed": {name: {test: asdict(flips) for test, flips in tests.items()}
                            for name, tests in self.unconfirmed.items()},
            "triggers": [{"target": self.classnames[t.target], "kind": t.kind, "box": t.box,
                          **{test: None if flips is None else asdict(flips)
                             for test, flips in (("pattern", t.pattern), ("background", t.background))},
                          "additive": t.additive,
                          "victims": len(t.victim_indices), "patch_victims": len(t.patch_indices),
                          "consensus_pixels": int(t.consensus_mask.sum()), "description": t.describe(self.classnames)}
                         for t in self.triggers],
            "seconds": self.seconds,
        }
