"""Pooled region embeddings: the image embedding is the model's own, and each region's embedding is
exactly the last block's class-token attention restricted to the region's patches."""

import pytest
import torch
import torch.nn.functional as F

from clipfast.models import load_model
from clipfast.models.regions import encode_regions_pooled


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_model("clipfast-tiny")


def masked_class_token(bundle, images, patch_mask):
    """Reference: the last block run with the class token as the only query, attending only to the
    patches where patch_mask [B, P] is True, via nn.MultiheadAttention's own key_padding_mask."""
    visual = bundle.model.visual
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    normed = last.ln_1(x)
    out = last.attn(normed[:, :1], normed[:, 1:], normed[:, 1:], key_padding_mask=~patch_mask, need_weights=False)[0]
    cls = x[:, :1] + last.ls_1(out)
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    return F.normalize(visual.ln_post(cls[:, 0]) @ visual.proj, dim=-1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pooled_regions_are_masked_class_attention(bundle, backend):
    gen = torch.Generator().manual_seed(1)
    images = bundle.preprocess(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen))
    patch = bundle.model.visual.conv1.stride[0]
    grid = 32 // patch
    patch_masks = torch.rand(3, 5, grid, grid, generator=gen) > 0.5
    patch_masks[:, 0] = True   # the whole image
    patch_masks[:, 1] = False  # empty
    patch_masks[:, 1, 2, 1] = True  # one patch
    pixel_masks = patch_masks.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # whole patches
    with torch.no_grad():
        image, regions, valid = encode_regions_pooled(bundle, images, pixel_masks, backend=backend)
        torch.testing.assert_close(image, bundle.model.encode_image(images, normalize=True))
        for m in range(5):
            covered = patch_masks[:, m].flatten(1)
            if covered.any(1).all():
                torch.testing.assert_close(regions[:, m], masked_class_token(bundle, images, covered),
                                           atol=1e-5, rtol=1e-4)
    assert valid.all()


def test_partial_patches_weigh_by_coverage(bundle):
    images = bundle.preprocess(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8))
    masks = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    masks[0, 0, :8, :8] = True  # one full patch
    masks[0, 1, :4, :8] = True  # half of the same patch: same single-patch region
    masks[0, 1, :1, 8:9] = True  # plus one pixel of the next: a little of it
    with torch.no_grad():
        _, regions, _ = encode_regions_pooled(bundle, images, masks, backend="cpu")
    assert (regions[0, 0] - regions[0, 1]).norm() < 0.5 and not torch.equal(regions[0, 0], regions[0, 1])


def test_unsupported_towers_get_a_clear_error(bundle):
    class NotAViT(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    fake = type(bundle)(NotAViT(), bundle.tokenizer, "x", "x", 32, bundle.mean, bundle.std)
    with pytest.raises(ValueError, match="class-token ViT"):
        encode_regions_pooled(fake, torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32, dtype=torch.bool))
