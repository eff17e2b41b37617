"""mask_crop: every backend against the PyTorch reference, edge cases, opcheck, errors."""

import os

import pytest
import torch

from clipfast.ops import BackendUnavailable, mask_crop, reference

MEAN = [0.48, 0.46, 0.41]
STD = [0.27, 0.26, 0.28]
# Tolerances: fp32 differs from the reference only by summation order (~1e-5 after normalisation);
# bf16 output is one rounding of an fp32 value, so at most one bf16 ulp (2^-7 relative).
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}

compiled_backends = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_inputs(batch, num_masks, height, width, image_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen)
    if image_dtype != torch.uint8:
        images = (images.float() / 255).to(image_dtype)
    masks = torch.zeros(batch, num_masks, height, width, dtype=torch.bool)
    for b in range(batch):
        for m in range(num_masks):
            kind = (b + m) % 5
            if kind == 0:  # random blob-ish region
                cy, cx = torch.randint(0, height, (1,), generator=gen), torch.randint(0, width, (1,), generator=gen)
                yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
                r = 2 + int(torch.randint(1, max(2, min(height, width) // 2), (1,), generator=gen))
                masks[b, m] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif kind == 1:  # scattered pixels
                masks[b, m] = torch.rand(height, width, generator=gen) > 0.85
            elif kind == 2:  # touches bottom-right border
                masks[b, m, height // 2 :, width - 3 :] = True
            elif kind == 3:  # empty (padding)
                pass
            else:  # all-covering
                masks[b, m] = True
    device = "cuda" if device == "cuda" else "cpu"  # a backend name or a device
    return images.to(device), masks.to(device)


def run(images, masks, backend, **kwargs):
    kwargs = {"out_size": 23, "margin": 0.15, "background": 0.37, "mean": MEAN, "std": STD, **kwargs}
    out_size = kwargs.pop("out_size")
    return mask_crop(images, masks, out_size, backend=backend, **kwargs)


def assert_matches_reference(images, masks, backend, out_dtype, **kwargs):
    got = run(images, masks, backend, out_dtype=out_dtype, **kwargs)
    want = run(images.cpu(), masks.cpu(), "reference", out_dtype=out_dtype, **kwargs)
    assert got.crops.dtype == out_dtype
    torch.testing.assert_close(got.crops.float().cpu(), want.crops.float(), **TOLERANCE[out_dtype])
    assert torch.equal(got.boxes.cpu(), want.boxes)
    assert torch.equal(got.valid.cpu(), want.valid)


@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_random_odd_sizes(backend, image_dtype, out_dtype):
    images, masks = random_inputs(3, 7, 41, 29, image_dtype, backend)
    assert_matches_reference(images, masks, backend, out_dtype)


@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("out_size,margin", [(1, 0.0), (5, 0.5), (64, 0.1), (17, 3.0)])
def test_matches_reference_upsampling_and_downsampling(backend, square, out_size, margin):
    images, masks = random_inputs(2, 5, 19, 33, torch.float32, backend, seed=3)
    assert_matches_reference(images, masks, backend, torch.float32, out_size=out_size, margin=margin, square=square)


@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.bfloat16])
def test_square_boxes_match_reference(backend, image_dtype):
    images, masks = random_inputs(3, 7, 23, 41, image_dtype, backend, seed=5)
    assert_matches_reference(images, masks, backend, torch.bfloat16, square=True, margin=0.3)


def test_square_box_keeps_aspect_ratio_and_pads_with_background():
    images = torch.rand(1, 3, 12, 12)
    masks = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    masks[0, 0, 5:7, 0:8] = True  # a flat bar touching the left border: 2 x 8
    out = run(images, masks, "cpu", out_size=8, margin=0.0, square=True, mean=[0, 0, 0], std=[1, 1, 1])
    assert out.boxes[0, 0].tolist() == [2, 0, 10, 8]  # 8 x 8, centred vertically on the bar
    crop = out.crops[0, 0]
    torch.testing.assert_close(crop[:, 3:5, :], images[0, :, 5:7, 0:8])  # the bar, unstretched
    torch.testing.assert_close(crop[:, :3], torch.full_like(crop[:, :3], 0.37))  # background above
    corner = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    corner[0, 0, 10:12, 10:12] = True  # bottom-right corner: the square reaches outside the image
    out = run(images, corner, "cpu", out_size=6, margin=0.5, square=True, mean=[0, 0, 0], std=[1, 1, 1])
    assert out.boxes[0, 0].tolist() == [9, 9, 13, 13]
    torch.testing.assert_close(out.crops[0, 0, :, -1], torch.full((3, 6), 0.37))  # outside the image


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends)
def test_edge_cases_have_defined_results(backend):
    images, masks = random_inputs(1, 3, 9, 11, torch.float32, backend)
    masks[:] = False
    masks[0, 1] = True  # all-covering
    masks[0, 2, 8, 10] = True  # one pixel in the bottom-right corner
    out = run(images, masks, backend, out_size=4, margin=0.0, mean=[0, 0, 0], std=[1, 1, 1])
    assert out.valid.tolist() == [[False, True, True]]
    assert out.boxes[0].tolist() == [[0, 0, 0, 0], [0, 0, 9, 11], [8, 10, 9, 11]]
    torch.testing.assert_close(out.crops[0, 0], torch.full_like(out.crops[0, 0], 0.37))
    corner = images[0, :, 8, 10].view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(out.crops[0, 2], corner)


def test_full_mask_without_margin_at_native_size_is_the_normalised_image():
    images, _ = random_inputs(2, 1, 13, 13, torch.uint8, "cpu")
    masks = torch.ones(2, 1, 13, 13, dtype=torch.uint8)
    out = run(images, masks, "cpu", out_size=13, margin=0.0)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out.crops[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_pixels_outside_the_mask_do_not_leak():
    images, masks = random_inputs(1, 1, 15, 15, torch.float32, "cpu")
    masks[:] = False
    masks[0, 0, 3:9, 4:10] = True
    masks[0, 0, 5, 6] = False  # a hole
    changed = images.clone()
    changed[0, :, 5, 6] = 1.0 - changed[0, :, 5, 6]  # alter only the hole pixel
    changed[0, :, 12:, 12:] = 0.0  # and pixels outside the box
    a = run(images, masks, "cpu", margin=0.3)
    b = run(changed, masks, "cpu", margin=0.3)
    torch.testing.assert_close(a.crops, b.crops, atol=0, rtol=0)


def test_opcheck():
    images, masks = random_inputs(2, 3, 17, 21, torch.uint8, "cpu")
    for out_dtype in (torch.float32, torch.bfloat16):
        for square in (False, True):
            args = (images, masks, 11, 0.1, square, 0.5, MEAN, STD, out_dtype)
            torch.library.opcheck(torch.ops.clipfast.mask_crop.default, args)


def test_torch_compile_matches_eager():
    images, masks = random_inputs(2, 3, 17, 21, torch.uint8, "cpu")

    def crop(images, masks):
        return run(images, masks, "cpu").crops * 2.0

    compiled = torch.compile(crop, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images, masks), crop(images, masks))


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
        (dict(backend="gpu"), ValueError, "unknown backend"),
        pytest.param(dict(backend="triton"), BackendUnavailable, "no CUDA GPU for Triton",
                     marks=pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                              reason="Triton can run here")),
    ],
)
def test_bad_input_gets_a_clear_error(change, error, message):
    kwargs = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), masks=torch.zeros(2, 1, 8, 8, dtype=torch.bool),
                  out_size=4, mean=MEAN, std=STD, backend="auto")
    kwargs.update(change)
    images, masks, out_size = kwargs.pop("images"), kwargs.pop("masks"), kwargs.pop("out_size")
    with pytest.raises(error, match=message):
        mask_crop(images, masks, out_size, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_backend_without_a_gpu_says_why():
    images, masks = random_inputs(1, 1, 8, 8, torch.uint8, "cpu")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        run(images, masks, "cuda")


def test_registered_op_checks_its_inputs_too():
    with pytest.raises(RuntimeError, match="masks .* do not match images"):
        torch.ops.clipfast.mask_crop(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 9, dtype=torch.bool),
                                     4, 0.1, False, 0.5, MEAN, STD, torch.float32)


def test_reference_box_rule():
    mask = torch.zeros(10, 7, dtype=torch.bool)
    mask[1:9, 2:6] = True  # 8 tall, 4 wide
    assert reference.mask_box(mask, 0.25) == (0, 1, 10, 7)
    assert reference.mask_box(torch.zeros(3, 3, dtype=torch.bool), 0.25) is None
