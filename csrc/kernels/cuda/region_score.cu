// region_score CUDA core. Five launches on one stream, never materialising [B, M, C] logits:
//   1. inv_norm_kernel: fp32 inverse L2 norm of every image, region and text row (one warp per row,
//      16-byte loads when aligned).
//   2. softmax_gemm_kernel over the B image rows: a 64 x 64 (rows x classes) tensor-core tile per
//      step (4 warps, each 32 x 32 = 2 x 2 WMMA fragments, K steps of 32 through shared memory,
//      zero-padded past D / the last row / the last class); the epilogue turns the fp32 tile into
//      logits and folds it into each row's online-softmax state (max, argmax with ties to the lowest
//      class, sum of exp). A block owns a row tile and a contiguous range of class tiles ("split");
//      splits are chosen from the shape alone so that the grid has ~528 blocks, and each split
//      writes one partial state per row to the workspace.
//   3. finalize_images_kernel: merges the splits in order -> image label and probability.
//   4. softmax_gemm_kernel over the B * M region rows, which also records each row's logit for its
//      image's label (the very value that entered the softmax, so region_image_prob == region_prob
//      exactly when the labels agree).
//   5. finalize_regions_kernel (one warp per image): merges the splits -> region label and
//      probability, the probability of the image's label, and the discrepancy.
#include <cuda_bf16.h>
#include <mma.h>

#include <climits>
#include <type_traits>

#include "region_score.cuh"

namespace clipfast {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 64, kBN = 64, kBK = 32;  // rows x classes x depth of one block tile
constexpr int kGemmThreads = 128;            // 4 warps in a 2 x 2 layout, 32 x 32 each
constexpr int kLdc = kBN + 4;                // fp32 result tile row stride (floats)
constexpr int kThreads = 256;                // the small kernels
constexpr int64_t kTargetBlocks = 528;       // ~4 blocks per SM on 132 SMs
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps
constexpr unsigned kFull = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- MMA per input type -------------------------------------------------------------------------

template <typename T>
struct Mma;

// bf16 x bf16 -> fp32, 16 x 16 x 16.
template <>
struct Mma<bf16> {
  using Smem = __nv_bfloat16;
  using Raw = uint16_t;
  static constexpr int kLd = kBK + 8;  // 80-byte rows: 16-byte aligned fragments, fewer bank conflicts
  static constexpr int kK = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ Raw raw(bf16 v) { return v.bits; }

  static __device__ __forceinline__ void step(Acc (&acc)[2][2], const Smem* a_tile, const Smem* b_tile, int kk,
                                              int wm, int wn) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (wm * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], b_tile + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
};

// fp32 via 3xTF32, 16 x 16 x 8: x = hi + lo with hi = tf32(x), lo = tf32(x - hi);
// x * y ~ hi_x * hi_y + hi_x * lo_y + lo_x * hi_y (small terms first).
template <>
struct Mma<float> {
  using Smem = float;
  using Raw = float;
  static constexpr int kLd = kBK + 4;
  static constexpr int kK = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static __device__ __forceinline__ Raw raw(float v) { return v; }

  template <typename Frag>
  static __device__ __forceinline__ void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float v = hi.x[t];
      const float h = wmma::__float_to_tf32(v);
      lo.x[t] = wmma::__float_to_tf32(v - h);
      hi.x[t] = h;
    }
  }

  static __device__ __forceinline__ void step(Acc (&acc)[2][2], const Smem* a_tile, const Smem* b_tile, int kk,
                                              int wm, int wn) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a_hi[2], a_lo[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b_hi[2], b_lo[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      wmma::load_matrix_sync(a_hi[i], a_tile + (wm * 32 + i * 16) * kLd + kk, kLd);
      split(a_hi[i], a_lo[i]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::load_matrix_sync(b_hi[j], b_tile + (wn * 32 + j * 16) * kLd + kk, kLd);
      split(b_hi[j], b_lo[j]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::mma_sync(acc[i][j], a_lo[i], b_hi[j], acc[i][j]);
        wmma::mma_sync(acc[i][j], a_hi[i], b_lo[j], acc[i][j]);
        wmma::mma_sync(acc[i][j], a_hi[i], b_hi[j], acc[i][j]);
      }
  }
};

// rows [row0, row0 + 64) x depth [k0, k0 + 32) of a row-major [rows, D] matrix into a shared tile
// (row stride kLd), zero past the last row and past D. vec: D % (16 / sizeof(T)) == 0 and the
// matrix is 16-byte aligned, so every in-range 16-byte group can be copied whole.
template <typename T>
__device__ __forceinline__ void load_tile(typename Mma<T>::Smem* tile, const T* __restrict__ src, int64_t rows,
                                          int64_t row0, int64_t k0, int64_t D, bool vec) {
  using Raw = typename Mma<T>::Raw;
  constexpr int kV = 16 / sizeof(T);
  constexpr int kPerRow = kBK / kV;
  constexpr int kLd = Mma<T>::kLd;
  Raw* base = reinterpret_cast<Raw*>(tile);
  for (int e = threadIdx.x; e < kBM * kPerRow; e += kGemmThreads) {
    const int r = e / kPerRow;
    const int kv = (e - r * kPerRow) * kV;
    const int64_t gr = row0 + r, gk = k0 + kv;
    Raw* dst = base + r * kLd + kv;  // 16-byte aligned: kLd and kv are multiples of kV
    if (vec && gr < rows && gk < D) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src + gr * D + gk));
    } else {
#pragma unroll
      for (int v = 0; v < kV; ++v)
        dst[v] = (gr < rows && gk + v < D) ? Mma<T>::raw(src[gr * D + gk + v]) : Raw(0);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// ---- 1. inverse norms ---------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    inv_norm_kernel(const T* __restrict__ images, int64_t num_images, const T* __restrict__ regions,
                    int64_t num_regions, const T* __restrict__ text, int64_t num_text, int64_t D, bool vec,
                    float* __restrict__ inv_norm) {
  constexpr int kV = 16 / sizeof(T);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t total = num_images + num_regions + num_text;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < total;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform
    const T* x = row < num_images                 ? images + row * D
                 : row < num_images + num_regions ? regions + (row - num_images) * D
                                                  : text + (row - num_images - num_regions) * D;
    float ss = 0.f;
    if (vec) {
      for (int64_t v = lane; v < D / kV; v += 32) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(x) + v);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (sizeof(T) == 2) {
            const float lo = __uint_as_float(w[i] << 16), hi = __uint_as_float(w[i] & 0xffff0000u);
            ss = fmaf(lo, lo, ss);
            ss = fmaf(hi, hi, ss);
          } else {
            const float f = __uint_as_float(w[i]);
            ss = fmaf(f, f, ss);
          }
        }
      }
    } else {
      for (int64_t d = lane; d < D; d += 32) {
        const float f = to_float(x[d]);
        ss = fmaf(f, f, ss);
      }
    }
    ss = warp_sum(ss);
    if (lane == 0) inv_norm[row] = 1.f / fmaxf(sqrtf(ss), kNormEps);
  }
}

// ---- 2 / 4. tensor-core logits + online softmax -------------------------------------------------

// Partial softmax states of one row set: [splits][rows] each.
struct Partials {
  float* max;
  int32_t* argmax;
  float* sum;
};

template <typename T, bool kRegions>
__global__ void __launch_bounds__(kGemmThreads, 3)  // <= 168 registers, 3+ blocks per SM
    softmax_gemm_kernel(const T* __restrict__ rows_src, int64_t nrows, const float* __restrict__ inv_rows,
                        const T* __restrict__ text, const float* __restrict__ inv_text, int64_t C, int64_t D,
                        float scale, int splits, bool vec, Partials out,
                        const int64_t* __restrict__ image_label, int64_t regions_per_image,
                        float* __restrict__ target_logit) {
  using Mm = Mma<T>;
  __shared__ __align__(128) typename Mm::Smem a_tile[kBM * Mm::kLd];
  __shared__ __align__(128) typename Mm::Smem b_tile[kBN * Mm::kLd];
  __shared__ __align__(128) float c_tile[kBM * kLdc];

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t class_tiles = (C + kBN - 1) / kBN;
  const int s = blockIdx.y;
  const int64_t ct0 = s * class_tiles / splits, ct1 = (s + 1) * class_tiles / splits;

  // Epilogue role: threads 2r and 2r+1 own row r of the tile, even / odd columns.
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t row = row0 + r;
  const bool row_ok = row < nrows;
  const float inv_row = row_ok ? inv_rows[row] : 0.f;
  int64_t label = -1;
  if (kRegions && row_ok) label = image_label[row / regions_per_image];

  SoftmaxState run = softmax_empty();
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t n0 = ct * kBN;
    typename Mm::Acc acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      load_tile<T>(a_tile, rows_src, nrows, row0, k0, D, vec);
      load_tile<T>(b_tile, text, C, n0, k0, D, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += Mm::kK) Mm::step(acc, a_tile, b_tile, kk, wm, wn);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(c_tile + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                                wmma::mem_row_major);
    __syncthreads();

    // Epilogue: logit = scale * (dot * inv_row * inv_text); __fmul_rn keeps the rounded logit
    // from being fused into the exp argument, so both passes and target_logit see the same value.
    const float* c_row = c_tile + r * kLdc;
    float best = 0.f;
    int64_t arg = -1;
    for (int c = half; c < kBN && n0 + c < C; c += 2) {
      const float l = __fmul_rn(scale, c_row[c] * inv_row * inv_text[n0 + c]);
      if (arg < 0 || l > best) {  // ascending columns: ties keep the lowest class
        best = l;
        arg = n0 + c;
      }
    }
    float sum = 0.f;
    for (int c = half; c < kBN && n0 + c < C; c += 2) {
      const float l = __fmul_rn(scale, c_row[c] * inv_row * inv_text[n0 + c]);
      sum += expf(l - best);
      if (kRegions && n0 + c == label) target_logit[row] = l;  // exactly one thread in the grid
    }
    const SoftmaxState mine{best, arg, sum};
    const SoftmaxState other{__shfl_xor_sync(kFull, best, 1),
                             static_cast<int64_t>(__shfl_xor_sync(kFull, static_cast<long long>(arg), 1)),
                             __shfl_xor_sync(kFull, sum, 1)};
    run = softmax_merge(run, softmax_merge(mine, other));  // symmetric: both threads agree
    __syncthreads();  // c_tile is rewritten by the next class tile (also when D == 0)
  }
  if (row_ok && half == 0) {
    const int64_t at = static_cast<int64_t>(s) * nrows + row;
    out.max[at] = run.max;
    out.argmax[at] = static_cast<int32_t>(run.argmax);
    out.sum[at] = run.sum;
  }
}

__device__ __forceinline__ SoftmaxState merge_splits(const Partials& p, int splits, int64_t nrows, int64_t row) {
  SoftmaxState st = softmax_empty();
  for (int s = 0; s < splits; ++s) {
    const int64_t at = static_cast<int64_t>(s) * nrows + row;
    st = softmax_merge(st, SoftmaxState{p.max[at], static_cast<int64_t>(p.argmax[at]), p.sum[at]});
  }
  return st;
}

// ---- 3. images ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 4)
    finalize_images_kernel(Partials part, int splits, int64_t B, int64_t* __restrict__ image_label,
                           float* __restrict__ image_prob) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * kThreads) {
    const SoftmaxState st = merge_splits(part, splits, B, b);
    image_label[b] = st.argmax;
    image_prob[b] = 1.f / st.sum;  // exp(max - max) / sum
  }
}

// ---- 5. regions and discrepancy -----------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 4)
    finalize_regions_kernel(Partials part, int splits, int64_t B, int64_t M, const uint8_t* __restrict__ valid,
                            const float* __restrict__ target_logit, const float* __restrict__ image_prob,
                            int64_t* __restrict__ region_label, float* __restrict__ region_prob,
                            float* __restrict__ region_image_prob, float* __restrict__ discrepancy) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t nrows = B * M;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < B;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform
    float best = 0.f;  // invalid regions count as 0 in the reference's max
    for (int64_t m = lane; m < M; m += 32) {
      const int64_t row = b * M + m;
      if (valid[row]) {
        const SoftmaxState st = merge_splits(part, splits, nrows, row);
        const float image_label_prob = expf(target_logit[row] - st.max) / st.sum;
        region_label[row] = st.argmax;
        region_prob[row] = 1.f / st.sum;
        region_image_prob[row] = image_label_prob;
        best = fmaxf(best, image_label_prob);
      } else {
        region_label[row] = -1;
        region_prob[row] = 0.f;
        region_image_prob[row] = 0.f;
      }
    }
    best = warp_max(best);
    if (lane == 0) discrepancy[b] = image_prob[b] - best;
  }
}

// ---- host side ----------------------------------------------------------------------------------

// Class splits of a row set: enough blocks to fill the GPU, from the shape alone (deterministic).
int splits_for(int64_t rows, int64_t classes) {
  const int64_t row_tiles = ceil_div(rows > 0 ? rows : 1, kBM);
  const int64_t class_tiles = ceil_div(classes, kBN);
  int64_t s = ceil_div(kTargetBlocks, row_tiles);
  if (s > class_tiles) s = class_tiles;
  if (s > kMaxSplits) s = kMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

struct Layout {
  int split_images, split_regions;
  size_t inv, image_max, image_arg, image_sum, region_max, region_arg, region_sum, target, total;
};

Layout make_layout(const RegionScoreParams& p) {
  Layout l{};
  const int64_t B = p.batch, R = p.batch * p.regions, C = p.classes;
  l.split_images = splits_for(B, C);
  l.split_regions = splits_for(R, C);
  size_t at = 0;
  auto take = [&](int64_t count, size_t elem) {
    const size_t start = at;
    at += (static_cast<size_t>(count) * elem + 255) / 256 * 256;
    return start;
  };
  l.inv = take(B + R + C, sizeof(float));
  l.image_max = take(l.split_images * B, sizeof(float));
  l.image_arg = take(l.split_images * B, sizeof(int32_t));
  l.image_sum = take(l.split_images * B, sizeof(float));
  l.region_max = take(l.split_regions * R, sizeof(float));
  l.region_arg = take(l.split_regions * R, sizeof(int32_t));
  l.region_sum = take(l.split_regions * R, sizeof(float));
  l.target = take(R, sizeof(float));
  l.total = at;
  return l;
}

unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = ceil_div(work, per_block);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t region_score_workspace_bytes(const RegionScoreParams& params) { return make_layout(params).total; }

template <typename T>
cudaError_t region_score(const T* images, const T* regions, const uint8_t* valid, const T* text,
                         int64_t* image_label, float* image_prob, int64_t* region_label, float* region_prob,
                         float* region_image_prob, float* discrepancy, void* workspace, size_t workspace_bytes,
                         const RegionScoreParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.classes < 1 || p.classes > INT_MAX || p.dim < 0 || p.regions < 0) return cudaErrorInvalidValue;
  const Layout l = make_layout(p);
  if (workspace == nullptr || workspace_bytes < l.total || !aligned16(workspace)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  const int64_t B = p.batch, M = p.regions, R = B * M, C = p.classes, D = p.dim;
  float* inv = reinterpret_cast<float*>(ws + l.inv);
  float* inv_images = inv;
  float* inv_regions = inv + B;
  float* inv_text = inv + B + R;
  const Partials image_part{reinterpret_cast<float*>(ws + l.image_max), reinterpret_cast<int32_t*>(ws + l.image_arg),
                            reinterpret_cast<float*>(ws + l.image_sum)};
  const Partials region_part{reinterpret_cast<float*>(ws + l.region_max),
                             reinterpret_cast<int32_t*>(ws + l.region_arg),
                             reinterpret_cast<float*>(ws + l.region_sum)};
  float* target = reinterpret_cast<float*>(ws + l.target);
  constexpr int kV = 16 / sizeof(T);
  const bool vec = D % kV == 0 && aligned16(images) && aligned16(text) && (R == 0 || aligned16(regions));
  cudaError_t status;

  inv_norm_kernel<T><<<grid_for(B + R + C, kThreads / 32), kThreads, 0, stream>>>(images, B, regions, R, text, C,
                                                                                D, vec, inv);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;

  softmax_gemm_kernel<T, false>
      <<<dim3(static_cast<unsigned>(ceil_div(B, kBM)), static_cast<unsigned>(l.split_images)), kGemmThreads, 0,
         stream>>>(images, B, inv_images, text, inv_text, C, D, p.logit_scale, l.split_images, vec, image_part,
                   nullptr, 1, nullptr);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;

  finalize_images_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(image_part, l.split_images, B,
                                                                        image_label, image_prob);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;

  if (R > 0) {
    softmax_gemm_kernel<T, true>
        <<<dim3(static_cast<unsigned>(ceil_div(R, kBM)), static_cast<unsigned>(l.split_regions)), kGemmThreads,
           0, stream>>>(regions, R, inv_regions, text, inv_text, C, D, p.logit_scale, l.split_regions, vec,
                        region_part, image_label, M, target);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }

  finalize_regions_kernel<<<grid_for(B, kThreads / 32), kThreads, 0, stream>>>(
      region_part, l.split_regions, B, M, valid, target, image_prob, region_label, region_prob, region_image_prob,
      discrepancy);
  return cudaGetLastError();
}

#define CLIPFAST_INSTANTIATE(T)                                                                                 \
  template cudaError_t region_score<T>(const T*, const T*, const uint8_t*, const T*, int64_t*, float*, int64_t*, \
                                       float*, float*, float*, void*, size_t, const RegionScoreParams&,         \
                                       cudaStream_t);
CLIPFAST_INSTANTIATE(float)
CLIPFAST_INSTANTIATE(bf16)
#undef CLIPFAST_INSTANTIATE

}  // namespace cuda
}  // namespace clipfast
