// region_patches CUDA core: torch-free launchers (raw pointers + stream), the two passes of the CPU
// core in ../cpu/region_patches.h with the same semantics (clipfast/ops/reference.py: region_patches).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/bf16.h"
#include "../common/region_patches_common.h"

namespace clipfast {
namespace cuda {

// Dynamic shared memory one block of either pass needs (P ints), or 0 when it exceeds
// max_shared_bytes (the device's opt-in limit per block): the glue reports it.
size_t region_patches_shared_bytes(const RegionPatchesParams& params, size_t max_shared_bytes);

// Pass 1. masks [B, M, mask_h, row_bytes] uint8; kept [B * M, P] out (0 / 1); lengths [B * M] out.
cudaError_t region_patch_select(const uint8_t* masks, const RegionPatchesParams& params, uint8_t* kept,
                                int64_t* lengths, cudaStream_t stream);

// Pass 2. images [B, C, mask_h, mask_w]; offsets [B * M + 1] (exclusive scan of lengths, on the
// device); pixels [T, C, patch_h, patch_w], image_index [T], patch_index [T] out.
// In: uint8_t | float | bf16; Out: float | bf16.
template <typename In, typename Out>
cudaError_t region_patch_fill(const In* images, const uint8_t* masks, const uint8_t* kept, const int64_t* offsets,
                              const RegionPatchesParams& params, Out* pixels, int64_t* image_index,
                              int64_t* patch_index, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
