// mask_crop CPU core: torch-free. For every (image b, mask m): tight bounding box of the mask,
// grown by the margin; pixels outside the mask replaced by the background; bilinear resize of the
// box to S x S; per-channel normalisation; one write of the output.
//
// `parallel_for(begin, end, fn)` runs fn(lo, hi) over chunks of [begin, end): the torch glue passes
// at::parallel_for, the C++ unit tests a serial loop.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

#include "../common/bf16.h"
#include "../common/mask_crop_common.h"

namespace clipfast {
namespace cpu {

// Tight box of a mask of height x width (row-major, nonzero = inside). Empty mask -> all zeros.
inline Box tight_box(const uint8_t* mask, int64_t height, int64_t width) {
  Box box{0, 0, 0, 0};
  int64_t y_min = height, y_max = -1, x_min = width, x_max = -1;
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = mask + y * width;
    int64_t first = 0;
    while (first < width && row[first] == 0) ++first;
    if (first == width) continue;
    int64_t last = width - 1;
    while (row[last] == 0) --last;
    if (y_min == height) y_min = y;
    y_max = y;
    if (first < x_min) x_min = first;
    if (last > x_max) x_max = last;
  }
  if (y_max < 0) return box;
  box.y0 = static_cast<int32_t>(y_min);
  box.x0 = static_cast<int32_t>(x_min);
  box.y1 = static_cast<int32_t>(y_max + 1);
  box.x1 = static_cast<int32_t>(x_max + 1);
  return box;
}

template <typename In, typename Out>
void mask_crop_one(const In* image, const uint8_t* mask, Out* out, Box* box_out, uint8_t* valid_out,
                   const MaskCropParams& p) {
  const int64_t S = p.out_size, C = p.channels, H = p.height, W = p.width;
  const Box tight = tight_box(mask, H, W);
  if (tight.y1 == tight.y0) {  // empty mask: defined result (all background) and a flag
    for (int64_t c = 0; c < C; ++c) {
      const Out fill = from_float<Out>((p.background - p.mean[c]) * p.inv_std[c]);
      for (int64_t i = 0; i < S * S; ++i) out[c * S * S + i] = fill;
    }
    *box_out = tight;
    *valid_out = 0;
    return;
  }
  const Box box = expand_box(tight, p.margin, p.square, H, W);
  *box_out = box;
  *valid_out = 1;

  // Column taps once per crop; a tap outside the image (square boxes) reads as background.
  std::vector<Taps> col_taps(S);
  for (int64_t ox = 0; ox < S; ++ox) col_taps[ox] = bilinear_taps(ox, box.x1 - box.x0, S);
  const int64_t plane = H * W;

  // Bilinear is separable: lerp along x within a source row, then along y between two rows. The
  // x-lerped rows ([C][S] each) are cached by source row, so each is made once even when
  // upsampling; the arithmetic is the same as lerping the four taps directly.
  std::vector<float> row_cache(2 * C * S);
  // Source row held in each slot; rows may be negative (square boxes), so "none" is INT64_MIN.
  int64_t cached_row[2] = {INT64_MIN, INT64_MIN};
  // Row y in cache, never evicting the slot `keep` (the other row of the same output line).
  auto lerped_row = [&](int64_t y, int keep) -> int {
    for (int slot = 0; slot < 2; ++slot)
      if (cached_row[slot] == y) return slot;
    const int slot = keep >= 0 ? 1 - keep : (cached_row[0] < cached_row[1] ? 0 : 1);  // rows only move down
    cached_row[slot] = y;
    float* dst = row_cache.data() + slot * C * S;
    const bool row_inside = y >= 0 && y < H;
    for (int64_t ox = 0; ox < S; ++ox) {
      const Taps tx = col_taps[ox];
      const int64_t x0 = box.x0 + tx.i0, x1 = box.x0 + tx.i1;
      const bool in0 = row_inside && x0 >= 0 && x0 < W && mask[y * W + x0] != 0;
      const bool in1 = row_inside && x1 >= 0 && x1 < W && mask[y * W + x1] != 0;
      for (int64_t c = 0; c < C; ++c) {
        const In* channel = image + c * plane + y * W;
        const float v0 = in0 ? to_float(channel[x0]) * p.input_scale : p.background;
        const float v1 = in1 ? to_float(channel[x1]) * p.input_scale : p.background;
        dst[c * S + ox] = (1.f - tx.w1) * v0 + tx.w1 * v1;
      }
    }
    return slot;
  };

  for (int64_t oy = 0; oy < S; ++oy) {
    const Taps ty = bilinear_taps(oy, box.y1 - box.y0, S);
    const int top_slot = lerped_row(box.y0 + ty.i0, -1);
    const int bottom_slot = lerped_row(box.y0 + ty.i1, top_slot);
    const float* top = row_cache.data() + top_slot * C * S;
    const float* bottom = row_cache.data() + bottom_slot * C * S;
    for (int64_t c = 0; c < C; ++c) {
      const float mean = p.mean[c], inv_std = p.inv_std[c];
      Out* dst = out + (c * S + oy) * S;
      const float* t = top + c * S;
      const float* b = bottom + c * S;
      for (int64_t ox = 0; ox < S; ++ox)
        dst[ox] = from_float<Out>(((1.f - ty.w1) * t[ox] + ty.w1 * b[ox] - mean) * inv_std);
    }
  }
}

// images [B, C, H, W]; masks [B, M, H, W] (0 / nonzero); out [B, M, C, S, S]; boxes [B, M];
// valid [B, M]. All contiguous.
template <typename In, typename Out, typename ParallelFor>
void mask_crop(const In* images, const uint8_t* masks, Out* out, Box* boxes, uint8_t* valid,
               const MaskCropParams& p, ParallelFor&& parallel_for) {
  const int64_t image_stride = p.channels * p.height * p.width;
  const int64_t mask_stride = p.height * p.width;
  const int64_t out_stride = p.channels * p.out_size * p.out_size;
  parallel_for(int64_t{0}, p.batch * p.masks, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / p.masks;
      mask_crop_one(images + b * image_stride, masks + i * mask_stride, out + i * out_stride,
                    boxes + i, valid + i, p);
    }
  });
}

}  // namespace cpu
}  // namespace clipfast
