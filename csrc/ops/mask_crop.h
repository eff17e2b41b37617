// mask_crop torch glue shared by the CPU and CUDA implementations: input checks with clear
// messages, the core's parameter block, and the output allocation.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/mask_crop_common.h"

namespace clipfast {
namespace ops {

struct MaskCropCall {
  at::Tensor images, masks;        // contiguous inputs
  at::Tensor crops, boxes, valid;  // allocated outputs
  MaskCropParams params;
};

MaskCropCall prepare_mask_crop(const at::Tensor& images, const at::Tensor& masks, int64_t out_size,
                               double margin, bool square, double background, at::ArrayRef<double> mean,
                               at::ArrayRef<double> std, at::ScalarType out_dtype);

}  // namespace ops
}  // namespace clipfast
