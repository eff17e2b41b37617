"""Which op backends exist, which can run here and now, and which one a call gets.

Backends: ``reference`` (pure PyTorch, always), ``cpu`` (C++ in clipfast._C), ``cuda`` (CUDA in
clipfast._C, when built with CUDA and a GPU is present), ``triton`` (where Triton runs: a GPU, or
the CPU interpreter under TRITON_INTERPRET=1). ``auto`` picks the fastest available for the tensors'
device and the input. An explicitly requested backend that cannot run raises BackendUnavailable saying why.
"""

from __future__ import annotations

import os
import warnings

import torch

from clipfast.errors import ClipfastError

from . import extension, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Every op has every backend.
OPS = ("mask_crop", "mask_pool", "region_score", "region_topk", "region_patches")

# auto's order of preference per device type (the Triton interpreter is never picked on a CPU).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(ClipfastError, RuntimeError):
    """An explicitly requested backend cannot run; the message says why."""


# Loaded once at import (cheap), so that backend resolution stays traceable by torch.compile.
EXTENSION, BUILD_INFO = extension.EXTENSION, extension.BUILD_INFO


def backend_status(backend: str) -> tuple[bool, str]:
    """(usable now, why or why not) for one backend, independent of any op."""
    if backend == "reference":
        return True, "pure PyTorch, always available"
    ext = EXTENSION
    if backend == "cpu":
        if isinstance(ext, ImportError):
            return False, f"clipfast._C failed to import ({ext}); {extension.REBUILD}"
        return True, "C++ kernels in clipfast._C"
    if backend == "cuda":
        if isinstance(ext, ImportError):
            return False, f"clipfast._C failed to import ({ext})"
        info = BUILD_INFO
        if "cuda" not in info.get("compiled_backends", ()):
            return False, f"clipfast._C was built without CUDA ({info.get('cuda_reason', 'unknown reason')})"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
        return True, f"CUDA kernels for {info.get('cuda_arch_list')} on {torch.cuda.get_device_name()}"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return False, f"triton is not installed ({error})"
        if torch.cuda.is_available():
            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, f"triton {triton.__version__} interpreter on CPU (TRITON_INTERPRET=1; tests only, slow)"
        return False, "no CUDA GPU for Triton (set TRITON_INTERPRET=1 to run its interpreter on CPU)"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS + ('auto',))}")


def resolve(op: str, backend: str, device: torch.device, limits: dict[str, str] | None = None) -> str:
    """The backend that runs `op` on tensors on `device` when the caller asked for `backend`.
    limits: backend -> why it cannot take this particular input (e.g. a k above a kernel's
    maximum); `auto` passes such a backend over, an explicit request for it raises saying why."""
    limits = limits or {}
    device_type = device.type
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if backend_status(candidate)[0] and candidate not in limits:
                if candidate == "reference" and device_type == "cuda":
                    warnings.warn(f"clipfast: {op} runs the slow reference on {device}: "
                                  f"{limits.get('cuda') or backend_status('cuda')[1]}", stacklevel=3)
                return candidate
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS + ('auto',))}")
    usable, why = backend_status(backend)
    if not usable:
        raise BackendUnavailable(f"{op}: backend {backend!r} cannot run: {why}")
    if backend == "cpu" and device_type != "cpu":
        raise BackendUnavailable(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend in ("cuda", "triton") and device_type != "cuda" and not (
        backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        raise BackendUnavailable(f"{op}: backend {backend!r} needs CUDA tensors, got tensors on {device}")
    if backend in limits:
        raise BackendUnavailable(f"{op}: backend {backend!r} cannot take this input: {limits[backend]}")
    return backend


def call(op: str, backend: str, *args):
    """Run `op` on a resolved backend; every backend takes the reference function's arguments."""
    if backend == "reference":
        return getattr(reference, op)(*args)
    if backend == "triton":
        from . import triton  # imported on first use: loading Triton costs about a second

        return getattr(triton, op)(*args)
    return getattr(torch.ops.clipfast, op)(*args)
