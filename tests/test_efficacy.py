"""The efficacy harness on a two-case matrix with a tiny training budget: every row carries every
field, a rerun skips the finished cases, and the README table and plot come from the CSV."""

import csv
from dataclasses import replace

import pytest

from clipfast.bench.efficacy import FIELDS, AttackConfig, case_key, quiet, read_rows, run_matrix, select, summarise
from clipfast.bench.efficacy_report import README_BEGIN, README_END, plot_efficacy, update_readme
from clipfast.defense import BaselineConfig, DefenseConfig, RepairConfig
from clipfast.demo import DemoConfig
from clipfast.recipes import WorldRecipe
from clipfast.train import TrainConfig

TINY = quiet(DemoConfig(
    recipe=WorldRecipe(train_size=600, train=TrainConfig(steps=6, batch_size=64, eval_every=0, measure_mfu=False)),
    probe_size=300, test_size=100, baseline_size=100,
    defense=DefenseConfig(repair=RepairConfig(max_steps=2, holdout_clean=50)), baseline=BaselineConfig(steps=2)))
MATRIX = (AttackConfig("patch test", "patch", "badnet", (("size_fraction", 0.25), ("pattern", "noise")), (0.05, 0.1),
                       seeds=(0, 1), core=True),
          AttackConfig("clean test", "clean", "badnet", (), (0.0,), seeds=(3,)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficacy")
    cases = select(MATRIX, seeds=[0, 3])
    rows = run_matrix(cases, TINY, out / "results", "cpu", "quick", cache_dir=out / "cache")
    return out, cases, rows


def test_every_row_carries_every_field(finished):
    out, cases, rows = finished
    assert [(r["config"], r["seed"]) for r in rows] == [("patch test", 0), ("clean test", 3)]
    with (out / "results" / "efficacy.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 2 and list(written[0]) == FIELDS
    for row in written:
        for name in ("timestamp", "device", "torch", "commit", "case_key", "attack", "rate", "rates_tried", "target",
                     "seed", "oracle_mode", "ca_poisoned", "asr_poisoned", "asr_clean_model", "ca_repaired", "asr_repaired",
                     "ca_baseline", "asr_baseline", "compact_set_size", "baseline_set_size", "seconds_case"):
            assert row[name] not in ("", "None"), name
        assert 0 <= float(row["asr_poisoned"]) <= 1 and 0 <= float(row["ca_repaired"]) <= 1
    patch, clean = written
    assert patch["trigger_params"] == '{"pattern": "noise", "size_fraction": 0.25}'
    # the 6-step model never reaches ASR 0.9: the ladder tried both rates and kept the last
    assert patch["rates_tried"] == "0.05 0.1" and patch["rate"] == "0.1"
    assert patch["target_found"] in ("True", "False") and patch["false_alarm"] == ""
    assert clean["target_found"] == "" and clean["false_alarm"] in ("True", "False") and clean["rate"] == "0.0"
    assert clean["asr_clean_model"] == clean["asr_poisoned"]  # a clean case's model is its own floor
    assert patch["case_key"] == case_key(MATRIX[0], 0, TINY)


def test_a_rerun_skips_the_finished_cases(finished):
    out, cases, _ = finished
    again = run_matrix(cases, TINY, out / "results", "cpu", "quick", cache_dir=out / "cache")
    assert again == []
    assert len(read_rows(out / "results" / "efficacy.csv")) == 2
    other = replace(TINY, probe_size=299)  # other settings: not the same case
    assert case_key(MATRIX[0], 0, other) != case_key(MATRIX[0], 0, TINY)


def test_a_failing_case_is_reported_and_the_matrix_goes_on(finished):
    out, cases, _ = finished
    # label-consistent poisoning at 90 %: more target-class images than the world has (poison_pairs raises)
    broken = AttackConfig("broken", "clean-label", "label_consistent", (), (0.9,))
    failures = []
    rows = run_matrix([(broken, 0), *cases], TINY, out / "results", "cpu", "quick", cache_dir=out / "cache",
                      failures=failures)
    assert rows == [] and len(failures) == 1  # the finished cases were still visited (and skipped)
    assert failures[0].startswith("broken seed 0 (self): ValueError") and "target-class images" in failures[0]
    assert len(read_rows(out / "results" / "efficacy.csv")) == 2


def test_the_readme_table_and_plot_come_from_the_csv(finished, tmp_path):
    out, _, _ = finished
    rows = read_rows(out / "results" / "efficacy.csv")
    summary = summarise(rows)
    assert [entry["config"] for entry in summary] == ["clean test", "patch test"]  # not in MATRIX: by name
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\noutro\n")
    update_readme(rows, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| self | patch test | 1 | 0.1 |" in text and "false alarms" in text
    plot_efficacy(rows, tmp_path / "efficacy.png")
    assert (tmp_path / "efficacy.png").stat().st_size > 0


def test_a_row_takes_the_other_modes_baseline_only_for_the_same_model(tmp_path):
    base = {field: "" for field in FIELDS}
    rows = [dict(base, config="c", seed="0", oracle_mode="self", ca_poisoned="0.9", asr_poisoned="0.97",
                 ca_baseline="0.88", asr_baseline="0.01"),
            dict(base, config="c", seed="0", oracle_mode="trusted", ca_poisoned="0.9", asr_poisoned="0.97"),
            dict(base, config="c", seed="1", oracle_mode="self", ca_poisoned="0.9", asr_poisoned="0.86",
                 ca_baseline="0.87", asr_baseline="0.02"),
            # seed 1's trusted row measured another training of the model (poisoned ASR differs)
            dict(base, config="c", seed="1", oracle_mode="trusted", ca_poisoned="0.9", asr_poisoned="0.96")]
    path = tmp_path / "efficacy.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    read = {(row["seed"], row["oracle_mode"]): row for row in read_rows(path)}
    assert read["0", "trusted"]["asr_baseline"] == "0.01"
    assert read["1", "trusted"]["asr_baseline"] == ""
    trusted = next(entry for entry in summarise(list(read.values())) if entry["oracle_mode"] == "trusted")
    assert trusted["baseline_seeds"] == 1 and trusted["median_asr_baseline"] == 0.01


def test_the_matrix_sweeps_what_the_defence_is_judged_on():
    from clipfast.bench.efficacy import MATRIX as FULL

    families = {config.family for config in FULL}
    assert families == {"patch", "image-wide", "clean-label", "clean"}
    assert all(sum(c.core for c in FULL if c.family == family) >= 1 for family in families)
    assert max(len(c.seeds) for c in FULL if c.family == "clean") >= 5
    attacks = {c.attack for c in FULL}
    assert {"badnet", "badnet_random", "blended", "sig", "wanet", "label_consistent", "optimized_patch"} <= attacks
    sizes = {dict(c.params).get("size_fraction") for c in FULL if c.family == "patch"}
    assert min(sizes) * min(sizes) < 0.02 and max(sizes) ** 2 > 0.09  # ~1.5 % to ~10 % of the image area
    assert len(select(FULL, quick=True)) < len(select(FULL))


def test_the_optimized_patch_attack_is_made_on_a_surrogate_deterministically(tmp_path):
    from clipfast.recipes import cached_world_model, optimized_patch_recipe

    recipe = replace(TINY.recipe, attack="optimized_patch", trigger_params=(("size_fraction", 0.25),), rate=0.05)
    assert recipe.needs_optimized_patch
    with pytest.raises(ValueError, match="make the optimized patch first"):
        cached_world_model(recipe, tmp_path)
    made = optimized_patch_recipe(recipe, tmp_path, steps=3)
    again = optimized_patch_recipe(recipe, tmp_path, steps=3)
    assert made == again and not made.needs_optimized_patch
    trigger = made.make_trigger()
    assert trigger.name == "optimized_patch" and trigger.patch(8).shape == (3, 8, 8)
    assert len(list(tmp_path.iterdir())) == 1  # the surrogate model, cached
