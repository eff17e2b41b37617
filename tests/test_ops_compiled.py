"""mask_pool, region_score and region_topk: compiled backends (cpu here, cuda wherever a GPU is)
against the PyTorch reference on random odd sizes and edge cases; gradients, opcheck, torch.compile.

Tolerances: fp32 differs from the reference only by summation order (pooled features 1e-5,
probabilities 1e-5); bf16 outputs are one rounding of an fp32 value (one bf16 ulp, 2^-7 relative).
"""

import pytest
import torch

from clipfast.ops import mask_pool, pack_mask_bits, reference, region_score, region_topk

compiled_backends = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
POOL_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
PROB_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


# ---------------------------------------------------------------- mask_pool

def pool_inputs(batch, num_masks, grid, patch, dim, heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    (gh, gw), (ph, pw) = grid, patch
    height, width = gh * ph, gw * pw
    features = torch.randn(batch, gh * gw, dim, generator=gen)
    masks = torch.zeros(batch, num_masks, height, width, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for b in range(batch):
        for m in range(num_masks):
            kind = (b + 2 * m) % 5
            if kind == 0:
                cy, cx = int(torch.randint(0, height, (1,), generator=gen)), int(torch.randint(0, width, (1,), generator=gen))
                masks[b, m] = (yy - cy) ** 2 + (xx - cx) ** 2 <= (1 + m % 7) ** 2
            elif kind == 1:
                masks[b, m] = torch.rand(height, width, generator=gen) > 0.8
            elif kind == 2:
                masks[b, m, : ph // 2 + 1, -1:] = True  # one partial patch in the top-right corner
            elif kind == 3:
                pass  # empty (padding)
            else:
                masks[b, m] = True  # all-covering
    logits = 3 * torch.randn(batch, heads, gh * gw, generator=gen)
    return features, masks, logits


def assert_pool_matches(backend, dtype, features, masks, logits, grid, packed=False):
    device = device_of(backend)
    want = mask_pool(features.to(dtype), masks, grid, logits=logits, backend="reference")
    if packed:
        masks, width = pack_mask_bits(masks)
    else:
        width = None
    got = mask_pool(features.to(device, dtype), masks.to(device), grid, packed_width=width,
                    logits=None if logits is None else logits.to(device), backend=backend)
    assert got.pooled.dtype == dtype and got.pooled.shape == want.pooled.shape
    torch.testing.assert_close(got.pooled.float().cpu(), want.pooled.float(), **POOL_TOLERANCE[dtype])
    assert torch.equal(got.valid.cpu(), want.valid)


@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [0, 1, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_mask_pool_matches_reference(backend, dtype, heads, packed):
    features, masks, logits = pool_inputs(3, 41, (7, 9), (5, 3), 77, max(heads, 1))
    assert_pool_matches(backend, dtype, features, masks, logits if heads else None, (7, 9), packed)


@pytest.mark.parametrize("backend", compiled_backends)
def test_mask_pool_realistic_vit_grid(backend):
    features, masks, logits = pool_inputs(2, 9, (14, 14), (16, 16), 96, 12, seed=4)
    assert_pool_matches(backend, torch.bfloat16, features, masks, logits, (14, 14))
    assert_pool_matches(backend, torch.float32, features, masks, logits, (14, 14), packed=True)


@pytest.mark.parametrize("backend", compiled_backends)
def test_mask_pool_edge_cases(backend):
    device = device_of(backend)
    features, _, _ = pool_inputs(2, 1, (3, 3), (1, 1), 5, 1)
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


@pytest.mark.filterwarnings("ignore:Input #.* is not a double")  # the ops take fp32 at most: loose tolerances
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends)
def test_mask_pool_gradients(backend):
    device = device_of(backend)
    features, masks, logits = pool_inputs(2, 4, (3, 4), (2, 3), 6, 2, seed=2)
    features = features.to(device).requires_grad_()
    logits = logits.to(device).requires_grad_()
    masks = masks.to(device)

    def pooled(x, lg):
        return mask_pool(x, masks, (3, 4), logits=lg, backend=backend).pooled

    assert torch.autograd.gradcheck(pooled, (features, logits), eps=1e-3, atol=2e-2, rtol=2e-2)
    # The closed-form backward equals autograd through the reference.
    weights = torch.randn(2, 4, 6, device=device)
    got = torch.autograd.grad((pooled(features, logits) * weights).sum(), (features, logits))
    want = torch.autograd.grad((mask_pool(features, masks, (3, 4), logits=logits, backend="reference").pooled
                                * weights).sum(), (features, logits))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_mask_pool_opcheck_and_compile():
    features, masks, logits = pool_inputs(2, 5, (3, 5), (2, 2), 8, 2, seed=1)
    torch.library.opcheck(torch.ops.clipfast.mask_pool.default, (features, masks, logits, 3, 5, 0))
    torch.library.opcheck(torch.ops.clipfast.mask_pool.default, (features, masks, None, 3, 5, 0))
    packed, width = pack_mask_bits(masks)
    torch.library.opcheck(torch.ops.clipfast.mask_pool.default, (features.bfloat16(), packed, None, 3, 5, width))
    compiled = torch.compile(lambda x, m, lg: mask_pool(x, m, (3, 5), logits=lg, backend="cpu").pooled,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(features, masks, logits),
                               mask_pool(features, masks, (3, 5), logits=logits, backend="reference").pooled)


def test_pack_mask_bits_roundtrip():
    masks = torch.rand(2, 3, 5, 19) > 0.5
    packed, width = pack_mask_bits(masks)
    assert packed.shape == (2, 3, 5, 3) and width == 19
    assert torch.equal(reference.unpack_mask_bits(packed, width), masks)


@pytest.mark.parametrize("change,message", [
    (dict(grid=(7, 7)), "tokens but the grid"),
    (dict(masks=torch.ones(2, 3, 10, 10, dtype=torch.bool)), "not a multiple"),
    (dict(masks=torch.ones(2, 3, 9, 9)), "bool or uint8"),
    (dict(logits=torch.randn(2, 4, 9)), "heads dividing"),
    (dict(packed_width=9), "bit-packed"),
    (dict(grid=(3, 0)), "grid must be"),
])
def test_mask_pool_bad_input(change, message):
    args = dict(features=torch.randn(2, 9, 6), masks=torch.ones(2, 3, 9, 9, dtype=torch.bool), grid=(3, 3),
                logits=None, packed_width=None) | change
    with pytest.raises((ValueError, TypeError), match=message):
        mask_pool(args["features"], args["masks"], args["grid"], logits=args["logits"],
                  packed_width=args["packed_width"], backend="cpu")


# ---------------------------------------------------------------- region_score

def score_inputs(batch, regions, dim, classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    # Images lean towards one label, so the top label is well separated in fp32 and bf16.
    images = torch.randn(batch, dim, generator=gen) + 2 * text[labels]
    regions_ = torch.randn(batch, regions, dim, generator=gen) + 2 * text[torch.randint(0, classes, (batch, regions),
                                                                                         generator=gen)]
    valid = torch.rand(batch, regions, generator=gen) > 0.25
    if batch > 1:
        valid[1] = False  # an image with no valid region
    valid[0, 0] = True
    return images, regions_, valid, text


def assert_scores_match(got, want, prob_tolerance):
    assert torch.equal(got.image_label.cpu(), want.image_label)
    assert torch.equal(got.region_label.cpu(), want.region_label)
    for name in ("image_prob", "region_prob", "region_image_prob", "discrepancy"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), **prob_tolerance, msg=name)


@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [(3, 41, 77, 1000), (5, 1, 33, 3), (2, 7, 16, 1)])
def test_region_score_matches_reference(backend, dtype, sizes):
    device = device_of(backend)
    images, regions, valid, text = score_inputs(*sizes)
    args = [t.to(dtype) for t in (images, regions)] + [valid] + [text.to(dtype)]
    want = region_score(*args, 50.0, backend="reference")
    got = region_score(*[t.to(device) for t in args], 50.0, backend=backend)
    # bf16 inputs: both sides compute in fp32 from the same bf16 values; only summation order differs
    # (the GPU's tensor-core dot products accumulate in a different order, so allow 1e-4 there).
    assert_scores_match(got, want, PROB_TOLERANCE if backend == "cpu" else dict(atol=1e-4, rtol=1e-3))


@pytest.mark.parametrize("backend", compiled_backends)
def test_region_score_ties_go_to_the_lower_label(backend):
    device = device_of(backend)
    text = torch.eye(4, 6)
    text[2] = text[1]  # labels 1 and 2 identical: every tie goes to 1
    images = torch.tensor([[0.0, 1.0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0]])
    regions = images[:, None].repeat(1, 3, 1)
    valid = torch.ones(2, 3, dtype=torch.bool)
    got = region_score(images.to(device), regions.to(device), valid.to(device), text.to(device), 10.0, backend=backend)
    assert got.image_label.tolist() == [1, 0]
    assert got.region_label.tolist() == [[1] * 3, [0] * 3]


def test_region_score_opcheck_and_compile():
    images, regions, valid, text = score_inputs(3, 5, 12, 7)
    torch.library.opcheck(torch.ops.clipfast.region_score.default, (images, regions, valid, text, 20.0))
    compiled = torch.compile(lambda *a: region_score(*a, 20.0, backend="cpu").discrepancy, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(images, regions, valid, text),
                               region_score(images, regions, valid, text, 20.0, backend="reference").discrepancy)


# ---------------------------------------------------------------- region_topk

@pytest.mark.parametrize("backend", compiled_backends)
@pytest.mark.parametrize("n,num_labels,k", [(1, 1, 1), (997, 13, 5), (20011, 101, 37), (5000, 7, 1024)])
def test_region_topk_matches_reference(backend, n, num_labels, k):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=gen)
    scores[::5] = 0.25  # many ties
    scores[1::97] = float("nan")
    scores[2::89] = -0.0
    scores[3::89] = 0.0
    labels = torch.randint(-2, num_labels + 2, (n,), generator=gen)  # some out of range: ignored
    want = region_topk(scores, labels, num_labels, k, backend="reference")
    device = device_of(backend)
    got = region_topk(scores.to(device), labels.to(device), num_labels, k, backend=backend)
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.indices.cpu(), want.indices)


@pytest.mark.parametrize("backend", compiled_backends)
def test_region_topk_one_label_owns_everything(backend):
    device = device_of(backend)
    scores = torch.arange(70000, dtype=torch.float32) % 1000  # ascending runs: worst case for insertion
    labels = torch.full((70000,), 2)
    got = region_topk(scores.to(device), labels.to(device), 4, 3, backend=backend)
    assert got.counts.tolist() == [0, 0, 70000, 0]
    assert got.indices[2].tolist() == [999, 1999, 2999]
    assert (got.indices[[0, 1, 3]] == -1).all()


def test_region_topk_opcheck_and_compile():
    scores, labels = torch.randn(300), torch.randint(0, 9, (300,))
    torch.library.opcheck(torch.ops.clipfast.region_topk.default, (scores, labels, 9, 4))
    compiled = torch.compile(lambda s, lab: region_topk(s, lab, 9, 4, backend="cpu").indices, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(scores, labels), region_topk(scores, labels, 9, 4, backend="reference").indices)


@pytest.mark.parametrize("backend", compiled_backends)
def test_region_score_without_regions(backend):
    device = device_of(backend)
    images, _, _, text = score_inputs(3, 1, 10, 6)
    regions, valid = torch.zeros(3, 0, 10), torch.zeros(3, 0, dtype=torch.bool)
    want = region_score(images, regions, valid, text, 30.0, backend="reference")
    got = region_score(images.to(device), regions.to(device), valid.to(device), text.to(device), 30.0, backend=backend)
    assert_scores_match(got, want, PROB_TOLERANCE)
    torch.testing.assert_close(want.discrepancy, want.image_prob)  # no region supports the label


# ---------------------------------------------------------------- dispatch

def small_calls():
    features, masks, logits = pool_inputs(1, 2, (2, 2), (2, 2), 4, 1)
    images, regions, valid, text = score_inputs(2, 3, 8, 5)
    return {
        "mask_pool": lambda backend: mask_pool(features, masks, (2, 2), backend=backend),
        "region_score": lambda backend: region_score(images, regions, valid, text, 10.0, backend=backend),
        "region_topk": lambda backend: region_topk(torch.randn(9), torch.randint(0, 3, (9,)), 3, 2, backend=backend),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
@pytest.mark.parametrize("op", ["mask_pool", "region_score", "region_topk"])
def test_explicit_backends_that_cannot_run_say_why(op, monkeypatch):
    from clipfast.ops import BackendUnavailable

    call = small_calls()[op]
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible"):
        call("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU for Triton"):
        call("triton")
    with pytest.raises(ValueError, match="unknown backend"):
        call("gpu")
    from clipfast.ops import backends

    assert backends.resolve(op, "auto", torch.device("cpu")) == "cpu"  # the C++ kernels for CPU tensors
    call("auto")
