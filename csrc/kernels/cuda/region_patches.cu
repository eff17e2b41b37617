// region_patches CUDA core. Both passes run one block of 256 threads per region (image b, mask m),
// grid-stride over the B * M regions:
//   select: the region's per-patch pixel counts in shared memory (mask_counts.cuh, the coverage
//           counting mask_pool uses), its best count (a shared atomic max), the keep rule of
//           region_patches_common.h -> kept flags and the region's length;
//   fill:   one warp lists the kept patches in patch order (ballots: the token slots), then the
//           whole block writes every kept patch's C x patch_h x patch_w pixels, consecutive threads
//           on consecutive pixels of a patch row (coalesced reads of image rows and mask rows).
#include "mask_counts.cuh"
#include "region_patches.cuh"

namespace clipfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // usable without cudaFuncSetAttribute
constexpr size_t kStaticSharedBound = 128;         // >= the kernels' static __shared__ bytes (32)

__global__ void __launch_bounds__(kThreads) select_kernel(const uint8_t* __restrict__ masks, RegionPatchesParams p,
                                                          uint8_t* __restrict__ kept, int64_t* __restrict__ lengths) {
  extern __shared__ int counts[];  // [P]
  __shared__ int s_best, s_kept;
  const MaskPoolParams& g = p.grid;
  const int P = static_cast<int>(g.patches);
  const int plane = static_cast<int>(g.mask_h * g.row_bytes);
  const mask_counts::Geometry geometry{static_cast<int>(g.row_bytes), static_cast<int>(g.mask_w),
                                       static_cast<int>(g.patch_h), static_cast<int>(g.patch_w),
                                       static_cast<int>(g.grid_w), g.packed};
  const int64_t regions = g.batch * g.masks;
  for (int64_t r = blockIdx.x; r < regions; r += gridDim.x) {
    for (int q = threadIdx.x; q < P; q += kThreads) counts[q] = 0;
    if (threadIdx.x == 0) s_best = s_kept = 0;
    __syncthreads();  // also: the previous region is done with counts, s_best and s_kept
    mask_counts::count_mask<kThreads>(masks + r * plane, plane, geometry, counts);
    __syncthreads();
    int best = 0;  // one shared atomic per thread: P is at most a few thousand patches
    for (int q = threadIdx.x; q < P; q += kThreads) best = max(best, counts[q]);
    atomicMax(&s_best, best);
    __syncthreads();
    const int threshold = keep_threshold(p.min_pixels, s_best);
    int n = 0;
    for (int q = threadIdx.x; q < P; q += kThreads) {
      const bool keep = keep_patch(counts[q], threshold);
      kept[r * P + q] = keep ? 1 : 0;
      n += keep;
    }
    atomicAdd(&s_kept, n);
    __syncthreads();
    if (threadIdx.x == 0) lengths[r] = s_kept;
    __syncthreads();  // s_kept is read before the next region resets it
  }
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    fill_kernel(const In* __restrict__ images, const uint8_t* __restrict__ masks, const uint8_t* __restrict__ kept,
                const int64_t* __restrict__ offsets, RegionPatchesParams p, Out* __restrict__ pixels,
                int64_t* __restrict__ image_index, int64_t* __restrict__ patch_index) {
  extern __shared__ int slots[];  // [n]: the region's kept patches in patch order
  // Per-channel constants indexed by a run-time channel: from shared memory (indexing the kernel
  // parameter's arrays would copy them to local memory).
  __shared__ float s_mean[kMaxChannels], s_inv_std[kMaxChannels];
  if (threadIdx.x < kMaxChannels) {
    s_mean[threadIdx.x] = p.mean[threadIdx.x];
    s_inv_std[threadIdx.x] = p.inv_std[threadIdx.x];
  }
  const MaskPoolParams& g = p.grid;
  const int P = static_cast<int>(g.patches), C = static_cast<int>(p.channels);
  const int ph = static_cast<int>(g.patch_h), pw = static_cast<int>(g.patch_w), gw = static_cast<int>(g.grid_w);
  const int64_t H = g.mask_h, W = g.mask_w, plane = g.mask_h * g.row_bytes;
  const int per_token = C * ph * pw;
  const int64_t regions = g.batch * g.masks;
  for (int64_t r = blockIdx.x; r < regions; r += gridDim.x) {
    const int64_t first = offsets[r];
    const int n = static_cast<int>(offsets[r + 1] - first);
    if (n == 0) continue;  // block-uniform
    const int64_t b = r / g.masks;
    __syncthreads();  // the previous region is done with slots
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int base = 0;
      for (int q0 = 0; q0 < P; q0 += 32) {
        const bool keep = q0 + lane < P && kept[r * P + q0 + lane];
        const unsigned ballot = __ballot_sync(kFull, keep);
        if (keep) slots[base + __popc(ballot & ((1u << lane) - 1u))] = q0 + lane;
        base += __popc(ballot);
      }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < n; k += kThreads) {
      image_index[first + k] = b;
      patch_index[first + k] = slots[k];
    }
    const uint8_t* mask = masks + r * plane;
    Out* out = pixels + first * per_token;
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(n) * per_token; i += kThreads) {
      const int k = static_cast<int>(i / per_token);
      const int within = static_cast<int>(i - static_cast<int64_t>(k) * per_token);
      const int c = within / (ph * pw), y = (within / pw) % ph, x = within % pw;
      const int q = slots[k];
      const int64_t py = (q / gw) * ph + y, px = (q % gw) * pw + x;
      const bool inside = mask_pixel(mask + py * g.row_bytes, px, g.packed);
      const float v = inside ? to_float(images[((b * C + c) * H + py) * W + px]) * p.input_scale : p.background;
      out[i] = from_float<Out>((v - s_mean[c]) * s_inv_std[c]);
    }
  }
}

unsigned grid_for(int64_t regions) {
  return static_cast<unsigned>(regions < (int64_t{1} << 30) ? regions : (int64_t{1} << 30));
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t smem) {
  if (smem + kStaticSharedBound <= kDefaultSharedLimit) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace

size_t region_patches_shared_bytes(const RegionPatchesParams& params, size_t max_shared_bytes) {
  const size_t bytes = static_cast<size_t>(params.grid.patches) * sizeof(int);
  return bytes + kStaticSharedBound <= max_shared_bytes ? (bytes > 0 ? bytes : sizeof(int)) : 0;
}

cudaError_t region_patch_select(const uint8_t* masks, const RegionPatchesParams& p, uint8_t* kept, int64_t* lengths,
                                cudaStream_t stream) {
  const int64_t regions = p.grid.batch * p.grid.masks;
  if (regions == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(p.grid.patches) * sizeof(int);
  cudaError_t status = allow_shared(select_kernel, smem);
  if (status != cudaSuccess) return status;
  select_kernel<<<grid_for(regions), kThreads, smem, stream>>>(masks, p, kept, lengths);
  return cudaGetLastError();
}

template <typename In, typename Out>
cudaError_t region_patch_fill(const In* images, const uint8_t* masks, const uint8_t* kept, const int64_t* offsets,
                              const RegionPatchesParams& p, Out* pixels, int64_t* image_index, int64_t* patch_index,
                              cudaStream_t stream) {
  const int64_t regions = p.grid.batch * p.grid.masks;
  if (regions == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(p.grid.patches) * sizeof(int);
  auto kernel = fill_kernel<In, Out>;
  cudaError_t status = allow_shared(kernel, smem);
  if (status != cudaSuccess) return status;
  kernel<<<grid_for(regions), kThreads, smem, stream>>>(images, masks, kept, offsets, p, pixels, image_index,
                                                        patch_index);
  return cudaGetLastError();
}

#define CLIPFAST_INSTANTIATE(In, Out)                                                                              \
  template cudaError_t region_patch_fill<In, Out>(const In*, const uint8_t*, const uint8_t*, const int64_t*,      \
                                                  const RegionPatchesParams&, Out*, int64_t*, int64_t*, cudaStream_t);
CLIPFAST_INSTANTIATE(uint8_t, float)
CLIPFAST_INSTANTIATE(uint8_t, bf16)
CLIPFAST_INSTANTIATE(float, float)
CLIPFAST_INSTANTIATE(float, bf16)
CLIPFAST_INSTANTIATE(bf16, float)
CLIPFAST_INSTANTIATE(bf16, bf16)
#undef CLIPFAST_INSTANTIATE

}  // namespace cuda
}  // namespace clipfast
