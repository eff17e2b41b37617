"""Metrics (CA, ASR) and evaluation reports."""

from .metrics import attack_success_rate, clean_accuracy, evaluate, triggered_victims
from .report import format_report, save_report

__all__ = ["attack_success_rate", "clean_accuracy", "evaluate", "format_report", "save_report", "triggered_victims"]
