// Per-patch pixel counts of a mask plane on the GPU: the coverage rule of reference.mask_patch_counts,
// shared by the mask_pool and region_patches kernels (the CPU twin is cpu::patch_counts).
// The mask plane is read once with 16-byte streaming loads (__ldcs, evict-first: masks are used
// once) where aligned; each 16-byte chunk becomes a pixel bit set and is added to its patch counters
// with one shared atomic per (chunk, patch) run that has pixels (all-zero chunks cost nothing).
#pragma once
#include <cstdint>

namespace clipfast {
namespace cuda {
namespace mask_counts {

// 32-bit copies of the mask geometry for cheap index arithmetic (sizes checked < 2^31 by the glue).
struct Geometry {
  int row_bytes, mask_w, patch_h, patch_w, grid_w;
  bool packed;
};

// Bit k (k < 4) set where byte k of w is nonzero.
__device__ __forceinline__ uint32_t nonzero_nibble(uint32_t w) {
  uint32_t t = ((((w & 0x7f7f7f7fu) + 0x7f7f7f7fu) | w) & 0x80808080u) >> 7;  // bit 0 of each byte
  return (t | (t >> 7) | (t >> 14) | (t >> 21)) & 0xFu;
}

// Set bits of the 128-bit value f in bit positions [lo, hi), 0 <= lo <= hi <= 128.
__device__ __forceinline__ int popc_range(const uint32_t (&f)[4], int lo, int hi) {
  int total = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int a = max(lo - 32 * w, 0), b = min(hi - 32 * w, 32);
    if (a < b) {
      const uint32_t upper = b == 32 ? 0xffffffffu : ((1u << b) - 1u);
      total += __popc(f[w] & upper & ~((1u << a) - 1u));
    }
  }
  return total;
}

// Adds the mask pixels of `nbytes` (<= 16) consecutive bytes of the mask plane, starting at byte
// `offset`, to the per-patch counters. f holds the bytes little-endian (zero past nbytes). The bytes
// may span several rows; packed rows' padding bits past mask_w are ignored.
__device__ __forceinline__ void count_bytes(uint32_t (&f)[4], int offset, int nbytes, const Geometry& g,
                                            int* counts) {
  if (!g.packed) {  // one flag bit per pixel byte
    f[0] = nonzero_nibble(f[0]) | (nonzero_nibble(f[1]) << 4) | (nonzero_nibble(f[2]) << 8) |
           (nonzero_nibble(f[3]) << 12);
    f[1] = f[2] = f[3] = 0u;
  }
  if ((f[0] | f[1] | f[2] | f[3]) == 0u) return;
  const int s = g.packed ? 8 : 1;  // flag bits (pixels) per byte
  int y = offset / g.row_bytes;
  int c = offset - y * g.row_bytes;  // byte of row y at chunk byte k
  for (int k = 0; k < nbytes;) {
    const int seg = min(nbytes - k, g.row_bytes - c);  // bytes of this chunk in row y
    const int delta = s * (c - k);                     // pixel x of flag bit i is i + delta
    int lo = s * k;
    const int hi = min(s * (k + seg), g.mask_w - delta);
    if (lo < hi && popc_range(f, lo, hi) > 0) {
      int* row_counts = counts + (y / g.patch_h) * g.grid_w;
      while (lo < hi) {
        const int gx = (lo + delta) / g.patch_w;
        const int bound = min((gx + 1) * g.patch_w - delta, hi);
        const int pixels = popc_range(f, lo, bound);
        if (pixels) atomicAdd(row_counts + gx, pixels);
        lo = bound;
      }
    }
    k += seg;
    ++y;
    c = 0;
  }
}

__device__ __forceinline__ void load_bytes(const uint8_t* src, int n, uint32_t (&f)[4]) {
  f[0] = f[1] = f[2] = f[3] = 0u;
#pragma unroll
  for (int j = 0; j < 16; ++j)
    if (j < n) f[j >> 2] |= static_cast<uint32_t>(src[j]) << (8 * (j & 3));
}

// counts[P] += the plane's pixels per patch (counts zeroed by the caller, in shared memory). Every
// thread of a block of kThreads threads calls it; the caller synchronises before reading counts.
template <int kThreads>
__device__ __forceinline__ void count_mask(const uint8_t* __restrict__ mask, int plane, const Geometry& g,
                                           int* counts) {
  const int head = min(static_cast<int>((16u - (reinterpret_cast<uintptr_t>(mask) & 15u)) & 15u), plane);
  const int nvec = (plane - head) >> 4;
  const int tail = head + (nvec << 4);
  const uint4* vec = reinterpret_cast<const uint4*>(mask + head);
  int v = threadIdx.x;
  for (; v + 3 * kThreads < nvec; v += 4 * kThreads) {  // 4 loads in flight per thread
    uint4 chunk[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) chunk[u] = __ldcs(vec + v + u * kThreads);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t f[4] = {chunk[u].x, chunk[u].y, chunk[u].z, chunk[u].w};
      count_bytes(f, head + ((v + u * kThreads) << 4), 16, g, counts);
    }
  }
  for (; v < nvec; v += kThreads) {
    const uint4 chunk = __ldcs(vec + v);
    uint32_t f[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
    count_bytes(f, head + (v << 4), 16, g, counts);
  }
  uint32_t f[4];
  if (threadIdx.x == kThreads - 1 && head > 0) {  // unaligned start
    load_bytes(mask, head, f);
    count_bytes(f, 0, head, g, counts);
  }
  if (threadIdx.x == kThreads - 2 && tail < plane) {  // ragged end
    load_bytes(mask + tail, plane - tail, f);
    count_bytes(f, tail, plane - tail, g, counts);
  }
}

}  // namespace mask_counts
}  // namespace cuda
}  // namespace clipfast
