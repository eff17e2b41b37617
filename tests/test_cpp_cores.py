"""The torch-free kernel cores through CMake: C++ unit tests (ctest) and, where nvcc exists, a
compile of the CUDA cores for sm_80/sm_90, so CUDA sources are checked even with no GPU."""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def run(command, cwd=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_cmake_build_and_ctest(tmp_path):
    source = str(Path(__file__).resolve().parents[1])
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    require_cuda = ["-DCLIPFAST_REQUIRE_CUDA=ON"] if shutil.which("nvcc") else []
    configure = run(["cmake", "-S", source, "-B", str(tmp_path), *generator, *require_cuda])
    if shutil.which("nvcc"):
        assert "compiling CUDA kernel cores for architectures 80;90" in configure
    run(["cmake", "--build", str(tmp_path), "-j", "2"])
    out = run(["ctest", "--test-dir", str(tmp_path), "--output-on-failure"])
    assert "100% tests passed" in out
