"""mask_pool on every backend: against the PyTorch reference (both mask sets, bool/uint8/bit-packed
masks, no/[B, P]/per-head logits, several tiles, extreme logits, no masks), edge cases with defined
results, gradients (closed form against autograd through the reference, gradcheck), opcheck,
torch.compile, input errors, and the GPU at realistic sizes. Inputs, tolerances and the assertion
live in optest.py; mask bit packing itself is tested in test_op_dispatch.py."""

import pytest
import torch
from optest import (
    ALL_BACKENDS,
    COMPILE_BACKENDS,
    COMPILED_BACKENDS,
    GPU_BACKENDS,
    TRITON,
    TRITON_OPS,
    assert_pool_matches_reference,
    device_of,
    generator,
    opcheck,
    pool_inputs,
    pool_logits,
    skip_if_interpreted,
    tolerance,
)

from clipfast.ops import mask_pool, pack_mask_bits, reference

DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [0, 1, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference(backend, dtype, heads, packed):
    # 41 masks of every kind on a 7x9 grid of 5x3-pixel patches, D=77 (7 heads of 11); heads=0: no logits.
    skip_if_interpreted(backend, "41 masks of 35 x 27 pixels, ~4 s a case; test_matches_reference_mask_formats "
                                 "covers the same paths")
    features, masks, logits = pool_inputs(3, 41, (7, 9), (5, 3), 77, heads=max(heads, 1))
    assert_pool_matches_reference(features.to(dtype), masks, (7, 9), backend, logits if heads else None, packed)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("logit_heads", [None, 1, 4])
@pytest.mark.parametrize("mask_format", ["bool", "uint8", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_mask_formats(backend, dtype, mask_format, logit_heads):
    # 7x7 grid of 2x3-pixel patches: mask width 21, not a multiple of 8 when bit-packed; D=40 = 4 heads x 10.
    features, masks, _ = pool_inputs(3, 5, (7, 7), (2, 3), 40, mask_set="random")
    if mask_format == "uint8":
        masks = masks.to(torch.uint8) * 3  # any nonzero value is inside
    logits = None
    if logit_heads is not None:
        logits = pool_logits(3, logit_heads, 49)
        if logit_heads == 1:
            logits = logits[:, 0]  # the [B, P] form
    got = assert_pool_matches_reference(features.to(dtype), masks, (7, 7), backend, logits, mask_format == "packed")
    assert not got.valid[0, 0] and not got.pooled[0, 0].any() and got.valid[1, 0] and got.valid[0, 1]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_several_tiles_and_extreme_logits(backend):
    # 65 masks (2 mask tiles), 72 patches (2 patch tiles), D=300 (3 channel tiles; 2 heads of 150).
    features, masks, _ = pool_inputs(1, 65, (3, 24), (2, 2), 300, seed=3, mask_set="random")
    assert_pool_matches_reference(features, masks, (3, 24), backend)
    logits = pool_logits(1, 2, 72, seed=3, scale=40.0)
    uncovered = masks[0, 2].reshape(3, 2, 24, 2).sum((1, 3)).flatten() == 0
    logits[0, :, uncovered.nonzero().flatten()] = 1e4  # must not leak into (or overflow) mask 2's weights
    assert_pool_matches_reference(features, masks, (3, 24), backend, logits)
    assert_pool_matches_reference(features, masks, (3, 24), backend, logits.to(torch.float16))  # any float logits


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_realistic_vit_grid(backend):
    skip_if_interpreted(backend, "a 224 x 224 mask grid, ~4 s")
    features, masks, logits = pool_inputs(2, 9, (14, 14), (16, 16), 96, heads=12, seed=4)
    assert_pool_matches_reference(features.bfloat16(), masks, (14, 14), backend, logits)
    assert_pool_matches_reference(features, masks, (14, 14), backend, logits, packed=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_without_masks(backend):
    features, _, _ = pool_inputs(2, 1, (2, 2), (2, 2), 8, mask_set="random")
    assert_pool_matches_reference(features, torch.zeros(2, 0, 4, 4, dtype=torch.bool), (2, 2), backend)


# ------------------------------------------------------------------ defined results, any backend

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_edge_cases(backend):
    device = device_of(backend)
    features, _, _ = pool_inputs(2, 1, (3, 3), (1, 1), 5)
    masks = torch.zeros(2, 3, 3, 3, dtype=torch.uint8)
    masks[0, 1] = 7  # any nonzero byte is inside
    masks[1, 2, 1, 1] = 1  # one patch: its feature exactly
    out = mask_pool(features.to(device), masks.to(device), (3, 3), backend=backend)
    assert out.valid.cpu().tolist() == [[False, True, False], [False, False, True]]
    assert torch.equal(out.pooled[0, 0].cpu(), torch.zeros(5))
    torch.testing.assert_close(out.pooled[0, 1].cpu(), features[0].mean(0))
    torch.testing.assert_close(out.pooled[1, 2].cpu(), features[1, 4])
    # Huge logits must not overflow: weights are exp(logit - max over covered patches).
    logits = torch.full((2, 1, 9), 1e4)
    logits[:, :, 4] = 1e4 + 1
    out = mask_pool(features.to(device), masks.to(device), (3, 3), logits=logits.to(device), backend=backend)
    assert torch.isfinite(out.pooled).all()
    # No masks at all.
    empty = mask_pool(features.to(device), masks[:, :0].to(device), (3, 3), backend=backend)
    assert empty.pooled.shape == (2, 0, 5)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logits_agree_with_the_reference(backend, dtype):
    # valid means "the mask covers a pixel" on every backend, whatever the covered logits are: a mask
    # whose only covered patch has logit -inf pools to zeros (valid); NaN or +inf there gives NaN
    # (valid); a -inf patch beside a finite one has weight 0. One head per case, so that a non-finite
    # head leaves the others finite.
    device = device_of(backend)
    features = torch.randn(2, 4, 8, generator=generator(21)).to(dtype)  # grid 2 x 2, 4 heads of 2 channels
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[:, 0, :2, :2] = True  # patch 0 only
    masks[:, 1, :2, :] = True  # patches 0 and 1
    # masks[:, 2] empty
    logits = torch.randn(2, 4, 4, generator=generator(22))
    logits[:, 0, 0] = float("-inf")  # head 0: mask 0's only patch is -inf; mask 1 has a finite patch beside it
    logits[:, 1, 0] = float("nan")
    logits[:, 2, 0] = float("inf")
    logits[1, 3, :] = float("-inf")  # image 1, head 3: every logit -inf
    want = mask_pool(features, masks, (2, 2), logits=logits, backend="reference")
    got = mask_pool(features.to(device), masks.to(device), (2, 2), logits=logits.to(device), backend=backend)
    assert want.valid.tolist() == [[True, True, False]] * 2
    assert torch.equal(got.valid.cpu(), want.valid)
    torch.testing.assert_close(got.pooled.float().cpu(), want.pooled.float(), equal_nan=True,
                               **tolerance("mask_pool", dtype, backend))
    pooled = want.pooled.float().reshape(2, 3, 4, 2)
    assert (pooled[:, 0, 0] == 0).all()  # only covered patch at -inf: zeros
    assert pooled[:, 0, 1:3].isnan().all() and pooled[:, 1, 1:3].isnan().all()  # NaN or +inf covered: NaN
    assert torch.isfinite(pooled[:, 1, 0]).all()  # -inf beside a finite patch: that patch has weight 0
    assert (pooled[1, :2, 3] == 0).all() and (pooled[:, 2] == 0).all()  # all -inf; empty mask


# -------------------------------------------------------------------------------------- gradients

@pytest.mark.filterwarnings("ignore:Input #.* is not a double")  # the ops take fp32 at most: loose tolerances
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients(backend):
    skip_if_interpreted(backend, "the full gradcheck makes ~400 interpreted forward calls, ~50 s; "
                                 "test_gradcheck_packed_masks covers it")
    device = device_of(backend)
    features, masks, logits = pool_inputs(2, 4, (3, 4), (2, 3), 6, heads=2, seed=2)
    features = features.to(device).requires_grad_()
    logits = logits.to(device).requires_grad_()
    masks = masks.to(device)

    def pooled(x, lg):
        return mask_pool(x, masks, (3, 4), logits=lg, backend=backend).pooled

    assert torch.autograd.gradcheck(pooled, (features, logits), eps=1e-3,
                                    **tolerance("mask_pool.gradcheck", torch.float32, backend))
    # The closed-form backward equals autograd through the reference.
    weights = torch.randn(2, 4, 6, device=device)
    got = torch.autograd.grad((pooled(features, logits) * weights).sum(), (features, logits))
    want = torch.autograd.grad((mask_pool(features, masks, (3, 4), logits=logits, backend="reference").pooled
                                * weights).sum(), (features, logits))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance("mask_pool.grad", torch.float32, backend))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("with_logits", [False, True])
def test_gradients_match_reference(backend, with_logits):
    device = device_of(backend)
    features, masks, logits = pool_inputs(2, 4, (5, 3), (2, 2), 12, heads=3, seed=4, mask_set="random")
    features, masks, logits = features.to(device), masks.to(device), logits.to(device) if with_logits else None
    weights = torch.randn(2, 4, 12, generator=generator(5)).to(device)
    grads = {}
    for name in (backend, "reference"):
        leaves = [features.clone().requires_grad_()] + ([logits.clone().requires_grad_()] if with_logits else [])
        pooled = mask_pool(leaves[0], masks, (5, 3), logits=leaves[1] if with_logits else None, backend=name).pooled
        grads[name] = torch.autograd.grad((pooled * weights).sum(), leaves)
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, **tolerance("mask_pool.grad", torch.float32, backend))


@pytest.mark.filterwarnings("ignore:Input #.*double precision:UserWarning")  # fp32 on purpose
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_packed_masks(backend):
    device = device_of(backend)
    features, masks, _ = pool_inputs(1, 3, (2, 3), (2, 1), 4, seed=6, mask_set="random")
    masks, width = pack_mask_bits(masks.to(device))
    logits = pool_logits(1, 2, 6, seed=6, scale=1.0).to(device)

    def pooled(features, logits):
        return mask_pool(features, masks, (2, 3), logits=logits, packed_width=width, backend=backend).pooled

    inputs = (features.to(device).requires_grad_(), logits.requires_grad_())
    assert torch.autograd.gradcheck(pooled, inputs, eps=1e-3, fast_mode=True,
                                    **tolerance("mask_pool.gradcheck", torch.float32, backend))


# ------------------------------------------------------------------------- opcheck, torch.compile

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_opcheck(backend):
    device = device_of(backend)
    features, masks, logits = (t.to(device) for t in pool_inputs(2, 5, (3, 5), (2, 2), 8, heads=2, seed=1))
    opcheck(backend, "mask_pool", (features, masks, logits, 3, 5, 0))
    opcheck(backend, "mask_pool", (features, masks, None, 3, 5, 0))
    packed, width = pack_mask_bits(masks)
    opcheck(backend, "mask_pool", (features.bfloat16(), packed, None, 3, 5, width))
    features, masks, logits = (t.to(device) for t in pool_inputs(2, 3, (3, 3), (2, 2), 8, heads=2, mask_set="random"))
    opcheck(backend, "mask_pool", (features.requires_grad_(), masks, logits.requires_grad_(), 3, 3, 0))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_matches_reference(backend):
    device = device_of(backend)
    features, masks, logits = (t.to(device) for t in pool_inputs(2, 5, (3, 5), (2, 2), 8, heads=2, seed=1))
    compiled = torch.compile(lambda x, m, lg: mask_pool(x, m, (3, 5), logits=lg, backend=backend).pooled,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(features, masks, logits),
                               mask_pool(features, masks, (3, 5), logits=logits, backend="reference").pooled)


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_triton_inductor_fullgraph():
    # triton_op makes the kernels visible to torch.compile: no graph break, same results.
    if TRITON_OPS is None:
        pytest.skip("triton is not usable")
    features, masks, logits = (t.cuda() for t in pool_inputs(2, 5, (4, 4), (4, 4), 64, heads=4, mask_set="random"))
    compiled = torch.compile(lambda *args: TRITON_OPS.mask_pool(*args), fullgraph=True)
    eager = TRITON_OPS.mask_pool(features, masks, logits, 4, 4, 0)
    for got, want in zip(compiled(features, masks, logits, 4, 4, 0), eager):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("change,message", [
    (dict(grid=(7, 7)), "tokens but the grid"),
    (dict(masks=torch.ones(2, 3, 10, 10, dtype=torch.bool)), "not a multiple"),
    (dict(masks=torch.ones(2, 3, 9, 9)), "bool or uint8"),
    (dict(logits=torch.randn(2, 4, 9)), "heads dividing"),
    (dict(packed_width=9), "bit-packed"),
    (dict(grid=(3, 0)), "grid must be"),
])
def test_bad_input(change, message):
    args = dict(features=torch.randn(2, 9, 6), masks=torch.ones(2, 3, 9, 9, dtype=torch.bool), grid=(3, 3),
                logits=None, packed_width=None) | change
    with pytest.raises((ValueError, TypeError), match=message):
        mask_pool(args["features"], args["masks"], args["grid"], logits=args["logits"],
                  packed_width=args["packed_width"], backend="cpu")


# ------------------------------------------------------------------------- GPU: realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_realistic_sizes(backend, dtype, packed):
    features, masks, _ = pool_inputs(4, 40, (14, 14), (16, 16), 768, mask_set="random")  # ViT-B/16 at 224 px
    features = features.to(dtype)
    assert_pool_matches_reference(features, masks, (14, 14), backend, None, packed)
    assert_pool_matches_reference(features, masks, (14, 14), backend, pool_logits(4, 12, 196), packed)


# ------------------------------------------------------------- GPU: shared memory, precision modes

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [32, 64])
def test_large_grids_and_many_heads(backend, dtype, grid):
    # The CUDA kernel keeps counts, covered list and every head's weights in shared memory: a 32 x 32
    # grid with 16 heads needs ~72 KB (above the 48 KB default: the opt-in path), a 64 x 64 grid ~288 KB
    # (more than a block gets: the weights are recomputed while pooling).
    skip_if_interpreted(backend, f"a {grid} x {grid} grid with 16 heads")
    features, masks, _ = pool_inputs(2, 6, (grid, grid), (2, 2), 128, mask_set="random", seed=grid)
    assert_pool_matches_reference(features.to(dtype), masks, (grid, grid), backend,
                                  pool_logits(2, 16, grid * grid, seed=grid))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_fp32_pooling_is_fp32_accurate(backend):
    # fp32 features: Triton's tl.dot runs tf32x3 (three tf32 products, ~fp32), CUDA fp32 FMAs. Against
    # float64: ~1e-7 relative; plain tf32 would give ~3e-4 (measured by emulating it on the CPU).
    features, masks, _ = pool_inputs(4, 40, (14, 14), (16, 16), 768, mask_set="random", seed=31)
    logits = pool_logits(4, 12, 196, seed=31)
    got = mask_pool(features.cuda(), masks.cuda(), (14, 14), logits=logits.cuda(), backend=backend).pooled.cpu()
    weights = reference.mask_pool_weights(reference.mask_patch_counts(masks, 14, 14, 0), logits)  # [B, M, 12, P]
    want = torch.einsum("bmhp,bphd->bmhd", weights.double(), features.double().reshape(4, 196, 12, 64))
    want = want.reshape(4, 40, 768)
    error = float((got.double() - want).norm() / want.norm())
    assert error < 1e-5, f"relative error {error:.2e}: not fp32-accurate (tf32 gives ~3e-4)"
