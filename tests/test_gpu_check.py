"""scripts/gpu_check.py, the one-call GPU check, without a GPU: its stage logic on fake stages (order,
skip rules, time boxes, the budget, $OUT streaming within the device tool's limits, resume, what a
run cut off mid-stage leaves), its pass rules (junit counts, sanitizer summaries, the canary), the
shape of the real GPU plan, and conftest's CLIPFAST_REQUIRE_GPU. Seconds in all; the full dry run
(minutes: a CPU build) is marked slow."""

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check
_spec.loader.exec_module(gpu_check)
Stage = gpu_check.Stage


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def make_context(tmp_path, budget=60.0, dry_run=True):
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    return gpu_check.Context(repo, tmp_path / "out", sys.executable, dry_run, budget)


def run_plan(ctx, plan, selected=None, resume=False):
    lines = []
    check = gpu_check.Check(ctx, lambda _: plan, selected, resume, echo=lines.append)
    return check.run(), lines


def assert_out_within_device_limits(out: Path):
    """At most 8 files, flat, plain names, each under 16 MiB, and only the ones the script names."""
    entries = list(out.iterdir())
    assert len(entries) <= gpu_check.OUT_LIMIT_FILES, entries
    for entry in entries:
        assert entry.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", entry.name), entry
        assert entry.name in gpu_check.OUT_FILES, entry.name
        assert entry.stat().st_size < gpu_check.OUT_LIMIT_BYTES


def stage_rows(out: Path) -> dict[str, dict]:
    with (out / "stages.csv").open() as handle:
        return {row["stage"]: row for row in csv.DictReader(handle)}


def test_stages_run_in_order_with_skip_rules_boxes_and_streamed_results(tmp_path):
    ctx = make_context(tmp_path, budget=60)
    plan = [
        Stage("a", "prints", 1, 10, "-", commands=[py("print('hello from a')")]),
        Stage("b", "fails", 1, 10, "-", needs=("a",), commands=[py("import sys; print('b is sad'); sys.exit(3)")]),
        Stage("c", "needs b", 1, 10, "-", needs=("b",), commands=[py("print('never')")]),
        Stage("d", "outlives its box", 1, 1, "-", commands=[py("import time; print('d starts', flush=True); "
                                                                "time.sleep(30)")]),
        Stage("e", "too long for the budget", 1000, 2000, "-", commands=[py("print('never')")]),
        Stage("f", "after all that", 1, 10, "-", needs=("a",), commands=[py("print('f ran')")]),
        Stage("g", "a tool that is not there", 1, 10, "-", commands=[["/nonexistent/compute-sanitizer"]]),
    ]
    start = time.monotonic()
    results, lines = run_plan(ctx, plan)
    assert time.monotonic() - start < 20  # d was killed at its 1 s box
    assert {name: r.result for name, r in results.items()} == dict(
        a="passed", b="failed", c="skipped", d="timeout", e="skipped", f="passed", g="failed")
    assert results["g"].detail == "exit codes [127]"
    assert results["c"].detail == "needs b (failed)"
    assert results["d"].detail == "killed at its time box of 1 s"
    assert results["e"].detail.startswith("no time: needs ~1000 s")
    assert results["b"].detail == "exit codes [3]"
    rows = stage_rows(ctx.out)
    assert list(rows) == list("abcdefg") and rows["d"]["result"] == "timeout" and rows["d"]["box_s"] == "1"
    log = (ctx.out / "gpu_check.log").read_text()
    assert log.index("hello from a") < log.index("b is sad") < log.index("d starts") < log.index("f ran")
    assert "never" not in log.replace("print('never')", "")
    assert any("| b is sad" in line for line in lines)  # a failed stage's tail goes to stdout
    assert json.loads(ctx.state_path.read_text())["a"]["result"] == "passed"
    assert_out_within_device_limits(ctx.out)


def test_a_stage_is_cut_at_the_end_of_the_budget(tmp_path):
    ctx = make_context(tmp_path, budget=gpu_check.RESERVE_S + 1.5)
    plan = [Stage("slow", "sleeps", 0.5, 100, "-", commands=[py("import time; time.sleep(60)")])]
    results, _ = run_plan(ctx, plan)
    assert results["slow"].result == "timeout" and "(the budget's end)" in results["slow"].detail
    assert results["slow"].seconds < 10


def test_selected_stages_bring_what_they_need(tmp_path):
    ctx = make_context(tmp_path)
    plan = [Stage("a", "", 1, 10, "-", commands=[py("")]), Stage("b", "", 1, 10, "-", needs=("a",), commands=[py("")]),
            Stage("c", "", 1, 10, "-", needs=("b",), commands=[py("")]), Stage("d", "", 1, 10, "-", commands=[py("")])]
    results, _ = run_plan(ctx, plan, selected={"c"})
    assert {name: r.result for name, r in results.items()} == dict(a="passed", b="passed", c="passed",
                                                                   d="not selected")
    with pytest.raises(SystemExit, match="unknown stages"):
        run_plan(ctx, plan, selected={"nope"})


def test_resume_keeps_what_passed_and_a_kept_build_only_reverifies(tmp_path):
    ctx = make_context(tmp_path)
    flag = tmp_path / "fixed"
    marker = tmp_path / "built"

    def plan():
        return [Stage("build", "", 1, 10, "-", keep=lambda: "built already" if marker.exists() else None,
                      commands=[py(f"open({str(marker)!r}, 'w').write('x'); print('compiling')"),
                                py("print('verifying')")]),
                Stage("a", "", 1, 10, "-", commands=[py("print('a ran')")]),
                Stage("b", "", 1, 10, "-", commands=[py(f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) "
                                                        "else 1)")])]

    first, _ = run_plan(ctx, plan())
    assert [r.result for r in first.values()] == ["passed", "passed", "failed"]
    flag.write_text("")
    second, _ = run_plan(make_context(tmp_path), plan(), resume=True)  # a second call: $OUT emptied before it
    assert second["b"].result == "failed" and second["b"].detail.startswith("failed in an earlier call")
    second, _ = run_plan(make_context(tmp_path), plan(), selected={"b"}, resume=True)  # asked for: rerun
    assert {name: r.result for name, r in second.items()} == dict(build="not selected", a="not selected", b="passed")
    second, _ = run_plan(make_context(tmp_path), plan(), resume=True)
    assert {name: r.result for name, r in second.items()} == dict(build="kept", a="kept", b="kept")
    assert second["build"].detail == "built already"
    log = (ctx.out / "gpu_check.log").read_text()
    assert "verifying" in log.split("build: running")[-1] and "compiling" not in log.split("build: running")[-1]
    assert "a ran" not in log.split("kept (passed in an earlier call")[-1]


def test_a_run_cut_off_mid_stage_leaves_everything_it_had(tmp_path):
    # What the device tool returns when a command hits its limit: $OUT as it was at that moment.
    ctx = make_context(tmp_path)
    script = tmp_path / "cut.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "scripts")!r})
        import gpu_check
        py = lambda code: [sys.executable, "-c", code]
        ctx = gpu_check.Context(gpu_check.Path({str(ctx.repo)!r}), gpu_check.Path({str(ctx.out)!r}), sys.executable,
                                True, 60)
        plan = [gpu_check.Stage("first", "", 1, 10, "-", commands=[py("print('first done')")]),
                gpu_check.Stage("second", "", 1, 50, "-",
                                commands=[py("import time; print('second half way', flush=True); time.sleep(60)")]),
                gpu_check.Stage("third", "", 1, 10, "-", commands=[py("print('third')")])]
        gpu_check.Check(ctx, lambda _: plan, None, False).run()
    """))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = ctx.out / "gpu_check.log"
            if log.exists() and "second half way" in log.read_text():
                break
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # the whole call, children too, as at the tool's limit
    finally:
        process.wait()
    rows = stage_rows(ctx.out)
    assert [rows[name]["result"] for name in ("first", "second", "third")] == ["passed", "running", "pending"]
    log = (ctx.out / "gpu_check.log").read_text()
    assert "first done" in log and "second half way" in log and "third" not in log.split("second half way")[-1]
    assert_out_within_device_limits(ctx.out)


def _junit(path: Path, tests: int, failures: int = 0, errors: int = 0, skips=()) -> Path:
    cases = "".join(f'<testcase name="s{i}"><skipped message="{m}"/></testcase>' for i, m in enumerate(skips))
    path.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="{errors}" '
                    f'skipped="{len(skips)}">{cases}</testsuite></testsuites>')
    return path


def test_test_stages_pass_only_with_their_expected_count_and_nothing_skipped(tmp_path):
    def decided(tests, failures=0, errors=0, skips=(), floor=5, rc=0, allow_skips=False):
        stage = Stage("t", "", 1, 1, "-", commands=[["x"]], check="pytest", floor=floor, allow_skips=allow_skips,
                      junit=_junit(tmp_path / "j.xml", tests, failures, errors, skips))
        result = gpu_check.Result("t")
        gpu_check.decide(stage, result, [rc], [""])
        return result

    assert decided(5).result == "passed"
    assert "only 4 passed, expected at least 5" in decided(4).detail
    assert "1 failed" in decided(6, failures=1, rc=1).detail
    assert "1 skipped (first: needs a CUDA GPU)" in decided(6, skips=["needs a CUDA GPU"]).detail
    assert decided(6, skips=["needs two CUDA GPUs"]).result == "passed"  # the multigpu tests on one GPU
    assert decided(6, skips=["needs a CUDA GPU"], allow_skips=True).result == "passed"  # the dry run
    assert "pytest exit code [5]" in decided(5, rc=5).detail
    stage = Stage("t", "", 1, 1, "-", commands=[["x"]], check="pytest", floor=1, junit=tmp_path / "missing.xml")
    result = gpu_check.Result("t")
    gpu_check.decide(stage, result, [0], [""])
    assert result.result == "failed" and "no junit XML" in result.detail


def test_sanitizer_stages_need_a_zero_error_summary_and_a_caught_canary(tmp_path):
    clean = "========= ERROR SUMMARY: 0 errors\n"
    caught = "========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 1 error\n"
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n========= ERROR SUMMARY: 1 error\n"
    assert gpu_check.sanitizer_summary(clean)[0] == 0
    assert gpu_check.sanitizer_summary(caught)[0] == 1
    assert gpu_check.sanitizer_summary(race)[0] == 2
    assert gpu_check.sanitizer_summary("Killed\n")[0] is None

    def decided(check, outputs, rcs=None):
        stage = Stage("s", "", 1, 1, "-", commands=[["x"]] * len(outputs), check=check, floor=2,
                      junit=_junit(tmp_path / "j.xml", 2))
        result = gpu_check.Result("s")
        gpu_check.decide(stage, result, rcs or [0] * len(outputs), outputs)
        return result

    assert decided("canary+sanitizer", [caught, clean], [99, 0]).result == "passed"
    assert "planted out-of-bounds read was not reported" in decided("canary+sanitizer", [clean, clean]).detail
    assert "sanitizer:" in decided("sanitizer", [caught], [99]).detail
    assert "no ERROR SUMMARY" in decided("sanitizer", ["pytest output only"]).detail
    assert decided("sanitizer", [clean]).result == "passed"


def test_the_gpu_plan(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPFAST_COMMIT", raising=False)
    ctx = gpu_check.Context(REPO, tmp_path / "out", "python3", False, 570)
    plan = gpu_check.stages(ctx)
    names = [stage.name for stage in plan]
    assert names == ["env", "wheels", "build", "cuda_tests", "triton_tests", "bench_ops", "pipeline_smoke", "memcheck",
                     "racecheck", "huge_tests", "pipeline_vitl", "defend", "capacity"]
    dry = gpu_check.stages(gpu_check.Context(REPO, tmp_path / "out", "python3", True, 570))
    assert [stage.name for stage in dry] == names and all(d.needs == g.needs for d, g in zip(dry, plan))
    by = {stage.name: stage for stage in plan}
    # The first call's stages fit its default budget by their estimates; every stage fits one 10-minute call.
    first = ["env", "wheels", "build", "cuda_tests", "triton_tests", "bench_ops", "pipeline_smoke"]
    assert sum(by[n].estimate for n in first) <= 570 - gpu_check.RESERVE_S
    assert all(stage.box <= 570 and stage.estimate <= stage.box for stage in plan)
    # python3, explicit test files (no bare tests/), strict counts, the build for sm_90 with CUDA required.
    files = gpu_check.op_test_files(REPO)
    assert files[:6] == list(gpu_check.OP_TEST_FILES)
    for name in ("cuda_tests", "triton_tests", "memcheck", "racecheck", "huge_tests"):
        command = by[name].commands[-1]
        assert "python3" in command and "tests/" not in command and "--continue-on-collection-errors" in command
        assert all(f in command for f in files) and by[name].floor >= 2 and not by[name].allow_skips
    assert by["cuda_tests"].floor == gpu_check.EXPECTED["cuda_tests"]
    assert by["build"].env == dict(CLIPFAST_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="16")
    # Sanitizers: clipfast's kernels only, no leak check, no caching allocator, a launch timeout, the canary.
    for name in ("memcheck", "racecheck"):
        command = by[name].commands[-1]
        regex = command[command.index("--kernel-regex") + 1]
        assert regex.startswith("kns=clipfast|") and "_masked_pool_kernel" in regex and "_mask_crop_kernel" in regex
        assert "--leak-check" not in command and "--launch-timeout" in command
        assert by[name].env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
        assert "not gradient and not gradcheck" in command[command.index("-k") + 1]
    assert "tests/test_mask_crop.py" in by["racecheck"].commands[-1]  # its shared box: atomicMin/atomicMax
    assert by["memcheck"].check == "canary+sanitizer" and by["memcheck"].commands[0][-1].endswith("canary.py")
    # Benchmarks write straight into $OUT; the pipeline sizes are set per stage; capacity runs on its own.
    assert by["bench_ops"].commands[0][4:6] == ["--results", str(ctx.out)]
    assert "--probe" in by["pipeline_smoke"].commands[0] and by["capacity"].needs == ("build", "wheels")
    env = ctx.base_env()
    assert env["CLIPFAST_REQUIRE_GPU"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["CLIPFAST_COMMIT"] != ""
    monkeypatch.setenv("CLIPFAST_COMMIT", "abc123")
    assert ctx.base_env()["CLIPFAST_COMMIT"] == "abc123"


def test_the_conftest_makes_a_skipped_gpu_test_fail_when_a_gpu_is_required(tmp_path):
    test_file = tmp_path / "test_skips.py"
    test_file.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_gpu_skips():
            pytest.skip("no luck")

        @pytest.mark.gpu
        @pytest.mark.multigpu
        def test_two_gpus():
            pytest.skip("needs two CUDA GPUs")

        def test_plain_skip():
            pytest.skip("fine")
    """))
    # A GPU is pretended (torch.cuda.is_available), so conftest.py leaves the gpu tests to run; pytest runs
    # twice in one process (one torch import), with and without CLIPFAST_REQUIRE_GPU=1.
    code = textwrap.dedent(f"""
        import os, sys, torch, pytest
        sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO)!r}]  # conftest.py; clipfast, also when not installed
        torch.cuda.is_available = lambda: True
        args = ['-q', '-p', 'no:cacheprovider', '-p', 'conftest', '-rfs',
                '-W', 'ignore::pytest.PytestUnknownMarkWarning',
                {str(test_file)!r}]
        os.environ['CLIPFAST_REQUIRE_GPU'] = '1'
        strict = pytest.main(args)
        print('STRICT EXIT', int(strict), flush=True)
        del os.environ['CLIPFAST_REQUIRE_GPU']
        print('LENIENT EXIT', int(pytest.main(args)), flush=True)
    """)
    environment = {k: v for k, v in os.environ.items() if k != "CLIPFAST_REQUIRE_GPU"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=tmp_path,
                         timeout=300).stdout
    strict, lenient = out.split("STRICT EXIT")
    assert "1 failed, 2 skipped" in strict, out
    assert "CLIPFAST_REQUIRE_GPU=1: this GPU test skipped (Skipped: no luck)" in strict, out
    assert lenient.startswith(" 1") and "3 skipped" in lenient and "LENIENT EXIT 0" in lenient, out


@pytest.mark.dryrun
def test_the_dry_run_goes_through_every_stage(tmp_path):
    # The same script on this CPU: a copy of the tree, CPU build, interpreter tests, quick benchmarks, the
    # stand-in sanitizer; every stage but defend (its demo model, when not cached, trains for most of an hour
    # on 2 busy cores). ~8 minutes on 2 idle cores, most of it the build.
    stages = ["env", "wheels", "build", "cuda_tests", "triton_tests", "bench_ops", "pipeline_smoke", "memcheck",
              "racecheck", "huge_tests", "pipeline_vitl", "capacity"]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--budget", "1500",
                          "--dry-run-dir", str(tmp_path), "--stages", *stages], capture_output=True, text=True,
                         timeout=1800)
    rows = stage_rows(tmp_path / "out")
    assert all(rows[name]["result"] == "passed" for name in stages), out.stdout[-3000:]
    assert rows["defend"]["result"] == "not selected"
    assert rows["build"]["result"] == "passed" and rows["memcheck"]["result"] == "passed", out.stdout[-3000:]
    assert_out_within_device_limits(tmp_path / "out")
