"""The verdict every defence ends with: its statuses, exit codes, the Clopper-Pearson bound, and the
images its held-out ASR was counted on."""

import dataclasses

import pytest
import torch

from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.defense.pipeline import measured_on, verdict_of
from clipfast.defense.repair import RepairConfig
from clipfast.defense.scan import Flips, ImageColumns, LabelTest, ScanConfig, ScanResult, scan
from clipfast.defense.verdict import EXIT_NOT_REMOVED, judge, upper_bound
from clipfast.models import load_model
from clipfast.oracle import ClassicalSegmenter


def test_the_upper_bound_is_the_one_sided_clopper_pearson_bound():
    n = 448
    assert upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n))  # closed form with no hits
    assert upper_bound(n, n) == 1.0 and upper_bound(0, 0) == 1.0
    assert upper_bound(4, 512) > 4 / 512 and upper_bound(4, 512) < upper_bound(5, 512)


@pytest.mark.parametrize("found, repaired, hits, n, status", [
    (False, False, None, None, "no_backdoor"),
    (True, False, None, None, "not_removed"),  # found and left in place
    (True, True, None, 0, "not_removed"),  # nothing to measure the removal on
    (True, True, 0, 448, "removed"),  # bound 0.67 %
    (True, True, 20, 479, "not_removed"),  # 4.2 % measured, bound 6.0 % > 5 %
])
def test_the_verdict_says_removed_only_when_the_bound_is_below_max_asr(found, repaired, hits, n, status):
    verdict = judge(found, "target 'heart'", repaired, hits, n, 0.05, "held-out victims")
    assert verdict.status == status
    assert verdict.exit_code == (EXIT_NOT_REMOVED if status == "not_removed" else 0)
    if n:
        assert f"({hits}/{n} held-out victims)" in verdict.message
        assert (verdict.asr_upper_bound <= 0.05) == (status == "removed")


def test_the_verdict_names_the_images_its_estimate_counted():
    assert measured_on({"asr_n": 3, "asr_victim_n": 3, "asr_pasted_n": 0}) == "held-out victims"
    both = measured_on({"asr_n": 10, "asr_victim_n": 3, "asr_victim_hits": 1, "asr_pasted_n": 7})
    assert both.startswith("held-out victims and clean images")
    self_mode = measured_on({"asr_n": 7, "asr_victim_n": 3, "asr_victim_hits": 2, "asr_pasted_n": 7})
    assert self_mode.startswith("held-out clean images with the recovered trigger") and "not counted: 2/3" in self_mode
    mixed = measured_on({"asr_n": 9, "asr_victim_n": 3, "asr_victim_hits": 2, "asr_pasted_n": 7})
    assert "and 2 of 3 held-out victims" in mixed and "not counted" not in mixed


def test_no_backdoor_found_in_self_mode_says_image_wide_triggers_are_out_of_its_sight():
    """A self-mode scan cannot see image-wide triggers (README limits): its "no backdoor found"
    says so and names the way to look for them; a trusted-oracle scan's does not."""
    torch.manual_seed(0)
    probe = generate_world(21, seed=3).images
    result = scan(load_model("clipfast-tiny"), list(CLASSES), probe, ClassicalSegmenter(), prompts=zero_shot_prompts,
                  config=ScanConfig(progress=False, batch_size=8))
    assert not result.found and result.oracle_mode == "self"
    verdict = verdict_of(result, None, RepairConfig())
    assert verdict.status == "no_backdoor" and verdict.exit_code == 0
    assert "image-wide" in verdict.message and "--trusted-model" in verdict.message
    trusted = dataclasses.replace(result, reference_label=torch.zeros_like(result.reference_label))
    assert trusted.oracle_mode == "trusted" and "image-wide" not in verdict_of(trusted, None, RepairConfig()).message


def test_an_unconfirmed_label_is_reported_with_the_test_that_flagged_it():
    """Trusted mode: the discordance count and both models' shares; self mode: the image-wide test
    that flagged it (never a 'discordant' count, which self mode does not have) and the model's shares."""
    columns = ImageColumns.empty(8)
    columns.readable = torch.ones(8, dtype=torch.bool)  # (empty()'s columns share their tensors)
    count = LabelTest([2] * 4, [0, 9, 0, 0], [0.0, 1.5, 0.0, 0.0], [1.0, 1e-5, 1.0, 1.0], 1e-4, [1] * 4)
    scanned = ScanResult(**vars(columns), classnames=["a", "b", "c", "d"], patch_evidence=columns.discordant,
                         candidate=columns.discordant, label_test=count, targets=[], triggers=[],
                         unconfirmed={"b": {"pattern": Flips(0.02, 0.0), "background": Flips(0.16, 0.0)}})
    scanned.reference_label = torch.zeros(8, dtype=torch.long)  # trusted mode
    message = verdict_of(scanned, None, RepairConfig()).message
    assert "'b' passed the count (9 discordant images where 1.5 were expected)" in message
    assert "16 % in the model and 0 % in the trusted one): a confusion of the model" in message
    scanned.reference_label[:] = -1  # self mode
    scanned.object_test = LabelTest([2] * 4, [0, 40, 0, 0], [0.0, 25.0, 0.0, 0.0], [1.0, 1e-6, 1.0, 1.0], 1e-4, [3] * 4)
    message = verdict_of(scanned, None, RepairConfig()).message
    assert "'b' passed the object-alone test (p 1e-06) but neither transplant test confirmed it" in message
    assert "backgrounds 16 %): not reported as a trigger" in message and "discordant" not in message
