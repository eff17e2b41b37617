// mask_crop CUDA implementation: checks and allocation from mask_crop.cpp, the launch in the
// torch-free core csrc/kernels/cuda/mask_crop.cu, on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/mask_crop.cuh"
#include "dispatch.h"
#include "mask_crop.h"

namespace clipfast {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_crop_cuda(
    const at::Tensor& images, const at::Tensor& masks, int64_t out_size, double margin,
    bool square, double background, at::ArrayRef<double> mean, at::ArrayRef<double> std,
    at::ScalarType out_dtype) {
  // The op's own checks first (same device for every input, on a CUDA device), then the guard: a
  // guard made from a CPU tensor's device would fail inside c10 instead.
  MaskCropCall call =
      prepare_mask_crop(images, masks, out_size, margin, square, background, mean, std, out_dtype);
  TORCH_CHECK(call.images.is_cuda(), "mask_crop (cuda): images must be on a CUDA device, got ",
              call.images.device());
  const c10::cuda::CUDAGuard guard(call.images.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_in_out(call.images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    const cudaError_t status = cuda::mask_crop(
        static_cast<const In*>(call.images.const_data_ptr()),
        static_cast<const uint8_t*>(call.masks.const_data_ptr()),
        static_cast<Out*>(call.crops.mutable_data_ptr()),
        static_cast<Box*>(call.boxes.mutable_data_ptr()),
        static_cast<uint8_t*>(call.valid.mutable_data_ptr()), call.params, stream);
    TORCH_CHECK(status == cudaSuccess, "mask_crop: CUDA launch failed: ",
                cudaGetErrorString(status));
  });
  return {call.crops, call.boxes, call.valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CUDA, m) { m.impl("mask_crop", &mask_crop_cuda); }

}  // namespace ops
}  // namespace clipfast
