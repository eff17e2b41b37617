#!/usr/bin/env python3
"""clipfast's GPU check: one prepared call that turns a lent GPU into verified numbers, within a
budget, losing nothing when it is cut off.

    python3 scripts/gpu_check.py                              # the first call (budget 570 s)
    python3 scripts/gpu_check.py --resume --budget 150        # a second call on the still-warm machine
    python3 scripts/gpu_check.py --stages capacity --budget 540   # one stage (+ what it needs)
    python3 scripts/gpu_check.py --list                       # the stage table: boxes and estimates
    python3 scripts/gpu_check.py --dry-run --budget 420       # here, on a CPU: every stage, scaled down

Stages run in order of verified value (STAGES below): environment facts, the carried wheels, the
build (sm_90 only), the CUDA and the Triton correctness tests, the op benchmarks, a small pipeline
run, compute-sanitizer memcheck and racecheck on clipfast's own kernels, then the big pipeline runs.
A stage runs only when its estimate fits what is left of --budget, is killed at its time box (or at
the budget's end), and is skipped when a stage it needs did not pass. A test stage passes only with
pytest's exit code 0, no failure or error and at least its expected count of passed tests (with
CLIPFAST_REQUIRE_GPU=1 a skipped GPU test is a failure); a sanitizer stage also needs the tool's own
zero-error summary and, for memcheck, a planted out-of-bounds read that it does report.

Everything streams into $OUT as it is produced (at most 8 files, flat): gpu_check.log (every
stage's output), stages.csv (the plan and each stage's result, rewritten at every change: a run cut
off shows the stage it was in as `running`), env.txt, junit.xml (the test stages so far), and the
benchmarks' ops.csv, pipeline.csv and pipeline.png (a row on disk as soon as it is measured).
.gpu-check/ (git-ignored) keeps the build stamp, the installed wheels, compile caches and the state
that --resume reads; on a warm machine a second call finds them and continues where the first stopped.

The commit comes from $CLIPFAST_COMMIT (the device command sets it: .git does not travel), else git.
Standard library only: it runs under the machine's python3 before anything is installed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
WORK_NAME = ".gpu-check"  # git-ignored; kept between calls on a warm machine
OUT_FILES = ("gpu_check.log", "stages.csv", "env.txt", "junit.xml", "ops.csv", "pipeline.csv", "pipeline.png")
OUT_LIMIT_FILES, OUT_LIMIT_BYTES = 8, 16 * 2**20
LOG_CAP_BYTES = 15 * 2**20  # $OUT/gpu_check.log stops growing here (the per-stage logs in .gpu-check/logs go on)
KEPT_ESTIMATE_S = 20.0  # a kept stage (build, wheels) only re-verifies: one python start
RESERVE_S = 12.0  # kept back from the budget: a killed stage's grace periods, the summary
OP_TEST_FILES = ("tests/test_mask_crop.py", "tests/test_mask_pool.py", "tests/test_region_score.py",
                 "tests/test_region_topk.py", "tests/test_op_dispatch.py", "tests/test_extension.py")
SANITIZER_EXCLUDE = ("not gradient and not gradcheck and not compile and not inductor and not realistic "
                     "and not opcheck and not huge")
CSV_FIELDS = ["stage", "result", "seconds", "box_s", "estimate_s", "passed", "failed", "skipped", "errors",
              "expected", "detail"]


# ------------------------------------------------------------------------------------------- stages

@dataclasses.dataclass
class Stage:
    """One step of the check. commands: run in order inside one time box; check: how the result is
    decided ("rc": every exit code 0; "pytest": junit counts; "sanitizer": junit counts plus the
    tool's summary; "canary+sanitizer": the first command must report errors, the rest none)."""

    name: str
    what: str
    estimate: float  # seconds expected on the target (the H200, or this CPU in a dry run)
    box: float  # seconds at most
    basis: str  # what the estimate rests on
    needs: tuple[str, ...] = ()
    commands: list[list[str]] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    check: str = "rc"
    floor: int = 0  # passed tests at least (pytest checks)
    allow_skips: bool = False  # pytest checks: skips pass (dry run); else only EXEMPT_SKIPS may skip
    rerun: bool = False  # run in every call, also with --resume (the environment facts)
    junit: Path | None = None
    keep: Callable[[], str | None] | None = None  # -> why an earlier result still holds (then not rerun)
    after: Callable[["Result"], None] | None = None  # bookkeeping once passed (e.g. the build stamp)


@dataclasses.dataclass
class Result:
    stage: str
    result: str = "pending"  # pending | running | passed | failed | timeout | skipped | kept | not selected
    seconds: float = 0.0
    detail: str = ""
    passed: int | str = ""
    failed: int | str = ""
    skipped: int | str = ""
    errors: int | str = ""
    expected: int | str = ""

    @property
    def ok(self) -> bool:
        return self.result in ("passed", "kept")


class Context:
    """Where the check runs and writes: the tree, the work folder, $OUT, the python, the mode."""

    def __init__(self, repo: Path, out: Path, python: str, dry_run: bool, budget: float):
        self.repo, self.out, self.python, self.dry_run, self.budget = repo, out, python, dry_run, budget
        self.work = repo / WORK_NAME
        self.logs = self.work / "logs"
        self.site = self.work / "site"
        self.facts_path = self.work / "facts.json"
        self.state_path = self.work / "state.json"

    def facts(self) -> dict:
        try:
            return json.loads(self.facts_path.read_text())
        except (OSError, ValueError):
            return {}

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(self.repo)] + ([str(self.site)] if self.site.is_dir() else [])
        env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", CLIPFAST_REQUIRE_EXTENSION="1",
                   PYTHONPATH=os.pathsep.join(path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
                   CLIPFAST_COMMIT=commit(self.repo), CLIPFAST_CACHE=str(self.work / "cache" / "clipfast"),
                   TRITON_CACHE_DIR=str(self.work / "cache" / "triton"),
                   TORCHINDUCTOR_CACHE_DIR=str(self.work / "cache" / "inductor"))
        if not self.dry_run:
            env["CLIPFAST_REQUIRE_GPU"] = "1"  # tests/conftest.py: a skipped GPU test fails
        return env


def commit(repo: Path) -> str:
    """$CLIPFAST_COMMIT (set by the device command: .git does not travel), else git, else unknown."""
    if os.environ.get("CLIPFAST_COMMIT"):
        return os.environ["CLIPFAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def op_test_files(repo: Path) -> list[str]:
    """The op test files, named explicitly (a collection error in one cannot take the others' tests
    with it: pytest runs with --continue-on-collection-errors), plus tests/test_<op>.py for any op
    clipfast.ops.backends.OPS lists beyond them."""
    files = [f for f in OP_TEST_FILES if (repo / f).exists()]
    try:
        text = (repo / "clipfast" / "ops" / "backends.py").read_text()
        ops = re.findall(r'"(\w+)"', re.search(r"^OPS = \(([^)]*)\)", text, re.M).group(1))
    except (OSError, AttributeError):
        ops = []
    for op in ops:
        f = f"tests/test_{op}.py"
        if f not in files and (repo / f).exists():
            files.append(f)
    return files


def triton_kernel_names(repo: Path) -> list[str]:
    """The names of clipfast's @triton.jit functions (its Triton kernels among them)."""
    names = []
    for path in sorted((repo / "clipfast" / "ops" / "triton").glob("*.py")):
        names += re.findall(r"@triton\.jit\s*\ndef (\w+)\(", path.read_text())
    return names


def kernel_regex(repo: Path) -> str:
    """compute-sanitizer's kernel filter: clipfast's CUDA kernels (namespace clipfast: the mangled
    names hold 'clipfast') and its Triton kernels (named after their functions); torch's and
    cuBLAS's kernels run uninstrumented."""
    return "|".join(["clipfast"] + [n for n in triton_kernel_names(repo) if n.endswith("_kernel")])


def source_stamp(repo: Path, *extra: str) -> str:
    """A hash of what a build depends on: setup.py, pyproject.toml, csrc/, plus extra strings."""
    digest = hashlib.sha256()
    files = [repo / "setup.py", repo / "pyproject.toml"] + sorted((repo / "csrc").rglob("*"))
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


def pytest_command(ctx: Context, stage: str, files: list[str], marker: str | None, keyword: str | None,
                   workers: int = 0) -> list[str]:
    command = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--durations=15",
               "--continue-on-collection-errors", f"--junitxml={ctx.work / f'junit-{stage}.xml'}",
               "-o", "junit_family=xunit1"]
    if marker:
        command += ["-m", marker]
    if keyword:
        command += ["-k", keyword]
    if workers > 1:
        command += ["-n", str(workers)]
    return command + files


def bench_command(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "clipfast.cli", "bench", "--results", str(ctx.out), *args]


FACTS_SCRIPT = r"""
import json, os, platform, shutil, subprocess, sys, time
facts = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
         "executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
         "commit": os.environ.get("CLIPFAST_COMMIT", "unknown")}
def run(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout + out.stderr).strip()
    except Exception as error:
        return f"unavailable ({error})"
def last(text):
    return (text.splitlines() or ["(no output)"])[-1]
try:
    import torch
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
except Exception as error:
    facts["torch"] = f"import failed: {error}"
for name in ("triton", "torchvision", "numpy", "xdist", "open_clip", "segment_anything"):
    try:
        module = __import__(name)
        facts[name] = getattr(module, "__version__", "present")
    except Exception as error:
        facts[name] = f"missing ({type(error).__name__})"
nvcc = shutil.which("nvcc")
facts["nvcc"] = last(run(nvcc, "--version")) if nvcc else "missing"
if nvcc:
    dryrun = run(nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull).splitlines()
    top = [l.split("=", 1)[1] for l in dryrun if l.startswith("#$ TOP=")]
    facts["nvcc_top"] = os.path.realpath(top[0]) if top else "not reported"
sanitizer = shutil.which("compute-sanitizer") or next((p for p in ("/usr/local/cuda/bin/compute-sanitizer",)
                                                       if os.path.exists(p)), None)
facts["compute_sanitizer"] = (sanitizer + ": " + last(run(sanitizer, "--version"))
                              if sanitizer else "missing")
facts["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                          "--format=csv,noheader") if shutil.which("nvidia-smi") else "missing"
usage = shutil.disk_usage(".")
facts["disk_free_gib"] = round(usage.free / 2**30, 1)
print(json.dumps(facts, indent=1))
json.dump(facts, open(sys.argv[1], "w"), indent=1)
need_gpu = sys.argv[2] == "1"
if need_gpu and not facts.get("cuda_available"):
    sys.exit("no CUDA GPU is visible to torch: every GPU stage would only skip")
if facts["commit"] == "unknown":
    print("WARNING: the commit is unknown: set CLIPFAST_COMMIT in the device command")
"""

CANARY_SCRIPT = r"""
# A planted out-of-bounds read in a Triton kernel named like clipfast's: memcheck must report it, or
# its zero-error summary of the real kernels proves nothing (wrong kernel filter, tool not working).
import sys
import torch
if not torch.cuda.is_available():
    print("canary: no GPU (dry run): nothing launched")
    sys.exit(0)
import triton
import triton.language as tl
@triton.jit
def _clipfast_canary_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(src + offsets)  # no mask: reads BLOCK floats of an n-float buffer
    tl.store(dst + offsets, values, mask=offsets < n)
src, dst = torch.ones(16, device="cuda"), torch.empty(16, device="cuda")
_clipfast_canary_kernel[(1,)](src, dst, 16, BLOCK=4096)
torch.cuda.synchronize()
print("canary launched")
"""

FAKE_SANITIZER = r"""
# Dry run only: stands in for compute-sanitizer on a machine without a GPU. Runs the program and prints
# the tool's summary lines (1 error for the canary, else 0), so the stage's parsing and pass rule run.
import subprocess, sys
with_value = {"--tool", "--kernel-regex", "--kernel-name", "--launch-timeout", "--print-limit", "--error-exitcode"}
args, tool, i = sys.argv[1:], "memcheck", 0
while i < len(args) and args[i].startswith("--"):
    if args[i] == "--tool":
        tool = args[i + 1]
    i += 2 if args[i] in with_value else 1
print(f"========= COMPUTE-SANITIZER (dry-run stand-in, tool {tool})", flush=True)
rc = subprocess.call(args[i:])
errors = 1 if any("canary" in a for a in args[i:]) else 0
if tool == "racecheck":
    print(f"========= RACECHECK SUMMARY: 0 hazards displayed ({errors} errors, 0 warnings)")
print(f"========= ERROR SUMMARY: {errors} error{'s' if errors != 1 else ''}")
sys.exit(99 if errors else rc)
"""


def _sanitizer(ctx: Context) -> str | None:
    if ctx.dry_run:
        path = ctx.work / "fake-compute-sanitizer.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_SANITIZER)
        return f"{ctx.python}\0{path}"
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and os.path.exists(candidate):
            return candidate
    facts = ctx.facts()
    top = facts.get("nvcc_top")
    if top and os.path.exists(os.path.join(top, "bin", "compute-sanitizer")):
        return os.path.join(top, "bin", "compute-sanitizer")
    return None


def sanitizer_command(ctx: Context, tool: str, program: list[str]) -> list[str]:
    tool_path = _sanitizer(ctx) or "compute-sanitizer"
    # Only clipfast's kernels are instrumented (--kernel-regex); GPU_CHECK_KERNEL_FILTER=none checks
    # every kernel instead (slower: for when the canary shows the filter matching nothing).
    # --launch-timeout: how long the tool waits for the program to start (Python + torch + CUDA); no
    # leak check: torch's caching allocator never frees at exit (and it is off here anyway).
    kernels = [] if os.environ.get("GPU_CHECK_KERNEL_FILTER") == "none" else [
        "--kernel-regex", f"kns={kernel_regex(ctx.repo)}"]
    return [*tool_path.split("\0"), "--tool", tool, *kernels, "--launch-timeout", "120", "--print-limit", "50",
            "--error-exitcode", "99", *program]


def build_keep(ctx: Context, stamp: str) -> str | None:
    marker = ctx.work / "build.stamp"
    built = list((ctx.repo / "clipfast").glob("_C*.so"))
    if built and marker.exists() and marker.read_text().strip() == stamp:
        return f"the build of these sources is there ({built[0].name}, stamp {stamp})"
    return None


def wheels_keep(ctx: Context, stamp: str) -> str | None:
    marker = ctx.work / "wheels.stamp"
    if ctx.site.is_dir() and marker.exists() and marker.read_text().strip() == stamp:
        return f"these wheels are installed in {ctx.site.relative_to(ctx.repo)} (stamp {stamp})"
    return None


def stages(ctx: Context) -> list[Stage]:
    """The plan, in order of verified value. GPU estimates: reasoned from this CPU's timings and the
    H200's rates (KINDS.md), not measured; the first call's stages.csv replaces them with readings."""
    py, dry = ctx.python, ctx.dry_run
    files = op_test_files(ctx.repo)
    facts = ctx.facts()
    arch = facts.get("capability") or "9.0"
    workers = 4 if (not dry and str(facts.get("xdist", "missing")).split(" ")[0] not in ("missing", "")) else 0
    wheel_dir = ctx.repo / ".gpu-wheels"
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    wheel_stamp = hashlib.sha256(b"".join(w.name.encode() for w in wheels)).hexdigest()[:16]
    build_env = dict(CLIPFAST_CUDA="0" if dry else "1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS="2" if dry else "16")
    stamp = source_stamp(ctx.repo, str(facts.get("torch")), facts.get("python", ""), json.dumps(build_env))
    verify_build = [py, "-c", "import json, sys, torch; from clipfast.ops import backends, extension; "
                    "assert extension.loaded(), 'clipfast._C did not load'; "
                    "info = backends.BUILD_INFO; print(json.dumps(info)); "
                    "sys.exit(0 if sys.argv[1] == '0' or 'cuda' in info['compiled_backends'] else "
                    "'clipfast._C was built without CUDA')", "0" if dry else "1"]
    canary = ctx.work / "canary.py"
    gpu_only = "not huge"  # tests that need tens of GB on the GPU (test_region_topk: 2^31 entries) run last

    def junit(name: str) -> Path:
        return ctx.work / f"junit-{name}.xml"

    def write_stamp(name: str, value: str) -> Callable[[Result], None]:
        return lambda result: (ctx.work / name).write_text(value)

    def write_canary() -> list[str]:
        canary.parent.mkdir(parents=True, exist_ok=True)
        canary.write_text(CANARY_SCRIPT)
        return [py, str(canary)]

    if dry:  # CPU stand-ins: C++ backends for CUDA, Triton's interpreter, quick sizes, tiny models
        cuda_sel = pytest_command(ctx, "cuda_tests", ["tests/test_region_topk.py", "tests/test_op_dispatch.py"],
                                  "not gpu and not triton", None)
        triton_sel = pytest_command(ctx, "triton_tests", ["tests/test_region_topk.py"], "triton", None)
        memcheck_sel = pytest_command(ctx, "memcheck", ["tests/test_region_topk.py"], "not gpu and not triton",
                                      SANITIZER_EXCLUDE)
        racecheck_sel = pytest_command(ctx, "racecheck", ["tests/test_mask_crop.py"], "not gpu and not triton",
                                       "edge or identity")
        floors = dict(cuda_tests=20, triton_tests=10, memcheck=10, racecheck=2)
        ops_args = ["--quick", "--suite", "ops", "--ops", "region_topk", "mask_pool", "--min-run-time", "0.05"]
        smoke_args = ["--full", "--suite", "pipeline", "--stages", "scan", "repair", "--models", "clipfast-tiny",
                      "--probe", "32", "--regions", "4", "--repair-steps", "6", "--scan-variants", "reference",
                      "fast crop"]
        big_args = ["--full", "--suite", "pipeline", "--stages", "scan", "repair", "--models", "clipfast-tiny",
                    "--probe", "64", "--regions", "8", "--repair-steps", "10"]
        defend_args = ["--quick", "--suite", "pipeline", "--stages", "defend", "--probe", "500"]
        capacity_args = ["--full", "--suite", "pipeline", "--stages", "capacity", "--capacity-models",
                         "clipfast-tiny"]
        est = dict(env=30, wheels=30, build=560, cuda_tests=40, triton_tests=60, bench_ops=60, pipeline_smoke=60,
                   memcheck=40, racecheck=25, huge_tests=5, pipeline_vitl=130, defend=600, capacity=60)
        box = dict(env=60, wheels=120, build=900, cuda_tests=240, triton_tests=300, bench_ops=240,
                   pipeline_smoke=240, memcheck=240, racecheck=240, huge_tests=60, pipeline_vitl=300, defend=600,
                   capacity=240)
        basis = {k: "this 2-core CPU, measured in dry runs (defend: the demo model's training alone "
                    "outlasts its box here when the model is not cached)" if k == "defend" else
                 "this 2-core CPU, measured in dry runs" for k in est}
    else:
        cuda_sel = pytest_command(ctx, "cuda_tests", files, f"gpu and not triton and {gpu_only}", None, workers)
        triton_sel = pytest_command(ctx, "triton_tests", files, f"triton and {gpu_only}", None, workers)
        memcheck_sel = pytest_command(ctx, "memcheck", files, "gpu or triton", SANITIZER_EXCLUDE)
        racecheck_sel = pytest_command(ctx, "racecheck", files, "gpu and not triton", SANITIZER_EXCLUDE)
        floors = dict(cuda_tests=EXPECTED["cuda_tests"], triton_tests=EXPECTED["triton_tests"],
                      memcheck=EXPECTED["memcheck"], racecheck=EXPECTED["racecheck"])
        ops_args = ["--full", "--suite", "ops", "--min-run-time", "0.5"]
        smoke_args = ["--full", "--suite", "pipeline", "--stages", "scan", "repair", "--models", "ViT-B-16",
                      "--probe", "256", "--regions", "16", "--repair-steps", "20"]
        big_args = ["--full", "--suite", "pipeline", "--stages", "scan", "repair", "--models", "ViT-L-14",
                    "--probe", "256", "--regions", "16", "32", "--repair-steps", "20"]
        defend_args = ["--quick", "--suite", "pipeline", "--stages", "defend", "--probe", "5000"]
        capacity_args = ["--full", "--suite", "pipeline", "--stages", "capacity"]
        est, box, basis = dict(GPU_ESTIMATE), dict(GPU_BOX), dict(GPU_BASIS)

    sanitizer_env = dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every allocation its own: no hidden overruns
    plan = [
        Stage("env", "facts: GPU, driver, versions, nvcc root, compute-sanitizer, commit (env.txt)",
              est["env"], box["env"], basis["env"], rerun=True,
              commands=[[py, "-c", FACTS_SCRIPT, str(ctx.facts_path), "0" if dry else "1"]]),
        Stage("wheels", "install the carried wheels (.gpu-wheels) and import open_clip and segment_anything",
              est["wheels"], box["wheels"], basis["wheels"],
              commands=[[py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                         "--upgrade", "--target", str(ctx.site), *map(str, wheels)] if wheels else
                        [py, "-c", f"raise SystemExit('no wheels in {wheel_dir}: copy /work/shared/wheels/*.whl there "
                                   "and name .gpu-wheels in the device call carry list')"],
                        [py, "-c", "import open_clip, segment_anything, ftfy; "
                                   "print('open_clip', open_clip.__version__, open_clip.__file__); "
                                   "print('segment_anything', segment_anything.__file__)"]],
              keep=lambda: wheels_keep(ctx, wheel_stamp) if wheels else None,
              after=write_stamp("wheels.stamp", wheel_stamp)),
        Stage("build", "build clipfast._C in place (" + ("CPU kernels only" if dry else
                                                         f"CUDA kernels for sm_{arch.replace('.', '')} and the CPU "
                                                         "ones") + "), then import it",
              est["build"], box["build"], basis["build"], needs=("env",),
              commands=[[py, "setup.py", "-q", "build_ext", "--inplace"], verify_build], env=build_env,
              keep=lambda: build_keep(ctx, stamp), after=write_stamp("build.stamp", stamp)),
        Stage("cuda_tests", "op tests of the CUDA backend (every gpu-marked case, opcheck included)",
              est["cuda_tests"], box["cuda_tests"], basis["cuda_tests"], needs=("build",), commands=[cuda_sel],
              check="pytest", floor=floors["cuda_tests"], junit=junit("cuda_tests")),
        Stage("triton_tests", "every Triton op test on the GPU (fullgraph compile and tf32x3 included)",
              est["triton_tests"], box["triton_tests"], basis["triton_tests"], needs=("build",), commands=[triton_sel],
              check="pytest", floor=floors["triton_tests"], junit=junit("triton_tests")),
        Stage("bench_ops", "op benchmarks: every backend vs the reference, rooflines (ops.csv)", est["bench_ops"],
              box["bench_ops"], basis["bench_ops"], needs=("build", "wheels"),
              commands=[bench_command(ctx, *ops_args)]),
        Stage("pipeline_smoke", "pipeline at small size: ViT-B-16 scan (256 images x 16 regions), repair steps",
              est["pipeline_smoke"], box["pipeline_smoke"], basis["pipeline_smoke"], needs=("build", "wheels"),
              commands=[bench_command(ctx, *smoke_args)]),
        Stage("memcheck", "compute-sanitizer memcheck on clipfast's CUDA and Triton kernels (planted canary first)",
              est["memcheck"], box["memcheck"], basis["memcheck"], needs=("build",),
              commands=[sanitizer_command(ctx, "memcheck", write_canary()),
                        sanitizer_command(ctx, "memcheck", memcheck_sel)],
              env=sanitizer_env, check="canary+sanitizer", floor=floors["memcheck"], junit=junit("memcheck")),
        Stage("racecheck", "compute-sanitizer racecheck on the CUDA kernels (mask_crop's shared box included)",
              est["racecheck"], box["racecheck"], basis["racecheck"], needs=("build",),
              commands=[sanitizer_command(ctx, "racecheck", racecheck_sel)], env=sanitizer_env, check="sanitizer",
              floor=floors["racecheck"], junit=junit("racecheck")),
        Stage("huge_tests", "GPU tests at tens of GB: region_topk near 2^31 entries (int32 wraps)",
              est["huge_tests"], box["huge_tests"], basis["huge_tests"],
              needs=("build",), commands=[pytest_command(ctx, "huge_tests", files, "huge", None)] if not dry else
              [[py, "-c", "print('dry run: the huge tests need a GPU with >40 GB')"]],
              check="rc" if dry else "pytest", floor=0 if dry else EXPECTED["huge_tests"],
              junit=None if dry else junit("huge_tests")),
        Stage("pipeline_vitl", "pipeline: ViT-L-14 scans (16 and 32 regions) and repair steps", est["pipeline_vitl"],
              box["pipeline_vitl"], basis["pipeline_vitl"], needs=("pipeline_smoke",),
              commands=[bench_command(ctx, *big_args)]),
        Stage("defend", "defend end to end on the demo world, reference vs fast, and the CleanCLIP baseline",
              est["defend"], box["defend"], basis["defend"], needs=("pipeline_smoke",),
              commands=[bench_command(ctx, *defend_args)]),
        Stage("capacity", "ViT-L/H/bigG scan + one repair epoch on one GPU (each model a row, no checkpoint)",
              est["capacity"], box["capacity"], basis["capacity"], needs=("build", "wheels"),
              commands=[bench_command(ctx, *capacity_args)]),
    ]
    for stage in plan:
        stage.allow_skips = dry  # no GPU: the gpu cases skip; the stage still checks counts and failures
    return plan


# The GPU plan's numbers. Estimates are reasoned, not measured (no GPU has run this yet): CPU timings
# of the same work here, scaled by what the H200 does (KINDS.md: ~4.3 TB/s copies, ~790 TFLOP/s bf16),
# plus process start-up (~5 s per python with torch) and Triton/torch.compile compile times.
GPU_ESTIMATE = dict(env=10, wheels=10, build=120, cuda_tests=70, triton_tests=150, bench_ops=75, pipeline_smoke=120,
                    memcheck=100, racecheck=60, huge_tests=40, pipeline_vitl=240, defend=300, capacity=420)
GPU_BOX = dict(env=60, wheels=60, build=300, cuda_tests=180, triton_tests=300, bench_ops=150, pipeline_smoke=240,
               memcheck=240, racecheck=200, huge_tests=120, pipeline_vitl=420, defend=540, capacity=560)
GPU_BASIS = dict(
    env="nvidia-smi, one python importing torch/triton (~5 s), nvcc --dryrun",
    wheels="pip --no-index of 4 pure-Python wheels (~3 s) + importing open_clip (~4 s)",
    build="4 .cu + 5 glue .cpp + 5 .cpp for one arch with 16 jobs: the slowest file ~60-90 s (torch headers); "
          "here 13 files take ~12 min on 2 cores",
    cuda_tests="~150 cases: ~25 s of torch/pytest start + gradcheck/opcheck/aot_eager compiles (~1-5 s each), "
               "4 xdist workers",
    triton_tests="~130 cases, ~40 distinct Triton compiles of 1-3 s each + inductor fullgraph compiles, "
                 "4 xdist workers",
    bench_ops="copy/matmul rooflines (~3 s), ~14 variants x (warm-up + 0.5 s) + torch.compile of region_score "
              "(~20 s) + the reference mask_crop at B=256 (~10 s)",
    pipeline_smoke="ViT-B-16: load + 5 scans of 256 images x 17 inputs (fp32 reference ~4 s) + repair "
                   "reference and compiled fast (compile ~45 s)",
    memcheck="canary (~15 s) + ~250 small cuda/triton cases at 2-10x under memcheck with every allocation "
             "a cudaMalloc",
    racecheck="~80 small CUDA cases; racecheck instruments the shared-memory accesses of 4 kernels only",
    huge_tests="region_topk at 2^31 - 1 entries: ~40 GB of inputs and keys, a few passes at ~3 TB/s",
    pipeline_vitl="ViT-L-14: 2 x 5 scans of 256 images x 17/33 inputs (fp32 reference ~25 s each) + repair "
                  "compile (~60 s)",
    defend="the demo model trained from scratch (2000 tiny steps, ~60 s) + defend x2 + 500 baseline steps",
    capacity="ViT-L/H/bigG: load (random init of 2.5 B params ~60 s), scan 64 images, 8 steps with "
             "activation checkpointing; bigG alone ~3 min",
)
# Passed tests at least (the counts collected here for the GPU selections; tests are only added).
# Collected here for the four op files + dispatch + extension (test_region_patches.py and new tests
# come on top); the four multigpu tests skip on one GPU (exempt).
EXPECTED = dict(cuda_tests=132, triton_tests=138, memcheck=230, racecheck=119, huge_tests=2)


# ------------------------------------------------------------------------------------------ running

class Out:
    """$OUT: the files that come back. Only OUT_FILES are written there; the log is capped."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.log_path = path / "gpu_check.log"
        self._log = self.log_path.open("ab")
        self._lock = threading.Lock()
        self._size = self.log_path.stat().st_size

    def log(self, line: str) -> None:
        data = (line if line.endswith("\n") else line + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._size >= LOG_CAP_BYTES:
                return
            self._size += len(data)
            if self._size >= LOG_CAP_BYTES:
                data += f"... log capped at {LOG_CAP_BYTES} bytes: the rest is in {WORK_NAME}/logs\n".encode()
            self._log.write(data)
            self._log.flush()

    def write(self, name: str, text: str) -> None:
        """Replace one $OUT file at once (a temporary name, then rename)."""
        assert name in OUT_FILES, name
        temporary = self.path / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, self.path / name)

    def close(self) -> None:
        self._log.close()


def run_command(command: list[str], env: dict, cwd: Path, timeout: float, out: Out, stage_log) -> tuple[int, bool]:
    """Run one command in its own process group, its output line by line into the stage log and
    $OUT's log; at the timeout, SIGTERM to the group, then SIGKILL. Returns (exit code, timed out)."""
    out.log(f"$ {shlex.join(command)[:2000]}")
    # Its own process group (killable as a whole) in the same session: if the device tool ends this
    # call, it ends the children too (a new session would outlive the call).
    group = dict(process_group=0) if sys.version_info >= (3, 11) else dict(preexec_fn=os.setpgrp)
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, **group)
    except OSError as error:  # e.g. compute-sanitizer missing: the stage fails, the check goes on
        message = f"cannot start {command[0]}: {error}\n"
        stage_log.write(message)
        out.log(message)
        return 127, False

    def pump():
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            stage_log.write(line)
            stage_log.flush()
            out.log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return process.returncode if process.returncode is not None else -9, timed_out


EXEMPT_SKIPS = ("needs two CUDA GPUs",)  # the multigpu tests on a one-GPU machine


def junit_counts(path: Path) -> dict | None:
    """tests, failures, errors, skipped, passed summed over a junit XML's test suites, and the skip
    messages not in EXEMPT_SKIPS (`unexpected_skips`)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    messages = [skip.get("message", "") for suite in suites for skip in suite.iter("skipped")]
    counts["unexpected_skips"] = [m for m in messages if not any(e in m for e in EXEMPT_SKIPS)]
    return counts


SUMMARY_RE = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACE_RE = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def sanitizer_summary(text: str) -> tuple[int | None, str]:
    """(errors reported, detail) from compute-sanitizer's output; None when it printed no summary."""
    errors = [int(n) for n in SUMMARY_RE.findall(text)]
    races = RACE_RE.findall(text)
    detail = f"{len(errors)} summaries, errors {errors}" + (f"; racecheck {races}" if races else "")
    if not errors and not races:
        return None, "no ERROR SUMMARY line: the tool did not finish"
    return sum(errors) + sum(int(r[1]) for r in races), detail


def decide(stage: Stage, result: Result, rcs: list[int], outputs: list[str]) -> None:
    """Set result.result/detail from the commands' exit codes, junit counts and sanitizer summaries."""
    if stage.check == "rc":
        bad = [rc for rc in rcs if rc != 0]
        result.result = "failed" if bad or len(rcs) < len(stage.commands) else "passed"
        result.detail = f"exit codes {rcs}" if bad else result.detail
        return
    problems = []
    rcs_tests = rcs
    if stage.check == "canary+sanitizer":
        canary_errors, canary_detail = sanitizer_summary(outputs[0]) if outputs else (None, "not run")
        if not canary_errors:
            problems.append(f"the planted out-of-bounds read was not reported ({canary_detail}): a zero-error run "
                            "proves nothing")
        rcs_tests, outputs = rcs[1:], outputs[1:]
    if stage.check in ("sanitizer", "canary+sanitizer"):
        errors, detail = sanitizer_summary(outputs[0]) if outputs else (None, "not run")
        if errors is None or errors > 0:
            problems.append(f"sanitizer: {detail}")
        else:
            result.detail = f"sanitizer: 0 errors ({detail})"
    counts = junit_counts(stage.junit) if stage.junit else None
    if counts is None:
        problems.append("no junit XML (pytest did not finish)")
    else:
        result.passed, result.failed = counts["passed"], counts["failures"]
        result.skipped, result.errors = counts["skipped"], counts["errors"]
        result.expected = f">={stage.floor}"
        if counts["failures"] or counts["errors"]:
            problems.append(f"{counts['failures']} failed, {counts['errors']} errors")
        if counts["unexpected_skips"] and not stage.allow_skips:
            problems.append(f"{len(counts['unexpected_skips'])} skipped (first: {counts['unexpected_skips'][0][:120]})")
        if counts["passed"] < max(1, stage.floor):
            problems.append(f"only {counts['passed']} passed, expected at least {max(1, stage.floor)}")
    if any(rc != 0 for rc in rcs_tests):
        problems.append(f"pytest exit code {rcs_tests}")
    result.result = "failed" if problems else "passed"
    if problems:
        result.detail = "; ".join(problems)


class Check:
    """Runs a plan: budget, boxes, skip rules, $OUT streaming, state for --resume."""

    def __init__(self, ctx: Context, planner: Callable[[Context], list[Stage]], selected: set[str] | None,
                 resume: bool, echo: Callable[[str], None] = print):
        self.ctx, self.planner, self.resume, self.echo = ctx, planner, resume, echo
        self.plan = planner(ctx)
        self.start = time.monotonic()
        self.deadline = self.start + ctx.budget
        self.out = Out(ctx.out)
        self.results = {stage.name: Result(stage.name) for stage in self.plan}
        self.selected = set(selected or ())
        self.wanted = self._closure(selected) if selected else {stage.name for stage in self.plan}
        self.state = self._load_state()
        self._ran: set[str] = set()  # stages this call ran (their state records are this call's)
        ctx.logs.mkdir(parents=True, exist_ok=True)

    def _closure(self, selected: set[str]) -> set[str]:
        by_name = {stage.name: stage for stage in self.plan}
        unknown = selected - set(by_name)
        if unknown:
            raise SystemExit(f"unknown stages {sorted(unknown)}; stages: {', '.join(by_name)}")
        wanted, todo = set(), list(selected)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo += by_name[name].needs
        return wanted

    def _load_state(self) -> dict:
        try:
            return json.loads(self.ctx.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        self.ctx.work.mkdir(parents=True, exist_ok=True)
        for name, result in self.results.items():
            if name not in self._ran:
                continue  # not run in this call: an earlier call's record stands
            if result.result in ("passed", "failed", "timeout", "kept"):
                self.state[name] = dict(result=result.result, seconds=round(result.seconds, 1), detail=result.detail,
                                        at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.ctx.state_path.write_text(json.dumps(self.state, indent=1))

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write_table(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        by_name = {stage.name: stage for stage in self.plan}
        for name, result in self.results.items():
            stage = by_name[name]
            writer.writerow(dict(stage=name, result=result.result, seconds=f"{result.seconds:.1f}",
                                 box_s=f"{stage.box:.0f}", estimate_s=f"{stage.estimate:.0f}", passed=result.passed,
                                 failed=result.failed, skipped=result.skipped, errors=result.errors,
                                 expected=result.expected, detail=result.detail[:400]))
        self.out.write("stages.csv", buffer.getvalue())

    def merge_junit(self) -> None:
        suites = ET.Element("testsuites")
        for stage in self.plan:
            if stage.junit and stage.junit.exists() and self.results[stage.name].result not in ("pending", "kept"):
                try:
                    root = ET.parse(stage.junit).getroot()
                except ET.ParseError:
                    continue
                for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
                    suite.set("name", stage.name)
                    suites.append(suite)
        self.out.write("junit.xml", ET.tostring(suites, encoding="unicode"))

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.0f}s] {text}"
        self.echo(line)
        self.out.log(f"=== {line}")

    def run(self) -> dict[str, Result]:
        facts_line = f"gpu_check: {'DRY RUN on this CPU' if self.ctx.dry_run else 'GPU'}; " \
                     f"budget {self.ctx.budget:.0f} s; " \
                     f"repo {self.ctx.repo}; out {self.ctx.out}; commit {commit(self.ctx.repo)}"
        self.say(facts_line)
        for stage in self.plan:
            if stage.name not in self.wanted:
                self.results[stage.name].result = "not selected"
        self.write_table()
        for index in range(len(self.plan)):
            stage = self.plan[index]
            if stage.name in self.wanted:
                try:
                    self._run_stage(stage)
                except Exception as error:  # noqa: BLE001 - a bug here must not cost the other stages
                    result = self.results[stage.name]
                    result.result, result.detail = "failed", f"gpu_check error: {type(error).__name__}: {error}"
                    self.say(f"{stage.name}: {result.detail}")
                self.write_table()
                self._save_state()
                if stage.name == "env":  # the facts (GPU arch, versions, xdist) shape the later commands
                    self.plan = self.planner(self.ctx)
        self.out.close()
        return self.results

    def _run_stage(self, stage: Stage) -> None:
        result = self.results[stage.name]
        missing = [need for need in stage.needs if not self.results[need].ok]
        if missing:
            result.result = "skipped"
            result.detail = "needs " + ", ".join(f"{n} ({self.results[n].result})" for n in missing)
            self.say(f"{stage.name}: skipped: {result.detail}")
            return
        earlier = self.state.get(stage.name, {})
        if self.resume and not stage.rerun and stage.name not in self.selected:
            # Continue where an earlier call stopped: what passed is kept, what failed is not rerun (a
            # deterministic failure would only cost the budget again; --stages NAME reruns it).
            if earlier.get("result") in ("passed", "kept") and stage.keep is None:
                result.result, result.detail = "kept", f"passed in an earlier call at {earlier.get('at')}"
                self.say(f"{stage.name}: kept ({result.detail})")
                return
            if earlier.get("result") == "failed":
                result.result = "failed"
                result.detail = (f"failed in an earlier call at {earlier.get('at')}, not rerun (--stages "
                                 f"{stage.name} reruns it): {earlier.get('detail', '')}")[:400]
                result.seconds = 0.0
                self.say(f"{stage.name}: {result.detail}")
                return
        kept = stage.keep() if stage.keep else None  # still valid: only the checks after the work run
        commands = stage.commands[1:] if kept else stage.commands
        estimate = min(stage.estimate, KEPT_ESTIMATE_S) if kept else stage.estimate
        remaining = self.deadline - time.monotonic() - RESERVE_S
        if estimate > remaining:
            result.result = "skipped"
            result.detail = f"no time: needs ~{estimate:.0f} s, {max(0, remaining):.0f} s of the budget left"
            self.say(f"{stage.name}: skipped: {result.detail}")
            return
        box = min(stage.box, remaining)
        result.result = "running"
        self._ran.add(stage.name)
        self.write_table()
        self.say(f"{stage.name}: running (box {box:.0f} s, estimate {stage.estimate:.0f} s): {stage.what}"
                 + (f"; kept: {kept}" if kept else ""))
        env = self.ctx.base_env() | stage.env
        started, rcs, outputs, timed_out = time.monotonic(), [], [], False
        log_path = self.ctx.logs / f"{stage.name}.log"
        with log_path.open("w") as stage_log:
            for command in commands:
                left = box - (time.monotonic() - started)
                if left <= 0:
                    timed_out = True
                    break
                mark = stage_log.tell()
                rc, timed_out = run_command(command, env, self.ctx.repo, left, self.out, stage_log)
                rcs.append(rc)
                stage_log.flush()
                with log_path.open() as reread:
                    reread.seek(mark)
                    outputs.append(reread.read())
                if timed_out or (rc != 0 and stage.check == "rc"):
                    break
        result.seconds = time.monotonic() - started
        if kept and not timed_out:
            rcs = [0] + rcs  # the skipped work counts as done
        if timed_out:
            result.result = "timeout"
            result.detail = f"killed at its time box of {box:.0f} s" + (
                " (the budget's end)" if box < stage.box else "")
            counts = junit_counts(stage.junit) if stage.junit else None
            if counts:
                result.passed, result.failed, result.skipped = counts["passed"], counts["failures"], counts["skipped"]
        else:
            decide(stage, result, rcs, outputs)
        if kept and result.result == "passed":
            result.result, result.detail = "kept", kept
        if result.result == "passed" and stage.after:
            stage.after(result)
        if stage.junit:
            self.merge_junit()
        if stage.name == "env" and self.ctx.facts_path.exists():
            self.out.write("env.txt", self.ctx.facts_path.read_text())
        self.say(f"{stage.name}: {result.result} in {result.seconds:.0f} s"
                 + (f": {result.detail}" if result.detail else ""))
        if result.result in ("failed", "timeout"):
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            self.echo("    | " + "\n    | ".join(line[:200] for line in tail))


def summary_table(plan: list[Stage], results: dict[str, Result]) -> str:
    lines = [f"{'stage':15s} {'result':12s} {'s':>5s} {'box':>4s} {'est':>4s} {'pass':>5s} {'fail':>4s} "
             f"{'skip':>4s}  detail"]
    for stage in plan:
        r = results[stage.name]
        lines.append(f"{stage.name:15s} {r.result:12s} {r.seconds:5.0f} {stage.box:4.0f} {stage.estimate:4.0f} "
                      f"{str(r.passed):>5s} {str(r.failed):>4s} {str(r.skipped):>4s}  {r.detail[:90]}")
    return "\n".join(lines)


def plan_table(plan: list[Stage]) -> str:
    lines = ["| stage | needs | box (s) | estimate (s) | what | estimate from |", "|---|---|---|---|---|---|"]
    for s in plan:
        lines.append(f"| {s.name} | {', '.join(s.needs) or '-'} | {s.box:.0f} | {s.estimate:.0f} | {s.what} "
                     f"| {s.basis} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ dry run

def copy_tree(source: Path, target: Path, carry: list[Path]) -> None:
    """What the device tool sends: tracked and untracked-not-ignored files (overwritten in place, so
    ignored build outputs already in `target` stay, as on a warm machine), plus carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source,
                            capture_output=True, check=True).stdout.split(b"\0")
    for raw in filter(None, listed):
        relative = raw.decode()
        src = source / relative
        if src.is_file():
            dst = target / relative
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for path in carry:
        if path.exists():
            dst = target / path.name
            if path.is_dir():
                shutil.copytree(path, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(path, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 570)),
                        help="seconds this call may take in all (default $GPU_CHECK_BUDGET or 570)")
    parser.add_argument("--stages", nargs="+", default=os.environ.get("GPU_CHECK_STAGES", "").split() or None,
                        help="only these stages (and what they need); default all (or $GPU_CHECK_STAGES)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the stages an earlier call on this machine passed (.gpu-check/state.json)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else .gpu-check/out)")
    parser.add_argument("--python", default=None, help="the python that runs the stages (default: python3 on "
                        "the GPU; this checkout's .venv in a dry run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on this CPU: a copy of the tree, CPU build, Triton interpreter, quick sizes, a stand-in "
                             "sanitizer")
    parser.add_argument("--dry-run-dir", type=Path, default=Path("/tmp/clipfast-gpu-check-dry"),
                        help="dry run: where the copy of the tree (tree/) and $OUT (out/) live")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="dry run: wheels to carry as .gpu-wheels (default: the checkout's .gpu-wheels, else "
                             "../shared/wheels)")
    parser.add_argument("--list", action="store_true", help="print the stage table and exit")
    args = parser.parse_args(argv)

    repo = REPO
    if args.dry_run:
        os.environ.setdefault("CLIPFAST_COMMIT", commit(REPO))  # as the device command sets it (no .git there)
        tree = args.dry_run_dir / "tree"
        wheels = args.wheels or next((p for p in (REPO / ".gpu-wheels", REPO.parent / "shared" / "wheels")
                                      if p.is_dir()), None)
        if not args.list:
            tree.mkdir(parents=True, exist_ok=True)
            copy_tree(REPO, tree, [])
            if wheels:
                shutil.copytree(wheels, tree / ".gpu-wheels", dirs_exist_ok=True)
        repo = tree
        python = args.python or next((str(p) for p in (REPO / ".venv" / "bin" / "python",) if p.exists()),
                                     sys.executable)
        out = args.out or args.dry_run_dir / "out"
    else:
        python = args.python or shutil.which("python3") or sys.executable
        out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else repo / WORK_NAME / "out")
    if not args.list and out.exists() and (args.dry_run or out == repo / WORK_NAME / "out"):
        shutil.rmtree(out)  # as the device tool empties $OUT before each command
    ctx = Context(repo, out, python, args.dry_run, args.budget)
    if args.list:
        print(plan_table(stages(ctx)))
        return 0
    check = Check(ctx, stages, set(args.stages) if args.stages else None, args.resume)
    results = check.run()
    print("\n" + summary_table(check.plan, results), flush=True)
    bad = [name for name, r in results.items() if r.result in ("failed", "timeout")]
    print(f"\n{'FAILED: ' + ', '.join(bad) if bad else 'no stage failed'}; results in {out} "
          f"({', '.join(sorted(p.name for p in out.iterdir()))})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
