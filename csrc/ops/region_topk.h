// region_topk torch glue shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

namespace clipfast {
namespace ops {

struct RegionTopkCall {
  at::Tensor scores;   // contiguous fp32 [N]
  at::Tensor labels;   // contiguous int64 [N]
  at::Tensor counts;   // allocated int64 [num_labels]
  at::Tensor indices;  // allocated int64 [num_labels, k]
  int64_t n, num_labels, k;
};

RegionTopkCall prepare_region_topk(const at::Tensor& scores, const at::Tensor& labels, int64_t num_labels,
                                   int64_t k);

}  // namespace ops
}  // namespace clipfast
