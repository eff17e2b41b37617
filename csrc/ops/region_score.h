// region_score torch glue shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include "common/region_score_common.h"

namespace clipfast {
namespace ops {

struct RegionScoreCall {
  at::Tensor images, regions, text;  // contiguous, one dtype (fp32 or bf16): [B, D], [B, M, D], [C, D]
  at::Tensor valid;                  // contiguous [B, M] as uint8
  // Allocated outputs.
  at::Tensor image_label, image_prob, region_label, region_prob, region_image_prob, discrepancy;
  RegionScoreParams params;
};

RegionScoreCall prepare_region_score(const at::Tensor& image_embeddings, const at::Tensor& region_embeddings,
                                     const at::Tensor& region_valid, const at::Tensor& text_embeddings,
                                     double logit_scale);

}  // namespace ops
}  // namespace clipfast
