// Minimal bfloat16 storage type for the torch-free kernel cores. Same bit layout as at::BFloat16
// and __nv_bfloat16, so the torch glue can reinterpret_cast tensor pointers to it.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace clipfast {

struct bf16 {
  uint16_t bits;
};

CLIPFAST_HD float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(u);
#else
  std::memcpy(&f, &u, sizeof(f));
#endif
  return f;
}

CLIPFAST_HD bf16 bf16_from_float(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof(u));
#endif
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // keep NaN a (quiet) NaN
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return bf16{static_cast<uint16_t>(u >> 16)};
}

CLIPFAST_HD float to_float(float v) { return v; }
CLIPFAST_HD float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T>
CLIPFAST_HD T from_float(float v);
template <>
CLIPFAST_HD float from_float<float>(float v) { return v; }
template <>
CLIPFAST_HD bf16 from_float<bf16>(float v) { return bf16_from_float(v); }

}  // namespace clipfast
