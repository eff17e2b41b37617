"""What clipfast was built with and which op backends can run right now (`clipfast info`)."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .ops import backends


def build_report() -> dict:
    """The recorded build plus the live state of every backend, as a JSON-ready dict."""
    build = backends.BUILD_INFO
    runtime = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
    status = {name: backends.backend_status(name) for name in backends.BACKENDS}
    warnings = []
    if build and build.get("torch") != torch.__version__:
        warnings.append(f"built against torch {build.get('torch')} but running torch {torch.__version__}: rebuild")
    return {
        "clipfast": __version__,
        "build": build or None,
        "runtime": runtime,
        "backends": {name: {"usable": ok, "why": why} for name, (ok, why) in status.items()},
        "ops": {op: backends.BACKENDS for op in backends.OPS},
        "warnings": warnings,
    }


def format_build_report(report: dict | None = None) -> str:
    report = report or build_report()
    build = report["build"] or {}
    runtime = report["runtime"]
    lines = [f"clipfast {report['clipfast']}"]
    if build:
        lines += [
            f"  built with   torch {build.get('torch')} (CUDA {build.get('torch_cuda')}), python {build.get('python')}",
            f"  compiled     {', '.join(build.get('compiled_backends', []))}"
            + (f"; CUDA archs {build.get('cuda_arch_list')}" if build.get("cuda_arch_list") else f"; no CUDA: {build.get('cuda_reason')}"),
            f"  nvcc         {build.get('nvcc') or '-'}",
            f"  commit       {build.get('commit')}",
        ]
    else:
        lines.append("  built with   (no build record: clipfast._C was not built by setup.py)")
    lines.append(f"  running on   torch {runtime['torch']}, python {runtime['python']}, "
                 f"GPU: {runtime['gpu'] or 'none'}, {runtime['cpu_threads']} CPU threads")
    lines.append("backends (usable now):")
    for name, state in report["backends"].items():
        lines.append(f"  {name:<10} {'yes' if state['usable'] else 'no ':<4} {state['why']}")
    lines.append("ops:")
    for op, offered in report["ops"].items():
        lines.append(f"  {op:<12} {', '.join(offered)}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
