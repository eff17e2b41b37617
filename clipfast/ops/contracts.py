"""Each op's output contract, shared by every backend that registers it as a torch custom op (the C++
ops clipfast::<op> and the Triton ops clipfast_triton::<op>): the fake kernel (output shapes and
dtypes only, what torch.compile and FakeTensor tracing see) and, for mask_pool, autograd.

The fakes replace triton_op's default fake (tracing the Python body), which cannot run the kernels
under Triton's CPU interpreter.
"""

from __future__ import annotations

import torch

from . import reference


def fake_mask_crop(images, masks, out_size, margin, square, background, mean, std, out_dtype):
    batch, channels = images.shape[:2]
    num_masks = masks.shape[1]
    return (images.new_empty((batch, num_masks, channels, out_size, out_size), dtype=out_dtype),
            images.new_empty((batch, num_masks, 4), dtype=torch.int32),
            images.new_empty((batch, num_masks), dtype=torch.bool))


def fake_mask_pool(features, masks, logits, grid_h, grid_w, packed_width):
    batch, _, dim = features.shape
    num_masks = masks.shape[1]
    return features.new_empty((batch, num_masks, dim)), features.new_empty((batch, num_masks), dtype=torch.bool)


def fake_region_score(image_embeddings, region_embeddings, region_valid, text_embeddings, logit_scale):
    batch, num_regions = region_valid.shape
    new = image_embeddings.new_empty
    return (new(batch, dtype=torch.int64), new(batch, dtype=torch.float32),
            new((batch, num_regions), dtype=torch.int64), new((batch, num_regions), dtype=torch.float32),
            new((batch, num_regions), dtype=torch.float32), new(batch, dtype=torch.float32))


def fake_region_topk(scores, labels, num_labels, k):
    return scores.new_empty(num_labels, dtype=torch.int64), scores.new_empty((num_labels, k), dtype=torch.int64)


def fake_region_patches(images, masks, grid_h, grid_w, min_pixels, background, mean, std, out_dtype, packed_width):
    # The number of kept patches depends on the masks' values: a data-dependent size.
    tokens = torch.library.get_ctx().new_dynamic_size()
    patch_h, patch_w = images.shape[2] // grid_h, images.shape[3] // grid_w
    new = images.new_empty
    return (new((tokens, images.shape[1], patch_h, patch_w), dtype=out_dtype), new(tokens, dtype=torch.int64),
            new(tokens, dtype=torch.int64), new(masks.shape[0] * masks.shape[1] + 1, dtype=torch.int64))


def _mask_pool_setup(ctx, inputs, output):
    features, masks, logits, grid_h, grid_w, packed_width = inputs
    ctx.save_for_backward(features, masks, logits)
    ctx.geometry = (grid_h, grid_w, packed_width)


def _mask_pool_backward(ctx, grad_pooled, grad_valid):
    """Gradients for features and logits from the closed form in reference.mask_pool_backward."""
    features, masks, logits = ctx.saved_tensors
    grad_features, grad_logits = reference.mask_pool_backward(grad_pooled, features, masks, logits, *ctx.geometry)
    return grad_features, None, grad_logits, None, None, None


FAKES = {"mask_crop": fake_mask_crop, "mask_pool": fake_mask_pool, "region_score": fake_region_score,
         "region_topk": fake_region_topk, "region_patches": fake_region_patches}
AUTOGRAD = {"mask_pool": (_mask_pool_backward, _mask_pool_setup)}


def register_contract(name: str, op) -> None:
    """Give a registered op its fake kernel (and autograd where the op has one). op: the qualified
    name ("clipfast::mask_pool") or the op object torch.library.triton_op returned."""
    torch.library.register_fake(op, FAKES[name])
    if name in AUTOGRAD:
        backward, setup = AUTOGRAD[name]
        torch.library.register_autograd(op, backward, setup_context=setup)
