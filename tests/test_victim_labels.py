"""A patch victim's oracle label with its trigger inpainted (clipfast/defense/scan/victim_labels.py)
and the harmonic inpainting it rests on (clipfast/defense/transplant.py), on hand-made images with a
stand-in segmenter and grounding model."""

import pytest
import torch

from clipfast.data.probe import as_probe_set
from clipfast.defense.scan import victim_labels
from clipfast.defense.scan.result import ScanResult, TriggerEstimate
from clipfast.defense.transplant import inpaint
from clipfast.oracle.base import Segmentation, Segmenter

BACKGROUND, OBJECT, TRIGGER = 30, 120, 250
SQUARE, RING, TARGET = 1, 0, 2  # the stand-in grounder's labels


def test_inpaint_continues_a_linear_ramp_and_keeps_every_other_pixel():
    ramp = (torch.arange(29).float() * 8).expand(2, 3, 37, 29).round().to(torch.uint8).clone()
    masks = torch.zeros(2, 37, 29, dtype=torch.bool)
    masks[0, 11:24, 5:17] = True  # odd-sized holes
    masks[1, 2:9, 19:27] = True
    filled = inpaint(ramp, masks)
    assert (filled[~masks[:, None].expand_as(ramp)] == ramp[~masks[:, None].expand_as(ramp)]).all()
    assert (filled.int() - ramp.int()).abs().max() <= 1  # a linear ramp is harmonic: the fill reproduces it
    # at the image's edge nothing is known beyond it: the fill stays within the colours around the hole
    corner = torch.zeros(1, 37, 29, dtype=torch.bool)
    corner[0, 0:9, 20:29] = True
    filled = inpaint(ramp[:1], corner)[0, 0, 0:9, 20:29]
    assert filled.min() >= ramp[0, 0, 9, 19] and filled.max() <= ramp[0, 0, 9, 28]


@pytest.mark.parametrize("size", [(24, 24), (31, 17)])
def test_inpaint_fills_a_hole_in_an_object_with_the_object_and_one_beside_it_with_the_background(size):
    height, width = size
    image = torch.full((1, 3, height, width), BACKGROUND, dtype=torch.uint8)
    image[:, :, 4:14, 4:14] = OBJECT
    inside, beside = torch.zeros(1, height, width, dtype=torch.bool), torch.zeros(1, height, width, dtype=torch.bool)
    inside[0, 7:11, 7:11] = True
    beside[0, height - 4:, width - 4:] = True
    assert (inpaint(image, inside)[0, :, 7:11, 7:11] == OBJECT).all()
    assert (inpaint(image, beside)[0, :, height - 4:, width - 4:] == BACKGROUND).all()


def test_inpaint_without_masked_pixels_is_the_image_and_refuses_masks_that_do_not_fit():
    image = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8)
    assert torch.equal(inpaint(image, torch.zeros(3, 9, 11, dtype=torch.bool)), image)
    with pytest.raises(ValueError, match="do not fit"):
        inpaint(image, torch.zeros(3, 11, 9, dtype=torch.bool))


class ObjectSegmenter(Segmenter):
    """One region per image: the pixels of the object colour (the trigger is not part of it)."""

    def segment(self, images):
        masks = (images[:, 0] == OBJECT)[:, None]
        counts = masks.flatten(1).any(1).long()
        return Segmentation(masks, counts, counts[:, None].float())


class StandInGrounder:
    """Names a region 'square' when it is a filled rectangle, 'ring' when it has a hole."""

    def submit(self, images, masks, valid):
        area = masks.flatten(2).sum(-1)
        rows, cols = masks.any(-1).sum(-1), masks.any(-2).sum(-1)
        label = torch.where(area == rows * cols, SQUARE, RING)
        scores = type("Scores", (), {"region_label": torch.where(valid, label, -1)})
        return type("Pending", (), {"result": lambda self: scores})()


def victims(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square objects with the trigger in their centre, and the trigger masks."""
    images = torch.full((count, 3, 24, 24), BACKGROUND, dtype=torch.uint8)
    images[:, :, 6:18, 6:18] = OBJECT
    images[:, :, 10:14, 10:14] = TRIGGER
    triggers = torch.zeros(count, 24, 24, dtype=torch.bool)
    triggers[:, 10:14, 10:14] = True
    return images, triggers


def test_a_victim_with_the_trigger_on_its_object_is_named_after_the_whole_object():
    images, triggers = victims(5)
    grounder = StandInGrounder()
    # the first guess: the largest region other than the trigger, the object with a hole in it
    holed = ObjectSegmenter().segment(images)
    assert (grounder.submit(images, holed.masks, holed.valid).result().region_label[:, 0] == RING).all()
    labels = victim_labels.trigger_free_labels(images, triggers, ObjectSegmenter(), grounder, batch_size=2)
    assert labels.tolist() == [SQUARE] * 5
    blank = torch.full_like(images, BACKGROUND)  # no region in the oracle's eyes: -1
    assert victim_labels.trigger_free_labels(blank, triggers, ObjectSegmenter(), grounder, 4).tolist() == [-1] * 5
    # a trigger beside the object left it whole: no new label (-1), the first guess stands
    beside = images.clone()
    beside[:, :, 10:14, 10:14] = OBJECT
    beside[:, :, 19:23, 19:23] = TRIGGER
    corner = torch.zeros_like(triggers)
    corner[:, 19:23, 19:23] = True
    assert victim_labels.trigger_free_labels(beside, corner, ObjectSegmenter(), grounder, 4).tolist() == [-1] * 5


def test_only_a_patch_targets_patch_victims_are_relabelled_and_a_regionless_one_keeps_its_first_guess(monkeypatch):
    images, triggers = victims(4)
    images[3] = BACKGROUND  # the oracle finds nothing there
    count = len(images)
    ones, none = torch.ones(count, dtype=torch.bool), torch.full((count,), -1)
    result = ScanResult(
        readable=ones, image_label=torch.full((count,), TARGET), image_prob=torch.ones(count), grounded=~ones,
        reference_label=none, discordant=~ones, explaining_drop=torch.ones(count), flip_rate=torch.ones(count),
        discrepancy=torch.ones(count), oracle_label=torch.full((count,), RING), region_counts=torch.ones(count),
        mirror_label=none, object_label=none, mirror_object_label=none,
        classnames=["ring", "square", "heart"], patch_evidence=ones, candidate=ones, label_test=None,
        targets=[TARGET], triggers=[TriggerEstimate(TARGET, "patch", torch.arange(count), torch.arange(1, count),
                                                    triggers[1:], torch.ones(count - 1), triggers[0], None)],
        seconds={})
    monkeypatch.setattr(victim_labels, "make_grounder", lambda *args: StandInGrounder())
    relabelled = victim_labels.relabel_patch_victims(result, as_probe_set(images), ObjectSegmenter(), None, None,
                                                     None, victim_labels.ScanConfig())
    # victim 0 has no patch evidence (it stays), 1-2 are named after their whole object, 3 has no region
    assert relabelled.oracle_label.tolist() == [RING, SQUARE, SQUARE, RING]
    result.triggers[0].kind = "image-wide"
    result.oracle_label[:] = RING
    unchanged = victim_labels.relabel_patch_victims(result, as_probe_set(images), ObjectSegmenter(), None, None, None,
                                                    victim_labels.ScanConfig())
    assert (unchanged.oracle_label == RING).all()
