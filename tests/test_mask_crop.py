"""mask_crop on every backend: against the PyTorch reference (random odd sizes, both mask sets, up-
and downsampling, square boxes, channels, margins, no masks), edge cases with defined results,
opcheck, torch.compile, input errors, and the GPU at realistic sizes. Inputs, tolerances and the
assertion live in optest.py; backend selection is in test_op_dispatch.py."""

import pytest
import torch
from optest import (
    ALL_BACKENDS,
    COMPILE_BACKENDS,
    COMPILED_BACKENDS,
    MEAN,
    STD,
    TRITON,
    assert_crops_match_reference,
    crop_inputs,
    device_of,
    opcheck,
    run_crop,
    tolerance,
)

from clipfast.ops import mask_crop, reference

IMAGE_DTYPES = [torch.uint8, torch.float32, torch.bfloat16]
OUT_DTYPES = [torch.float32, torch.bfloat16]
NO_NORMALISATION = dict(mean=[0, 0, 0], std=[1, 1, 1])


# ------------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_matches_reference_on_random_odd_sizes(backend, image_dtype, out_dtype):
    images, masks = crop_inputs(3, 7, 41, 29, image_dtype)
    assert_crops_match_reference(images, masks, backend, out_dtype=out_dtype)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
def test_matches_reference_on_every_mask_kind(backend, image_dtype, out_dtype, square):
    images, masks = crop_inputs(2, 6, 19, 23, image_dtype, mask_set="six_kinds")  # every kind, odd sizes
    got = assert_crops_match_reference(images, masks, backend, 13, out_dtype, square=square)
    assert not got.valid[0, 3] and got.valid.sum() == 10


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("out_size,margin", [(1, 0.0), (5, 0.5), (64, 0.1), (17, 3.0)])
def test_matches_reference_upsampling_and_downsampling(backend, square, out_size, margin):
    images, masks = crop_inputs(2, 5, 19, 33, torch.float32, seed=3)
    assert_crops_match_reference(images, masks, backend, out_size, margin=margin, square=square)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.bfloat16])
def test_square_boxes_match_reference(backend, image_dtype):
    images, masks = crop_inputs(3, 7, 23, 41, image_dtype, seed=5)
    assert_crops_match_reference(images, masks, backend, out_dtype=torch.bfloat16, square=True, margin=0.3)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("channels,out_size,height,width", [
    (1, 1, 7, 5),     # a 1x1 crop (Triton specialises the size 1)
    (4, 5, 1, 9),     # one-row images, 4 channels
    (3, 40, 3, 300),  # several output tiles and several mask column tiles
])
def test_channels_and_odd_geometry(backend, channels, out_size, height, width):
    images, masks = crop_inputs(1, 6, height, width, torch.uint8, channels=channels, seed=1, mask_set="six_kinds")
    assert_crops_match_reference(images, masks, backend, out_size)
    assert_crops_match_reference(images, masks, backend, out_size, square=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
def test_margins(backend, margin):
    images, masks = crop_inputs(1, 6, 17, 12, torch.float32, seed=2, mask_set="six_kinds")
    assert_crops_match_reference(images, masks, backend, 9, margin=margin)
    assert_crops_match_reference(images, masks, backend, 9, margin=margin, square=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_empty_mask_is_background_and_flagged(backend):
    images = torch.rand(1, 3, 8, 8)
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.uint8)
    masks[0, 1, 2:4, 3:7] = 7  # nonzero uint8 = inside
    got = assert_crops_match_reference(images, masks, backend, 6)
    assert got.valid.tolist() == [[False, True]] and got.boxes[0, 0].tolist() == [0, 0, 0, 0]
    background = (0.37 - torch.tensor(MEAN[:3])) / torch.tensor(STD[:3])
    torch.testing.assert_close(got.crops[0, 0].cpu(), background.view(3, 1, 1).expand(3, 6, 6))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_without_masks(backend):
    images, masks = crop_inputs(2, 0, 5, 6, torch.uint8, mask_set="six_kinds")  # M = 0
    assert_crops_match_reference(images, masks, backend, 4)


# ------------------------------------------------------------------ defined results, any backend

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_square_box_keeps_aspect_ratio_and_pads_with_background(backend):
    device = device_of(backend)
    images = torch.rand(1, 3, 12, 12).to(device)
    masks = torch.zeros(1, 1, 12, 12, dtype=torch.bool, device=device)
    masks[0, 0, 5:7, 0:8] = True  # a flat bar touching the left border: 2 x 8
    out = run_crop(images, masks, backend, out_size=8, margin=0.0, square=True, **NO_NORMALISATION)
    assert out.boxes[0, 0].tolist() == [2, 0, 10, 8]  # 8 x 8, centred vertically on the bar
    crop = out.crops[0, 0]
    torch.testing.assert_close(crop[:, 3:5, :], images[0, :, 5:7, 0:8])  # the bar, unstretched
    torch.testing.assert_close(crop[:, :3], torch.full_like(crop[:, :3], 0.37))  # background above
    corner = torch.zeros(1, 1, 12, 12, dtype=torch.bool, device=device)
    corner[0, 0, 10:12, 10:12] = True  # bottom-right corner: the square reaches outside the image
    out = run_crop(images, corner, backend, out_size=6, margin=0.5, square=True, **NO_NORMALISATION)
    assert out.boxes[0, 0].tolist() == [9, 9, 13, 13]
    torch.testing.assert_close(out.crops[0, 0, :, -1].cpu(), torch.full((3, 6), 0.37))  # outside the image


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_edge_cases_have_defined_results(backend):
    images, masks = crop_inputs(1, 3, 9, 11, torch.float32)
    masks[:] = False
    masks[0, 1] = True  # all-covering
    masks[0, 2, 8, 10] = True  # one pixel in the bottom-right corner
    device = device_of(backend)
    images, masks = images.to(device), masks.to(device)
    out = run_crop(images, masks, backend, out_size=4, margin=0.0, **NO_NORMALISATION)
    assert out.valid.tolist() == [[False, True, True]]
    assert out.boxes[0].tolist() == [[0, 0, 0, 0], [0, 0, 9, 11], [8, 10, 9, 11]]
    torch.testing.assert_close(out.crops[0, 0], torch.full_like(out.crops[0, 0], 0.37))
    corner = images[0, :, 8, 10].view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(out.crops[0, 2], corner)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_full_mask_without_margin_at_native_size_is_the_normalised_image(backend):
    images, _ = crop_inputs(2, 1, 13, 13, torch.uint8)
    masks = torch.ones(2, 1, 13, 13, dtype=torch.uint8)
    device = device_of(backend)
    out = run_crop(images.to(device), masks.to(device), backend, out_size=13, margin=0.0)
    expected = (images.float() / 255 - torch.tensor(MEAN[:3]).view(3, 1, 1)) / torch.tensor(STD[:3]).view(3, 1, 1)
    close = tolerance("mask_crop.identity", torch.float32, backend)
    torch.testing.assert_close(out.crops[:, 0].cpu(), expected, **close)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pixels_outside_the_mask_do_not_leak(backend):
    images, masks = crop_inputs(1, 1, 15, 15, torch.float32)
    masks[:] = False
    masks[0, 0, 3:9, 4:10] = True
    masks[0, 0, 5, 6] = False  # a hole
    changed = images.clone()
    changed[0, :, 5, 6] = 1.0 - changed[0, :, 5, 6]  # alter only the hole pixel
    changed[0, :, 12:, 12:] = 0.0  # and pixels outside the box
    device = device_of(backend)
    a = run_crop(images.to(device), masks.to(device), backend, margin=0.3)
    b = run_crop(changed.to(device), masks.to(device), backend, margin=0.3)
    torch.testing.assert_close(a.crops, b.crops, atol=0, rtol=0)


def test_reference_box_rule():
    mask = torch.zeros(10, 7, dtype=torch.bool)
    mask[1:9, 2:6] = True  # 8 tall, 4 wide
    assert reference.mask_box(mask, 0.25) == (0, 1, 10, 7)
    assert reference.mask_box(torch.zeros(3, 3, dtype=torch.bool), 0.25) is None


# ------------------------------------------------------------------------- opcheck, torch.compile

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_opcheck(backend):
    device = device_of(backend)
    images, masks = crop_inputs(2, 3, 17, 21, torch.uint8)
    images, masks = images.to(device), masks.to(device)
    for out_dtype in OUT_DTYPES:
        for square in (False, True):
            opcheck(backend, "mask_crop", (images, masks, 11, 0.1, square, 0.5, MEAN[:3], STD[:3], out_dtype))
    images, masks = crop_inputs(1, 3, 9, 11, torch.uint8, mask_set="six_kinds")
    opcheck(backend, "mask_crop", (images.to(device), masks.to(device), 7, 0.1, True, 0.5, MEAN[:3], STD[:3],
                                   torch.bfloat16))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_matches_eager(backend):
    images, masks = crop_inputs(2, 3, 17, 21, torch.uint8)
    device = device_of(backend)
    images, masks = images.to(device), masks.to(device)

    def crop(images, masks):
        return run_crop(images, masks, backend).crops * 2.0

    compiled = torch.compile(crop, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images, masks), crop(images, masks))


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(images=torch.zeros(3, 8, 8, dtype=torch.uint8)), ValueError, r"images must be \[B, C, H, W\]"),
        (dict(masks=torch.zeros(2, 8, 8, dtype=torch.bool)), ValueError, r"masks must be \[B, M, H, W\]"),
        (dict(masks=torch.zeros(2, 1, 8, 9, dtype=torch.bool)), ValueError, "do not match"),
        (dict(masks=torch.zeros(2, 1, 8, 8)), TypeError, "bool or uint8"),
        (dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.int32)), TypeError, "uint8, float32 or bfloat16"),
        (dict(images=torch.zeros(2, 5, 8, 8)), ValueError, "1 to 4 channels"),
        (dict(out_size=0), ValueError, "out_size"),
        (dict(margin=-0.1), ValueError, "margin"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(std=[1, 0, 1]), ValueError, "std must be positive"),
        (dict(mean=[0, 0]), ValueError, "one per channel"),
        (dict(out_dtype=torch.float16), TypeError, "out_dtype"),
        (dict(masks=torch.zeros(2, 1, 8, 8, dtype=torch.bool, device="meta")), ValueError, "but masks on meta"),
    ],
)
def test_bad_input_gets_a_clear_error(change, error, message):
    # Unknown or unusable backends: test_op_dispatch.py.
    kwargs = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), masks=torch.zeros(2, 1, 8, 8, dtype=torch.bool),
                  out_size=4, mean=MEAN[:3], std=STD[:3], backend="auto")
    kwargs.update(change)
    images, masks, out_size = kwargs.pop("images"), kwargs.pop("masks"), kwargs.pop("out_size")
    with pytest.raises(error, match=message):
        mask_crop(images, masks, out_size, **kwargs)


def test_registered_op_checks_its_inputs_too():
    with pytest.raises(RuntimeError, match="masks .* do not match images"):
        torch.ops.clipfast.mask_crop(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 9, dtype=torch.bool),
                                     4, 0.1, False, 0.5, MEAN[:3], STD[:3], torch.float32)


# ------------------------------------------------------------------------- GPU: realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("square", [False, True])
def test_gpu_realistic_sizes(backend, square, out_dtype):
    images, masks = crop_inputs(4, 12, 224, 224, torch.uint8, mask_set="six_kinds")
    assert_crops_match_reference(images, masks, backend, 224, out_dtype, square=square)
