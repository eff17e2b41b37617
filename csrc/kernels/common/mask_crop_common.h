// mask_crop's parameters and the geometry rules every backend shares (box margin, bilinear taps).
#pragma once
#include <cstdint>

#include "macros.h"

namespace clipfast {

constexpr int kMaxChannels = 4;

struct MaskCropParams {
  int64_t batch;      // B images
  int64_t masks;      // M masks per image
  int64_t channels;   // C (<= kMaxChannels)
  int64_t height;     // H
  int64_t width;      // W
  int64_t out_size;   // S: crops are S x S
  double margin;      // box grows by floor(margin * side) pixels on each side (see expand_box)
  bool square;        // square boxes that keep the aspect ratio (see expand_box)
  float input_scale;  // 1/255 for uint8 images, 1 for float images
  float background;   // fill value outside the mask, in input_scale'd units (before normalisation)
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];
};

// Box of a mask: rows [y0, y1), columns [x0, x1). An empty mask has y1 == y0.
struct Box {
  int32_t y0, x0, y1, x1;
};

// The sampling box of a tight (non-empty) box, the same rule in every backend. Default: grow each
// side by floor(margin * that side's length) and clip to the image. Square: a square of side
// L = max(h, w) + 2 * floor(margin * max(h, w)) centred on the tight box (the extra split
// floor-left), NOT clipped: keeps the region's aspect ratio; pixels outside the image read as
// background.
CLIPFAST_HD Box expand_box(Box tight, double margin, bool square, int64_t height, int64_t width) {
  const int32_t h = tight.y1 - tight.y0, w = tight.x1 - tight.x0;
  Box b;
  if (square) {
    const int32_t longest = h > w ? h : w;
    const int32_t side = longest + 2 * static_cast<int32_t>(margin * longest);
    b.y0 = tight.y0 - (side - h) / 2;
    b.x0 = tight.x0 - (side - w) / 2;
    b.y1 = b.y0 + side;
    b.x1 = b.x0 + side;
    return b;
  }
  const int32_t pad_y = static_cast<int32_t>(margin * h);
  const int32_t pad_x = static_cast<int32_t>(margin * w);
  b.y0 = tight.y0 - pad_y < 0 ? 0 : tight.y0 - pad_y;
  b.x0 = tight.x0 - pad_x < 0 ? 0 : tight.x0 - pad_x;
  b.y1 = tight.y1 + pad_y > height ? static_cast<int32_t>(height) : tight.y1 + pad_y;
  b.x1 = tight.x1 + pad_x > width ? static_cast<int32_t>(width) : tight.x1 + pad_x;
  return b;
}

// Bilinear taps of output index `out_index` along one axis of length `in_size` resized to
// `out_size`, with PyTorch's align_corners=False convention (source index clamped at 0).
struct Taps {
  int32_t i0, i1;  // neighbouring source indices
  float w1;        // weight of i1; i0 gets 1 - w1
};

CLIPFAST_HD Taps bilinear_taps(int64_t out_index, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(out_index) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  Taps t;
  t.i0 = static_cast<int32_t>(src);
  t.i1 = t.i0 + 1 < in_size ? t.i0 + 1 : t.i0;
  t.w1 = src - static_cast<float>(t.i0);
  return t;
}

}  // namespace clipfast
