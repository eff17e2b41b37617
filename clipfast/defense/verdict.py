"""The plain answer every defence run ends with, in the console and in report.json: no backdoor
found; backdoor found and removed; or backdoor found but NOT removed (which the command line turns
into exit code 3, so that scripts cannot miss it).

"Removed" is a statistical claim about the repaired model on held-out triggered images: the
one-sided 95 % Clopper-Pearson upper bound of their attack success rate must be at most
`max_asr`. A point estimate of 0 on a handful of images is not enough evidence, and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scipy.stats import beta

CONFIDENCE = 0.95
EXIT_NOT_REMOVED = 3  # the CLI's exit code when a backdoor was found and is not (shown to be) removed


@dataclass(frozen=True)
class Verdict:
    status: str  # no_backdoor | removed | not_removed
    message: str
    asr_estimate: float | None = None  # held-out ASR of the repaired model
    asr_upper_bound: float | None = None  # its one-sided 95 % upper bound
    held_out: int | None = None  # triggered held-out images it was measured on
    max_asr: float | None = None  # what the bound had to reach

    @property
    def exit_code(self) -> int:
        return EXIT_NOT_REMOVED if self.status == "not_removed" else 0

    def summary(self) -> dict:
        return asdict(self)


def upper_bound(hits: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial proportion (hits of n)."""
    if n <= 0:
        return 1.0
    return 1.0 if hits >= n else float(beta.ppf(confidence, hits + 1, n - hits))


def judge(found: bool, description: str, repaired: bool, hits: int | None, n: int | None,
          max_asr: float, measured_on: str = "held-out triggered images") -> Verdict:
    """found: the scan's decision; description: what was found (targets, trigger); repaired: a
    repair ran; hits / n: held-out triggered images still classified as a target after it, which
    measured_on names."""
    if not found:
        return Verdict("no_backdoor", f"no backdoor found: {description}; the model is left alone")
    if not repaired:
        return Verdict("not_removed", f"backdoor found ({description}) and NOT removed: no repair was run "
                                      "(`clipfast repair` on the same --out, or `clipfast defend`)", max_asr=max_asr)
    if not n:
        return Verdict("not_removed", f"backdoor found ({description}) but its removal could not be measured: "
                                      "no held-out triggered images", held_out=0, max_asr=max_asr)
    estimate, bound = hits / n, upper_bound(hits, n)
    numbers = (f"held-out ASR {100 * estimate:.1f} % ({hits}/{n} {measured_on}), {int(100 * CONFIDENCE)} % "
               f"upper bound {100 * bound:.1f} %")
    if bound <= max_asr:
        return Verdict("removed", f"backdoor found ({description}) and removed: {numbers} <= {100 * max_asr:.0f} %",
                       estimate, bound, n, max_asr)
    return Verdict("not_removed", f"backdoor found ({description}) but NOT removed: {numbers} > "
                                  f"{100 * max_asr:.0f} %", estimate, bound, n, max_asr)
