// region_patches torch glue shared by the CPU and CUDA implementations: input checks, the core's
// parameter block, and the two-pass allocation (selection buffers first; the packed outputs once the
// number of kept patches is known).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/region_patches_common.h"

namespace clipfast {
namespace ops {

struct RegionPatchesCall {
  at::Tensor images, masks;   // contiguous inputs; masks as uint8
  at::Tensor kept, lengths;   // pass-1 outputs: [B * M, P] uint8, [B * M] int64
  at::Tensor offsets;         // [B * M + 1] int64, set by finish_selection
  at::Tensor pixels, image_index, patch_index;  // packed outputs, allocated by finish_selection
  RegionPatchesParams params;
};

RegionPatchesCall prepare_region_patches(const at::Tensor& images, const at::Tensor& masks, int64_t grid_h,
                                         int64_t grid_w, int64_t min_pixels, double background,
                                         at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                         at::ScalarType out_dtype, int64_t packed_width);

// After pass 1: offsets = exclusive scan of lengths, and the outputs sized by its total (a host read
// of one number: on a GPU the one synchronisation of the op).
void finish_selection(RegionPatchesCall& call, at::ScalarType out_dtype);

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const RegionPatchesCall& call) {
  return {call.pixels, call.image_index, call.patch_index, call.offsets};
}

}  // namespace ops
}  // namespace clipfast
