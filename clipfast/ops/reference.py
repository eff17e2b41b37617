"""Pure-PyTorch reference implementations of clipfast's ops.

These are the semantic spec (DESIGN.md section 3), the test oracle for every compiled backend, the
benchmark baseline and the fallback. They favour clarity over speed; inputs are validated by the
public functions in this package before they get here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .maskbits import unpack_mask_bits


def mask_box(mask: torch.Tensor, margin: float, square: bool = False) -> tuple[int, int, int, int] | None:
    """Sampling box (y0, x0, y1, x1) of a [H, W] mask; None for an empty mask.

    Default: the tight box grown by floor(margin * side) per side, clipped to the image. Square: a
    square of side max(h, w) + 2 * floor(margin * max(h, w)) centred on the tight box (the odd pixel
    of the extra goes right/down), not clipped: it may reach outside the image.
    """
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    h, w = y1 - y0, x1 - x0
    if square:
        side = max(h, w) + 2 * math.floor(margin * max(h, w))
        y0, x0 = y0 - (side - h) // 2, x0 - (side - w) // 2
        return y0, x0, y0 + side, x0 + side
    pad_y, pad_x = math.floor(margin * h), math.floor(margin * w)
    height, width = mask.shape
    return max(0, y0 - pad_y), max(0, x0 - pad_x), min(height, y1 + pad_y), min(width, x1 + pad_x)


def mask_crop(
    images: torch.Tensor,
    masks: torch.Tensor,
    out_size: int,
    margin: float,
    square: bool,
    background: float,
    mean: list[float],
    std: list[float],
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop every (image b, mask m) to the mask's sampling box (mask_box), with pixels outside the
    mask (or outside the image) set to `background`, bilinear-resize (align_corners=False) to
    out_size, normalise.

    images [B, C, H, W] uint8 (scaled by 1/255) or float; masks [B, M, H, W] bool/uint8.
    Returns crops [B, M, C, S, S] (out_dtype), boxes [B, M, 4] int32 (the sampling box; zeros for an
    empty mask) and valid [B, M] bool (False for an empty mask, whose crop is all background).
    """
    batch, channels, height, width = images.shape
    num_masks = masks.shape[1]
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    crops = torch.full((batch, num_masks, channels, out_size, out_size), float(background), device=images.device)
    boxes = torch.zeros(batch, num_masks, 4, dtype=torch.int32, device=images.device)
    valid = torch.zeros(batch, num_masks, dtype=torch.bool, device=images.device)
    for b in range(batch):
        for m in range(num_masks):
            mask = masks[b, m].bool()
            box = mask_box(mask, margin, square)
            if box is None:
                continue
            y0, x0, y1, x1 = box
            region = torch.full((channels, y1 - y0, x1 - x0), float(background), device=images.device)
            iy0, ix0, iy1, ix1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
            inside = torch.where(mask[iy0:iy1, ix0:ix1], pixels[b, :, iy0:iy1, ix0:ix1], float(background))
            region[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = inside
            crops[b, m] = F.interpolate(region[None], size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
            boxes[b, m] = torch.tensor(box, dtype=torch.int32)
            valid[b, m] = True
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    return ((crops - mean_t) / std_t).to(out_dtype), boxes, valid


def region_score(
    image_embeddings: torch.Tensor,
    region_embeddings: torch.Tensor,
    region_valid: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-shot scores of whole images and their regions, reduced per image.

    image_embeddings [B, D], region_embeddings [B, M, D], region_valid [B, M] bool, text_embeddings
    [C, D] (all normalised here), logit_scale: softmax temperature (CLIP's exp(logit_scale)).
    Returns image_label [B] int64, image_prob [B], region_label [B, M] int64, region_prob [B, M]
    (each region's top label and its probability), region_image_prob [B, M] (each region's
    probability for the whole-image label) and discrepancy [B] = image_prob - max over valid regions
    of region_image_prob (image_prob where an image has no valid region). Invalid regions get label
    -1 and probabilities 0.
    """
    text = F.normalize(text_embeddings.float(), dim=-1)
    image_probs = (logit_scale * F.normalize(image_embeddings.float(), dim=-1) @ text.T).softmax(-1)
    region_probs = (logit_scale * F.normalize(region_embeddings.float(), dim=-1) @ text.T).softmax(-1)
    image_prob, image_label = image_probs.max(-1)
    region_prob, region_label = region_probs.max(-1)
    index = image_label.view(-1, 1, 1).expand(-1, region_probs.shape[1], 1)
    region_image_prob = region_probs.gather(-1, index).squeeze(-1)
    valid = region_valid.bool()
    region_label = torch.where(valid, region_label, -1)
    region_prob = torch.where(valid, region_prob, 0.0)
    region_image_prob = torch.where(valid, region_image_prob, 0.0)
    # Invalid regions hold 0, and the padded 0 column covers images with M = 0: max over valid regions or 0.
    discrepancy = image_prob - F.pad(region_image_prob, (0, 1)).max(-1).values
    return image_label, image_prob, region_label, region_prob, region_image_prob, discrepancy


def region_topk(scores: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label counts [num_labels] int64 and the indices [num_labels, k] int64 of the k highest
    scores of each label (best first, ties to the lower index, -1 where a label has fewer than k).
    Entries with a label outside [0, num_labels) are ignored."""
    counts = torch.zeros(num_labels, dtype=torch.int64, device=scores.device)
    top = torch.full((num_labels, k), -1, dtype=torch.int64, device=scores.device)
    for label in range(num_labels):
        members = torch.nonzero(labels == label).flatten()
        counts[label] = members.numel()
        # A stable sort on the negated score keeps the lower index first among ties.
        order = torch.sort(-scores[members].float(), stable=True).indices[:k]
        top[label, : order.numel()] = members[order]
    return counts, top


def mask_patch_counts(masks: torch.Tensor, grid_h: int, grid_w: int, packed_width: int) -> torch.Tensor:
    """Pixels of each mask inside each patch: [B, M, H, W] (or bit-packed) -> [B, M, grid_h * grid_w]
    float32, patches row-major; a patch is (H / grid_h) x (W / grid_w) pixels."""
    pixels = unpack_mask_bits(masks, packed_width) if packed_width else masks.bool()
    batch, num_masks, height, width = pixels.shape
    blocks = pixels.reshape(batch, num_masks, grid_h, height // grid_h, grid_w, width // grid_w)
    return blocks.sum(dim=(3, 5), dtype=torch.int32).reshape(batch, num_masks, grid_h * grid_w).float()


def mask_pool_weights(counts: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """Normalised pooling weights [B, M, heads, P]: count * exp(logit - max over covered patches),
    divided by their sum; all zero for an empty mask."""
    if logits is None:
        weights = counts[:, :, None, :]
    else:
        scores = logits.float()[:, None]  # [B, 1, heads, P]
        covered = counts[:, :, None, :] > 0
        top = torch.where(covered, scores, -math.inf).amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)  # empty masks: any finite shift
        weights = torch.where(covered, counts[:, :, None, :] * torch.exp(scores - top), 0.0)
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, 1.0)


def _mask_pool_terms(features, masks, logits, grid_h, grid_w, packed_width):
    """What mask_pool and its backward share: patch counts [B, M, P], normalised weights
    [B, M, heads, P] and the fp32 features split per head [B, P, heads, D / heads]."""
    counts = mask_patch_counts(masks, grid_h, grid_w, packed_width)
    batch, patches, dim = features.shape
    heads = 1 if logits is None else logits.shape[1]
    values = features.float().reshape(batch, patches, heads, dim // heads)
    return counts, mask_pool_weights(counts, logits), values


def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    logits: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    packed_width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool patch features under masks (DESIGN.md section 3).

    features [B, P, D] (P = grid_h * grid_w patch tokens, row-major); masks [B, M, H, W] bool/uint8
    at pixel resolution (H, W multiples of the grid), or bit-packed uint8 [B, M, H, ceil(W/8)] with
    packed_width = W (0 = not packed); logits None or [B, heads, P] per-head attention logits, D a
    multiple of heads. pooled[b, m, head h] = sum_p w x[b, p, h] / sum_p w with w = the mask's pixel
    count in patch p times exp(logit[b, h, p] - max over covered patches). Returns pooled [B, M, D]
    (features' dtype, accumulated in fp32; zeros for an empty mask) and valid [B, M] bool.
    """
    counts, weights, values = _mask_pool_terms(features, masks, logits, grid_h, grid_w, packed_width)
    pooled = torch.einsum("bmhp,bphd->bmhd", weights, values).reshape(*counts.shape[:2], features.shape[2])
    return pooled.to(features.dtype), counts.sum(-1) > 0


def mask_pool_backward(
    grad_pooled: torch.Tensor,
    features: torch.Tensor,
    masks: torch.Tensor,
    logits: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    packed_width: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of mask_pool's pooled output w.r.t. features and logits (None without logits),
    from the closed form: d features = a^T g; d logit = sum_m a * (g.x_p - g.pooled)."""
    _, weights, values = _mask_pool_terms(features, masks, logits, grid_h, grid_w, packed_width)
    grad = grad_pooled.float().reshape(*weights.shape[:3], values.shape[3])
    grad_features = torch.einsum("bmhp,bmhd->bphd", weights, grad).reshape(features.shape).to(features.dtype)
    if logits is None:
        return grad_features, None
    pooled = torch.einsum("bmhp,bphd->bmhd", weights, values)
    grad_dot_values = torch.einsum("bmhd,bphd->bmhp", grad, values)
    grad_dot_pooled = (grad * pooled).sum(-1, keepdim=True)
    grad_logits = (weights * (grad_dot_values - grad_dot_pooled)).sum(1)
    return grad_features, grad_logits.to(logits.dtype)


def region_patch_keep(counts: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """The token-selection rule, from mask_patch_counts' [..., P] pixel counts: a patch is kept when
    the mask covers at least min_pixels of its pixels; a region with no such patch keeps its
    best-covered patch(es) instead (the threshold drops to its highest count), so every non-empty
    region keeps at least one patch and an empty one none."""
    threshold = torch.minimum(torch.full_like(counts[..., :1], float(min_pixels)), counts.amax(-1, keepdim=True))
    return (counts > 0) & (counts >= threshold)


def region_patches(
    images: torch.Tensor,
    masks: torch.Tensor,
    grid_h: int,
    grid_w: int,
    min_pixels: int,
    background: float,
    mean: list[float],
    std: list[float],
    out_dtype: torch.dtype,
    packed_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every region's kept patches (region_patch_keep on mask_patch_counts), packed over the batch.

    images [B, C, H, W] uint8 (scaled by 1/255) or float; masks [B, M, H, W] bool/uint8 or bit-packed
    (packed_width = W); H, W multiples of the grid. Regions r = b * M + m in order, each one's kept
    patches in row-major patch order: token t is patch patch[t] of image image[t], its pixels inside
    the mask kept and the others set to `background`, then normalised ((v - mean) / std).
    Returns pixels [T, C, H / grid_h, W / grid_w] (out_dtype), image [T] int64, patch [T] int64 and
    offsets [B * M + 1] int64 (region r owns tokens offsets[r] : offsets[r + 1]; an empty mask none).
    """
    batch, channels, height, width = images.shape
    num_masks = masks.shape[1]
    patch_h, patch_w = height // grid_h, width // grid_w
    kept = region_patch_keep(mask_patch_counts(masks, grid_h, grid_w, packed_width), min_pixels)
    region, patch = torch.nonzero(kept.flatten(0, 1), as_tuple=True)  # row-major: region, then patch
    offsets = F.pad(kept.flatten(0, 1).sum(-1).cumsum(0), (1, 0))
    image = torch.div(region, num_masks, rounding_mode="floor")

    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    tiles = pixels.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(batch, grid_h * grid_w, channels, patch_h, patch_w)
    inside = unpack_mask_bits(masks, packed_width) if packed_width else masks.bool()
    inside = inside.reshape(batch * num_masks, grid_h, patch_h, grid_w, patch_w).permute(0, 1, 3, 2, 4)
    inside = inside.reshape(batch * num_masks, grid_h * grid_w, 1, patch_h, patch_w)
    filled = torch.where(inside[region, patch], tiles[image, patch], float(background))
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    return ((filled - mean_t) / std_t).to(out_dtype), image, patch, offsets
