// region_topk's ranking rule, shared by every backend: one 64-bit key per entry, larger = better.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace clipfast {

// Monotone map float -> uint32 (larger score, larger key). NaN ranks below every number; -0 == +0.
CLIPFAST_HD uint32_t orderable_score(float score) {
  if (score != score) return 0u;  // NaN
  if (score == 0.f) score = 0.f;  // -0 -> +0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(score);
#else
  std::memcpy(&bits, &score, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Key of entry `index` (< 2^32): higher score first, then lower index first.
CLIPFAST_HD uint64_t rank_key(float score, int64_t index) {
  return (static_cast<uint64_t>(orderable_score(score)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

CLIPFAST_HD int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

}  // namespace clipfast
