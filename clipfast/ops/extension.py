"""The compiled library clipfast._C, loaded once and checked against the torch it runs with.

A missing or mismatched build must not silently leave every op on the slow reference: loading
warns once, naming the cause and the fix, and CLIPFAST_REQUIRE_EXTENSION=1 (CI sets it) turns
that warning into an error.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from clipfast.errors import ClipfastError

REQUIRE_ENV = "CLIPFAST_REQUIRE_EXTENSION"
REBUILD = "reinstall to rebuild it: `pip install --no-build-isolation -e .` (or bash scripts/install.sh)"


class ExtensionError(ClipfastError, ImportError):
    """clipfast._C is missing or does not fit the running torch, and CLIPFAST_REQUIRE_EXTENSION=1."""


def _read_build_info() -> dict:
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _load() -> tuple[ModuleType | ImportError, str | None]:
    """(the module or the ImportError that stopped it, the problem to report or None)."""
    built_with = BUILD_INFO.get("torch")
    try:
        module = importlib.import_module("clipfast._C")
    except ImportError as error:
        mismatch = f" (it was built against torch {built_with}, this is torch {torch.__version__})" if (
            built_with and built_with != torch.__version__) else ""
        return error, f"clipfast._C failed to import{mismatch}: {error}. The C++/CUDA ops fall back to the " \
                      f"slow PyTorch reference; {REBUILD}"
    if built_with and built_with != torch.__version__:
        return module, (f"clipfast._C was built against torch {built_with} but this is torch {torch.__version__}; "
                        f"its kernels may misbehave: {REBUILD}")
    return module, None


BUILD_INFO = _read_build_info()  # what setup.py recorded: versions, compiled backends, CUDA archs, commit
EXTENSION, PROBLEM = _load()  # the compiled library (or the ImportError), and what is wrong with it
if PROBLEM:
    if os.environ.get(REQUIRE_ENV) == "1":
        raise ExtensionError(f"{PROBLEM} ({REQUIRE_ENV}=1)")
    warnings.warn(f"clipfast: {PROBLEM}", stacklevel=2)


def loaded() -> bool:
    return not isinstance(EXTENSION, ImportError)
