import dataclasses
import itertools
import re

import pytest
import torch

from clipfast.data import world
from clipfast.data.shapes import render_shapes
from clipfast.data.world import (
    CAPTION_TEMPLATES,
    CLASSES,
    COLOURS,
    WorldConfig,
    WorldSamples,
    generate_world,
    world_vocabulary,
    zero_shot_prompts,
)

torch.set_num_threads(1)  # the machine is shared: 2 threads stall badly when cores are busy

N = 1001  # odd


@pytest.fixture(scope="module")
def samples() -> WorldSamples:
    return generate_world(N, seed=11)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def _mean_colour(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, mean RGB in [0, 1] over its mask's pixels, [N, 3]."""
    weights = masks[:, None].float()
    return (images.float() / 255 * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1)


def _assert_same(a: WorldSamples, b: WorldSamples) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.object_masks, b.object_masks)
    assert torch.equal(a.object_labels, b.object_labels)
    assert torch.equal(a.distractor_masks, b.distractor_masks)
    assert a.captions == b.captions


def test_default_config_is_the_low_noise_world():
    config = WorldConfig()
    assert (config.image_size, config.bg_low, config.bg_pix) == (32, 0.05, 0.03)
    assert (config.min_extent, config.max_extent, config.max_rotation) == (0.22, 0.42, 0.35)
    assert len(CLASSES) == 10 and len(COLOURS) == 9 and len(CAPTION_TEMPLATES) >= 8


def test_deterministic_in_seed(samples):
    _assert_same(samples, generate_world(N, seed=11))
    other = generate_world(N, seed=12)
    assert not torch.equal(samples.images, other.images)
    assert (samples.labels != other.labels).any() and samples.captions != other.captions


def test_shorter_world_is_a_prefix_of_a_longer_one(monkeypatch):
    monkeypatch.setattr(world, "_CHUNK", 16)  # so that the worlds below span several chunks
    longer = generate_world(53, seed=4)
    _assert_same(generate_world(37, seed=4), longer.subset(slice(0, 37)))


@pytest.mark.parametrize("n, size", [(1, 32), (23, 29), (7, 45)])
def test_shapes_and_dtypes(n, size):
    s = generate_world(n, seed=3, config=WorldConfig(image_size=size))
    assert len(s) == n and len(s.captions) == n
    assert s.images.shape == (n, 3, size, size) and s.images.dtype == torch.uint8
    assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
    assert s.object_masks.shape == (n, 2, size, size) and s.object_masks.dtype == torch.bool
    assert s.object_labels.shape == (n, 2) and s.object_labels.dtype == torch.int64
    assert s.colours.shape == (n,) and s.distractor_masks.shape == (n, size, size)
    assert all(isinstance(c, str) and c for c in s.captions)


def test_all_classes_and_colours_occur_roughly_uniformly(samples):
    assert torch.bincount(samples.labels, minlength=10).min() > N / 10 * 0.7
    assert torch.bincount(samples.colours, minlength=9).min() > N / 9 * 0.7


def test_masks_match_drawn_pixels(samples):
    images, masks = samples.images, samples.object_masks
    main = masks[:, 0]
    background = ~(masks.any(1) | samples.distractor_masks)
    assert main.flatten(1).any(1).all(), "every image has a visible main object"
    object_colour = _mean_colour(images, main)
    background_colour = _mean_colour(images, background)
    # Objects are segmentable: their colour clearly differs from the background's.
    assert ((object_colour - background_colour).abs().amax(1) > 0.2).all()
    # Pixel by pixel: inside the mask the object's colour (up to noise), outside (background) not.
    distance = (images.float() / 255 - object_colour[:, :, None, None]).abs().amax(1)
    near = distance < 0.15
    assert near[main].float().mean() > 0.995
    assert near[background].float().mean() < 0.01
    # The drawn colour is the recorded one (nearest named colour by direction, as brightness varies).
    palette = torch.nn.functional.normalize(world._COLOUR_RGB, dim=1)
    nearest = (torch.nn.functional.normalize(object_colour, dim=1) @ palette.T).argmax(1)
    assert (nearest == samples.colours).float().mean() > 0.99


def test_object_labels_and_masks_are_consistent(samples):
    labels, masks = samples.object_labels, samples.object_masks
    assert torch.equal(labels[:, 0], samples.labels)
    present = labels[:, 1] >= 0
    assert torch.equal(masks[:, 1].flatten(1).any(1), present)
    assert (labels[present, 1] != labels[present, 0]).all()
    assert ((labels[:, 1] >= -1) & (labels[:, 1] < 10)).all()
    # The main object is drawn on top: the second object's mask is only its visible part.
    assert not (masks[:, 0] & masks[:, 1]).any()
    assert not (masks.any(1) & samples.distractor_masks).any()
    second_area = masks[present, 1].flatten(1).sum(1).float()
    main_area = masks[present, 0].flatten(1).sum(1).float()
    assert (second_area < main_area).float().mean() > 0.8


def test_captions_describe_the_main_object(samples):
    main = samples.object_masks[:, 0]
    areas = main.flatten(1).sum(1).float()
    side = WorldConfig().image_size
    # Position words come from the centre of the object's bounding box (3 x 3 grid, cuts at 0.4/0.6).
    pixel = torch.arange(side) + 0.5
    def box_centre(occupied: torch.Tensor) -> torch.Tensor:
        low = torch.where(occupied, pixel, float("inf")).amin(1)
        high = torch.where(occupied, pixel, -float("inf")).amax(1)
        return (low + high) / 2 / side
    centre_x, centre_y = box_centre(main.any(1)), box_centre(main.any(2))
    slack = 1.5 / side  # pixel quantisation plus the shift of a rotated asymmetric shape's box
    size_areas = {"small": [], "large": []}
    for i, caption in enumerate(samples.captions):
        words = _words(caption)
        assert [w for w in words if w in CLASSES] == [CLASSES[samples.labels[i]]], caption
        colours = [w for w in words if w in COLOURS]
        assert colours in ([], [COLOURS[samples.colours[i]]]), caption
        for size in size_areas:
            if size in words:
                size_areas[size].append(areas[i])
        if "left" in words:
            assert centre_x[i] < 0.4 + slack, caption
        if "right" in words:
            assert centre_x[i] > 0.6 - slack, caption
        if "top" in words:
            assert centre_y[i] < 0.4 + slack, caption
        if "bottom" in words:
            assert centre_y[i] > 0.6 - slack, caption
        if "center" in words:
            assert abs(centre_x[i] - 0.5) < 0.1 + slack and abs(centre_y[i] - 0.5) < 0.1 + slack, caption
    assert min(len(v) for v in size_areas.values()) > 50
    assert torch.stack(size_areas["large"]).mean() > 1.5 * torch.stack(size_areas["small"]).mean()
    # Varied templates: few duplicate captions within a training batch (duplicates are false negatives).
    assert len(set(samples.captions[:128])) > 0.7 * 128


@pytest.mark.parametrize("probability", [0.0, 0.3])
def test_second_objects_and_distractors_at_about_the_configured_rate(probability):
    config = WorldConfig(second_object_prob=probability, distractor_prob=probability)
    s = generate_world(1500, seed=5, config=config)
    second_rate = (s.object_labels[:, 1] >= 0).float().mean().item()
    distractor_rate = s.distractor_masks.flatten(1).any(1).float().mean().item()
    if probability == 0:
        assert second_rate == 0 and distractor_rate == 0
    else:
        # A few second objects are dropped (too hidden) and a few distractors fully covered.
        assert 0.8 * probability < second_rate <= probability + 0.03
        assert 0.6 * probability < distractor_rate <= probability + 0.03


def test_classes_look_distinct_at_any_allowed_rotation():
    # Same place and size, extreme rotations: no two classes may be near-identical masks.
    size, rotation = 64, WorldConfig().max_rotation
    masks = {}
    for cls, theta in itertools.product(range(len(CLASSES)), (-rotation, 0.0, rotation)):
        one = torch.tensor
        masks[cls, theta] = render_shapes(
            one([cls]), one([0.5]), one([0.5]), one([0.4]), one([theta]), size)[0]
    for (a, ta), (b, tb) in itertools.combinations(masks, 2):
        if a != b:
            iou = (masks[a, ta] & masks[b, tb]).sum() / (masks[a, ta] | masks[b, tb]).sum()
            assert iou < 0.8, (CLASSES[a], ta, CLASSES[b], tb, float(iou))


def test_subset_accepts_tensor_list_and_slice(samples):
    index = [5, 0, 17]
    by_list = samples.subset(index)
    _assert_same(by_list, samples.subset(torch.tensor(index)))
    assert by_list.captions == [samples.captions[i] for i in index]
    assert torch.equal(by_list.images[1], samples.images[0])
    assert len(samples.subset(slice(3, 12, 2))) == 5
    bare = WorldSamples(samples.images[:4], samples.labels[:4], samples.object_masks[:4],
                        samples.object_labels[:4], samples.captions[:4])
    assert bare.subset([1]).colours is None and len(bare.subset([1, 2])) == 2


def test_prompts_and_vocabulary(samples):
    vocabulary = set(world_vocabulary())
    for name in CLASSES:
        prompts = zero_shot_prompts(name)
        assert len(prompts) == 3 + 3 + len(COLOURS)
        assert all(name in _words(p) for p in prompts)
        assert {w for p in prompts for w in _words(p)} <= vocabulary
        assert {c for p in prompts for c in _words(p) if c in COLOURS} == set(COLOURS)
    assert {w for c in samples.captions for w in _words(c)} <= vocabulary
    assert set(CLASSES) | set(COLOURS) | {"a", "photo", "of", "."} <= vocabulary
    assert len(vocabulary) < 60  # compact: the tiny models' token embedding stays small
    with pytest.raises(ValueError):
        zero_shot_prompts("  ")


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n_raises(n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        generate_world(n, seed=0)


@pytest.mark.parametrize("change", [
    {"image_size": 4}, {"min_extent": 0.5, "max_extent": 0.4}, {"second_object_prob": 1.5},
    {"distractor_prob": -0.1}, {"bg_pix": -1.0}, {"bg_blocks": 0}, {"second_position_candidates": 0},
])
def test_bad_config_raises(change):
    with pytest.raises(ValueError, match="WorldConfig"):
        dataclasses.replace(WorldConfig(), **change)


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed must be an int"):
        generate_world(3, seed=1.5)
