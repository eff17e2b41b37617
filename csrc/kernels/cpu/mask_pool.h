// mask_pool CPU core: torch-free. For every (image b, mask m): the mask's pixel count in each patch
// (pixel-resolution or bit-packed masks are reduced to the patch grid here), the pooling weights
// (count, times exp(logit - max over covered patches) per head with logits), and the weighted mean
// of the patch features, accumulated in fp32. Only covered patches are read.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "../common/mask_pool_common.h"

namespace clipfast {
namespace cpu {

// Set bits among pixels [x0, x0 + len) of a bit-packed row of row_bytes bytes: up to 56 pixels per
// 64-bit popcount. Never reads past the row (little-endian byte order, as on x86 and ARM).
inline int32_t count_packed(const uint8_t* row, int64_t row_bytes, int64_t x0, int64_t len) {
  int32_t total = 0;
  while (len > 0) {
    const int64_t first = x0 >> 3, shift = x0 & 7, take = len < 56 ? len : 56;
    uint64_t word = 0;
    if (first + 8 <= row_bytes) {
      std::memcpy(&word, row + first, 8);  // fixed size: one load, no libc call
    } else {
      for (int64_t i = 0; first + i < row_bytes; ++i) word |= static_cast<uint64_t>(row[first + i]) << (8 * i);
    }
    total += __builtin_popcountll((word >> shift) & ((uint64_t{1} << take) - 1));
    x0 += take;
    len -= take;
  }
  return total;
}

// counts[P] += pixels of one mask ([mask_h, row_bytes]) in each patch.
inline void patch_counts(const uint8_t* mask, const MaskPoolParams& p, int32_t* counts) {
  std::fill(counts, counts + p.patches, 0);
  for (int64_t y = 0; y < p.mask_h; ++y) {
    const uint8_t* row = mask + y * p.row_bytes;
    int32_t* row_counts = counts + (y / p.patch_h) * p.grid_w;
    for (int64_t gx = 0; gx < p.grid_w; ++gx) {
      int32_t inside = 0;
      const int64_t x0 = gx * p.patch_w;
      if (p.packed) {
        inside = count_packed(row, p.row_bytes, x0, p.patch_w);
      } else {
        for (int64_t x = x0; x < x0 + p.patch_w; ++x) inside += row[x] != 0;  // vectorises
      }
      row_counts[gx] += inside;
    }
  }
}

// features [B, P, D]; masks [B, M, mask_h, row_bytes]; logits [B, heads, P] fp32 or null;
// pooled [B, M, D]; valid [B, M]. All contiguous.
template <typename T, typename ParallelFor>
void mask_pool(const T* features, const uint8_t* masks, const float* logits, T* pooled, uint8_t* valid,
               const MaskPoolParams& p, ParallelFor&& parallel_for) {
  const int64_t P = p.patches, D = p.dim, heads = p.heads, head_dim = p.dim / p.heads;
  const int64_t mask_stride = p.mask_h * p.row_bytes;
  parallel_for(int64_t{0}, p.batch * p.masks, [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> counts(P);
    std::vector<float> weights(heads * P), acc(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / p.masks;
      patch_counts(masks + i * mask_stride, p, counts.data());
      // valid: the mask covers a pixel (whatever the logits are; reference.mask_pool).
      bool any = false;
      for (int64_t q = 0; q < P; ++q) any = any || counts[q] > 0;
      // Weights per head, normalised so that each head's weights sum to one.
      for (int64_t h = 0; h < heads; ++h) {
        float* w = weights.data() + h * P;
        const float* l = p.has_logits ? logits + (b * heads + h) * P : nullptr;
        float top = -INFINITY;
        if (l) {
          for (int64_t q = 0; q < P; ++q)
            if (counts[q] > 0 && l[q] > top) top = l[q];
        }
        // As the reference: a max over covered logits that is not finite (all -inf, or +inf) shifts
        // by 0, so an all -inf mask pools to zeros and +inf / NaN logits give NaN, as on every backend.
        if (!std::isfinite(top)) top = 0.f;
        float total = 0.f;
        for (int64_t q = 0; q < P; ++q) {
          w[q] = counts[q] > 0 ? static_cast<float>(counts[q]) * (l ? std::exp(l[q] - top) : 1.f) : 0.f;
          total += w[q];
        }
        const float scale = total > 0.f ? 1.f / total : 0.f;
        for (int64_t q = 0; q < P; ++q) w[q] *= scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t q = 0; q < P; ++q) {
        if (counts[q] == 0) continue;
        const T* x = features + (b * P + q) * D;
        for (int64_t h = 0; h < heads; ++h) {
          const float wq = weights[h * P + q];
          float* a = acc.data() + h * head_dim;
          const T* xh = x + h * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += wq * to_float(xh[d]);
        }
      }
      T* out = pooled + i * D;
      for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(acc[d]);
      valid[i] = any ? 1 : 0;
    }
  });
}

}  // namespace cpu
}  // namespace clipfast
