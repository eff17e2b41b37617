"""mask_crop in Triton: a box kernel (one program per mask) then a crop kernel (output tiles).

Geometry follows reference.mask_box and csrc/kernels/common/mask_crop_common.h exactly: the
margin pad floor(margin * side) is looked up in a small table computed in float64 (as Python and the
C++ kernels do), and the bilinear taps use PyTorch's align_corners=False rule in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contracts import register_contract
from ._launch import on_device, pow2_block, wrap_triton

_MAX_CHANNELS = 4  # clipfast.ops.mask_crop.MAX_CHANNELS


@triton.jit
def _mask_box_kernel(
    masks_ptr,          # [B*M, H, W] uint8, nonzero = inside
    pad_for_side_ptr,   # [max(H, W) + 1] int32: floor(margin * side)
    boxes_ptr,          # [B*M, 4] int32 out: (y0, x0, y1, x1), zeros for an empty mask
    valid_ptr,          # [B*M] uint8 out
    height,
    width,
    SQUARE: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    item = tl.program_id(0)
    mask = masks_ptr + item.to(tl.int64) * height * width
    rows = tl.arange(0, BLOCK_Y)
    cols = tl.arange(0, BLOCK_X)
    # Per-lane running extremes, reduced once at the end (cheaper than a full reduction per tile).
    y_min = tl.full([BLOCK_Y], 2147483647, tl.int32)
    y_max = tl.full([BLOCK_Y], -1, tl.int32)
    x_min = tl.full([BLOCK_X], 2147483647, tl.int32)
    x_max = tl.full([BLOCK_X], -1, tl.int32)
    for y_start in range(0, height, BLOCK_Y):
        ys = y_start + rows
        for x_start in range(0, width, BLOCK_X):
            xs = x_start + cols
            in_image = (ys[:, None] < height) & (xs[None, :] < width)
            pixels = tl.load(mask + ys[:, None] * width + xs[None, :], mask=in_image, other=0)
            hit = (pixels != 0).to(tl.int32)
            row_hit = tl.max(hit, axis=1) > 0
            col_hit = tl.max(hit, axis=0) > 0
            y_min = tl.minimum(y_min, tl.where(row_hit, ys, 2147483647))
            y_max = tl.maximum(y_max, tl.where(row_hit, ys, -1))
            x_min = tl.minimum(x_min, tl.where(col_hit, xs, 2147483647))
            x_max = tl.maximum(x_max, tl.where(col_hit, xs, -1))
    top = tl.min(y_min, axis=0)
    bottom = tl.max(y_max, axis=0) + 1
    left = tl.min(x_min, axis=0)
    right = tl.max(x_max, axis=0) + 1
    nonempty = bottom > 0
    tight_h = tl.where(nonempty, bottom - top, 0)
    tight_w = tl.where(nonempty, right - left, 0)
    if SQUARE:
        # Not clipped: a square centred on the tight box, the odd extra pixel going right/down.
        longest = tl.maximum(tight_h, tight_w)
        side = longest + 2 * tl.load(pad_for_side_ptr + longest)
        y0 = top - (side - tight_h) // 2
        x0 = left - (side - tight_w) // 2
        y1 = y0 + side
        x1 = x0 + side
    else:
        pad_y = tl.load(pad_for_side_ptr + tight_h)
        pad_x = tl.load(pad_for_side_ptr + tight_w)
        y0 = tl.maximum(top - pad_y, 0)
        x0 = tl.maximum(left - pad_x, 0)
        y1 = tl.minimum(bottom + pad_y, height)
        x1 = tl.minimum(right + pad_x, width)
    box = boxes_ptr + item.to(tl.int64) * 4
    tl.store(box + 0, tl.where(nonempty, y0, 0))
    tl.store(box + 1, tl.where(nonempty, x0, 0))
    tl.store(box + 2, tl.where(nonempty, y1, 0))
    tl.store(box + 3, tl.where(nonempty, x1, 0))
    tl.store(valid_ptr + item, nonempty.to(tl.uint8))


@triton.jit
def _bilinear_taps(out_index, in_size, out_size):
    """Source indices (i0, i1) and weight of i1 along one axis; PyTorch's align_corners=False rule
    (source clamped at 0), in float32 like the C++/CUDA kernels."""
    scale = in_size.to(tl.float32) / out_size  # out_size may arrive as a constexpr (Triton specialises 1)
    src = tl.maximum(scale * (out_index.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation == floor since src >= 0
    i1 = tl.where(i0 + 1 < in_size, i0 + 1, i0)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _channel_value(image, mask_hit, offset, input_divisor, background):
    """Pixels as the crop sees them: image value inside the mask, background elsewhere."""
    value = tl.load(image + offset, mask=mask_hit, other=0).to(tl.float32) / input_divisor
    return tl.where(mask_hit, value, background)


@triton.jit
def _mask_crop_kernel(
    images_ptr,         # [B, C, H, W] uint8 / float32 / bfloat16
    masks_ptr,          # [B*M, H, W] uint8
    boxes_ptr,          # [B*M, 4] int32 from _mask_box_kernel
    valid_ptr,          # [B*M] uint8 from _mask_box_kernel
    out_ptr,            # [B*M, C, S, S] float32 / bfloat16
    num_masks,
    height,
    width,
    out_size,
    input_divisor,      # 255 for uint8 images, else 1
    background,
    mean0, mean1, mean2, mean3,
    std0, std1, std2, std3,
    CHANNELS: tl.constexpr,
    BLOCK_OY: tl.constexpr,
    BLOCK_OX: tl.constexpr,
):
    item = tl.program_id(0)
    tile = tl.program_id(1)
    tiles_x = tl.cdiv(out_size, BLOCK_OX)
    oy = (tile // tiles_x) * BLOCK_OY + tl.arange(0, BLOCK_OY)
    ox = (tile % tiles_x) * BLOCK_OX + tl.arange(0, BLOCK_OX)
    in_tile = (oy[:, None] < out_size) & (ox[None, :] < out_size)

    box = boxes_ptr + item.to(tl.int64) * 4
    box_y0 = tl.load(box + 0)
    box_x0 = tl.load(box + 1)
    box_y1 = tl.load(box + 2)
    box_x1 = tl.load(box + 3)
    nonempty = tl.load(valid_ptr + item) != 0

    ty0, ty1, wy = _bilinear_taps(oy, box_y1 - box_y0, out_size)
    tx0, tx1, wx = _bilinear_taps(ox, box_x1 - box_x0, out_size)
    gy0 = box_y0 + ty0
    gy1 = box_y0 + ty1
    gx0 = box_x0 + tx0
    gx1 = box_x0 + tx1
    # Square boxes may reach outside the image: those taps read as background.
    row0_ok = (gy0 >= 0) & (gy0 < height)
    row1_ok = (gy1 >= 0) & (gy1 < height)
    col0_ok = (gx0 >= 0) & (gx0 < width)
    col1_ok = (gx1 >= 0) & (gx1 < width)
    at00 = gy0[:, None] * width + gx0[None, :]
    at01 = gy0[:, None] * width + gx1[None, :]
    at10 = gy1[:, None] * width + gx0[None, :]
    at11 = gy1[:, None] * width + gx1[None, :]
    ok00 = in_tile & nonempty & row0_ok[:, None] & col0_ok[None, :]
    ok01 = in_tile & nonempty & row0_ok[:, None] & col1_ok[None, :]
    ok10 = in_tile & nonempty & row1_ok[:, None] & col0_ok[None, :]
    ok11 = in_tile & nonempty & row1_ok[:, None] & col1_ok[None, :]
    # The mask taps are shared by every channel: load them once.
    mask = masks_ptr + item.to(tl.int64) * height * width
    hit00 = ok00 & (tl.load(mask + at00, mask=ok00, other=0) != 0)
    hit01 = ok01 & (tl.load(mask + at01, mask=ok01, other=0) != 0)
    hit10 = ok10 & (tl.load(mask + at10, mask=ok10, other=0) != 0)
    hit11 = ok11 & (tl.load(mask + at11, mask=ok11, other=0) != 0)

    image_index = item // num_masks
    plane = height * width
    out_item = out_ptr + item.to(tl.int64) * CHANNELS * out_size * out_size
    out_offset = oy[:, None] * out_size + ox[None, :]
    wy = wy[:, None]
    wx = wx[None, :]
    for c in tl.static_range(CHANNELS):
        if c == 0:
            mean, std = mean0, std0
        elif c == 1:
            mean, std = mean1, std1
        elif c == 2:
            mean, std = mean2, std2
        else:
            mean, std = mean3, std3
        image = images_ptr + (image_index.to(tl.int64) * CHANNELS + c) * plane
        v00 = _channel_value(image, hit00, at00, input_divisor, background)
        v01 = _channel_value(image, hit01, at01, input_divisor, background)
        v10 = _channel_value(image, hit10, at10, input_divisor, background)
        v11 = _channel_value(image, hit11, at11, input_divisor, background)
        upper = (1.0 - wx) * v00 + wx * v01
        lower = (1.0 - wx) * v10 + wx * v11
        value = (1.0 - wy) * upper + wy * lower
        value = tl.where(nonempty, value, background)
        normalised = (value - mean) / std
        tl.store(out_item + c * out_size * out_size + out_offset, normalised.to(out_ptr.dtype.element_ty),
                 mask=in_tile)


@torch.library.triton_op("clipfast_triton::mask_crop", mutates_args=())
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
    batch, channels, height, width = images.shape
    num_masks = masks.shape[1]
    images = images.contiguous()
    masks = masks.contiguous().view(torch.uint8)  # bool and uint8 share the byte layout
    crops = images.new_empty((batch, num_masks, channels, out_size, out_size), dtype=out_dtype)
    boxes = images.new_empty((batch, num_masks, 4), dtype=torch.int32)
    valid = images.new_empty((batch, num_masks), dtype=torch.bool)
    items = batch * num_masks
    if items == 0:
        return crops, boxes, valid
    # floor(margin * side) in float64 for every possible side: bit-identical to the reference's
    # math.floor(margin * h) and to the C++ double arithmetic, at the cost of one tiny tensor.
    sides = torch.arange(max(height, width) + 1, device=images.device, dtype=torch.float64)
    pad_for_side = torch.floor(sides * margin).to(torch.int32)

    with on_device(images):  # Triton launches on the current device: make it the tensors'
        block_x = pow2_block(width, high=256)
        block_y = pow2_block(height, high=4096 // block_x)
        wrap_triton(_mask_box_kernel)[(items,)](
            masks, pad_for_side, boxes, valid.view(torch.uint8), height, width,
            SQUARE=bool(square), BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=4,
        )

        # 512 outputs per program: ~4 per thread, ~90 registers (each carries 4 taps x C channels).
        block_ox = pow2_block(out_size, high=64)
        block_oy = pow2_block(out_size, high=512 // block_ox)
        tiles = triton.cdiv(out_size, block_oy) * triton.cdiv(out_size, block_ox)
        means = list(mean) + [0.0] * (_MAX_CHANNELS - channels)
        stds = list(std) + [1.0] * (_MAX_CHANNELS - channels)
        wrap_triton(_mask_crop_kernel)[(items, tiles)](
            images, masks, boxes, valid.view(torch.uint8), crops, num_masks, height, width, out_size,
            255.0 if images.dtype == torch.uint8 else 1.0, float(background),
            float(means[0]), float(means[1]), float(means[2]), float(means[3]),
            float(stds[0]), float(stds[1]), float(stds[2]), float(stds[3]),
            CHANNELS=channels, BLOCK_OY=block_oy, BLOCK_OX=block_ox, num_warps=4,
        )
    return crops, boxes, valid


register_contract("mask_crop", mask_crop)
