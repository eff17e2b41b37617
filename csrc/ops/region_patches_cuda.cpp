// region_patches CUDA implementation: checks and allocation from region_patches.cpp, the two launches
// in the torch-free core csrc/kernels/cuda/region_patches.cu, on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>

#include "cuda/region_patches.cuh"
#include "dispatch.h"
#include "region_patches.h"

namespace clipfast {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_patches_cuda(
    const at::Tensor& images, const at::Tensor& masks, int64_t grid_h, int64_t grid_w, int64_t min_pixels,
    double background, at::ArrayRef<double> mean, at::ArrayRef<double> std, at::ScalarType out_dtype,
    int64_t packed_width) {
  const c10::cuda::CUDAGuard guard(images.device());
  RegionPatchesCall call = prepare_region_patches(images, masks, grid_h, grid_w, min_pixels, background, mean, std,
                                                  out_dtype, packed_width);
  const MaskPoolParams& g = call.params.grid;
  TORCH_CHECK(g.mask_h * g.row_bytes <= INT_MAX && g.mask_h * g.mask_w <= INT_MAX,
              "region_patches (cuda): masks of ", g.mask_h, "x", g.mask_w,
              " pixels are too large (each mask must have < 2^31 pixels and bytes)");
  int optin = 0;
  const cudaError_t attr =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, images.get_device());
  TORCH_CHECK(attr == cudaSuccess, "region_patches (cuda): cannot query the device: ", cudaGetErrorString(attr));
  TORCH_CHECK(cuda::region_patches_shared_bytes(call.params, static_cast<size_t>(optin)) > 0,
              "region_patches (cuda): a grid of ", g.patches, " patches needs more shared memory per block than "
              "this GPU's ", optin, " bytes; use the cpu or reference backend");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* mask_data = call.masks.const_data_ptr<uint8_t>();
  cudaError_t status = cuda::region_patch_select(mask_data, call.params, call.kept.mutable_data_ptr<uint8_t>(),
                                                 call.lengths.mutable_data_ptr<int64_t>(), stream);
  TORCH_CHECK(status == cudaSuccess, "region_patches (cuda): launch failed: ", cudaGetErrorString(status));
  finish_selection(call, out_dtype);
  dispatch_in_out(call.images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    status = cuda::region_patch_fill(static_cast<const In*>(call.images.const_data_ptr()), mask_data,
                                     call.kept.const_data_ptr<uint8_t>(), call.offsets.const_data_ptr<int64_t>(),
                                     call.params, static_cast<Out*>(call.pixels.mutable_data_ptr()),
                                     call.image_index.mutable_data_ptr<int64_t>(),
                                     call.patch_index.mutable_data_ptr<int64_t>(), stream);
  });
  TORCH_CHECK(status == cudaSuccess, "region_patches (cuda): launch failed: ", cudaGetErrorString(status));
  return outputs(call);
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CUDA, m) { m.impl("region_patches", &region_patches_cuda); }

}  // namespace ops
}  // namespace clipfast
