// region_topk CUDA implementation: checks and allocation from region_topk.cpp, the launches in the
// torch-free core csrc/kernels/cuda/region_topk.cu (scratch memory as a torch tensor), on the
// current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cuda/region_topk.cuh"
#include "region_topk.h"

namespace clipfast {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> region_topk_cuda(const at::Tensor& scores, const at::Tensor& labels,
                                                    int64_t num_labels, int64_t k) {
  // The op's own checks first (same device for every input, on a CUDA device), then the guard: a
  // guard made from a CPU tensor's device would fail inside c10 instead.
  RegionTopkCall call = prepare_region_topk(scores, labels, num_labels, k);
  TORCH_CHECK(call.scores.is_cuda(), "region_topk (cuda): scores must be on a CUDA device, got ",
              call.scores.device());
  const c10::cuda::CUDAGuard guard(call.scores.device());
  TORCH_CHECK(call.k >= 0 && call.k <= cuda::kRegionTopkMaxK, "region_topk (cuda): k=", call.k,
              " is above the CUDA backend's limit of ", cuda::kRegionTopkMaxK,
              " per label; use the triton or reference backend (backend=\"auto\" picks one that can)");
  TORCH_CHECK(call.n <= cuda::kRegionTopkMaxEntries, "region_topk (cuda): ", call.n,
              " entries exceed the limit of 2^32 - 1 (indices are ranked as 32-bit values)");
  TORCH_CHECK(call.num_labels >= 0 && call.num_labels <= cuda::kRegionTopkMaxLabels,
              "region_topk (cuda): num_labels=", call.num_labels, " must be below 2^31 - 1");
  if (call.num_labels == 0) return {call.counts, call.indices};

  const size_t bytes = cuda::region_topk_workspace_bytes(call.n, call.num_labels, call.k);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, call.scores.options().dtype(at::kByte));
  const cudaError_t status = cuda::region_topk(
      call.scores.const_data_ptr<float>(), call.labels.const_data_ptr<int64_t>(), call.n, call.num_labels, call.k,
      call.counts.mutable_data_ptr<int64_t>(), call.indices.mutable_data_ptr<int64_t>(),
      workspace.mutable_data_ptr(), bytes, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "region_topk (cuda): launch failed: ", cudaGetErrorString(status));
  return {call.counts, call.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CUDA, m) { m.impl("region_topk", &region_topk_cuda); }

}  // namespace ops
}  // namespace clipfast
