// mask_pool CUDA core. One block of 256 threads per (image b, mask m), grid-stride over the B * M
// items (consecutive blocks share an image, so its features stay in L2 while its masks stream by):
//   1. per-patch pixel counts in shared memory (mask_counts.cuh, shared with region_patches): the
//      mask plane is read once with 16-byte streaming loads where aligned, each 16-byte chunk turned
//      into a pixel bit set and added to its patch counters with one shared atomic per (chunk,
//      patch) run that has pixels (all-zero chunks cost nothing);
//   2. the covered patches, in patch order (a block-wide scan), and the mask's pixel total;
//   3. pooling weights: count * exp(logit - max over covered patches), normalised per head (one warp
//      per head), kept in shared memory (or, when P * heads does not fit, recomputed while pooling);
//   4. the weighted sum over covered patches only, fp32 accumulation, 16-byte feature loads (8 bf16 /
//      4 floats) when D, the head width and the pointers allow; thread groups split the covered
//      patches when D / 8 < 256 and are reduced through shared memory in a fixed order
//      (deterministic results).
#include <cmath>

#include "mask_counts.cuh"
#include "mask_pool.cuh"

namespace clipfast {
namespace cuda {
namespace {

constexpr int kThreads = kMaskPoolThreads;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // usable without cudaFuncSetAttribute
constexpr size_t kStaticSharedBound = 256;         // >= the kernel's static __shared__ bytes (80)

using mask_counts::count_mask;
using mask_counts::Geometry;

// Block-wide exclusive scan of `value` (returned) with the block totals of value and `extra` in
// *total_value / *total_extra. Every thread must call it; ends with a barrier.
__device__ __forceinline__ int block_exclusive_scan(int value, int extra, int* s_a, int* s_b,
                                                    int* total_value, int* total_extra) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = value;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  int sum = extra;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
  if (lane == 31) s_a[warp] = incl;
  if (lane == 0) s_b[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? s_a[lane] : 0;
    int e = lane < kWarps ? s_b[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(kFull, wi, o);
      if (lane >= o) wi += t;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(kFull, e, o);
    if (lane < kWarps) s_a[lane] = wi - w;
    if (lane == 31) *total_value = wi;
    if (lane == 0) *total_extra = e;
  }
  __syncthreads();
  return s_a[warp] + incl - value;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// V consecutive feature elements <-> V floats.
template <typename T, int V>
struct VecIO;

template <>
struct VecIO<bf16, 8> {
  static __device__ __forceinline__ void load(const bf16* p, float (&x)[8]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ void store(bf16* p, const float (&x)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<uint32_t>(bf16_from_float(x[2 * i]).bits) |
             (static_cast<uint32_t>(bf16_from_float(x[2 * i + 1]).bits) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct VecIO<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float (&x)[4]) {
    const float4 u = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = u.x;
    x[1] = u.y;
    x[2] = u.z;
    x[3] = u.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&x)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
};

template <typename T>
struct VecIO<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float (&x)[1]) { x[0] = to_float(*p); }
  static __device__ __forceinline__ void store(T* p, const float (&x)[1]) { *p = from_float<T>(x[0]); }
};

// kSharedWeights: the normalised weights of every head live in shared memory ([heads][P], by
// covered-list position); otherwise they are recomputed from counts and logits with the per-head
// shift and normaliser (same arithmetic, same values).
// <= 64 registers (4 blocks, 1024 threads per SM); the rarely used recomputing variant gets 80.
template <typename T, int V, bool kSharedWeights>
__global__ void __launch_bounds__(kThreads, kSharedWeights ? 4 : 3)
    mask_pool_kernel(const T* __restrict__ features, const uint8_t* __restrict__ masks,
                     const float* __restrict__ logits, T* __restrict__ pooled, uint8_t* __restrict__ valid,
                     MaskPoolParams p) {
  extern __shared__ __align__(16) int smem[];
  __shared__ int s_scan[kWarps], s_pixels[kWarps], s_covered, s_total;

  const int P = static_cast<int>(p.patches), D = static_cast<int>(p.dim);
  const bool has_logits = p.has_logits;
  const int heads = has_logits ? static_cast<int>(p.heads) : 1;
  const int head_dim = D / heads;
  int* counts = smem;       // [P] pixels per patch
  int* covered = smem + P;  // [P] covered patches in patch order; the first n are used
  float* weights = reinterpret_cast<float*>(smem + 2 * P);  // [heads][P] when kSharedWeights
  float* head_top = weights + (kSharedWeights ? static_cast<int64_t>(heads) * P : 0);  // [heads]
  float* head_inv_denom = head_top + heads;                                            // [heads]
  float* partial = reinterpret_cast<float*>(smem);  // aliases all of the above in the final reduction

  const Geometry g{static_cast<int>(p.row_bytes), static_cast<int>(p.mask_w), static_cast<int>(p.patch_h),
                   static_cast<int>(p.patch_w), static_cast<int>(p.grid_w), p.packed};
  const int plane = static_cast<int>(p.mask_h * p.row_bytes);
  const int64_t items = p.batch * p.masks;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nv = D / V;  // feature vectors per token

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / p.masks;
    __syncthreads();  // the previous item is done with shared memory
    for (int q = tid; q < P; q += kThreads) counts[q] = 0;
    __syncthreads();

    // 1. Pixels per patch.
    count_mask<kThreads>(masks + item * plane, plane, g, counts);
    __syncthreads();

    // 2. Covered patches in patch order (thread t owns a contiguous run of patches).
    const int per = (P + kThreads - 1) / kThreads;
    const int q0 = min(tid * per, P), q1 = min(q0 + per, P);
    int mine = 0, pixels = 0;
    for (int q = q0; q < q1; ++q) {
      const int c = counts[q];
      mine += c > 0;
      pixels += c;
    }
    int slot = block_exclusive_scan(mine, pixels, s_scan, s_pixels, &s_covered, &s_total);
    for (int q = q0; q < q1; ++q)
      if (counts[q] > 0) covered[slot++] = q;
    const int n = s_covered;  // written before the scan's final barrier
    const int total_pixels = s_total;
    __syncthreads();  // covered[] is complete

    // 3. Weights (reference.mask_pool_weights): count * exp(logit - top), top = max over covered
    //    patches (0 when not finite), times 1 / sum (1 / 1 when the sum is not > 0; the reference
    //    divides: <= 1 ulp apart).
    const float* logits_b = has_logits ? logits + b * heads * static_cast<int64_t>(P) : nullptr;
    if (has_logits) {
      for (int h = warp; h < heads; h += kWarps) {
        const float* l = logits_b + static_cast<int64_t>(h) * P;
        float top = -INFINITY;
        for (int i = lane; i < n; i += 32) top = fmaxf(top, l[covered[i]]);
        top = warp_max(top);
        if (!isfinite(top)) top = 0.f;
        float sum = 0.f;
        for (int i = lane; i < n; i += 32) {
          const int q = covered[i];
          const float e = static_cast<float>(counts[q]) * expf(l[q] - top);
          if (kSharedWeights) weights[h * P + i] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        const float inv_denom = 1.f / (sum > 0.f ? sum : 1.f);
        if (kSharedWeights)
          for (int i = lane; i < n; i += 32) weights[h * P + i] *= inv_denom;  // this lane's own writes
        if (lane == 0) {
          head_top[h] = top;
          head_inv_denom[h] = inv_denom;
        }
      }
    } else {
      const float inv_denom = 1.f / (total_pixels > 0 ? static_cast<float>(total_pixels) : 1.f);
      if (kSharedWeights)
        for (int i = tid; i < n; i += kThreads) weights[i] = static_cast<float>(counts[covered[i]]) * inv_denom;
      if (tid == 0) {
        head_top[0] = 0.f;
        head_inv_denom[0] = inv_denom;
      }
    }
    __syncthreads();

    // 4. Weighted sum over covered patches. Thread (group gi, vector j) sums covered positions
    //    gi, gi + groups, ... of channels [j*V, j*V + V).
    const T* x_b = features + b * P * static_cast<int64_t>(D);
    auto weight = [&](int i, int q, int h) -> float {
      if (kSharedWeights) return weights[h * P + i];
      const float c = static_cast<float>(counts[q]);
      if (has_logits) return c * expf(logits_b[static_cast<int64_t>(h) * P + q] - head_top[h]) * head_inv_denom[h];
      return c * head_inv_denom[0];
    };
    auto accumulate = [&](int j, int gi, int groups, float (&acc)[V]) {
      constexpr int U = kSharedWeights ? 4 : 2;  // feature loads in flight per thread
      const int h = has_logits ? (j * V) / head_dim : 0;
      const T* x = x_b + static_cast<int64_t>(j) * V;
      int i = gi;
      for (; i + (U - 1) * groups < n; i += U * groups) {
        int q[U];
        float w[U], v[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) q[u] = covered[i + u * groups];
#pragma unroll
        for (int u = 0; u < U; ++u) VecIO<T, V>::load(x + static_cast<int64_t>(q[u]) * D, v[u]);
#pragma unroll
        for (int u = 0; u < U; ++u) w[u] = weight(i + u * groups, q[u], h);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fmaf(w[u], v[u][e], acc[e]);
      }
      for (; i < n; i += groups) {
        const int q = covered[i];
        float v[V];
        VecIO<T, V>::load(x + static_cast<int64_t>(q) * D, v);
        const float w = weight(i, q, h);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(w, v[e], acc[e]);
      }
    };
    T* out = pooled + item * D;
    if (nv >= kThreads) {
      for (int j = tid; j < nv; j += kThreads) {
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.f;
        accumulate(j, 0, 1, acc);
        VecIO<T, V>::store(out + static_cast<int64_t>(j) * V, acc);
      }
    } else if (nv > 0) {
      const int groups = kThreads / nv;
      const int gi = tid / nv, j = tid - gi * nv;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      if (gi < groups) accumulate(j, gi, groups, acc);
      if (groups > 1) {  // block-uniform
        __syncthreads();  // all reads of counts / covered / weights are done: `partial` may alias them
        if (gi >= 1 && gi < groups)
#pragma unroll
          for (int e = 0; e < V; ++e) partial[((gi - 1) * nv + j) * V + e] = acc[e];
        __syncthreads();
        if (gi == 0)
          for (int other = 1; other < groups; ++other)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += partial[((other - 1) * nv + j) * V + e];
      }
      if (gi == 0) VecIO<T, V>::store(out + static_cast<int64_t>(j) * V, acc);
    }
    if (tid == 0) valid[item] = n > 0 ? 1 : 0;
  }
}

// Shared memory for vector width V (floats of the cross-group reduction depend on it).
size_t shared_bytes(const MaskPoolParams& p, int V, size_t max_shared_bytes, bool* weights_in_shared) {
  // The opt-in limit bounds static + dynamic shared memory together (cudaFuncSetAttribute rejects a
  // dynamic size whose sum with the kernel's static __shared__ arrays exceeds it): keep room for them.
  max_shared_bytes = max_shared_bytes > kStaticSharedBound ? max_shared_bytes - kStaticSharedBound : 0;
  const int64_t heads = p.has_logits ? p.heads : 1;
  const int64_t nv = p.dim / V;
  const int64_t groups = nv > 0 && nv < kThreads ? kThreads / nv : 1;
  const size_t reduction = static_cast<size_t>((groups - 1) * nv * V) * sizeof(float);
  const size_t base = static_cast<size_t>(2 * p.patches + 2 * heads) * sizeof(int);
  const size_t with_weights = base + static_cast<size_t>(heads * p.patches) * sizeof(float);
  const size_t options[2] = {with_weights, base};
  for (int o = 0; o < 2; ++o) {
    const size_t bytes = options[o] > reduction ? options[o] : reduction;
    if (bytes <= max_shared_bytes) {
      if (weights_in_shared) *weights_in_shared = o == 0;
      return bytes;
    }
  }
  return 0;
}

template <typename T, int V, bool kSharedWeights>
cudaError_t launch(const T* features, const uint8_t* masks, const float* logits, T* pooled, uint8_t* valid,
                   const MaskPoolParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = mask_pool_kernel<T, V, kSharedWeights>;
  if (smem + kStaticSharedBound > kDefaultSharedLimit) {  // static + dynamic must fit the default 48 KiB
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) return status;
  }
  const int64_t items = p.batch * p.masks;
  const unsigned grid = static_cast<unsigned>(items < (int64_t{1} << 30) ? items : (int64_t{1} << 30));
  kernel<<<grid, kThreads, smem, stream>>>(features, masks, logits, pooled, valid, p);
  return cudaGetLastError();
}

}  // namespace

size_t mask_pool_shared_bytes(const MaskPoolParams& params, size_t max_shared_bytes, bool* weights_in_shared) {
  // The widest vector (8) bounds the reduction buffer for every element type (<= 8 KiB, so it never
  // decides whether a launch fits).
  return shared_bytes(params, 8, max_shared_bytes, weights_in_shared);
}

template <typename T>
cudaError_t mask_pool(const T* features, const uint8_t* masks, const float* logits, T* pooled,
                      uint8_t* valid, const MaskPoolParams& p, cudaStream_t stream) {
  if (p.batch * p.masks == 0) return cudaSuccess;
  if (p.patches <= 0 || p.heads <= 0 || (p.has_logits && logits == nullptr)) return cudaErrorInvalidValue;
  int device = 0, optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;

  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  const int64_t head_dim = p.dim / (p.has_logits ? p.heads : 1);
  const bool vectorised = p.dim % kVec == 0 && head_dim % kVec == 0 &&
                          reinterpret_cast<uintptr_t>(features) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(pooled) % 16 == 0;
  bool in_shared = false;
  const size_t smem = shared_bytes(p, vectorised ? kVec : 1, static_cast<size_t>(optin), &in_shared);
  if (smem == 0) return cudaErrorInvalidValue;
  if (vectorised)
    return in_shared ? launch<T, kVec, true>(features, masks, logits, pooled, valid, p, smem, stream)
                     : launch<T, kVec, false>(features, masks, logits, pooled, valid, p, smem, stream);
  return in_shared ? launch<T, 1, true>(features, masks, logits, pooled, valid, p, smem, stream)
                   : launch<T, 1, false>(features, masks, logits, pooled, valid, p, smem, stream);
}

template cudaError_t mask_pool<float>(const float*, const uint8_t*, const float*, float*, uint8_t*,
                                      const MaskPoolParams&, cudaStream_t);
template cudaError_t mask_pool<bf16>(const bf16*, const uint8_t*, const float*, bf16*, uint8_t*,
                                     const MaskPoolParams&, cudaStream_t);

}  // namespace cuda
}  // namespace clipfast
