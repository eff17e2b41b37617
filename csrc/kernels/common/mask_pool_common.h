// mask_pool's parameters and the mask-pixel rule every backend shares.
#pragma once
#include <cstdint>

#include "macros.h"

namespace clipfast {

struct MaskPoolParams {
  int64_t batch;       // B images
  int64_t masks;       // M masks per image
  int64_t patches;     // P = grid_h * grid_w patch tokens, row-major
  int64_t dim;         // D feature channels
  int64_t heads;       // attention heads (1 without logits); head h pools channels [h*D/heads, (h+1)*D/heads)
  int64_t grid_h, grid_w;
  int64_t mask_h, mask_w;    // mask size in pixels (multiples of the grid)
  int64_t patch_h, patch_w;  // pixels per patch: mask_h / grid_h, mask_w / grid_w
  int64_t row_bytes;         // bytes per mask row: mask_w, or ceil(mask_w / 8) when bit-packed
  bool packed;               // bit-packed masks: pixel x is bit (x % 8) of byte x / 8
  bool has_logits;
};

// Whether pixel x of a mask row is inside the mask.
CLIPFAST_HD bool mask_pixel(const uint8_t* row, int64_t x, bool packed) {
  return packed ? ((row[x >> 3] >> (x & 7)) & 1) != 0 : row[x] != 0;
}

}  // namespace clipfast
