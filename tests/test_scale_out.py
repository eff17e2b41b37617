"""Scale-out and loss-free runs, through the real command line: `clipfast defend` on 2 gloo
processes under torchrun equals the single-process run, and a run killed (SIGTERM to 2 ranks during
the scan, SIGKILL to one process during the repair, at random points) resumes to the uninterrupted
run's result."""

import io
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import POISONED_RECIPE, PROBE
from PIL import Image

from clipfast.defense.pipeline import REPAIRED_NAME, SCAN_NAME, SCAN_SHARDS_NAME, load_scan
from clipfast.defense.verdict import EXIT_NOT_REMOVED
from clipfast.eval import evaluate
from clipfast.models import load_model
from clipfast.recipes import evaluation_world

pytestmark = pytest.mark.slow

SHARD_SIZE = 256  # 12 shards: room to interrupt the scan in the middle
PER_IMAGE = ("readable", "image_label", "image_prob", "grounded", "reference_label", "discordant", "explaining_drop",
             "flip_rate", "candidate", "discrepancy", "oracle_label", "region_counts")


@pytest.fixture(scope="module")
def probe_tar(poisoned_world, tmp_path_factory) -> Path:
    """The probe set as a webdataset tar shard of PNGs (the streaming input path)."""
    _, pairs, _ = poisoned_world
    path = tmp_path_factory.mktemp("probe") / "probe-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(pairs.images[:PROBE]):
            data = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(data, format="PNG")
            member = tarfile.TarInfo(f"{i:06d}.png")
            member.size = data.tell()
            data.seek(0)
            tar.addfile(member, data)
    return path


def defend_argv(poisoned_world, probe_tar, out: Path) -> list[str]:
    return ["-m", "clipfast.cli", "defend", "--checkpoint", str(poisoned_world[2] / "model.pt"), "--probe",
            str(probe_tar), "--vocab", "world", "--no-progress", "--shard-size", str(SHARD_SIZE), "--workers", "1",
            "--device", "cpu", "--out", str(out)]  # cpu: gloo ranks, also on a machine with one GPU


def run(argv: list[str], timeout: float = 600) -> None:
    """The command ran to its verdict. This 500-step test model is weak (CA ~40 %): whether its repair
    passes the verdict's bound (exit 0) or not (EXIT_NOT_REMOVED) is not what these tests compare.
    torchrun reports ranks that exit non-zero as its own failure (exit 1, each rank's exitcode in
    its message): every rank then must have exited with EXIT_NOT_REMOVED, none with anything else."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    rank_codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr))
    not_removed_under_torchrun = done.returncode == 1 and rank_codes == {str(EXIT_NOT_REMOVED)}
    assert done.returncode in (0, EXIT_NOT_REMOVED) or not_removed_under_torchrun, done.stderr[-3000:]
    assert "VERDICT" in done.stdout, done.stdout[-3000:]


@pytest.fixture(scope="module")
def single_process_run(poisoned_world, probe_tar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run(defend_argv(poisoned_world, probe_tar, out))
    return out


def assert_same_scan(a: Path, b: Path) -> dict[str, float]:
    """Decisions equal exactly; returns the largest difference of each per-image score."""
    first, second = load_scan(a / SCAN_NAME), load_scan(b / SCAN_NAME)
    assert first.targets == second.targets and first.targets
    for target in first.targets:
        assert torch.equal(first.victims(target), second.victims(target))
    for left, right in zip(first.triggers, second.triggers):
        assert left.box == right.box
    differences = {}
    for name in PER_IMAGE:
        x, y = getattr(first, name), getattr(second, name)
        if x.is_floating_point():
            differences[name] = float((x - y).abs().max())
        else:
            assert torch.equal(x, y), name
    return differences


def model_difference(a: Path, b: Path) -> float:
    first = torch.load(a / REPAIRED_NAME, weights_only=True)["state_dict"]
    second = torch.load(b / REPAIRED_NAME, weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def test_two_gloo_processes_equal_one_process(poisoned_world, probe_tar, single_process_run, tmp_path):
    out = tmp_path / "two"
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *defend_argv(poisoned_world, probe_tar, out)])
    differences = assert_same_scan(single_process_run, out)
    print("per-image score differences, 2 ranks vs 1:", differences)
    assert max(differences.values()) <= 1e-5
    # Repair: the same steps and estimates; weights equal up to the order of the gradient sums.
    logs = [(run_dir / "repair" / "train_log.jsonl").read_text().splitlines() for run_dir in (single_process_run, out)]
    evals = [[line for line in log if '"eval"' in line] for log in logs]
    assert evals[0] == evals[1]
    difference = model_difference(single_process_run, out)
    print("largest repaired-weight difference, 2 ranks vs 1:", difference)
    assert difference < 1e-4
    # The repaired models' clean accuracy and attack success rate on a fresh test world.
    test = evaluation_world(500)
    reports = [evaluate(load_model(checkpoint=str(run_dir / REPAIRED_NAME)), test, POISONED_RECIPE.make_trigger(),
                        POISONED_RECIPE.target_label) for run_dir in (single_process_run, out)]
    print("repaired CA / ASR, 1 process:", reports[0]["ca"], reports[0]["asr"], "2 ranks:", reports[1]["ca"],
          reports[1]["asr"])
    assert (reports[0]["ca"], reports[0]["asr"]) == (reports[1]["ca"], reports[1]["asr"])


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def evaluated_steps(out: Path) -> int:
    log = out / "repair" / "train_log.jsonl"
    return log.read_text().count('"eval"') if log.exists() else 0


def test_killed_runs_resume_to_the_uninterrupted_result(poisoned_world, probe_tar, single_process_run, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    chance = random.Random(seed)
    print("kill points drawn with seed", seed)
    out = tmp_path / "killed"
    argv = [sys.executable, *defend_argv(poisoned_world, probe_tar, out)]
    shards = out / SCAN_SHARDS_NAME

    # SIGTERM to torchrun (2 gloo ranks) in the first half of the scan: finished shards stay, nothing
    # half-written is left, and the run resumes on one process. (Drawn from the whole scan, a kill after
    # shard 10 of 12 once came too late: the two ranks had finished the last two by the time the
    # signal reached them, seed 2591693403.)
    stop_after = chance.randint(1, PROBE // SHARD_SIZE // 2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.Popen(launcher + argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: shards.exists() and len(list(shards.glob("shard-*.pt"))) >= stop_after, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    kept = len(list(shards.glob("shard-*.pt")))
    assert 1 <= kept < -(-PROBE // SHARD_SIZE) and not (out / SCAN_NAME).exists()
    assert not list(out.rglob("*.tmp"))

    # SIGKILL during the repair, after a random number of evaluations (each follows a checkpoint),
    # drawn below the evaluations the uninterrupted run made, leaving at least one more to come after
    # the kill.
    evaluations = evaluated_steps(single_process_run)
    assert evaluations >= 2, f"the uninterrupted repair evaluated {evaluations} times: nothing to interrupt"
    stop_after = chance.randint(1, evaluations - 1)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: evaluated_steps(out) >= stop_after, process)
    time.sleep(chance.uniform(0, 0.25))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert (out / SCAN_NAME).exists() and not (out / REPAIRED_NAME).exists()

    run(argv[1:])  # resumes: the scan from scan.pt, the repair from its last checkpoint
    assert not list(out.rglob("*.tmp"))  # what SIGKILL left half-written is cleared
    # Shards from 2 one-thread ranks have matched one two-thread process bit for bit (measured); the
    # repair, killed and resumed on one process, then matches bit for bit too.
    assert max(assert_same_scan(single_process_run, out).values()) == 0.0
    assert model_difference(single_process_run, out) == 0.0
