"""Evaluation reports: JSON files (written atomically) and a short human-readable summary."""

from __future__ import annotations

import os

from clipfast.rundir import save_json


def save_report(report: dict, path: str | os.PathLike) -> None:
    save_json(report, path)


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']}", f"CA  = {100 * report['ca']:.1f} %  (n = {report['n']})"]
    if report.get("asr") is not None:
        lines.append(
            f"ASR = {100 * report['asr']:.1f} %  (n = {report['n_asr']} triggered non-target images, "
            f"target = {report['target_class']})"
        )
    worst = sorted(report["per_class_accuracy"].items(), key=lambda item: item[1])[:3]
    lines.append("weakest classes: " + ", ".join(f"{name} {100 * acc:.0f} %" for name, acc in worst))
    return "\n".join(lines)
