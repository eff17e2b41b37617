"""Build clipfast and its compiled operator library `clipfast._C`.

CPU kernels are always built. CUDA kernels are built whenever torch has CUDA and nvcc is found
(no GPU needed): set CLIPFAST_CUDA=0 to skip them, CLIPFAST_CUDA=1 to fail if they cannot be built.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0": A100, H100/H200) and MAX_JOBS
the parallel compile jobs. The CUDA toolkit root is CUDA_HOME when set, else the one the nvcc on PATH
reports itself (`nvcc --dryrun`, TOP=); the root chosen and why are printed and recorded. The build is
recorded in clipfast/_build_info.json for `clipfast info`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from clipfast.provenance import git_commit  # noqa: E402  (dependency-free)

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def nvcc_top(nvcc: str) -> str | None:
    """The toolkit root nvcc itself uses: the TOP= line of `nvcc --dryrun` (nvcc prints its settings
    without compiling), which sees through wrapper scripts and symlinks on PATH."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        key, _, value = line.removeprefix("#$ ").strip().partition("=")
        if key == "TOP" and value:
            return str(Path(value).resolve())
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """(the CUDA toolkit root that holds both nvcc and the headers, how it was found). CUDA_HOME or
    CUDA_PATH when set; else the root the nvcc on PATH reports (an nvcc on PATH may be a wrapper);
    else the one holding the resolved nvcc; else /usr/local/cuda."""
    candidates = [(os.environ.get("CUDA_HOME"), "CUDA_HOME"), (os.environ.get("CUDA_PATH"), "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((nvcc_top(nvcc), f"`{nvcc} --dryrun` TOP="))
        candidates.append((str(Path(nvcc).resolve().parent.parent), f"the directory above {Path(nvcc).resolve()}"))
    candidates.append(("/usr/local/cuda", "the default /usr/local/cuda"))
    for root, how in candidates:
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root, how
    return None, "no nvcc with CUDA headers found (PATH, CUDA_HOME, /usr/local/cuda)"


# torch.utils.cpp_extension reads CUDA_HOME at import time, so settle it first.
_cuda_home, _cuda_home_source = find_cuda_home()
print(f"clipfast: CUDA root {_cuda_home or '(none)'} ({_cuda_home_source})", file=sys.stderr)
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> tuple[bool, str]:
    setting = os.environ.get("CLIPFAST_CUDA", "auto")
    if setting == "0":
        return False, "disabled by CLIPFAST_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if _cuda_home is None:
        reasons.append("no CUDA toolkit (nvcc + headers) found; set CUDA_HOME")
    if reasons:
        if setting == "1":
            sys.exit("clipfast: CLIPFAST_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc from {_cuda_home} ({_cuda_home_source})"


def nvcc_version() -> str | None:
    if _cuda_home is None:
        return None
    try:
        out = subprocess.run([str(Path(_cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=30).stdout
        return out.strip().splitlines()[-1] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


with_cuda, cuda_reason = want_cuda()
cxx_flags = ["-O3", "-std=c++17", "-fopenmp-simd"]  # `omp simd` loops, no OpenMP runtime
include_dirs = [str(ROOT / "csrc" / "kernels"), str(ROOT / "csrc" / "ops")]
sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "ops").glob("*.cpp") if not p.name.endswith("_cuda.cpp"))
if with_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "ops").glob("*_cuda.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "kernels" / "cuda").glob("*.cu"))
    extension = CUDAExtension(
        "clipfast._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
else:
    extension = CppExtension("clipfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})

build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "python": sys.version.split()[0],
    "compiled_backends": ["cpu"] + (["cuda"] if with_cuda else []),
    "cuda_reason": cuda_reason,
    "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
    "nvcc": nvcc_version() if with_cuda else None,
    "cuda_home": _cuda_home,
    "commit": git_commit(ROOT) or "unknown",
}
(ROOT / "clipfast" / "_build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
