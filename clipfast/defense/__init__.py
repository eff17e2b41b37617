"""The defence (DESIGN.md section 1): scan -> curate -> repair, the CleanCLIP-style baseline, and
the resumable pipeline that runs them into one output directory."""

from .baseline import BaselineConfig, cleanclip_baseline
from .curate import CompactSet, CurateConfig, curate
from .pipeline import DefenseConfig, DefenseOutcome, defend
from .repair import RepairConfig, RepairResult, repair
from .scan import ScanConfig, ScanResult, scan

__all__ = ["BaselineConfig", "cleanclip_baseline", "CompactSet", "CurateConfig", "curate", "DefenseConfig",
           "DefenseOutcome", "defend", "RepairConfig", "RepairResult", "repair",
           "ScanConfig", "ScanResult", "scan"]
