"""Shared testing helpers for clipfast's ops (the one module behind test_mask_crop.py,
test_mask_pool.py, test_region_score.py, test_region_topk.py and test_op_dispatch.py): the backend
parameter lists, the Triton interpreter setup, input builders, the tolerance table and the
assert_*_matches_reference helpers.

Backends. Tests take a `backend` parameter from ALL_BACKENDS (the reference too: for tests that check
against something other than the reference itself) or COMPILED_BACKENDS (cpu, cuda, triton). The
cuda param carries the `gpu` marker (skipped without a GPU, see conftest.py); the triton param
carries the `triton` marker and skips with WHY_NOT where Triton cannot run. Without a GPU, Triton
runs under its CPU interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 for every
triton-marked test, through use_triton_interpreter): slow, so interpreter cases stay small, and the
larger ones skip there (skip_if_interpreted) and run on a GPU. Inputs are built on the CPU and
moved to device_of(backend); the assert_*_matches_reference helpers run the reference on the CPU.

Tolerances (TOLERANCE, read with tolerance(check, dtype, backend)): fp32 outputs differ from the
reference only by summation order; a bf16 output is one rounding of an fp32 value, so at most one
bf16 ulp (2^-7 relative) apart. Where one backend is held to a different tolerance than the others,
its entry says why. Integer outputs (labels, boxes, indices, counts, valid flags) must match exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from clipfast.ops import mask_crop, mask_pool, pack_mask_bits, region_score, region_topk

HAS_GPU = torch.cuda.is_available()
INTERPRET = not HAS_GPU  # Triton runs under its CPU interpreter, on CPU tensors


# ------------------------------------------------------------------------------ Triton interpreter

def _import_triton_ops():
    """(clipfast.ops.triton or None, why not). Without a GPU its kernels must be built for the CPU
    interpreter; Triton picks the mode when it decorates a function, its own standard library
    included, so TRITON_INTERPRET=1 must be set when triton is first imported: conftest.py does that
    before collection, and this does it again in case this module is imported first. The variable is
    restored at once so that other modules see the environment they expect; use_triton_interpreter
    sets it while a triton-marked test runs."""
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
        return None, "triton was imported without TRITON_INTERPRET=1 before the op tests: run them in their own process"
    return ops, ""


TRITON_OPS, WHY_NOT = _import_triton_ops()  # clipfast.ops.triton (or None), and why not
# Without a GPU, opcheck's AOT-dispatch test would hand fake tensors to the interpreter: left out.
OPCHECK_KWARGS = {} if HAS_GPU else dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def use_triton_interpreter(monkeypatch) -> None:
    """Where there is no GPU, set TRITON_INTERPRET=1 for the running test: the interpreter, and
    backends.resolve for CPU tensors, read it at call time. conftest.py calls this for every
    `triton`-marked test."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def skip_if_interpreted(backend: str, why: str) -> None:
    """Skip a case too large (or impossible) for Triton's CPU interpreter; it runs where there is a GPU."""
    if backend == "triton" and INTERPRET:
        pytest.skip(f"Triton interpreter: {why} (runs on a GPU)")


# ---------------------------------------------------------------------------------------- backends

_TRITON_MARKS = [pytest.mark.triton, pytest.mark.skipif(TRITON_OPS is None, reason=WHY_NOT or "(Triton is usable)")]
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
TRITON = pytest.param("triton", marks=_TRITON_MARKS)
COMPILED_BACKENDS = ["cpu", CUDA, TRITON]
ALL_BACKENDS = ["reference"] + COMPILED_BACKENDS
# torch.compile traces a Triton op's body with fake tensors, which the CPU interpreter cannot run
# (like opcheck's AOT-dispatch test): the triton case of a compile test needs a GPU.
COMPILE_BACKENDS = ["cpu", CUDA, pytest.param("triton", marks=[*_TRITON_MARKS, pytest.mark.gpu])]
# The GPU backends only, Triton on a GPU (not its interpreter): for what only a GPU shows (tensor-core
# precision modes, shared-memory limits, tens of GB).
TRITON_ON_GPU = pytest.param("triton", marks=[*_TRITON_MARKS, pytest.mark.gpu])
GPU_BACKENDS = [CUDA, TRITON_ON_GPU]


def device_of(backend: str) -> str:
    """The device a backend's inputs live on: cuda for the CUDA backend and for Triton on a GPU,
    else the CPU (the reference, the C++ backend, the Triton interpreter)."""
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return "cuda"
    return "cpu"


def registered_op(backend: str, op: str):
    """The torch custom op behind a compiled backend, for opcheck: clipfast::<op> (cpu and cuda
    register the same op) or the Triton backend's clipfast_triton::<op>."""
    if backend == "triton":
        return getattr(TRITON_OPS, op)
    return getattr(torch.ops.clipfast, op).default


def opcheck(backend: str, op: str, args) -> None:
    """torch.library.opcheck on the backend's registered op; the Triton interpreter skips the
    AOT-dispatch test (OPCHECK_KWARGS)."""
    torch.library.opcheck(registered_op(backend, op), args, **(OPCHECK_KWARGS if backend == "triton" else {}))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------- tolerances

F32, BF16 = torch.float32, torch.bfloat16


def _both(**close):
    return {F32: close, BF16: close}


# check -> {"default" or a backend: {dtype: assert_close keywords}}. A backend without its own entry
# gets "default"; a check without "default" exists only for the backends it names.
TOLERANCE = {
    # Crops after normalisation: summation order ~1e-5; bf16 one ulp.
    "mask_crop": {"default": {F32: dict(atol=1e-4, rtol=1e-5), BF16: dict(atol=2e-2, rtol=1e-2)}},
    # A full-mask crop at native size without margin against the analytically normalised image.
    "mask_crop.identity": {"default": {F32: dict(atol=1e-5, rtol=1e-5)}},
    # Pooled features: weighted means accumulated in fp32 in a different order.
    "mask_pool": {
        "default": {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=1e-2, rtol=1e-2)},
        # Triton pools with tl.dot (tf32x3 on a GPU: ~fp32, not bit-for-bit) over 64-patch tiles: its
        # tests have always allowed the crop table's 1e-4 for fp32 and 2e-2 for bf16.
        "triton": {F32: dict(atol=1e-4, rtol=1e-5), BF16: dict(atol=2e-2, rtol=1e-2)},
    },
    # Gradients: every backend's backward is the same closed form (reference.mask_pool_backward),
    # compared with autograd through the reference. The C++/CUDA tests allowed rtol 1e-4, the Triton
    # tests held 1e-5: kept as they were.
    "mask_pool.grad": {"default": {F32: dict(atol=1e-5, rtol=1e-4)}, "triton": {F32: dict(atol=1e-5, rtol=1e-5)}},
    # gradcheck in fp32 (the ops take fp32 at most) with eps=1e-3: loose on purpose. The Triton
    # tests held 1e-2, the C++/CUDA tests 2e-2: kept as they were.
    "mask_pool.gradcheck": {"default": {F32: dict(atol=2e-2, rtol=2e-2)}, "triton": {F32: dict(atol=1e-2, rtol=1e-2)}},
    # Probabilities. bf16 inputs: both sides compute in fp32 from the same bf16 values, so the fp32
    # tolerance holds for both dtypes.
    "region_score": {
        "default": _both(atol=1e-5, rtol=1e-5),
        # The GPU's tensor-core dot products accumulate in a different order: 1e-4 there.
        "cuda": _both(atol=1e-4, rtol=1e-3),
        # Triton's tl.dot (tf32x3 on a GPU) over label and K tiles, then an online softmax: 1e-4.
        "triton": _both(atol=1e-4, rtol=1e-4),
    },
    # M = 0 regions: only image-level outputs; cpu and cuda have always been held to 1e-5 here.
    "region_score.no_regions": {"default": _both(atol=1e-5, rtol=1e-5), "triton": _both(atol=1e-4, rtol=1e-4)},
    # Against naive full logits (test_region_score.py): torch's defaults for the reference and cpu, as
    # always; cuda and triton (new there) get their summation-order tolerance from "region_score".
    "region_score.naive": {"default": {F32: {}}, "cuda": {F32: dict(atol=1e-4, rtol=1e-3)},
                           "triton": {F32: dict(atol=1e-4, rtol=1e-4)}},
    # bf16 embeddings against fp32 ones (the same backend): the inputs' rounding, not the op's.
    "region_score.bf16_vs_fp32": {"default": {BF16: dict(image_prob=dict(atol=2e-2, rtol=0),
                                                         discrepancy=dict(atol=3e-2, rtol=0))}},
    # Triton on a GPU at 2112 rows x 1000 labels x D=512 (near-tie label flips: see the test).
    "region_score.realistic": {"triton": _both(atol=1e-3, rtol=1e-3)},
    # Masked patch pixels: one normalisation, (v - mean) / std or (v - mean) * (1 / std): ulps in fp32;
    # a bf16 output is one rounding of that fp32 value, so at most one bf16 ulp apart.
    "region_patches": {"default": {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=1e-2, rtol=1e-2)}},
}


def tolerance(check: str, dtype: torch.dtype, backend: str) -> dict:
    entry = TOLERANCE[check]
    return entry[backend if backend in entry else "default"][dtype]


# --------------------------------------------------------------------------------------- mask_crop

MEAN = [0.48, 0.46, 0.41, 0.5]
STD = [0.27, 0.26, 0.28, 0.3]

# Mask sets cycled over (b + m): (number of kinds, lowest pixel value, disc radius offset, width of
# the bottom-right border strip). Kinds: 0 a disc, 1 scattered pixels, 2 a strip on the bottom-right
# border (square boxes leave the image), 3 empty (padding), 4 all-covering, 5 one pixel in the
# top-left corner (six_kinds only).
CROP_MASK_SETS = {"five_kinds": (5, 1, 2, 3), "six_kinds": (6, 0, 1, 2)}


def crop_inputs(batch, num_masks, height, width, image_dtype, *, channels=3, seed=0, mask_set="five_kinds"):
    """images [B, C, H, W] (uint8, or value/255 in image_dtype) and bool masks [B, M, H, W] on the CPU."""
    kinds, low, radius_offset, strip = CROP_MASK_SETS[mask_set]
    gen = generator(seed)
    images = torch.randint(low, 256, (batch, channels, height, width), dtype=torch.uint8, generator=gen)
    if image_dtype != torch.uint8:
        images = (images.float() / 255).to(image_dtype)
    masks = torch.zeros(batch, num_masks, height, width, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for b in range(batch):
        for m in range(num_masks):
            kind = (b + m) % kinds
            if kind == 0:  # a disc
                cy = int(torch.randint(0, height, (1,), generator=gen))
                cx = int(torch.randint(0, width, (1,), generator=gen))
                radius = radius_offset + int(torch.randint(1, max(2, min(height, width) // 2), (1,), generator=gen))
                masks[b, m] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
            elif kind == 1:  # scattered pixels
                masks[b, m] = torch.rand(height, width, generator=gen) > 0.85
            elif kind == 2:  # a strip on the bottom-right border
                masks[b, m, height // 2 :, width - strip :] = True
            elif kind == 3:  # empty (padding)
                pass
            elif kind == 4:  # all-covering
                masks[b, m] = True
            else:  # one pixel in the top-left corner
                masks[b, m, 0, 0] = True
    return images, masks


def run_crop(images, masks, backend, out_size=23, **kwargs):
    """mask_crop with the tests' defaults: margin 0.15, background 0.37, the first C of MEAN/STD."""
    channels = images.shape[1]
    kwargs = dict(margin=0.15, background=0.37, mean=MEAN[:channels], std=STD[:channels]) | kwargs
    return mask_crop(images, masks, out_size, backend=backend, **kwargs)


def assert_crops_match_reference(images, masks, backend, out_size=23, out_dtype=torch.float32, **kwargs):
    """backend on (images, masks) moved to its device against the reference on the CPU; returns
    backend's output (on its device)."""
    device = device_of(backend)
    got = run_crop(images.to(device), masks.to(device), backend, out_size, out_dtype=out_dtype, **kwargs)
    want = run_crop(images.cpu(), masks.cpu(), "reference", out_size, out_dtype=out_dtype, **kwargs)
    assert got.crops.dtype == out_dtype and got.crops.shape == want.crops.shape
    close = tolerance("mask_crop", out_dtype, backend)
    torch.testing.assert_close(got.crops.float().cpu(), want.crops.float(), **close)
    assert torch.equal(got.boxes.cpu(), want.boxes)
    assert torch.equal(got.valid.cpu(), want.valid)
    return got


# --------------------------------------------------------------------------------------- mask_pool

def pool_logits(batch, heads, patches, *, seed=0, scale=3.0):
    """[B, heads, P] attention logits from their own generator (seed + 100)."""
    return scale * torch.randn(batch, heads, patches, generator=generator(seed + 100))


def pool_inputs(batch, num_masks, grid, patch, dim, *, heads=1, seed=0, mask_set="kinds"):
    """(features [B, P, D], bool masks [B, M, H, W], logits [B, heads, P]) on the CPU; a grid of
    grid[0] x grid[1] patches of patch[0] x patch[1] pixels.

    mask_set "kinds": masks cycle over (b + 2m) through a disc, scattered pixels, one partial patch
    in the top-right corner, empty, all-covering; logits (x3) from the same generator.
    mask_set "random": 30% random pixels, with mask [0, 0] empty, [0, 1 % M] all-covering and
    [1, 0] one pixel in the last patch; logits from pool_logits(seed).
    """
    (gh, gw), (ph, pw) = grid, patch
    height, width = gh * ph, gw * pw
    gen = generator(seed)
    features = torch.randn(batch, gh * gw, dim, generator=gen)
    if mask_set == "random":
        masks = torch.rand(batch, num_masks, height, width, generator=gen) > 0.7
        masks[0, 0] = False  # empty
        masks[0, 1 % num_masks] = True  # all-covering
        if batch > 1:
            masks[1, 0] = False
            masks[1, 0, -1, -1] = True  # one pixel in the last patch
        return features, masks, pool_logits(batch, heads, gh * gw, seed=seed)
    assert mask_set == "kinds", mask_set
    masks = torch.zeros(batch, num_masks, height, width, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for b in range(batch):
        for m in range(num_masks):
            kind = (b + 2 * m) % 5
            if kind == 0:  # a disc
                cy = int(torch.randint(0, height, (1,), generator=gen))
                cx = int(torch.randint(0, width, (1,), generator=gen))
                masks[b, m] = (yy - cy) ** 2 + (xx - cx) ** 2 <= (1 + m % 7) ** 2
            elif kind == 1:  # scattered pixels
                masks[b, m] = torch.rand(height, width, generator=gen) > 0.8
            elif kind == 2:
                masks[b, m, : ph // 2 + 1, -1:] = True  # one partial patch in the top-right corner
            elif kind == 3:
                pass  # empty (padding)
            else:
                masks[b, m] = True  # all-covering
    logits = 3 * torch.randn(batch, heads, gh * gw, generator=gen)
    return features, masks, logits


def assert_pool_matches_reference(features, masks, grid, backend, logits=None, packed=False):
    """backend against the reference, both on the unpacked masks (CPU) unless packed: then the
    backend reads them bit-packed. features in the dtype to test. Returns backend's output (on its device)."""
    device = device_of(backend)
    want = mask_pool(features.cpu(), masks.cpu(), grid, logits=None if logits is None else logits.cpu(),
                     backend="reference")
    width = None
    if packed:
        masks, width = pack_mask_bits(masks)
    got = mask_pool(features.to(device), masks.to(device), grid, packed_width=width,
                    logits=None if logits is None else logits.to(device), backend=backend)
    assert got.pooled.dtype == features.dtype and got.pooled.shape == want.pooled.shape
    torch.testing.assert_close(got.pooled.float().cpu(), want.pooled.float(),
                               **tolerance("mask_pool", features.dtype, backend))
    assert torch.equal(got.valid.cpu(), want.valid)
    assert torch.isfinite(got.pooled).all()
    return got


# ------------------------------------------------------------------------------------ region_score

def score_inputs(batch, regions, dim, classes, *, seed=0, style="separated"):
    """(image [B, D], region [B, M, D], valid [B, M] bool, text [C, D]) fp32 on the CPU.

    style "separated": images and regions lean towards a random label (+2 x its text embedding), so
    the top label is well separated in fp32 and bf16; valid is 75% random, image 1 (if any) has no
    valid region, region [0, 0] is valid.
    style "plain": independent standard normals; valid is 70% random.
    """
    gen = generator(seed)
    if style == "plain":
        image = torch.randn(batch, dim, generator=gen)
        region = torch.randn(batch, regions, dim, generator=gen)
        text = torch.randn(classes, dim, generator=gen)
        valid = torch.rand(batch, regions, generator=gen) > 0.3
        return image, region, valid, text
    assert style == "separated", style
    text = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    image = torch.randn(batch, dim, generator=gen) + 2 * text[labels]
    region = torch.randn(batch, regions, dim, generator=gen) + 2 * text[torch.randint(0, classes, (batch, regions),
                                                                                       generator=gen)]
    valid = torch.rand(batch, regions, generator=gen) > 0.25
    if batch > 1:
        valid[1] = False  # an image with no valid region
    valid[0, 0] = True
    return image, region, valid, text


def assert_scores_match_reference(image, region, valid, text, logit_scale, backend, check="region_score"):
    """backend on the inputs moved to its device against the reference on the CPU: every field's
    dtype and shape, labels exactly, probabilities within tolerance(check, ...). The tolerance is
    looked up by the embeddings' dtype. Returns backend's output (on its device)."""
    device = device_of(backend)
    got = region_score(image.to(device), region.to(device), valid.to(device), text.to(device), logit_scale,
                       backend=backend)
    want = region_score(image.cpu(), region.cpu(), valid.cpu(), text.cpu(), logit_scale, backend="reference")
    close = tolerance(check, image.dtype, backend)
    for name in want._fields:
        a, b = getattr(got, name).cpu(), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **close, msg=lambda m, name=name: f"{name}: {m}")
    return got


# ------------------------------------------------------------------------------------- region_topk

def topk_inputs(n, num_labels, *, style, seed):
    """(scores [n] fp32, labels [n] int64) on the CPU.

    "special": gaussian scores with many ties (every 5th = 0.25), NaNs, -0.0 and +0.0; labels in
      [-2, num_labels + 2): some out of range (ignored).
    "few_values": 40 distinct integer scores (many ties), NaNs, -0.0; labels in [-1, num_labels]
      and every 13th 99 (out of range).
    "integers": 50 distinct integer scores; labels in [-1, num_labels).
    "gaussian": gaussian scores; labels in [0, num_labels).
    "realistic": 1000 distinct scores / 7 (ties); labels in [-1, num_labels), the first quarter
      all label 3 (one long bucket).
    """
    gen = generator(seed)
    if style == "special":
        scores = torch.randn(n, generator=gen)
        scores[::5] = 0.25  # many ties
        scores[1::97] = float("nan")
        scores[2::89] = -0.0
        scores[3::89] = 0.0
        labels = torch.randint(-2, num_labels + 2, (n,), generator=gen)  # some out of range: ignored
    elif style == "few_values":
        scores = torch.randint(0, 40, (n,), generator=gen).float()
        scores[::7] = float("nan")
        scores[::11] = -0.0
        labels = torch.randint(-1, num_labels + 1, (n,), generator=gen)
        labels[::13] = 99
    elif style == "integers":
        scores = torch.randint(0, 50, (n,), generator=gen).float()
        labels = torch.randint(-1, num_labels, (n,), generator=gen)
    elif style == "gaussian":
        scores, labels = torch.randn(n, generator=gen), torch.randint(0, num_labels, (n,), generator=gen)
    elif style == "realistic":
        scores = torch.randint(0, 1000, (n,), generator=gen).float() / 7
        labels = torch.randint(-1, num_labels, (n,), generator=gen)
        labels[: n // 4] = 3
    else:
        raise ValueError(style)
    return scores, labels


def assert_topk_matches_reference(scores, labels, num_labels, k, backend):
    """backend on the inputs moved to its device against the reference on the CPU, exactly."""
    device = device_of(backend)
    got = region_topk(scores.to(device), labels.to(device), num_labels, k, backend=backend)
    want = region_topk(scores.cpu(), labels.cpu(), num_labels, k, backend="reference")
    assert got.counts.dtype == torch.int64 and got.indices.dtype == torch.int64
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.indices.cpu(), want.indices)
    return got
