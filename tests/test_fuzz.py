"""Fuzzing (hypothesis): the compiled ops against their PyTorch reference, and the image loaders
against numpy, on random shapes and values (odd sizes, empty and all-covering masks, ties, every
PIL mode the loaders accept). Tolerance rationale: tests/optest.py."""

import io
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipfast.data import TarShardDataset, decode_image
from clipfast.ops import mask_crop, mask_pool, region_score, region_topk
from clipfast.ops.backends import backend_status

pytestmark = pytest.mark.skipif(not backend_status("cpu")[0], reason="the compiled cpu backend is not built")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def random_masks(gen: torch.Generator, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """density 0 gives empty masks, 1 all-covering ones."""
    return torch.rand(shape, generator=gen) < density


@FUZZ
@given(batch=st.integers(1, 3), masks=st.integers(1, 4), channels=st.integers(1, 4), height=st.integers(1, 29),
       width=st.integers(1, 29), out_size=st.integers(1, 19), margin=st.floats(0, 0.5), square=st.booleans(),
       background=st.floats(0, 1), density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       image_dtype=st.sampled_from([torch.uint8, torch.float32]), out_dtype=DTYPES, seed=st.integers(0, 2**16))
def test_mask_crop_cpu_equals_the_reference(batch, masks, channels, height, width, out_size, margin, square,
                                            background, density, image_dtype, out_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    images = (torch.randint(0, 256, (batch, channels, height, width), generator=gen, dtype=torch.uint8)
              if image_dtype == torch.uint8 else torch.rand(batch, channels, height, width, generator=gen))
    region_masks = random_masks(gen, (batch, masks, height, width), density)
    mean, std = torch.rand(channels, generator=gen).tolist(), (0.2 + torch.rand(channels, generator=gen)).tolist()
    results = [mask_crop(images, region_masks, out_size, margin=margin, square=square, background=background,
                         mean=mean, std=std, out_dtype=out_dtype, backend=backend) for backend in ("cpu", "reference")]
    assert torch.equal(results[0].valid, results[1].valid) and torch.equal(results[0].boxes, results[1].boxes)
    tolerance = dict(atol=1e-4, rtol=1e-5) if out_dtype == torch.float32 else dict(atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(results[0].crops.float(), results[1].crops.float(), **tolerance)


@FUZZ
@given(batch=st.integers(1, 3), masks=st.integers(1, 4), grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       patch=st.tuples(st.integers(1, 4), st.integers(1, 4)), heads=st.integers(1, 3), head_dim=st.integers(1, 9),
       logits=st.sampled_from(["none", "shared", "per_head"]), density=st.sampled_from([0.0, 0.1, 0.6, 1.0]),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_mask_pool_cpu_equals_the_reference(batch, masks, grid, patch, heads, head_dim, logits, density, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    patches = grid[0] * grid[1]
    features = torch.randn(batch, patches, heads * head_dim, generator=gen).to(dtype)
    region_masks = random_masks(gen, (batch, masks, grid[0] * patch[0], grid[1] * patch[1]), density)
    attention = {"none": None, "shared": torch.randn(batch, patches, generator=gen),
                 "per_head": torch.randn(batch, heads, patches, generator=gen)}[logits]
    attention = attention.to(dtype) if attention is not None else None
    results = [mask_pool(features, region_masks, grid, logits=attention, backend=backend) for backend in ("cpu", "reference")]
    assert torch.equal(results[0].valid, results[1].valid)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results[0].pooled.float(), results[1].pooled.float(), **tolerance)


@FUZZ
@given(batch=st.integers(1, 4), regions=st.integers(1, 6), dim=st.integers(1, 33), labels=st.integers(2, 9),
       scale=st.floats(0.5, 100), density=st.sampled_from([0.0, 0.5, 1.0]),
       poison=st.sampled_from([None, float("nan"), float("inf")]), seed=st.integers(0, 2**16))
def test_region_score_cpu_equals_the_reference(batch, regions, dim, labels, scale, density, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    image, text = torch.randn(batch, dim, generator=gen), torch.randn(labels, dim, generator=gen)
    region = torch.randn(batch, regions, dim, generator=gen)
    valid = random_masks(gen, (batch, regions), density)
    if poison is not None:  # one broken embedding: its scores must come out NaN, never a plausible number
        (image if seed % 2 else region.view(-1, dim))[0, seed % dim] = poison
    got, want = (region_score(image, region, valid, text, scale, backend=backend) for backend in ("cpu", "reference"))
    for name in ("image_prob", "region_prob", "region_image_prob", "discrepancy"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.isnan(), b.isnan()), name
    # Labels are argmaxes: near-ties may flip between summation orders; where they agree, values must too.
    same = (got.image_label == want.image_label) & ~want.image_prob.isnan()
    torch.testing.assert_close(got.image_prob, want.image_prob, atol=1e-5, rtol=1e-5, equal_nan=True)
    # discrepancy = image_prob - a region's probability of that label: the difference of two values each
    # held to 1e-5, so 2e-5 (hypothesis found 1.5e-5 at scale 98, dim 1: a saturated softmax in fp32)
    torch.testing.assert_close(got.discrepancy[same], want.discrepancy[same], atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.region_prob, want.region_prob, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(got.region_label == -1, ~valid) and torch.equal(want.region_label == -1, ~valid)


@FUZZ
@given(n=st.integers(0, 300), labels=st.integers(1, 12), k=st.integers(1, 9), distinct_scores=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_region_topk_cpu_equals_the_reference_with_ties(n, labels, k, distinct_scores, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, distinct_scores, (n,), generator=gen).float() / distinct_scores  # many ties
    label_of = torch.randint(-1, labels + 1, (n,), generator=gen)  # -1 and `labels` are out of range: ignored
    got, want = (region_topk(scores, label_of, labels, k, backend=backend) for backend in ("cpu", "reference"))
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


# ---------------------------------------------------------------- loaders

@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "I;16", "P"]))
    height, width = draw(st.integers(1, 23)), draw(st.integers(1, 23))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)), mode
    channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "P":
        image = Image.fromarray(array[..., 0], "L").convert("P")
    else:
        image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    return image, mode


def expected_rgb8(image: Image.Image, mode: str) -> np.ndarray:
    """What the loaders must return, computed from the pixel values with numpy."""
    if mode == "I;16":
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255
        return rgba[..., :3] * alpha + 255 * (1 - alpha)
    return np.asarray(image.convert("RGB"))


@FUZZ
@given(pil_images(), st.sampled_from(["PNG", "TIFF"]))
def test_decode_image_returns_8bit_rgb_of_every_mode(image_and_mode, format):
    image, mode = image_and_mode
    if format == "TIFF" and mode in ("P", "LA"):
        format = "PNG"
    data = io.BytesIO()
    image.save(data, format=format)
    data.seek(0)
    decoded = decode_image(data, name="fuzz").permute(1, 2, 0).numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == (image.height, image.width, 3)
    assert np.abs(decoded.astype(np.float64) - expected_rgb8(image, mode)).max() <= 1  # alpha compositing rounds


@settings(max_examples=15, deadline=None)
@given(samples=st.lists(st.tuples(st.integers(0, 9), st.booleans(), st.integers(1, 12)), min_size=1, max_size=12))
def test_tar_shards_round_trip_random_samples(tmp_path_factory, samples):
    path = tmp_path_factory.mktemp("tar") / "shard.tar"
    expected = []
    with tarfile.open(path, "w") as tar:
        for i, (label, broken, side) in enumerate(samples):
            rng = np.random.default_rng(i)
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            data = io.BytesIO()
            if broken:
                data.write(b"\x89PNG broken")
            else:
                Image.fromarray(pixels).save(data, format="PNG")
            for name, payload in ((f"{i:04d}.png", data.getvalue()), (f"{i:04d}.cls", str(label).encode())):
                member = tarfile.TarInfo(name)
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
            if not broken:
                expected.append((pixels, label))
    if not expected:
        with pytest.raises(ValueError, match="no usable images"):
            TarShardDataset(path)
        return
    dataset = TarShardDataset(path)
    assert len(dataset) == len(expected) and len(dataset.skipped) == len(samples) - len(expected)
    for (image, label), (pixels, want) in zip((dataset[i] for i in range(len(dataset))), expected):
        assert label == want and np.array_equal(image.permute(1, 2, 0).numpy(), pixels)
