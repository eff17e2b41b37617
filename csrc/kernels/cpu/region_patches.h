// region_patches CPU core: torch-free, in two passes because the packed output's size (the number
// of kept patches) is known only after the first:
//   1. region_patch_select: each region's per-patch pixel counts (cpu::patch_counts, mask_pool's
//      coverage core), the keep rule (region_patches_common.h) -> kept flags and lengths;
//   2. region_patch_fill (after the caller has turned lengths into offsets and allocated): every
//      kept patch's pixels, the mask's own or the background, normalised, written to its token slot.
#pragma once
#include <cstdint>
#include <vector>

#include "../common/bf16.h"
#include "../common/region_patches_common.h"
#include "mask_pool.h"  // cpu::patch_counts

namespace clipfast {
namespace cpu {

// masks [B, M, mask_h, row_bytes]; kept [B * M, P] out (0 / 1); lengths [B * M] out (kept per region).
template <typename ParallelFor>
void region_patch_select(const uint8_t* masks, const RegionPatchesParams& p, uint8_t* kept, int64_t* lengths,
                         ParallelFor&& parallel_for) {
  const MaskPoolParams& g = p.grid;
  const int64_t P = g.patches, mask_stride = g.mask_h * g.row_bytes;
  parallel_for(int64_t{0}, g.batch * g.masks, [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> counts(P);
    for (int64_t r = lo; r < hi; ++r) {
      patch_counts(masks + r * mask_stride, g, counts.data());
      int32_t best = 0;
      for (int64_t q = 0; q < P; ++q) best = counts[q] > best ? counts[q] : best;
      const int32_t threshold = keep_threshold(p.min_pixels, best);
      int64_t n = 0;
      for (int64_t q = 0; q < P; ++q) {
        const bool keep = keep_patch(counts[q], threshold);
        kept[r * P + q] = keep ? 1 : 0;
        n += keep;
      }
      lengths[r] = n;
    }
  });
}

// images [B, C, mask_h, mask_w]; kept from region_patch_select; offsets [B * M + 1] (exclusive scan
// of lengths); pixels [T, C, patch_h, patch_w], image_index [T], patch_index [T] out.
template <typename In, typename Out, typename ParallelFor>
void region_patch_fill(const In* images, const uint8_t* masks, const uint8_t* kept, const int64_t* offsets,
                       const RegionPatchesParams& p, Out* pixels, int64_t* image_index, int64_t* patch_index,
                       ParallelFor&& parallel_for) {
  const MaskPoolParams& g = p.grid;
  const int64_t P = g.patches, C = p.channels, H = g.mask_h, W = g.mask_w;
  const int64_t ph = g.patch_h, pw = g.patch_w, mask_stride = H * g.row_bytes;
  parallel_for(int64_t{0}, g.batch * g.masks, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / g.masks;
      const uint8_t* mask = masks + r * mask_stride;
      int64_t t = offsets[r];
      for (int64_t q = 0; q < P; ++q) {
        if (!kept[r * P + q]) continue;
        image_index[t] = b;
        patch_index[t] = q;
        const int64_t y0 = (q / g.grid_w) * ph, x0 = (q % g.grid_w) * pw;
        Out* out = pixels + t * C * ph * pw;
        for (int64_t c = 0; c < C; ++c) {
          const float mean = p.mean[c], inv_std = p.inv_std[c];
          const In* plane = images + (b * C + c) * H * W;
          for (int64_t y = 0; y < ph; ++y) {
            const uint8_t* row = mask + (y0 + y) * g.row_bytes;
            const In* src = plane + (y0 + y) * W + x0;
            Out* dst = out + (c * ph + y) * pw;
            for (int64_t x = 0; x < pw; ++x) {
              const float v = mask_pixel(row, x0 + x, g.packed) ? to_float(src[x]) * p.input_scale : p.background;
              dst[x] = from_float<Out>((v - mean) * inv_std);
            }
          }
        }
        ++t;
      }
    }
  });
}

}  // namespace cpu
}  // namespace clipfast
