"""The pipeline benchmark's CPU quick mode: pytest-benchmark times the reference and the fast scan
and repair step on a small probe set (compare with `pytest --benchmark-only`), and the benchmark's
own rows are checked for what they must report. No speed is asserted."""

import pytest
import torch

from clipfast.bench.pipeline import SCAN_VARIANTS, FixedOracle, bench_repair, bench_scan, plot_speedups
from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.defense.scan import ScanConfig, scan
from clipfast.models import load_model
from clipfast.oracle import ClassicalSegmenter
from clipfast.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("clipfast-tiny"), generate_world(300, seed=2)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_scan_speed(benchmark, tiny, engine):
    bundle, world = tiny
    benchmark.group = "scan 300 images"
    config = ScanConfig(progress=False, engine=engine)
    result = benchmark.pedantic(lambda: scan(bundle, list(CLASSES), world.images, ClassicalSegmenter(),
                                             prompts=zero_shot_prompts, config=config), rounds=2, warmup_rounds=1)
    assert len(result.image_label) == 300


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_repair_step_speed(benchmark, tiny, engine, tmp_path):
    bundle, world = tiny
    benchmark.group = "repair 5 steps x 64"
    speed = dict(precision="fp32", fused_optimizer=False) if engine == "reference" else {}
    config = TrainConfig(steps=5, batch_size=64, checkpoint_every=10**9, measure_mfu=False, progress=False, **speed)
    counter = iter(range(100))
    run = lambda: train(bundle, world.images, world.captions, config, tmp_path / str(next(counter)))  # noqa: E731
    assert benchmark.pedantic(run, rounds=2, warmup_rounds=0).step == 5


def test_pipeline_rows_report_throughput_speedup_and_agreement(tiny, tmp_path):
    bundle, world = tiny
    rows = []
    bench_scan(bundle, "tiny", world.images[:40], FixedOracle(5), "images=40 regions=5", "cpu", rows,
               variants=SCAN_VARIANTS)
    bench_repair(bundle, "tiny", world.images[:64], world.captions[:64], 32, 4, "cpu", rows)
    scans = [r for r in rows if r["stage"] == "scan"]
    assert {r["variant"] for r in scans} == {"reference", "fast crop", "fast crop fp32", "fast crop prefetch=0",
                                             "fast crop prefetch=2", "fast packed", "fast packed coverage=0.5",
                                             "fast hybrid"}
    assert {r["unit"] for r in scans} == {"images/s", "regions/s", "encoder GFLOP/image", "images/s region stage",
                                          "removal encodes/image"}
    removals = [float(r["throughput"]) for r in scans if r["unit"] == "removal encodes/image"]
    assert len(removals) == 8 and all(0 <= value <= 5 for value in removals)  # at most one per region
    flops = {r["variant"]: float(r["throughput"]) for r in scans if r["unit"] == "encoder GFLOP/image"}
    assert flops["fast packed"] < flops["fast crop"] == flops["reference"]  # 5 discs: fewer tokens than 5 crops
    assert flops["fast packed coverage=0.5"] < flops["fast packed"]  # boundary patches kept by fewer regions
    # self mode: the hybrid's packed pass, and the crops its naming encoded, counted (a random model
    # grounds no region, so all of them: each region both ways, the whole images once)
    assert flops["fast crop"] < flops["fast hybrid"] < flops["fast crop"] + flops["fast packed"]
    packed = next(r for r in scans if r["variant"] == "fast packed" and r["unit"] == "images/s")
    assert "vs fast crop" in packed["agreement"]
    fast = next(r for r in scans if r["variant"] == "fast crop" and r["unit"] == "images/s")
    assert float(fast["speedup_vs_reference"]) > 0 and float(fast["mfu"]) > 0
    assert "image labels" in fast["agreement"] and "targets" in fast["agreement"]
    repair = [r for r in rows if r["stage"] == "repair step"]
    assert [r["variant"] for r in repair] == ["reference", "fast"] and float(repair[1]["mfu"]) > 0
    table = [dict(r, device="cpu", mode="quick") for r in rows]
    plot_speedups(table, tmp_path / "pipeline.png")
    assert (tmp_path / "pipeline.png").stat().st_size > 0


def test_the_fixed_oracle_gives_the_asked_number_of_regions():
    images = generate_world(3, seed=1).images
    segmentation = FixedOracle(7).segment(images)
    assert segmentation.masks.shape == (3, 7, 32, 32) and segmentation.valid.all()
    assert segmentation.masks.flatten(2).any(-1).all()


def test_the_fixed_oracle_cells_partition_the_image():
    images = generate_world(3, seed=1).images
    masks = FixedOracle(9, "cells").segment(images).masks
    assert masks.shape == (3, 9, 32, 32) and torch.equal(masks.sum(1), torch.ones(3, 32, 32, dtype=torch.long))
    assert masks.flatten(2).any(-1).all()
    with pytest.raises(ValueError, match="shape"):
        FixedOracle(9, "squares")


def test_the_fixed_oracle_makes_its_masks_once(monkeypatch):
    import clipfast.bench.pipeline as pipeline

    calls = []
    real = pipeline.blob_masks
    monkeypatch.setattr(pipeline, "blob_masks", lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    oracle, images = FixedOracle(4), generate_world(6, seed=1).images
    first, again, fewer = oracle.segment(images), oracle.segment(images), oracle.segment(images[:2])
    assert len(calls) == 1 and torch.equal(first.masks, again.masks) and torch.equal(fewer.masks, first.masks[:2])
    # An image's masks go by its batch position only, whatever was asked before: a larger batch
    # later (the bank grows by blocks) leaves the first positions' masks as they were.
    many = generate_world(FixedOracle.BLOCK + 7, seed=2).images
    for shape in FixedOracle.SHAPES:
        small_first = FixedOracle(5, shape)
        few = small_first.segment(many[:3]).masks
        grown = small_first.segment(many).masks
        fresh = FixedOracle(5, shape).segment(many).masks
        assert torch.equal(grown, fresh) and torch.equal(grown[:3], few) and len(grown) == len(many)
        assert not torch.equal(grown[0], grown[FixedOracle.BLOCK])  # the next block is drawn anew


def test_rows_are_on_disk_as_they_are_measured(tmp_path):
    import csv

    from clipfast.bench.common import open_rows

    fields = ["timestamp", "device", "torch", "triton", "commit", "mode", "op", "ms"]
    rows = open_rows(tmp_path, "ops", fields, "cpu", "quick")
    for n in (1, 2):
        rows.append(dict(op=f"op{n}", ms=str(n)))
        with (tmp_path / "ops.csv").open() as handle:
            assert [r["op"] for r in csv.DictReader(handle)] == [f"op{k}" for k in range(1, n + 1)]
    assert rows[0]["device"] and rows[0]["commit"]  # stamped


def test_a_csv_from_before_new_columns_gets_the_new_header_and_keeps_its_rows(tmp_path):
    import csv

    import pytest

    from clipfast.bench.common import CsvWriter

    path = tmp_path / "rows.csv"
    CsvWriter(path, ["a", "c"]).write({"a": "1", "c": "3"})
    CsvWriter(path, ["a", "b", "c"]).write({"a": "4", "b": "5", "c": "6"})
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["a", "b", "c"]
        assert list(reader) == [{"a": "1", "b": "", "c": "3"}, {"a": "4", "b": "5", "c": "6"}]
    with pytest.raises(ValueError, match="does not know"):  # never drops a column silently
        CsvWriter(path, ["a", "b"]).write({"a": "7", "b": "8"})


def test_a_capacity_model_that_fails_is_a_row_and_the_next_one_runs():
    from clipfast.bench.pipeline import bench_capacity

    rows = []
    bench_capacity(["no-such-architecture", "nor-this-one"], "cpu", rows)
    assert [r["model"] for r in rows] == ["no-such-architecture", "nor-this-one"]
    assert all(r["agreement"].startswith("FAILED: ") for r in rows)


def test_results_written_by_a_run_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    import subprocess

    from clipfast.provenance import COMMIT_ENV, git_commit

    monkeypatch.delenv(COMMIT_ENV, raising=False)

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "rows.csv").write_text("x\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path / "benchmarks")
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "rows.csv").write_text("x\ny\n")
    assert git_commit(tmp_path / "benchmarks") == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path / "benchmarks") == clean + "-dirty"
