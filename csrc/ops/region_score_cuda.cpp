// region_score CUDA implementation: checks and allocation from region_score.cpp, the launches in the
// torch-free core csrc/kernels/cuda/region_score.cu (scratch memory as a torch tensor), on the
// current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>

#include "common/bf16.h"
#include "cuda/region_score.cuh"
#include "region_score.h"

namespace clipfast {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_score_cuda(
    const at::Tensor& image_embeddings, const at::Tensor& region_embeddings, const at::Tensor& region_valid,
    const at::Tensor& text_embeddings, double logit_scale) {
  // The op's own checks first (same device for every input, on a CUDA device), then the guard: a
  // guard made from a CPU tensor's device would fail inside c10 instead.
  RegionScoreCall call =
      prepare_region_score(image_embeddings, region_embeddings, region_valid, text_embeddings, logit_scale);
  const RegionScoreParams& p = call.params;
  auto outputs = std::make_tuple(call.image_label, call.image_prob, call.region_label, call.region_prob,
                                 call.region_image_prob, call.discrepancy);
  TORCH_CHECK(call.images.is_cuda(), "region_score (cuda): embeddings must be on a CUDA device, got ",
              call.images.device());
  const c10::cuda::CUDAGuard guard(call.images.device());
  if (p.batch == 0) return outputs;
  TORCH_CHECK(p.classes >= 1 && p.classes <= INT_MAX, "region_score (cuda): needs 1 to 2^31 - 1 classes, got ",
              p.classes);

  const size_t bytes = cuda::region_score_workspace_bytes(p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, call.images.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return cuda::region_score<T>(
        static_cast<const T*>(call.images.const_data_ptr()), static_cast<const T*>(call.regions.const_data_ptr()),
        call.valid.const_data_ptr<uint8_t>(), static_cast<const T*>(call.text.const_data_ptr()),
        call.image_label.mutable_data_ptr<int64_t>(), call.image_prob.mutable_data_ptr<float>(),
        call.region_label.mutable_data_ptr<int64_t>(), call.region_prob.mutable_data_ptr<float>(),
        call.region_image_prob.mutable_data_ptr<float>(), call.discrepancy.mutable_data_ptr<float>(),
        workspace.mutable_data_ptr(), bytes, p, stream);
  };
  cudaError_t status;
  if (call.images.scalar_type() == at::kFloat) {
    status = run(float{});
  } else {
    TORCH_CHECK(call.images.scalar_type() == at::kBFloat16, "region_score (cuda): unsupported dtype ",
                call.images.scalar_type());
    status = run(bf16{});
  }
  TORCH_CHECK(status == cudaSuccess, "region_score (cuda): launch failed: ", cudaGetErrorString(status));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CUDA, m) { m.impl("region_score", &region_score_cuda); }

}  // namespace ops
}  // namespace clipfast
