"""Triton backend: every op against the PyTorch reference, edge cases, gradients, opcheck.

Without a GPU the kernels run under Triton's CPU interpreter at small odd sizes; with a GPU the same
tests run compiled on CUDA, and the `gpu`-marked ones add realistic sizes, the full opcheck and
torch.compile. Run: pytest tests/test_triton_ops.py
"""

import os

import pytest
import torch

from clipfast.ops import mask_crop, mask_pool, pack_mask_bits, region_score, region_topk

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
INTERPRET = not HAS_GPU
MEAN = [0.48, 0.46, 0.41, 0.5]
STD = [0.27, 0.26, 0.28, 0.3]
# Tolerances: fp32 differs from the reference only by summation order; a bf16 output is one rounding
# of an fp32 value, so at most one bf16 ulp (2^-7 relative) apart.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}
# Without a GPU, opcheck's AOT-dispatch test would hand fake tensors to the interpreter: left out.
OPCHECK_KWARGS = {} if HAS_GPU else dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _import_triton_ops():
    """(clipfast.ops.triton or None, why not). Without a GPU its kernels must be built for the CPU
    interpreter; Triton picks the mode when it decorates a function, its own standard library
    included, so TRITON_INTERPRET=1 must be set when triton is first imported: here, at collection,
    before other test modules run anything that imports triton. The variable is restored at once so
    that other modules see the environment they expect."""
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        from clipfast.ops import triton as ops
    except ImportError as error:
        return None, f"triton is not usable: {error}"
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if INTERPRET and not isinstance(triton.language.max, InterpretedFunction):
        return None, "triton was imported without TRITON_INTERPRET=1 before this module: run it in its own process"
    return ops, ""


TRITON_OPS, WHY_NOT = _import_triton_ops()
pytestmark = pytest.mark.skipif(TRITON_OPS is None, reason=WHY_NOT)


@pytest.fixture
def triton_ops():
    return TRITON_OPS


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    # The interpreter (and backends.resolve for CPU tensors) read the variable at call time too.
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def generator(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- mask_crop

def crop_inputs(batch, num_masks, height, width, image_dtype, channels=3, seed=0, device=DEVICE):
    gen = generator(seed)
    images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8, generator=gen)
    if image_dtype != torch.uint8:
        images = (images.float() / 255).to(image_dtype)
    masks = torch.zeros(batch, num_masks, height, width, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for b in range(batch):
        for m in range(num_masks):
            kind = (b + m) % 6
            if kind == 0:  # a disc
                cy = int(torch.randint(0, height, (1,), generator=gen))
                cx = int(torch.randint(0, width, (1,), generator=gen))
                radius = 1 + int(torch.randint(1, max(2, min(height, width) // 2), (1,), generator=gen))
                masks[b, m] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
            elif kind == 1:  # scattered pixels
                masks[b, m] = torch.rand(height, width, generator=gen) > 0.85
            elif kind == 2:  # a thin strip on the bottom-right border: square boxes leave the image
                masks[b, m, height // 2 :, width - 2 :] = True
            elif kind == 3:  # empty (padding)
                pass
            elif kind == 4:  # all-covering
                masks[b, m] = True
            else:  # one pixel in the top-left corner
                masks[b, m, 0, 0] = True
    return images.to(device), masks.to(device)


def assert_crops_match(images, masks, out_size, out_dtype=torch.float32, **kwargs):
    kwargs = dict(margin=0.15, background=0.37, mean=MEAN[: images.shape[1]], std=STD[: images.shape[1]]) | kwargs
    got = mask_crop(images, masks, out_size, out_dtype=out_dtype, backend="triton", **kwargs)
    want = mask_crop(images.cpu(), masks.cpu(), out_size, out_dtype=out_dtype, backend="reference", **kwargs)
    assert got.crops.dtype == out_dtype and got.crops.shape == want.crops.shape
    torch.testing.assert_close(got.crops.float().cpu(), want.crops.float(), **TOLERANCE[out_dtype])
    assert torch.equal(got.boxes.cpu(), want.boxes)
    assert torch.equal(got.valid.cpu(), want.valid)
    return got


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_mask_crop_matches_reference(image_dtype, out_dtype, square):
    images, masks = crop_inputs(2, 6, 19, 23, image_dtype)  # every mask kind, odd sizes
    got = assert_crops_match(images, masks, 13, out_dtype, square=square)
    assert not got.valid[0, 3] and got.valid.sum() == 10


@pytest.mark.parametrize("channels,out_size,height,width", [
    (1, 1, 7, 5),     # a 1x1 crop (Triton specialises the size 1)
    (4, 5, 1, 9),     # one-row images, 4 channels
    (3, 40, 3, 300),  # several output tiles and several mask column tiles
])
def test_mask_crop_channels_and_odd_geometry(channels, out_size, height, width):
    images, masks = crop_inputs(1, 6, height, width, torch.uint8, channels=channels, seed=1)
    assert_crops_match(images, masks, out_size)
    assert_crops_match(images, masks, out_size, square=True)


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
def test_mask_crop_margins(margin):
    images, masks = crop_inputs(1, 6, 17, 12, torch.float32, seed=2)
    assert_crops_match(images, masks, 9, margin=margin)
    assert_crops_match(images, masks, 9, margin=margin, square=True)


def test_mask_crop_empty_mask_is_background_and_flagged():
    images = torch.rand(1, 3, 8, 8, device=DEVICE)
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.uint8, device=DEVICE)
    masks[0, 1, 2:4, 3:7] = 7  # nonzero uint8 = inside
    got = assert_crops_match(images, masks, 6)
    assert got.valid.tolist() == [[False, True]] and got.boxes[0, 0].tolist() == [0, 0, 0, 0]
    background = (0.37 - torch.tensor(MEAN[:3])) / torch.tensor(STD[:3])
    torch.testing.assert_close(got.crops[0, 0].cpu(), background.view(3, 1, 1).expand(3, 6, 6))


# ----------------------------------------------------------------------------------------- mask_pool

def pool_inputs(batch, num_masks, grid_h, grid_w, patch_h, patch_w, dim, seed=0, device=DEVICE):
    gen = generator(seed)
    features = torch.randn(batch, grid_h * grid_w, dim, generator=gen)
    masks = torch.rand(batch, num_masks, grid_h * patch_h, grid_w * patch_w, generator=gen) > 0.7
    masks[0, 0] = False  # empty
    masks[0, 1 % num_masks] = True  # all-covering
    if batch > 1:
        masks[1, 0] = False
        masks[1, 0, -1, -1] = True  # one pixel in the last patch
    return features.to(device), masks.to(device)


def pool_logits(batch, heads, patches, seed=0, scale=3.0, device=DEVICE):
    logits = scale * torch.randn(batch, heads, patches, generator=generator(seed + 100))
    return logits.to(device)


def assert_pool_matches(features, masks, grid, logits=None, packed_width=None):
    got = mask_pool(features, masks, grid, logits=logits, packed_width=packed_width, backend="triton")
    want = mask_pool(features.cpu(), masks.cpu(), grid, logits=None if logits is None else logits.cpu(),
                     packed_width=packed_width, backend="reference")
    assert got.pooled.dtype == features.dtype and got.pooled.shape == want.pooled.shape
    torch.testing.assert_close(got.pooled.float().cpu(), want.pooled.float(), **TOLERANCE[features.dtype])
    assert torch.equal(got.valid.cpu(), want.valid)
    assert torch.isfinite(got.pooled).all()
    return got


@pytest.mark.parametrize("logit_heads", [None, 1, 4])
@pytest.mark.parametrize("mask_format", ["bool", "uint8", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_pool_matches_reference(dtype, mask_format, logit_heads):
    # 7x7 grid of 2x3-pixel patches: mask width 21, not a multiple of 8 when bit-packed; D=40 = 4 heads x 10.
    features, masks = pool_inputs(3, 5, 7, 7, 2, 3, 40)
    features = features.to(dtype)
    packed_width = None
    if mask_format == "uint8":
        masks = masks.to(torch.uint8) * 3  # any nonzero value is inside
    elif mask_format == "packed":
        masks, packed_width = pack_mask_bits(masks)
    logits = None
    if logit_heads is not None:
        logits = pool_logits(3, logit_heads, 49)
        if logit_heads == 1:
            logits = logits[:, 0]  # the [B, P] form
    got = assert_pool_matches(features, masks, (7, 7), logits, packed_width)
    assert not got.valid[0, 0] and not got.pooled[0, 0].any() and got.valid[1, 0] and got.valid[0, 1]


def test_mask_pool_several_tiles_and_extreme_logits():
    # 65 masks (2 mask tiles), 72 patches (2 patch tiles), D=300 (3 channel tiles; 2 heads of 150).
    features, masks = pool_inputs(1, 65, 3, 24, 2, 2, 300, seed=3)
    assert_pool_matches(features, masks, (3, 24))
    logits = pool_logits(1, 2, 72, seed=3, scale=40.0)
    uncovered = masks[0, 2].reshape(3, 2, 24, 2).sum((1, 3)).flatten() == 0
    logits[0, :, uncovered.nonzero().flatten()] = 1e4  # must not leak into (or overflow) mask 2's weights
    assert_pool_matches(features, masks, (3, 24), logits)
    assert_pool_matches(features, masks, (3, 24), logits.to(torch.float16))  # any float logits


@pytest.mark.parametrize("with_logits", [False, True])
def test_mask_pool_gradients_match_reference(with_logits):
    features, masks = pool_inputs(2, 4, 5, 3, 2, 2, 12, seed=4)
    logits = pool_logits(2, 3, 15, seed=4) if with_logits else None
    weights = torch.randn(2, 4, 12, generator=generator(5)).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [features.clone().requires_grad_()] + ([logits.clone().requires_grad_()] if with_logits else [])
        pooled = mask_pool(leaves[0], masks, (5, 3), logits=leaves[1] if with_logits else None, backend=backend).pooled
        grads[backend] = torch.autograd.grad((pooled * weights).sum(), leaves)
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #.*double precision:UserWarning")  # fp32 on purpose
def test_mask_pool_gradcheck():
    features, masks = pool_inputs(1, 3, 2, 3, 2, 1, 4, seed=6)
    masks, width = pack_mask_bits(masks)
    logits = pool_logits(1, 2, 6, seed=6, scale=1.0)

    def pooled(features, logits):
        return mask_pool(features, masks, (2, 3), logits=logits, packed_width=width, backend="triton").pooled

    inputs = (features.requires_grad_(), logits.requires_grad_())
    assert torch.autograd.gradcheck(pooled, inputs, eps=1e-3, atol=1e-2, rtol=1e-2, fast_mode=True)


# -------------------------------------------------------------------------------------- region_score

def score_inputs(batch, regions, dim, classes, seed=0, device=DEVICE):
    gen = generator(seed)
    image = torch.randn(batch, dim, generator=gen)
    region = torch.randn(batch, regions, dim, generator=gen)
    text = torch.randn(classes, dim, generator=gen)
    valid = torch.rand(batch, regions, generator=gen) > 0.3
    return image.to(device), region.to(device), valid.to(device), text.to(device)


def assert_scores_match(image, region, valid, text, logit_scale=20.0, atol=1e-4):
    got = region_score(image, region, valid, text, logit_scale, backend="triton")
    want = region_score(image.cpu(), region.cpu(), valid.cpu(), text.cpu(), logit_scale, backend="reference")
    for name in got._fields:
        a, b = getattr(got, name).cpu(), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 40, 37), (5, 17, 100, 130)])  # the second: several row/label/K tiles
def test_region_score_matches_reference(dtype, shape):
    image, region, valid, text = score_inputs(*shape)
    valid[1] = False  # an image without valid regions: discrepancy = image_prob
    got = assert_scores_match(image.to(dtype), region.to(dtype), valid, text.to(dtype))
    assert (got.region_label[1] == -1).all() and torch.equal(got.discrepancy[1], got.image_prob[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN row, interpreted
def test_region_score_edge_cases():
    image, region, valid, text = score_inputs(2, 1, 24, 70, seed=1)  # a single region per image
    valid[:] = True
    text[7] = text[3]  # exact ties of label 3 with 7 (same label tile) and 66 (the next tile): 3 wins
    text[66] = text[3]
    image[0] = text[3]
    region[1, 0] = text[3] * 2
    got = assert_scores_match(image, region, valid, text)
    assert got.image_label[0] == 3 and got.region_label[1, 0] == 3

    image, region, valid, text = score_inputs(3, 4, 24, 19, seed=2)
    region[0, 1] = float("nan")  # padding garbage must stay in its own (invalid) row
    valid[0, 1] = False
    region[2, 2] = 0.0  # a zero embedding: uniform probabilities, as F.normalize gives
    valid[2] = False
    valid[2, 2] = True
    assert_scores_match(image, region, valid, text)


def test_ops_without_masks_or_regions():
    # M = 0 everywhere. The reference's region_score raises here (max over an empty dim); the kernels
    # follow its docstring: no valid region -> discrepancy = image_prob.
    images, masks = crop_inputs(2, 0, 5, 6, torch.uint8)
    assert_crops_match(images, masks, 4)
    features, _ = pool_inputs(2, 1, 2, 2, 2, 2, 8)
    assert_pool_matches(features, torch.zeros(2, 0, 4, 4, dtype=torch.bool, device=DEVICE), (2, 2))
    image, region, valid, text = score_inputs(2, 1, 8, 5)
    got = region_score(image, region[:, :0], valid[:, :0], text, 10.0, backend="triton")
    want = region_score(image.cpu(), region.cpu(), torch.zeros_like(valid.cpu()), text.cpu(), 10.0, backend="reference")
    assert got.region_label.shape == (2, 0) and got.region_image_prob.shape == (2, 0)
    assert torch.equal(got.image_label.cpu(), want.image_label)
    torch.testing.assert_close(got.image_prob.cpu(), want.image_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.discrepancy.cpu(), want.discrepancy, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------- region_topk

def assert_topk_matches(scores, labels, num_labels, k):
    got = region_topk(scores, labels, num_labels, k, backend="triton")
    want = region_topk(scores.cpu(), labels.cpu(), num_labels, k, backend="reference")
    assert got.counts.dtype == torch.int64 and got.indices.dtype == torch.int64
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.indices.cpu(), want.indices)
    return got


def test_region_topk_small_example():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5], device=DEVICE)
    labels = torch.tensor([0, 0, 0, 1, -1, 0, 5], device=DEVICE)
    got = assert_topk_matches(scores, labels, 3, 3)
    assert got.counts.tolist() == [4, 1, 0]
    assert got.indices.tolist() == [[1, 5, 0], [3, -1, -1], [-1, -1, -1]]


def test_region_topk_nan_signed_zero_and_out_of_range_labels():
    scores = torch.tensor([float("nan"), -0.0, 0.0, -1.0, float("nan"), float("-inf"), 0.0, 2.0], device=DEVICE)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 2, 7], device=DEVICE, dtype=torch.int32)  # 7: ignored
    got = assert_topk_matches(scores, labels, 3, 8)
    # -0 == +0 (index order), then -1, -inf, and the NaNs last (index order).
    assert got.indices[0].tolist() == [1, 2, 3, 5, 0, 4, -1, -1]
    assert got.counts.tolist() == [6, 0, 1]


@pytest.mark.parametrize("k", [1, 5, 37])
def test_region_topk_long_buckets_with_ties(k):
    # ~1500 entries per label: more than one 1024-key chunk per bucket; 40 distinct scores: many ties.
    gen = generator(7)
    scores = torch.randint(0, 40, (3001,), generator=gen).float()
    scores[::7] = float("nan")
    scores[::11] = -0.0
    labels = torch.randint(-1, 3, (3001,), generator=gen)
    labels[::13] = 99
    assert_topk_matches(scores.to(DEVICE), labels.to(DEVICE), 2, k)


def test_region_topk_small_inputs():
    gen = generator(8)
    scores, labels = torch.randn(50, generator=gen), torch.randint(0, 20, (50,), generator=gen)
    assert_topk_matches(scores.to(DEVICE), labels.to(DEVICE), 20, 4)  # k > most labels' counts
    assert_topk_matches(scores.to(DEVICE), labels.to(DEVICE), 1, 3)
    got = assert_topk_matches(torch.empty(0, device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE), 4, 2)
    assert (got.indices == -1).all() and (got.counts == 0).all()


# ------------------------------------------------------------------------------------------ opcheck

def opcheck_cases(device):
    images, masks = crop_inputs(1, 3, 9, 11, torch.uint8, device=device)
    features, pool_masks = pool_inputs(2, 3, 3, 3, 2, 2, 8, device=device)
    image, region, valid, text = score_inputs(2, 3, 16, 17, device=device)
    scores = torch.randn(40, generator=generator(9)).to(device)
    labels = torch.randint(-1, 5, (40,), generator=generator(9)).to(device)
    return {
        "mask_crop": (images, masks, 7, 0.1, True, 0.5, MEAN[:3], STD[:3], torch.bfloat16),
        "mask_pool": (features.requires_grad_(), pool_masks, pool_logits(2, 2, 9, device=device).requires_grad_(),
                      3, 3, 0),
        "region_score": (image, region, valid, text, 30.0),
        "region_topk": (scores, labels, 5, 3),
    }


@pytest.mark.parametrize("op", ["mask_crop", "mask_pool", "region_score", "region_topk"])
def test_opcheck(triton_ops, op):
    torch.library.opcheck(getattr(triton_ops, op), opcheck_cases(DEVICE)[op], **OPCHECK_KWARGS)


# -------------------------------------------------------------------------- GPU: realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("square", [False, True])
def test_gpu_mask_crop_realistic(square, out_dtype):
    images, masks = crop_inputs(4, 12, 224, 224, torch.uint8, device="cuda")
    assert_crops_match(images, masks, 224, out_dtype, square=square)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_mask_pool_realistic(dtype, packed):
    features, masks = pool_inputs(4, 40, 14, 14, 16, 16, 768, device="cuda")  # ViT-B/16 at 224 px
    features = features.to(dtype)
    width = None
    if packed:
        masks, width = pack_mask_bits(masks)
    assert_pool_matches(features, masks, (14, 14), None, width)
    assert_pool_matches(features, masks, (14, 14), pool_logits(4, 12, 196, device="cuda"), width)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_region_score_realistic(dtype):
    image, region, valid, text = (t.to(dtype) if t.is_floating_point() else t
                                  for t in score_inputs(64, 32, 512, 1000, device="cuda"))
    got = region_score(image, region, valid, text, 100.0, backend="triton")
    want = region_score(image.cpu(), region.cpu(), valid.cpu(), text.cpu(), 100.0, backend="reference")
    got = type(got)(*(t.cpu() for t in got))
    close = dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.image_prob, want.image_prob, **close)
    torch.testing.assert_close(got.region_prob, want.region_prob, **close)
    # 2112 rows x 1000 labels: a near tie (top-2 gap below the summation-order noise) may pick the
    # other label; the top probability is still checked above. Allow a handful, no more.
    assert (got.image_label != want.image_label).sum() <= 1
    assert (got.region_label != want.region_label).sum() <= 2
    same = got.image_label == want.image_label  # region_image_prob follows the image's label
    torch.testing.assert_close(got.region_image_prob[same], want.region_image_prob[same], **close)
    torch.testing.assert_close(got.discrepancy[same], want.discrepancy[same], **close)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [16, 100])
def test_gpu_region_topk_realistic(k):
    gen = generator(10)
    scores = torch.randint(0, 1000, (200_000,), generator=gen).float() / 7  # ties
    labels = torch.randint(-1, 1000, (200_000,), generator=gen)
    labels[:50_000] = 3  # one long bucket
    assert_topk_matches(scores.cuda(), labels.cuda(), 1000, k)


@pytest.mark.gpu
def test_gpu_ops_compile_fullgraph(triton_ops):
    # triton_op makes the kernels visible to torch.compile: no graph break, same results.
    image, region, valid, text = score_inputs(8, 6, 64, 50, device="cuda")
    compiled = torch.compile(lambda *args: triton_ops.region_score(*args), fullgraph=True)
    eager = triton_ops.region_score(image, region, valid, text, 50.0)
    for got, want in zip(compiled(image, region, valid, text, 50.0), eager):
        torch.testing.assert_close(got, want)
    features, masks = pool_inputs(2, 5, 4, 4, 4, 4, 64, device="cuda")
    logits = pool_logits(2, 4, 16, device="cuda")
    compiled = torch.compile(lambda *args: triton_ops.mask_pool(*args), fullgraph=True)
    eager = triton_ops.mask_pool(features, masks, logits, 4, 4, 0)
    for got, want in zip(compiled(features, masks, logits, 4, 4, 0), eager):
        torch.testing.assert_close(got, want)
