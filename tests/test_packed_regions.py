"""The packed region encoding (clipfast/models/packed.py): every region's embedding equals the tower
run on that region's sequence alone (encode_sequence, the per-region reference loop) and every image's
equals the model's own, for each attention method, fp32 and bf16 autocast, the world's tiny model and
ViT-B-16 (random weights); pixels outside a region's mask cannot reach it; towers that do not fit get
a clear error.

Tolerances on the unnormalised embeddings, relative to their largest entry: fp32 1e-5 (summation
order: one packed matrix vs per-sequence batches); bf16 autocast 2e-2 (both sides round every
matmul input to bf16 (8 bits), in different groupings, through a few blocks)."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from clipfast.bench.pipeline import FixedOracle
from clipfast.models import load_model
from clipfast.models.packed import (
    ATTENTION,
    AttentionPlan,
    Sequences,
    check_vision_tower,
    encode_packed,
    encode_regions_packed,
    encode_sequence,
    packed_layout,
    tower_flops,
    varlen_attention,
)
from clipfast.ops import region_patches

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
METHODS = [m for m in ATTENTION if m != "auto"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("clipfast-tiny")


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return load_model("ViT-B-16")


def inputs(bundle, batch, num_masks, seed):
    """uint8 images at the tower's size and masks of every kind: random pixels, one pixel, the
    whole image, empty."""
    size = bundle.image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    masks = torch.rand(batch, num_masks, size, size, generator=gen) > 0.85
    masks[0, 0] = False                          # empty: no sequence
    masks[0, 1] = True                           # the whole image
    masks[-1, -1] = False
    masks[-1, -1, size // 2, size // 3] = True   # one pixel: one patch
    return images, masks


def assert_matches_reference_loop(bundle, images, masks, attention, autocast_dtype=None, min_coverage=0.0):
    visual = check_vision_tower(bundle.model)
    device = bundle.device
    images, masks = images.to(device), masks.to(device)
    pixels = bundle.preprocess(images)
    dtype = autocast_dtype or torch.float32
    regions = region_patches(images, masks, visual.grid_size, background=0.35, mean=bundle.mean, std=bundle.std,
                             min_coverage=min_coverage, out_dtype=dtype)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast_dtype is not None):
        image, region, valid = encode_packed(visual, pixels, regions, masks.shape[1], attention=attention)
        want_image = visual(pixels)
        bounds = regions.offsets.tolist()
        want = [encode_sequence(visual, regions.pixels[lo:hi], regions.patch[lo:hi]) if hi > lo else None
                for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(valid.flatten().cpu(), torch.tensor([w is not None for w in want]))
    scale = want_image.abs().max()
    close = dict(atol=TOLERANCE[dtype] * float(scale), rtol=0)
    torch.testing.assert_close(image.float(), want_image.float(), **close)
    got = region.flatten(0, 1)[valid.flatten()].float()
    torch.testing.assert_close(got, torch.stack([w for w in want if w is not None]).float(), **close)
    assert not region.flatten(0, 1)[~valid.flatten()].any()
    return image, region, valid


@pytest.mark.parametrize("attention", METHODS)
def test_tiny_regions_equal_their_own_sequences(tiny, attention):
    images, masks = inputs(tiny, 3, 6, seed=1)
    assert_matches_reference_loop(tiny, images, masks, attention)


@pytest.mark.parametrize("min_coverage", [0.25, 1.0])
def test_tiny_coverage_threshold(tiny, min_coverage):
    images, masks = inputs(tiny, 2, 4, seed=2)
    assert_matches_reference_loop(tiny, images, masks, "bucketed", min_coverage=min_coverage)


def test_tiny_bf16(tiny):
    images, masks = inputs(tiny, 3, 6, seed=3)
    assert_matches_reference_loop(tiny, images, masks, "bucketed", torch.bfloat16)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_vit_b16(vit_b16, autocast_dtype):
    # 2 images at 224 px with 5 regions each: 12 heads of 64, 12 blocks, sequences of 2 to 197 tokens.
    images, masks = inputs(vit_b16, 2, 2, seed=4)  # empty, whole image, random pixels, one pixel
    masks = torch.cat([masks, FixedOracle(4).segment(images).masks], 1)  # and discs
    assert_matches_reference_loop(vit_b16, images, masks, "bucketed", autocast_dtype)


def test_pixels_outside_a_region_do_not_reach_it(tiny):
    # A "trigger" painted outside region 2's mask changes the image's embedding, not the region's.
    images, masks = inputs(tiny, 1, 3, seed=5)
    masks[0, 2] = False
    masks[0, 2, 4:14, 4:14] = True
    triggered = images.clone()
    triggered[0, :, 14:20, 14:20] = torch.tensor([255, 0, 255], dtype=torch.uint8)[:, None, None]
    before, after = (encode_regions_packed(tiny, tiny.preprocess(x), x, masks, background=0.35)
                     for x in (images, triggered))
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1][0, 2], after[1][0, 2], atol=1e-6, rtol=0)


def test_token_budget_splits_the_batch_without_changing_results(tiny):
    images, masks = inputs(tiny, 5, 4, seed=6)
    pixels = tiny.preprocess(images)
    whole = encode_regions_packed(tiny, pixels, images, masks, background=0.35)
    split = encode_regions_packed(tiny, pixels, images, masks, background=0.35, token_budget=40)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(whole[2], masks.flatten(2).any(-1))
    none = encode_regions_packed(tiny, pixels[:0], images[:0], masks[:0], background=0.35)
    assert [tuple(t.shape) for t in none] == [(0, 128), (0, 4, 128), (0, 4)]


@pytest.mark.parametrize("attention", METHODS)
def test_varlen_attention_stays_within_sequences(attention):
    # Lengths that make padded buckets, unpadded ones, and a run of whole consecutive sequences.
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([197, 197, 5, 1, 17, 3, 3, 8, 2, 12, 12])
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    qkv = torch.randn(int(lengths.sum()), 3 * 24, generator=gen)
    got = varlen_attention(qkv, 3, AttentionPlan(Sequences(offsets, lengths), attention, qkv.device))
    for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        q, k, v = qkv[lo:hi].view(hi - lo, 3, 3, 8).permute(1, 2, 0, 3)  # [heads, L, 8] each
        want = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(hi - lo, 24)
        torch.testing.assert_close(got[lo:hi], want, atol=1e-6, rtol=1e-5)


def test_packed_layout_sorts_regions_by_length():
    region_lengths = torch.tensor([0, 5, 1, 16, 2, 2, 0, 9, 3, 4, 16, 7])
    start, sequences = packed_layout(region_lengths, 2, 16)
    kept = region_lengths > 0
    assert sequences.lengths.tolist() == [17, 17] + sorted((1 + region_lengths[kept]).tolist())
    assert torch.equal(sequences.offsets.diff(), sequences.lengths)
    assert torch.equal(torch.sort(start[kept]).values, sequences.offsets[2:-1])
    assert torch.equal(sequences.lengths[2:], 1 + region_lengths[kept][torch.argsort(start[kept])])


def test_towers_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match="not an open_clip VisionTransformer"):
        check_vision_tower(torch.nn.Linear(3, 3))
    custom = VisionTransformer(32, 8, 64, 2, 2, 4.0, output_dim=32, scale_heads=True)
    with pytest.raises(ValueError, match="block 0 .*ResidualAttentionBlock|block 0 does not use"):
        check_vision_tower(custom)
    pooled = VisionTransformer(32, 8, 64, 2, 2, 4.0, output_dim=32, pool_type="avg")
    with pytest.raises(ValueError, match="class token"):
        check_vision_tower(pooled)


@pytest.mark.parametrize("model", ["tiny", "vit_b16"])
def test_tower_flops_counts_what_the_model_runs(model, request):
    # FlopCounterMode traces every matmul of the model's own forward (with autograd on, so that
    # nn.MultiheadAttention's fused inference path does not hide its projections); on a CPU it sees
    # no attention kernel, so the attention term (4 L^2 width per block) is added to its count.
    from torch.utils.flop_counter import FlopCounterMode

    bundle = request.getfixturevalue(model)
    visual = check_vision_tower(bundle.model)
    size, tokens = bundle.image_size, 1 + visual.grid_size[0] * visual.grid_size[1]
    with FlopCounterMode(display=False) as counter:
        visual(torch.zeros(2, 3, size, size, requires_grad=True))
    attention = 2 * len(visual.transformer.resblocks) * 4 * tokens**2 * visual.conv1.out_channels
    assert tower_flops(visual, torch.tensor([tokens, tokens])) == counter.get_total_flops() + attention


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_gpu_nested_attention(vit_b16, autocast_dtype):
    # On a GPU, auto attention is SDPA over jagged nested tensors (the varlen flash / memory-
    # efficient kernels): the same embeddings as the per-region loop, and as the CPU's buckets.
    import copy

    bundle = copy.deepcopy(vit_b16)
    bundle.model.cuda()
    images, masks = inputs(bundle, 3, 2, seed=8)
    masks = torch.cat([masks, FixedOracle(14).segment(images).masks], 1)
    _, region, _ = assert_matches_reference_loop(bundle, images, masks, "auto", autocast_dtype)
    _, bucketed, _ = assert_matches_reference_loop(bundle, images, masks, "bucketed", autocast_dtype)
    torch.testing.assert_close(region, bucketed, atol=TOLERANCE[autocast_dtype or torch.float32], rtol=0)
