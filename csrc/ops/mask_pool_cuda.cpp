// mask_pool CUDA implementation: checks and allocation from mask_pool.cpp, the launch in the
// torch-free core csrc/kernels/cuda/mask_pool.cu, on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>

#include "common/bf16.h"
#include "cuda/mask_pool.cuh"
#include "mask_pool.h"

namespace clipfast {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> mask_pool_cuda(const at::Tensor& features, const at::Tensor& masks,
                                                  const std::optional<at::Tensor>& logits, int64_t grid_h,
                                                  int64_t grid_w, int64_t packed_width) {
  // The op's own checks first (same device for every input, on a CUDA device), then the guard: a
  // guard made from a CPU tensor's device would fail inside c10 instead.
  MaskPoolCall call = prepare_mask_pool(features, masks, logits, grid_h, grid_w, packed_width);
  const MaskPoolParams& p = call.params;
  TORCH_CHECK(call.features.is_cuda(), "mask_pool (cuda): features must be on a CUDA device, got ",
              call.features.device());
  const c10::cuda::CUDAGuard guard(call.features.device());
  TORCH_CHECK(p.mask_h * p.row_bytes <= INT_MAX && p.mask_h * p.mask_w <= INT_MAX,
              "mask_pool (cuda): masks of ", p.mask_h, "x", p.mask_w,
              " pixels are too large (each mask must have < 2^31 pixels and bytes)");
  TORCH_CHECK(p.patches <= INT_MAX && p.dim <= INT_MAX, "mask_pool (cuda): P=", p.patches, " and D=", p.dim,
              " must be < 2^31");
  if (p.batch * p.masks == 0) return {call.pooled, call.valid};

  int optin = 0;
  const cudaError_t attr =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, call.features.get_device());
  TORCH_CHECK(attr == cudaSuccess, "mask_pool (cuda): cannot query the device: ", cudaGetErrorString(attr));
  TORCH_CHECK(cuda::mask_pool_shared_bytes(p, static_cast<size_t>(optin)) > 0, "mask_pool (cuda): a grid of ",
              p.patches, " patches needs ", 8 * p.patches,
              " bytes of shared memory per block, more than this GPU's ", optin,
              " bytes; use the triton or reference backend, or a coarser patch grid");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* logit_data = p.has_logits ? call.logits.const_data_ptr<float>() : nullptr;
  uint8_t* valid = static_cast<uint8_t*>(call.valid.mutable_data_ptr());  // bool storage, 0 / 1
  cudaError_t status;
  if (call.features.scalar_type() == at::kFloat) {
    status = cuda::mask_pool(call.features.const_data_ptr<float>(), call.masks.const_data_ptr<uint8_t>(),
                             logit_data, call.pooled.mutable_data_ptr<float>(), valid, p, stream);
  } else {
    TORCH_CHECK(call.features.scalar_type() == at::kBFloat16, "mask_pool (cuda): unsupported dtype ",
                call.features.scalar_type());
    status = cuda::mask_pool(static_cast<const bf16*>(call.features.const_data_ptr()),
                             call.masks.const_data_ptr<uint8_t>(), logit_data,
                             static_cast<bf16*>(call.pooled.mutable_data_ptr()), valid, p, stream);
  }
  TORCH_CHECK(status == cudaSuccess, "mask_pool (cuda): launch failed: ", cudaGetErrorString(status));
  return {call.pooled, call.valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CUDA, m) { m.impl("mask_pool", &mask_pool_cuda); }

}  // namespace ops
}  // namespace clipfast
