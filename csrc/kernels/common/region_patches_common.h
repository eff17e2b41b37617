// region_patches' parameters and the token-selection rule every backend shares
// (clipfast/ops/reference.py: region_patch_keep, region_patches).
#pragma once
#include <cstdint>

#include "macros.h"
#include "mask_crop_common.h"  // kMaxChannels
#include "mask_pool_common.h"  // MaskPoolParams, mask_pixel

namespace clipfast {

struct RegionPatchesParams {
  // The mask geometry in mask_pool's parameter block (batch, masks, patches, grid_h/w, mask_h/w,
  // patch_h/w, row_bytes, packed; dim and heads unused), so that mask_pool's coverage cores
  // (cpu::patch_counts, cuda::mask_counts::count_mask) serve this op unchanged.
  MaskPoolParams grid;
  int64_t channels;    // C (<= kMaxChannels); images are [B, C, mask_h, mask_w]
  int32_t min_pixels;  // a patch is kept from this many mask pixels on (>= 1; see keep_threshold)
  float input_scale;   // 1/255 for uint8 images, 1 for float images
  float background;    // fill outside the mask, in input_scale'd units (before normalisation)
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];
};

// The count a patch needs to be kept in a region whose best-covered patch has `best` pixels: the
// op's min_pixels, lowered to `best` when no patch reaches it (a small region keeps its
// best-covered patch(es) rather than vanishing). An empty region (best 0) keeps nothing.
CLIPFAST_HD int32_t keep_threshold(int32_t min_pixels, int32_t best) { return best < min_pixels ? best : min_pixels; }

CLIPFAST_HD bool keep_patch(int32_t count, int32_t threshold) { return count > 0 && count >= threshold; }

}  // namespace clipfast
