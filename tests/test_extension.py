"""clipfast._C is loaded once and checked: a missing or mismatched build warns (or, with
CLIPFAST_REQUIRE_EXTENSION=1, fails) naming the cause and the fix; `auto` passes over a backend that
cannot take a particular input."""

import os
import subprocess
import sys

import pytest
import torch

from clipfast.ops import BackendUnavailable, backends, extension
from clipfast.ops.region_topk import _limits as topk_limits

WITHOUT_EXTENSION = "import sys; sys.modules['clipfast._C'] = None; import clipfast.ops as ops; "


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != extension.REQUIRE_ENV} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_a_missing_extension_warns_and_auto_falls_back_to_the_reference():
    out = _python(WITHOUT_EXTENSION + "print(ops.backends.resolve('mask_pool', 'auto', __import__('torch').device('cpu')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    assert "clipfast._C failed to import" in out.stderr and "pip install --no-build-isolation -e ." in out.stderr


def test_a_missing_extension_is_an_error_when_required():
    out = _python(WITHOUT_EXTENSION, **{extension.REQUIRE_ENV: "1"})
    assert out.returncode != 0
    assert "ExtensionError" in out.stderr and "clipfast._C failed to import" in out.stderr


def test_a_build_for_another_torch_is_reported(monkeypatch):
    monkeypatch.setattr(extension, "BUILD_INFO", {"torch": "0.0.1"})
    module, problem = extension._load()
    assert not isinstance(module, ImportError)  # it imported: still used, but reported
    assert f"built against torch 0.0.1 but this is torch {torch.__version__}" in problem


def test_the_test_suite_requires_the_extension():
    assert os.environ.get(extension.REQUIRE_ENV) == "1" and extension.loaded()


def test_auto_passes_over_a_backend_that_cannot_take_the_input(monkeypatch):
    monkeypatch.setattr(backends, "backend_status", lambda backend: (True, "pretend"))  # as on a GPU machine
    cuda = torch.device("cuda")
    assert backends.resolve("region_topk", "auto", cuda, topk_limits(10, 64)) == "cuda"
    assert backends.resolve("region_topk", "auto", cuda, topk_limits(10, 2000)) == "triton"  # k > 1024
    with pytest.raises(BackendUnavailable, match="cannot take this input: k=2000 is above the CUDA kernel's limit"):
        backends.resolve("region_topk", "cuda", cuda, topk_limits(10, 2000))
    too_many = topk_limits(2**32, 8)
    assert set(too_many) == {"cuda", "triton"}
    assert backends.resolve("region_topk", "auto", cuda, too_many) == "reference"
