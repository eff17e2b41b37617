import json
import shutil

import pytest
import torch

from clipfast.cli import COMMANDS, main

TINY_RUN = ["--train-size", "256", "--test-size", "64", "--steps", "4", "--batch-size", "32",
            "--eval-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("poison")
    assert main(["poison", "--attack", "badnet", "--rate", "0.05", "--target", "heart", "--out", str(out), *TINY_RUN]) == 0
    return out


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exited.value.code, err


def test_subcommands_are_registered():
    assert {"info", "poison", "evaluate"} <= set(COMMANDS)


def test_info_prints_the_build_report(capsys):
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith("clipfast ")


def test_poison_writes_model_poison_record_log_and_report(poisoned_run):
    assert {"model.pt", "poison.json", "train_log.jsonl", "report.json", "checkpoint.pt"} <= {
        p.name for p in poisoned_run.iterdir()}
    poison = json.loads((poisoned_run / "poison.json").read_text())
    assert poison["num_poisoned"] == round(0.05 * 256) == len(poison["poisoned_indices"])
    assert poison["trigger"]["name"] == "badnet" and poison["target_class"] == "heart"
    report = json.loads((poisoned_run / "report.json").read_text())
    assert report["train"]["steps"] == 4 and report["n"] == 64
    assert 0 <= report["ca"] <= 1 and 0 <= report["asr"] <= 1
    assert report["command"].startswith("clipfast poison --attack badnet")


def test_evaluate_reproduces_the_poison_report(poisoned_run, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["evaluate", "--checkpoint", str(poisoned_run / "model.pt"), "--attack", "badnet", "--target", "heart",
            "--test-size", "64", "--out", str(out)]
    assert main(argv) == 0
    assert "CA  =" in capsys.readouterr().out
    report, original = json.loads(out.read_text()), json.loads((poisoned_run / "report.json").read_text())
    assert (report["ca"], report["asr"]) == (original["ca"], original["asr"])


@pytest.mark.parametrize("argv, message", [
    (["poison", "--rate", "1.5", "--out", "x"], "must be in [0, 1]"),
    (["poison", "--train-size", "0", "--out", "x"], "must be a positive integer"),
    (["poison", "--target", "unicorn", "--out", "x"], "--target must be one of"),
    (["poison", "--trigger-param", "nope=1", "--out", "x"], "unknown parameter(s) ['nope']"),
    (["evaluate", "--model", "ViT-Nope"], "unknown model 'ViT-Nope'"),
    (["evaluate"], "give --model and/or --checkpoint"),
])
def test_bad_input_exits_with_code_2_and_a_message(argv, message, capsys):
    code, err = _exit_code(argv, capsys)
    assert code == 2 and message in err


def test_bad_checkpoints_exit_with_code_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    code, err = _exit_code(["evaluate", "--model", "clipfast-tiny", "--checkpoint", str(garbage)], capsys)
    assert code == 2 and "not a readable PyTorch" in err

    unfitting = tmp_path / "unfitting.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, unfitting)
    code, err = _exit_code(["evaluate", "--model", "clipfast-tiny", "--checkpoint", str(unfitting)], capsys)
    assert code == 2 and "does not fit the architecture" in err and "visual.conv1.weight" in err


@pytest.fixture(scope="module")
def probe_folder(tmp_path_factory):
    """An ImageFolder of 24 synthetic-world images (PNG), one folder per class."""
    from PIL import Image

    from clipfast.data.world import CLASSES, generate_world

    root = tmp_path_factory.mktemp("probe")
    world = generate_world(24, seed=5)
    for i, (image, label) in enumerate(zip(world.images, world.labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (root / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    return root


def test_scan_on_an_image_folder_writes_a_report_and_resumes(poisoned_run, probe_folder, tmp_path, capsys):
    argv = ["scan", "--checkpoint", str(poisoned_run / "model.pt"), "--probe", str(probe_folder), "--vocab", "world",
            "--no-progress", "--out", str(tmp_path / "scan")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "1 probe images could not be decoded and were left out" in out.err and "broken.png" in out.err
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    assert report["scan"]["probe_images"] == 25 and report["scan"]["unreadable"] == 1
    assert report["unreadable_probe_images"][0].endswith("broken.png")
    assert report["repaired_model"] is None
    assert None not in (report["scan"]["mirror_test"], report["scan"]["object_test"])  # self mode: both ran
    assert (tmp_path / "scan" / "scan.pt").exists()
    assert main(argv) == 0  # resumes from scan.pt
    # without it, a setting the run directory records: a fresh directory, and no mirror test
    assert main([*argv[:-1], str(tmp_path / "no_mirror"), "--no-mirror-test"]) == 0
    no_mirror = json.loads((tmp_path / "no_mirror" / "report.json").read_text())["scan"]
    assert no_mirror["mirror_test"] is None and no_mirror["object_test"] is None
    other_probe = tmp_path / "other"
    shutil.copytree(probe_folder, other_probe)
    code, err = _exit_code([*argv[:-1], str(tmp_path / "scan"), "--probe", str(other_probe)], capsys)
    assert code == 2 and "different settings" in err


@pytest.mark.parametrize("content,message", [("heart\n\nstar\n", "empty line 2"), ("heart\nheart\nstar\n", "duplicate"),
                                             ("heart\n", "at least two")])
def test_bad_vocabulary_files_exit_with_code_2(poisoned_run, probe_folder, tmp_path, content, message, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(content)
    code, err = _exit_code(["scan", "--checkpoint", str(poisoned_run / "model.pt"), "--probe", str(probe_folder),
                            "--vocab", str(vocab), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err


def test_bench_times_every_usable_backend_and_appends_csv(tmp_path, capsys):
    import csv

    out = tmp_path / "ops.csv"
    assert main(["bench", "--suite", "ops", "--quick", "--ops", "region_topk", "--min-run-time", "0.01",
                 "--results", str(tmp_path)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {row["variant"] for row in rows} == {"torch.sort baseline", "reference", "cpu"}
    assert all(row["device"] and row["torch"] and row["commit"] and float(row["ms"]) > 0 for row in rows)
    assert "region_topk" in capsys.readouterr().out
