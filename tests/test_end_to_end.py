"""One small end-to-end run: poison a tiny CLIP in the synthetic world, scan, curate, repair, and
check the defence against the ground truth. About a minute on 2 CPU cores."""

import copy

import pytest
import torch

from clipfast.data.world import CLASSES, zero_shot_prompts
from clipfast.defense.curate import CurateConfig
from clipfast.defense.pipeline import DefenseConfig, defend
from clipfast.errors import RunMismatchError
from clipfast.defense.repair import RepairConfig
from clipfast.defense.scan import ScanConfig, scan
from clipfast.eval import evaluate
from clipfast.oracle import ClassicalSegmenter
from clipfast.recipes import evaluation_world

from conftest import POISONED_RECIPE as RECIPE
from conftest import PROBE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def poisoned(poisoned_world):
    bundle, pairs, _ = poisoned_world
    return bundle, pairs


def test_scan_curate_repair_remove_the_backdoor(poisoned, tmp_path):
    bundle, pairs = poisoned
    trigger, target = RECIPE.make_trigger(), RECIPE.target_label
    test = evaluation_world(500)
    before = evaluate(bundle, test, trigger, target)
    assert before["asr"] > 0.8  # the attack took

    model = copy.deepcopy(bundle)
    config = DefenseConfig(scan=ScanConfig(progress=False), curate=CurateConfig(),
                           repair=RepairConfig(max_steps=80, progress=False))
    probe = pairs.images[:PROBE]
    outcome = defend(model, list(CLASSES), probe, ClassicalSegmenter(), tmp_path, prompts=zero_shot_prompts,
                     config=config, identity={"recipe": RECIPE.cache_key()})
    assert outcome.scan.targets == [target]
    found = set(outcome.scan.victims(target).tolist())
    poisoned_in_probe = set(pairs.poisoned_indices[pairs.poisoned_indices < PROBE].tolist())
    assert len(found & poisoned_in_probe) / len(found) >= 0.9  # precision
    assert len(found & poisoned_in_probe) / len(poisoned_in_probe) >= 0.7  # recall
    assert outcome.scan.triggers[0].box == (28, 28, 32, 32)  # the 4x4 patch in the bottom-right corner

    after = evaluate(model, test, trigger, target)
    assert after["asr"] < before["asr"] / 2
    assert after["ca"] > before["ca"] - 0.1

    # A rerun in the same directory resumes (nothing left to do) and gives the same model...
    again = copy.deepcopy(bundle)
    defend(again, list(CLASSES), probe, ClassicalSegmenter(), tmp_path, prompts=zero_shot_prompts,
           config=config, identity={"recipe": RECIPE.cache_key()})
    for a, b in zip(model.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    # ...and other settings are refused.
    with pytest.raises(RunMismatchError):
        defend(copy.deepcopy(bundle), list(CLASSES), probe, ClassicalSegmenter(), tmp_path,
               prompts=zero_shot_prompts, config=DefenseConfig(repair=RepairConfig(max_steps=81)),
               identity={"recipe": RECIPE.cache_key()})


def test_the_fast_scan_reaches_the_reference_scans_decisions(poisoned):
    bundle, pairs = poisoned
    probe = pairs.images[:PROBE]
    # The engines compared at the same regions (crops: the reference has no packed path) ...
    fast, reference, default = (scan(bundle, list(CLASSES), probe, ClassicalSegmenter(), prompts=zero_shot_prompts,
                                     config=ScanConfig(progress=False, **settings))
                                for settings in (dict(regions="crop"), dict(engine="reference"), {}))
    assert fast.targets == reference.targets == default.targets == [RECIPE.target_label]
    victims = [set(result.victims(RECIPE.target_label).tolist()) for result in (fast, reference, default)]
    assert len(victims[0] & victims[1]) / len(victims[0] | victims[1]) >= 0.95  # Jaccard
    # ... and the default (self mode: packed trigger evidence) keeps the reference's victims: packed
    # regions found as many or more of them in 16 of the 17 worlds measured (README, "Packed regions": recall
    # median 1.00 vs 0.94; the 'bar' target 0.918 vs 0.980)
    assert len(victims[2] & victims[1]) / len(victims[1]) >= 0.95
