// mask_crop CUDA core. One block per (image, mask): the block first reduces the mask's tight box
// (16-byte loads when aligned), then writes the S x S x C crop with coalesced stores.
#include <climits>

#include "mask_crop.cuh"

namespace clipfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void note_pixel(int64_t index, int64_t width, int& y_min, int& y_max,
                                           int& x_min, int& x_max) {
  const int y = static_cast<int>(index / width);
  const int x = static_cast<int>(index - static_cast<int64_t>(y) * width);
  y_min = min(y_min, y);
  y_max = max(y_max, y);
  x_min = min(x_min, x);
  x_max = max(x_max, x);
}

// A pixel of one channel as the crop sees it: background outside the mask or the image.
template <typename In>
__device__ __forceinline__ float read_pixel(const In* __restrict__ channel, const uint8_t* __restrict__ mask,
                                            int64_t y, int64_t x, const MaskCropParams& p) {
  const bool inside = y >= 0 && y < p.height && x >= 0 && x < p.width && mask[y * p.width + x] != 0;
  return inside ? to_float(channel[y * p.width + x]) * p.input_scale : p.background;
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    mask_crop_kernel(const In* __restrict__ images, const uint8_t* __restrict__ masks,
                     Out* __restrict__ out, Box* __restrict__ boxes, uint8_t* __restrict__ valid,
                     MaskCropParams p) {
  const int64_t item = blockIdx.x;  // b * M + m
  const int64_t b = item / p.masks;
  const int64_t plane = p.height * p.width;
  const uint8_t* mask = masks + item * plane;
  const In* image = images + b * p.channels * plane;
  const int64_t S = p.out_size;
  Out* dst = out + item * p.channels * S * S;

  // 1. Tight box of the mask.
  int y_min = INT_MAX, y_max = -1, x_min = INT_MAX, x_max = -1;
  const bool vector_ok = (reinterpret_cast<uintptr_t>(mask) % 16 == 0);
  const int64_t vec_count = vector_ok ? plane / 16 : 0;
  for (int64_t v = threadIdx.x; v < vec_count; v += blockDim.x) {
    const uint4 chunk = reinterpret_cast<const uint4*>(mask)[v];
    if ((chunk.x | chunk.y | chunk.z | chunk.w) == 0) continue;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&chunk);
#pragma unroll
    for (int k = 0; k < 16; ++k)
      if (bytes[k]) note_pixel(v * 16 + k, p.width, y_min, y_max, x_min, x_max);
  }
  for (int64_t i = vec_count * 16 + threadIdx.x; i < plane; i += blockDim.x)
    if (mask[i]) note_pixel(i, p.width, y_min, y_max, x_min, x_max);

  __shared__ int s_box[4];
  if (threadIdx.x == 0) {
    s_box[0] = INT_MAX;
    s_box[1] = -1;
    s_box[2] = INT_MAX;
    s_box[3] = -1;
  }
  __syncthreads();
  for (int offset = 16; offset > 0; offset >>= 1) {
    y_min = min(y_min, __shfl_xor_sync(0xffffffffu, y_min, offset));
    y_max = max(y_max, __shfl_xor_sync(0xffffffffu, y_max, offset));
    x_min = min(x_min, __shfl_xor_sync(0xffffffffu, x_min, offset));
    x_max = max(x_max, __shfl_xor_sync(0xffffffffu, x_max, offset));
  }
  if ((threadIdx.x & 31) == 0 && y_max >= 0) {
    atomicMin(&s_box[0], y_min);
    atomicMax(&s_box[1], y_max);
    atomicMin(&s_box[2], x_min);
    atomicMax(&s_box[3], x_max);
  }
  __syncthreads();

  const bool empty = s_box[1] < 0;
  Box box{0, 0, 0, 0};
  if (!empty) box = expand_box(Box{s_box[0], s_box[2], s_box[1] + 1, s_box[3] + 1}, p.margin,
                               p.square, p.height, p.width);
  if (threadIdx.x == 0) {
    boxes[item] = box;
    valid[item] = empty ? 0 : 1;
  }

  // 2. The crop: one thread per output element, consecutive threads on consecutive columns.
  const int64_t box_h = box.y1 - box.y0, box_w = box.x1 - box.x0;
  const int64_t total = p.channels * S * S;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t c = i / (S * S);
    const int64_t oy = (i / S) % S;
    const int64_t ox = i % S;
    float v = p.background;
    if (!empty) {
      const Taps ty = bilinear_taps(oy, box_h, S);
      const Taps tx = bilinear_taps(ox, box_w, S);
      const In* channel = image + c * plane;
      const float v00 = read_pixel(channel, mask, box.y0 + ty.i0, box.x0 + tx.i0, p);
      const float v01 = read_pixel(channel, mask, box.y0 + ty.i0, box.x0 + tx.i1, p);
      const float v10 = read_pixel(channel, mask, box.y0 + ty.i1, box.x0 + tx.i0, p);
      const float v11 = read_pixel(channel, mask, box.y0 + ty.i1, box.x0 + tx.i1, p);
      const float top = (1.f - tx.w1) * v00 + tx.w1 * v01;
      const float bottom = (1.f - tx.w1) * v10 + tx.w1 * v11;
      v = (1.f - ty.w1) * top + ty.w1 * bottom;
    }
    dst[i] = from_float<Out>((v - p.mean[c]) * p.inv_std[c]);
  }
}

}  // namespace

template <typename In, typename Out>
cudaError_t mask_crop(const In* images, const uint8_t* masks, Out* out, Box* boxes, uint8_t* valid,
                      const MaskCropParams& params, cudaStream_t stream) {
  const int64_t items = params.batch * params.masks;
  if (items == 0) return cudaSuccess;
  mask_crop_kernel<In, Out><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(
      images, masks, out, boxes, valid, params);
  return cudaGetLastError();
}

#define CLIPFAST_INSTANTIATE(In, Out)                                                         \
  template cudaError_t mask_crop<In, Out>(const In*, const uint8_t*, Out*, Box*, uint8_t*,  \
                                          const MaskCropParams&, cudaStream_t);
CLIPFAST_INSTANTIATE(uint8_t, float)
CLIPFAST_INSTANTIATE(uint8_t, bf16)
CLIPFAST_INSTANTIATE(float, float)
CLIPFAST_INSTANTIATE(float, bf16)
CLIPFAST_INSTANTIATE(bf16, float)
CLIPFAST_INSTANTIATE(bf16, bf16)
#undef CLIPFAST_INSTANTIATE

}  // namespace cuda
}  // namespace clipfast
