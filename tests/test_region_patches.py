"""region_patches on every backend: against the PyTorch reference (odd grid and patch sizes, every
mask kind of optest.pool_inputs: discs, scattered pixels, one partial patch, empty, all-covering;
bool/uint8/bit-packed masks; uint8/fp32/bf16 images; fp32/bf16 output; the coverage threshold),
edge cases with defined results (one patch, all-covering, empty, no masks, many regions, the
best-patch fallback), opcheck, input errors, and the GPU at ViT-B/16 size. Inputs and tolerances
come from optest.py."""

import pytest
import torch
from optest import (
    COMPILED_BACKENDS,
    MEAN,
    STD,
    TRITON,
    device_of,
    generator,
    opcheck,
    pool_inputs,
    skip_if_interpreted,
    tolerance,
)

from clipfast.ops import pack_mask_bits, reference, region_patches
from clipfast.ops.region_patches import min_pixels

IMAGE_DTYPES = [torch.uint8, torch.float32, torch.bfloat16]
OUT_DTYPES = [torch.float32, torch.bfloat16]


def patch_inputs(batch, num_masks, grid, patch, *, channels=3, image_dtype=torch.uint8, seed=0, mask_set="kinds"):
    """(images [B, C, H, W], bool masks [B, M, H, W]) on the CPU: pool_inputs' masks (every kind),
    random pixels (never all zero) in image_dtype (float images are value/255)."""
    _, masks, _ = pool_inputs(batch, num_masks, grid, patch, 1, seed=seed, mask_set=mask_set)
    height, width = masks.shape[2:]
    images = torch.randint(1, 256, (batch, channels, height, width), dtype=torch.uint8, generator=generator(seed + 7))
    if image_dtype != torch.uint8:
        images = (images.float() / 255).to(image_dtype)
    return images, masks


def run(images, masks, grid, backend, packed=False, **kwargs):
    channels = images.shape[1]
    kwargs = dict(background=0.37, mean=MEAN[:channels], std=STD[:channels]) | kwargs
    width = None
    if packed:
        masks, width = pack_mask_bits(masks)
    device = device_of(backend)
    return region_patches(images.to(device), masks.to(device), grid, packed_width=width, backend=backend, **kwargs)


def assert_matches_reference(images, masks, grid, backend, packed=False, **kwargs):
    """backend (on its device, masks bit-packed if asked) against the reference on the CPU: indices
    and offsets exactly, pixels within tolerance. Returns the backend's output on the CPU."""
    want = run(images, masks, grid, "reference", **kwargs)
    got = run(images, masks, grid, backend, packed, **kwargs)
    got = type(got)(*(t.cpu() for t in got))
    out_dtype = kwargs.get("out_dtype", torch.float32)
    assert got.pixels.dtype == out_dtype and got.pixels.shape == want.pixels.shape
    for name in ("image", "patch", "offsets"):
        assert getattr(got, name).dtype == torch.int64 and torch.equal(getattr(got, name), getattr(want, name)), name
    close = tolerance("region_patches", out_dtype, backend)
    torch.testing.assert_close(got.pixels.float(), want.pixels.float(), **close)
    return got


# ------------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mask_format", ["bool", "uint8", "packed"])
def test_matches_reference(backend, image_dtype, out_dtype, mask_format):
    # A 5x7 grid of 3x2-pixel patches (21 x 14 pixels: not a multiple of 8 when bit-packed), 9 masks.
    images, masks = patch_inputs(3, 9, (7, 7), (3, 2), image_dtype=image_dtype)
    if mask_format == "uint8":
        masks = masks.to(torch.uint8) * 5  # any nonzero value is inside
    assert_matches_reference(images, masks, (7, 7), backend, mask_format == "packed", out_dtype=out_dtype)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("min_coverage", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("packed", [False, True])
def test_coverage_threshold_matches_reference(backend, min_coverage, packed):
    images, masks = patch_inputs(2, 6, (3, 5), (5, 3), seed=2, mask_set="random")
    got = assert_matches_reference(images, masks, (3, 5), backend, packed, min_coverage=min_coverage)
    lengths = got.offsets.diff().view(2, 6)
    assert (lengths[masks.flatten(2).any(-1)] >= 1).all()  # a non-empty region keeps at least one patch


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("channels", [1, 4])
def test_channels_and_many_regions(backend, channels):
    skip_if_interpreted(backend, "70 regions: one interpreted program per kept patch, ~10 s")
    images, masks = patch_inputs(2, 70, (4, 6), (4, 3), channels=channels, seed=5)
    assert_matches_reference(images, masks, (4, 6), backend)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_realistic_vit_grid(backend):
    skip_if_interpreted(backend, "a 224 x 224 grid")
    images, masks = patch_inputs(2, 9, (14, 14), (16, 16), seed=4)
    assert_matches_reference(images, masks, (14, 14), backend, out_dtype=torch.bfloat16)
    assert_matches_reference(images, masks, (14, 14), backend, packed=True, min_coverage=0.5)


# ------------------------------------------------------------------ defined results, any backend

@pytest.mark.parametrize("backend", ["reference"] + COMPILED_BACKENDS)
def test_edge_cases(backend):
    # One image 6 x 9 as a 2x3 grid of 3x3-pixel patches, five masks.
    images = torch.randint(0, 256, (1, 3, 6, 9), dtype=torch.uint8, generator=generator(1))
    masks = torch.zeros(1, 5, 6, 9, dtype=torch.bool)
    masks[0, 1] = True               # all-covering: every patch, the image's own pixels
    masks[0, 2, 4, 4] = True         # one pixel: one patch (4), background elsewhere in it
    masks[0, 3, 0:3, 0:2] = True     # 6 pixels of patch 0 ...
    masks[0, 3, 0, 3] = True         # ... and 1 of patch 1
    masks[0, 4, 0, 0] = masks[0, 4, 5, 8] = True  # one pixel in each of patches 0 and 5: a tie
    out = run(images, masks, (2, 3), backend, mean=[0.0] * 3, std=[1.0] * 3, background=0.25)
    out = type(out)(*(t.cpu() for t in out))
    assert out.offsets.tolist() == [0, 0, 6, 7, 9, 11]  # the empty mask 0 has no token
    assert out.image.tolist() == [0] * 11
    assert out.patch.tolist() == [0, 1, 2, 3, 4, 5, 4, 0, 1, 0, 5]
    tiles = (images[0].float() / 255).reshape(3, 2, 3, 3, 3).permute(1, 3, 0, 2, 4).reshape(6, 3, 3, 3)
    torch.testing.assert_close(out.pixels[:6], tiles)
    expected = torch.full((3, 3, 3), 0.25)
    expected[:, 1, 1] = tiles[4, :, 1, 1]
    torch.testing.assert_close(out.pixels[6], expected)
    # A higher threshold drops mask 3's one-pixel patch; mask 4 (best patches: 1 pixel each) keeps both.
    strict = run(images, masks, (2, 3), backend, min_coverage=0.5)
    assert strict.offsets.diff().tolist() == [0, 6, 1, 1, 2]
    # Masks 1 and 2 both keep everything / their only patch whatever the threshold.
    assert run(images, masks, (2, 3), backend, min_coverage=1.0).offsets.diff().tolist() == [0, 6, 1, 1, 2]


@pytest.mark.parametrize("backend", ["reference"] + COMPILED_BACKENDS)
def test_no_tokens(backend):
    images, _ = patch_inputs(2, 1, (2, 2), (2, 2))
    empty = run(images, torch.zeros(2, 3, 4, 4, dtype=torch.bool), (2, 2), backend)
    assert empty.pixels.shape == (0, 3, 2, 2) and empty.offsets.tolist() == [0] * 7
    none = run(images, torch.zeros(2, 0, 4, 4, dtype=torch.bool), (2, 2), backend)
    assert none.pixels.shape == (0, 3, 2, 2) and none.offsets.tolist() == [0]


def test_min_pixels():
    assert min_pixels(0.0, 256) == 1 and min_pixels(0.5, 256) == 128 and min_pixels(1.0, 256) == 256
    assert min_pixels(0.3, 6) == 2 and min_pixels(1e-9, 6) == 1


def test_keep_rule():
    counts = torch.tensor([[0.0, 3, 9, 9], [1, 2, 0, 0], [0, 0, 0, 0]])
    assert reference.region_patch_keep(counts, 4).tolist() == [[False, False, True, True], [False, True, False, False],
                                                               [False] * 4]
    assert reference.region_patch_keep(counts, 1).tolist() == [[False, True, True, True], [True, True, False, False],
                                                               [False] * 4]


# ---------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_opcheck(backend):
    device = device_of(backend)
    images, masks = (t.to(device) for t in patch_inputs(2, 4, (3, 2), (2, 3), seed=1))
    opcheck(backend, "region_patches", (images, masks, 3, 2, 1, 0.4, MEAN[:3], STD[:3], torch.float32, 0))
    packed, width = pack_mask_bits(masks)
    opcheck(backend, "region_patches", (images.float() / 255, packed, 3, 2, 3, 0.4, MEAN[:3], STD[:3], torch.bfloat16,
                                        width))


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("change,message", [
    (dict(grid=(4, 3)), "not a multiple"),
    (dict(masks=torch.ones(2, 3, 6, 5, dtype=torch.bool)), "do not match"),
    (dict(masks=torch.ones(2, 3, 6, 6)), "bool/uint8"),
    (dict(packed_width=6), "bit-packed"),
    (dict(min_coverage=1.5), "min_coverage"),
    (dict(grid=(3, 0)), "region_patches: grid must be"),
    (dict(mean=[0.5]), "region_patches: mean needs 3"),
])
def test_bad_input(change, message):
    args = dict(images=torch.zeros(2, 3, 6, 6, dtype=torch.uint8), masks=torch.ones(2, 3, 6, 6, dtype=torch.bool),
                grid=(3, 3)) | change
    images, masks, grid = args.pop("images"), args.pop("masks"), args.pop("grid")
    with pytest.raises((ValueError, TypeError), match=message):
        region_patches(images, masks, grid, backend="cpu", **args)


# ------------------------------------------------------------------------- GPU: realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", TRITON])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_realistic_sizes(backend, packed):
    images, masks = patch_inputs(8, 32, (14, 14), (16, 16), seed=9, mask_set="random")  # ViT-B/16 at 224 px
    for out_dtype in OUT_DTYPES:
        assert_matches_reference(images, masks, (14, 14), backend, packed, out_dtype=out_dtype, min_coverage=0.25)
