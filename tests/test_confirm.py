"""The image-wide confirmation (clipfast/defense/scan/confirm.py) on hand-made images with stand-in
models: the background test keeps a trigger that lives outside the object even when no additive
pattern reproduces it (a warp), and drops a confusion that lives in the object."""

import pytest
import torch

from clipfast.data.probe import as_probe_set
from clipfast.defense.scan import confirm
from clipfast.defense.scan.result import Flips, LabelTest, ScanResult, TriggerEstimate
from clipfast.defense.unlearning import recover_triggers
from clipfast.oracle.base import Segmentation, Segmenter

SIZE, GREY, TARGET = 8, 100, 3
CONFUSING = 90  # an object colour the suspect takes for the target
OBJECT_COLOURS = torch.tensor([20, 40, 60, CONFUSING])  # label l's object: 20 (l + 1); backgrounds: grey or a board
BOARD = (30, 230)


class ForegroundSegmenter(Segmenter):
    """One region per image: the pixels of an object colour."""

    def segment(self, images):
        masks = torch.isin(images[:, 0], OBJECT_COLOURS)[:, None]
        counts = masks.flatten(1).any(1).long()
        return Segmentation(masks, counts, counts[:, None].float())


class StandInJudges:
    """The suspect says the target where the top-left pixel is part of a checkerboard background
    (a trigger no mean reproduces: its two phases average to a flat grey) or the confusing object is
    present; the trusted model never does."""

    def flips(self, images, target):
        corner = images[:, 0, 0, 0]
        says = torch.isin(corner, torch.tensor(BOARD)) | (images == CONFUSING).flatten(1).any(1)
        return Flips(float(says.float().mean()), 0.0)


def picture(label: int, background=None, colour=None) -> torch.Tensor:
    image = torch.full((3, SIZE, SIZE), GREY, dtype=torch.uint8) if background is None else background.clone()
    image[:, 2 + label % 3: 5 + label % 3, 2:5] = colour if colour is not None else 20 * (label + 1)
    return image


def checkerboard(phase: int) -> torch.Tensor:
    cells = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :] + phase) % 2
    return (BOARD[0] + (BOARD[1] - BOARD[0]) * cells).to(torch.uint8).expand(3, SIZE, SIZE).clone()


def scan_of(victims: list[torch.Tensor]):
    """Victims labelled the target (candidates), then 12 clean images of labels 0-2."""
    clean = [picture(k % 3) for k in range(12)]
    images = torch.stack(victims + clean)
    count = len(images)
    candidate = torch.zeros(count, dtype=torch.bool)
    candidate[: len(victims)] = True
    label = torch.tensor([TARGET] * len(victims) + [k % 3 for k in range(12)])
    result = ScanResult(
        readable=torch.ones(count, dtype=torch.bool), image_label=label, image_prob=torch.ones(count),
        grounded=~candidate, reference_label=torch.where(candidate, 0, label), discordant=candidate,
        explaining_drop=torch.full((count,), -1.0), flip_rate=torch.full((count,), -1.0), discrepancy=torch.zeros(count),
        oracle_label=label, region_counts=torch.ones(count, dtype=torch.int64), classnames=["a", "b", "c", "d"],
        mirror_label=torch.full((count,), -1), object_label=torch.full((count,), -1),
        mirror_object_label=torch.full((count,), -1),
        patch_evidence=torch.zeros(count, dtype=torch.bool), candidate=candidate,
        label_test=LabelTest([0] * 4, [0] * 4, [0.0] * 4, [1.0] * 4, 1e-3, [0] * 4), targets=[TARGET],
        triggers=[TriggerEstimate(TARGET, "image-wide", torch.arange(len(victims)), torch.zeros(0, dtype=torch.int64),
                                  torch.zeros(0, SIZE, SIZE, dtype=torch.bool), torch.zeros(0),
                                  torch.zeros(SIZE, SIZE, dtype=torch.bool), None)])
    return result, as_probe_set(images)


@pytest.fixture
def stand_in_models(monkeypatch):
    monkeypatch.setattr(confirm, "_Judges", lambda *args: StandInJudges())


def test_a_trigger_in_the_background_is_confirmed_without_an_additive_pattern(stand_in_models):
    victims = [picture(k % 3, background=checkerboard(k % 2)) for k in range(8)]
    result, probe = scan_of(victims)
    judges = StandInJudges()
    assert confirm.pattern_flips(result, TARGET, probe, judges).suspect == 0.0  # the mean is flat: no pattern
    background = confirm.background_flips(result, TARGET, probe, ForegroundSegmenter(), judges)
    assert background == Flips(1.0, 0.0)
    result = confirm.confirm_image_wide(result, probe, ForegroundSegmenter(), None, None, None, 0.5, 0.2)
    assert result.targets == [TARGET] and result.unconfirmed == {}
    (trigger,) = result.triggers
    assert trigger.additive is False and trigger.background.confirms(0.2)
    # no additive pattern reproduces it; without the segmenter nothing puts it on other images
    assert recover_triggers(result, probe) == []


def test_a_background_trigger_is_put_on_other_images_under_their_own_object():
    victims = [picture(k % 3, background=checkerboard(k % 2)) for k in range(8)]
    result, probe = scan_of(victims)
    result.triggers[0].additive = False  # as confirm_image_wide leaves a warp
    (trigger,) = recover_triggers(result, probe, segmenter=ForegroundSegmenter())
    assert trigger.kind == "background" and len(trigger.donors) == len(victims)
    recipients = torch.stack([picture(1), picture(2), torch.full((3, SIZE, SIZE), GREY, dtype=torch.uint8)])
    out = trigger.apply(recipients, torch.Generator().manual_seed(0))
    objects = torch.isin(recipients[:, 0], OBJECT_COLOURS)
    for k in range(2):  # the recipient's object at its place, on a victim's background
        assert torch.equal(out[k][:, objects[k]], recipients[k][:, objects[k]])
        assert any(torch.equal(out[k][:, ~objects[k]], donor[:, ~objects[k]]) for donor in trigger.donors)
    assert torch.equal(out[2], recipients[2])  # no object: left as it is


def test_a_confusion_in_the_object_is_not_confirmed(stand_in_models):
    victims = [picture(k % 3, colour=CONFUSING) for k in range(8)]
    result, probe = scan_of(victims)
    assert confirm.background_flips(result, TARGET, probe, ForegroundSegmenter(), StandInJudges()).suspect == 0.0
    result = confirm.confirm_image_wide(result, probe, ForegroundSegmenter(), None, None, None, 0.5, 0.2)
    assert result.targets == [] and result.triggers == []
    assert set(result.unconfirmed["d"]) == {"pattern", "background"}
    assert result.summary()["unconfirmed"]["d"]["background"] == {"suspect": 0.0, "trusted": 0.0}


def test_the_background_keeps_the_victims_pixels_outside_their_objects():
    victim = picture(0, background=checkerboard(0))  # object (colour 20) at rows and columns 2-4
    (background,) = confirm.victim_backgrounds(victim[None], ForegroundSegmenter())
    assert (background[:, 2:5, 2:5] == BOARD[0]).all()  # filled with the image's median colour
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[2:5, 2:5] = False
    assert torch.equal(background[:, outside], victim[:, outside])


def test_flips_confirm_only_when_the_trusted_model_does_not_agree():
    assert Flips(0.6, 0.1).confirms(0.2) and not Flips(0.6, 0.3).confirms(0.2) and not Flips(0.1, 0.0).confirms(0.2)
