// mask_pool torch glue shared by the CPU and CUDA implementations: input checks, the core's
// parameter block and the output allocation.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/mask_pool_common.h"

namespace clipfast {
namespace ops {

struct MaskPoolCall {
  at::Tensor features, masks;   // contiguous; masks as uint8
  at::Tensor logits;            // contiguous fp32 [B, heads, P], undefined without logits
  at::Tensor pooled, valid;     // allocated outputs: [B, M, D] features' dtype, [B, M] bool
  MaskPoolParams params;
};

MaskPoolCall prepare_mask_pool(const at::Tensor& features, const at::Tensor& masks,
                               const std::optional<at::Tensor>& logits, int64_t grid_h, int64_t grid_w,
                               int64_t packed_width);

}  // namespace ops
}  // namespace clipfast
