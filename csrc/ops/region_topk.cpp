// region_topk: input checks (shared with CUDA) and the CPU implementation.
#include "region_topk.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/region_topk.h"

namespace clipfast {
namespace ops {

RegionTopkCall prepare_region_topk(const at::Tensor& scores, const at::Tensor& labels, int64_t num_labels,
                                   int64_t k) {
  TORCH_CHECK(scores.dim() == 1 && labels.dim() == 1 && scores.size(0) == labels.size(0),
              "region_topk: scores and labels must be 1-d of equal length, got ", scores.sizes(), " and ",
              labels.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat && labels.scalar_type() == at::kLong,
              "region_topk: the kernels take float32 scores and int64 labels, got ", scores.scalar_type(), " and ",
              labels.scalar_type());
  TORCH_CHECK(scores.device() == labels.device(), "region_topk: scores are on ", scores.device(), " but labels on ",
              labels.device());
  TORCH_CHECK(num_labels >= 1 && k >= 1, "region_topk: num_labels and k must be >= 1, got ", num_labels, ", ", k);
  TORCH_CHECK(scores.size(0) < (int64_t{1} << 32), "region_topk: at most 2^32 - 1 entries, got ", scores.size(0));
  RegionTopkCall call;
  call.scores = scores.contiguous();
  call.labels = labels.contiguous();
  call.n = scores.size(0);
  call.num_labels = num_labels;
  call.k = k;
  call.counts = at::empty({num_labels}, labels.options());
  call.indices = at::empty({num_labels, k}, labels.options());
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor> region_topk_cpu(const at::Tensor& scores, const at::Tensor& labels,
                                                   int64_t num_labels, int64_t k) {
  RegionTopkCall call = prepare_region_topk(scores, labels, num_labels, k);
  auto parallel = [](int64_t begin, int64_t end, auto&& fn) { at::parallel_for(begin, end, 1, fn); };
  cpu::region_topk(call.scores.const_data_ptr<float>(), call.labels.const_data_ptr<int64_t>(), call.n,
                   call.num_labels, call.k, call.counts.mutable_data_ptr<int64_t>(),
                   call.indices.mutable_data_ptr<int64_t>(), parallel);
  return {call.counts, call.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CPU, m) { m.impl("region_topk", &region_topk_cpu); }

}  // namespace ops
}  // namespace clipfast
