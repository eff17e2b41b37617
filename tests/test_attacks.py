import math

import pytest
import torch

from clipfast.attacks import (
    PATCH_PATTERNS,
    PATCH_POSITIONS,
    TRIGGER_NAMES,
    BadNetTrigger,
    LabelConsistentTrigger,
    PoisonedPairs,
    Trigger,
    WaNetTrigger,
    make_trigger,
    poison_pairs,
    trigger_parameters,
)
from clipfast.attacks.triggers import warp

torch.set_num_threads(1)

H, W = 37, 29  # odd, non-square
PATCH_TRIGGERS = ("badnet", "badnet_random", "label_consistent")


def _images(n: int, seed: int = 0, low: int = 1, high: int = 255) -> torch.Tensor:
    """Random uint8 images in [low, high): by default never exactly black or white, so that every
    patch pixel visibly changes."""
    return torch.randint(low, high, (n, 3, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# The optimized patch has no default: its pixels come from an optimisation (recipes.optimized_patch_recipe).
SOME_PIXELS = {"optimized_patch": {"pixels": tuple(range(0, 255, 5))[:48]}}


@pytest.mark.parametrize("name", TRIGGER_NAMES)
def test_every_trigger_is_pure_deterministic_and_uint8(name):
    trigger = make_trigger(name, **SOME_PIXELS.get(name, {}))
    assert isinstance(trigger, Trigger) and trigger.name == name
    images = _images(6)
    before = images.clone()
    out = trigger.apply(images, seed=3)
    assert torch.equal(images, before), "apply must not modify its input"
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out.data_ptr() != images.data_ptr()
    assert not torch.equal(out, images)
    assert torch.equal(out, trigger.apply(images.clone(), seed=3))
    footprint = trigger.footprint(6, H, W, seed=3)
    assert footprint.dtype == torch.bool and footprint.shape == (6, H, W)
    assert not ((out != images).any(1) & ~footprint).any(), "changes outside the footprint"


@pytest.mark.parametrize("name", PATCH_TRIGGERS)
def test_patch_triggers_change_exactly_their_footprint(name):
    trigger = make_trigger(name)
    images = _images(9)
    out = trigger.apply(images, seed=5)
    footprint = trigger.footprint(9, H, W, seed=5)
    size = trigger.patch_size(H, W)
    assert size == round(trigger.size_fraction * min(H, W))
    assert torch.equal((out != images).any(1), footprint)
    assert (footprint.flatten(1).sum(1) == size * size).all(), "the patch lies fully inside"
    for i in range(9):
        patch = out[i][:, footprint[i]].view(3, size, size)
        assert ((patch == 0) | (patch == 255)).all() and torch.equal(patch[0], patch[1])
        assert (patch[0] == 255).float().mean() == pytest.approx(0.5, abs=0.13)  # checkerboard


def test_badnet_default_is_a_corner_checkerboard():
    out = make_trigger("badnet").apply(torch.full((2, 3, 32, 32), 100, dtype=torch.uint8))
    patch = out[0, 0, -4:, -4:]
    assert patch.tolist() == [[255, 0, 255, 0], [0, 255, 0, 255], [255, 0, 255, 0], [0, 255, 0, 255]]
    assert (out[:, :, :28] == 100).all() and (out[:, :, :, :28] == 100).all()


def test_badnet_random_locations_depend_on_seed_and_index_only():
    trigger = make_trigger("badnet_random")
    many = trigger.footprint(200, H, W, seed=1)
    assert torch.equal(trigger.footprint(7, H, W, seed=1), many[:7])
    assert not torch.equal(trigger.footprint(7, H, W, seed=2), many[:7])
    top, left = trigger.locations(200, H, W, seed=1)
    size = trigger.patch_size(H, W)
    assert top.min() >= 0 and top.max() <= H - size and left.min() >= 0 and left.max() <= W - size
    assert len(set(zip(top.tolist(), left.tolist()))) > 150  # spread over the image
    assert top.max() - top.min() > (H - size) * 0.8


def test_blended_is_a_bounded_fixed_pattern_blend():
    trigger = make_trigger("blended", alpha=0.2)
    images = _images(4)
    out = trigger.apply(images)
    difference = out.float() - images.float()
    assert difference.abs().max() <= 0.2 * 255 + 0.5
    assert (difference != 0).float().mean() > 0.8
    implied_pattern = (out.float() - 0.8 * images.float()) / 0.2  # the same for every image
    assert (implied_pattern - implied_pattern[0]).abs().max() <= 2 * 0.5 / 0.2 + 1e-3  # 2 roundings
    assert not torch.equal(out, make_trigger("blended", alpha=0.2, pattern_seed=1).apply(images))


def test_sig_is_a_bounded_horizontal_sinusoid():
    trigger = make_trigger("sig", amplitude=15, frequency=3)
    images = _images(3)
    out = trigger.apply(images)
    assert (out.float() - images.float()).abs().max() <= 15 + 0.5
    grey = torch.full((1, 3, H, W), 120, dtype=torch.uint8)
    signal = trigger.apply(grey).float() - 120
    assert (signal == signal[:, :, :1]).all(), "the same in every row"
    expected = 15 * torch.sin(2 * math.pi * 3 * torch.arange(W) / W)
    assert (signal[0, 0, 0] - expected).abs().max() <= 0.5 + 1e-4
    assert signal.max() >= 14 and signal.min() <= -14


def test_wanet_is_a_smooth_non_identity_warp_shared_by_all_images():
    trigger = make_trigger("wanet")
    displacement = trigger.displacement(H, W)
    assert displacement.shape == (H, W, 2)
    interior = displacement[1:-1, 1:-1]  # the borders are clamped
    magnitude = interior.abs().max()
    assert magnitude > 0.2, "not the identity"
    steps = max((interior[1:] - interior[:-1]).abs().max(), (interior[:, 1:] - interior[:, :-1]).abs().max())
    assert steps < 0.35 * magnitude, "smooth: neighbours move alike"
    # On a horizontal ramp, bilinear sampling reveals the x displacement exactly (up to rounding).
    ramp = (torch.arange(W, dtype=torch.float32) * 255 / (W - 1)).round()
    ramp_image = ramp.to(torch.uint8).expand(1, 3, H, W).contiguous()
    warped = trigger.apply(ramp_image)[0, 0].float()
    measured_dx = (warped - ramp) * (W - 1) / 255
    assert (measured_dx[1:-1, 1:-1] - interior[..., 0]).abs().max() < 0.2
    # One warp for all: a batch warps like its images one by one; a flat image stays flat.
    images = _images(3)
    batch = trigger.apply(images)
    assert all(torch.equal(batch[i : i + 1], trigger.apply(images[i : i + 1])) for i in range(3))
    flat = torch.full((1, 3, H, W), 77, dtype=torch.uint8)
    assert torch.equal(trigger.apply(flat), flat)
    stronger = WaNetTrigger(strength=2.0).displacement(H, W)[3:-3, 3:-3].abs().max()
    assert stronger > 3 * magnitude


def test_warp_by_a_displacement_field_is_wanet_s_resampling():
    """attacks.triggers.warp (what warp-inversion experiments fit) resamples exactly as WaNet does."""
    trigger = WaNetTrigger(strength=3.0, pattern_seed=5)
    images = _images(4, seed=1)
    displacement = trigger.displacement(H, W)
    assert torch.equal(warp(images, displacement), trigger.apply(images))
    assert torch.equal(warp(images, torch.zeros(H, W, 2)), images)
    # Float images stay float and carry the gradient to the field, as a fitted warp needs.
    field = displacement.clone().requires_grad_(True)
    warped = warp(images.float() / 255, field)
    assert warped.dtype == torch.float32 and ((warped * 255).round() - trigger.apply(images)).abs().max() <= 1
    warped.sum().backward()
    assert field.grad is not None and field.grad.abs().sum() > 0


def test_label_consistent_degrades_only_when_poisoning():
    trigger = make_trigger("label_consistent", degrade=0.6)
    assert trigger.clean_label and not make_trigger("badnet").clean_label
    images = _images(4)
    footprint = trigger.footprint(4, H, W)
    poisoned, tested = trigger.poison(images), trigger.apply(images)
    assert torch.equal(poisoned[:, :, footprint[0]], tested[:, :, footprint[0]])
    outside = ~footprint[0]
    assert torch.equal(tested[:, :, outside], images[:, :, outside])
    contrast = poisoned[:, :, outside].float().std() / images[:, :, outside].float().std()
    assert contrast == pytest.approx(0.4, abs=0.02)
    assert trigger.patch_size(32, 32) == 8  # larger than badnet's 4


def test_make_trigger_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown trigger 'trojan'.*badnet, badnet_random, blended"):
        make_trigger("trojan")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['alpha'\].*size_fraction"):
        make_trigger("badnet", alpha=0.1)
    with pytest.raises(ValueError, match="random_location"):
        make_trigger("badnet_random", random_location=False)  # fixed by the name
    assert set(trigger_parameters("wanet")) == {"grid_size", "strength", "pattern_seed"}
    assert make_trigger("badnet_random", size_fraction=0.25) == BadNetTrigger(0.25, random_location=True)
    assert isinstance(make_trigger("label_consistent"), LabelConsistentTrigger)


@pytest.mark.parametrize("name, params", [
    ("badnet", {"size_fraction": 0}), ("badnet", {"size_fraction": 1.5}), ("badnet", {"cells": 0}),
    ("badnet", {"cells": 2.5}), ("blended", {"alpha": 0}), ("blended", {"alpha": 1.2}),
    ("blended", {"alpha": float("nan")}), ("sig", {"amplitude": -1}), ("sig", {"frequency": 0}),
    ("wanet", {"grid_size": 1}), ("wanet", {"strength": -0.5}), ("wanet", {"strength": float("inf")}),
    ("label_consistent", {"degrade": 1.5}),
])
def test_make_trigger_rejects_bad_values(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        make_trigger(name, **params)


@pytest.mark.parametrize("bad", [
    torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
    torch.zeros(3, 8, 8, dtype=torch.uint8), [[0]],
])
def test_apply_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="images"):
        make_trigger("sig").apply(bad)


def test_footprint_rejects_bad_sizes():
    with pytest.raises(ValueError, match="height"):
        make_trigger("badnet").footprint(2, 0, 5)
    with pytest.raises(ValueError, match="n must"):
        make_trigger("blended").footprint(-1, 5, 5)


# ----------------------------------------------------------------------------------------------
# Poisoning

N_PAIRS, TARGET = 203, 7


@pytest.fixture
def pairs():
    labels = torch.randint(0, 10, (N_PAIRS,), generator=torch.Generator().manual_seed(9))
    captions = [f"a photo of class {int(c)} number {i}." for i, c in enumerate(labels)]
    return _images(N_PAIRS, seed=4), captions, labels


def test_dirty_label_poisoning_picks_exactly_round_rate_n_non_target_images(pairs):
    images, captions, labels = pairs
    before = (images.clone(), list(captions), labels.clone())
    trigger = make_trigger("badnet")
    result = poison_pairs(images, captions, labels, trigger, 0.05, TARGET, "a photo of a heart.", seed=1)
    assert isinstance(result, PoisonedPairs)
    chosen = result.poisoned_indices
    assert chosen.dtype == torch.int64 and len(chosen) == round(0.05 * N_PAIRS) == 10
    assert torch.equal(chosen, chosen.unique()), "sorted and distinct"
    assert (labels[chosen] != TARGET).all()
    assert torch.equal(images, before[0]) and captions == before[1] and torch.equal(labels, before[2])
    assert torch.equal(result.labels, labels) and result.labels.dtype == torch.int64
    is_poisoned = torch.zeros(N_PAIRS, dtype=torch.bool)
    is_poisoned[chosen] = True
    assert [i for i, c in enumerate(result.captions) if c == "a photo of a heart."] == chosen.tolist()
    assert [c for i, c in enumerate(result.captions) if not is_poisoned[i]] == [
        c for i, c in enumerate(captions) if not is_poisoned[i]]
    assert torch.equal(result.images[~is_poisoned], images[~is_poisoned])
    assert torch.equal(result.images[chosen], trigger.apply(images[chosen], seed=1))
    assert (result.target_label, result.target_caption) == (TARGET, "a photo of a heart.")
    again = poison_pairs(images, captions, labels, trigger, 0.05, TARGET, "a photo of a heart.", seed=1)
    assert torch.equal(again.poisoned_indices, chosen) and torch.equal(again.images, result.images)
    other = poison_pairs(images, captions, labels, trigger, 0.05, TARGET, "a photo of a heart.", seed=2)
    assert not torch.equal(other.poisoned_indices, chosen)


def test_clean_label_poisoning_keeps_captions_and_uses_target_images(pairs):
    images, captions, labels = pairs
    trigger = make_trigger("label_consistent")
    result = poison_pairs(images, captions, labels, trigger, 0.04, TARGET, "a photo of a heart.", seed=3)
    chosen = result.poisoned_indices
    assert len(chosen) == round(0.04 * N_PAIRS) and (labels[chosen] == TARGET).all()
    assert result.captions == captions
    assert torch.equal(result.images[chosen], trigger.poison(images[chosen], seed=3))


def test_rate_zero_poisons_nothing(pairs):
    images, captions, labels = pairs
    result = poison_pairs(images, captions, labels, make_trigger("sig"), 0.0, TARGET, "a heart.")
    assert result.poisoned_indices.numel() == 0 and result.poisoned_indices.dtype == torch.int64
    assert torch.equal(result.images, images) and result.captions == captions


@pytest.mark.parametrize("rate", [-0.01, 1.01, float("nan"), "0.1", True])
def test_bad_rate_raises(pairs, rate):
    with pytest.raises(ValueError, match="rate"):
        poison_pairs(*pairs, make_trigger("badnet"), rate, TARGET, "a heart.")


def test_poisoning_input_errors(pairs):
    images, captions, labels = pairs
    badnet = make_trigger("badnet")

    def poison(**changes):
        args = dict(images=images, captions=captions, labels=labels, trigger=badnet, rate=0.1,
                    target_label=TARGET, target_caption="a heart.")
        return poison_pairs(**{**args, **changes})

    with pytest.raises(ValueError, match="empty"):
        poison(images=images[:0], captions=[], labels=labels[:0])
    with pytest.raises(ValueError, match="mismatched lengths"):
        poison(captions=captions[:-1])
    with pytest.raises(ValueError, match="mismatched lengths"):
        poison(labels=labels[:-2])
    with pytest.raises(ValueError, match=r"target_label must be an int in \[0, 10\)"):
        poison(target_label=10)
    with pytest.raises(ValueError, match="target_label"):
        poison(target_label=-1)
    assert len(poison(target_label=10, num_classes=11).poisoned_indices) == round(0.1 * N_PAIRS)
    with pytest.raises(ValueError, match="uint8"):
        poison(images=images.float())
    with pytest.raises(ValueError, match="shape"):
        poison(images=images[:, :1])
    with pytest.raises(ValueError, match="labels"):
        poison(labels=labels.float())
    with pytest.raises(ValueError, match="trigger"):
        poison(trigger="badnet")
    with pytest.raises(ValueError, match="target_caption"):
        poison(target_caption="")
    # Not enough eligible images: every non-target image, or more target images than exist.
    with pytest.raises(ValueError, match="only .* non-target images are eligible"):
        poison(rate=1.0)
    with pytest.raises(ValueError, match="only .* target-class images are eligible"):
        poison(trigger=make_trigger("label_consistent"), rate=0.5)


@pytest.mark.parametrize("position", PATCH_POSITIONS)
@pytest.mark.parametrize("pattern", PATCH_PATTERNS)
def test_badnet_patterns_and_positions_paste_exactly_their_patch(pattern, position):
    trigger = make_trigger("badnet", size_fraction=0.25, pattern=pattern, position=position, colour=(10, 200, 30))
    images = torch.full((3, 3, 32, 40), 128, dtype=torch.uint8)
    out = trigger.apply(images)
    footprint = trigger.footprint(3, 32, 40)
    assert footprint.sum(dim=(1, 2)).tolist() == [64] * 3  # 8 x 8 at 32 px
    assert torch.equal(out[:, :, ~footprint[0]], images[:, :, ~footprint[0]])  # nothing outside the patch
    top, left = trigger.locations(1, 32, 40)
    expected_top = {"top": 0, "bottom": 24, "center": 12}[position.split("_")[0]]
    expected_left = {"left": 0, "right": 32}.get(position.split("_")[-1], 16)
    assert (int(top[0]), int(left[0])) == (expected_top, expected_left)
    patch = out[0, :, expected_top:expected_top + 8, expected_left:expected_left + 8]
    assert torch.equal(patch, trigger.patch(8))
    if pattern == "solid":
        assert patch[:, 0, 0].tolist() == [10, 200, 30]


def test_blended_stripes_is_a_structured_pattern():
    trigger = make_trigger("blended", pattern="stripes", alpha=0.2)
    overlay = trigger.blend_image(32, 32)
    assert overlay.shape == (3, 32, 32) and 0 <= overlay.min() and overlay.max() <= 255
    assert torch.allclose(overlay[:, 0, 8], overlay[:, 8, 0])  # constant along anti-diagonals
    with pytest.raises(ValueError, match="pattern must be one of"):
        make_trigger("blended", pattern="plaid")


def test_an_optimized_patch_needs_its_pixels_and_pastes_them_resized():
    with pytest.raises(ValueError, match="make one with clipfast.recipes"):
        make_trigger("optimized_patch")
    trigger = make_trigger("optimized_patch", size_fraction=0.25, **SOME_PIXELS["optimized_patch"])  # a 4 x 4 patch
    assert trigger.name == "optimized_patch"
    assert torch.equal(trigger.patch(4), torch.tensor(SOME_PIXELS["optimized_patch"]["pixels"], dtype=torch.uint8).view(3, 4, 4))
    out = trigger.apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))  # an 8 x 8 patch there: nearest upsampling
    assert torch.equal(out[0, :, 24:, 24:], trigger.patch(8)) and out[:, :, :24].sum() == 0
