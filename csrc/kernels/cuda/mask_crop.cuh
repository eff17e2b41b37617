// mask_crop CUDA core: torch-free launcher (raw pointers + stream). Same semantics as the CPU core
// in ../cpu/mask_crop.h; see DESIGN.md section 3.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/bf16.h"
#include "../common/mask_crop_common.h"

namespace clipfast {
namespace cuda {

// images [B, C, H, W]; masks [B, M, H, W] (0 / nonzero); out [B, M, C, S, S]; boxes [B, M];
// valid [B, M]; all contiguous device memory. In: uint8_t | float | bf16; Out: float | bf16.
template <typename In, typename Out>
cudaError_t mask_crop(const In* images, const uint8_t* masks, Out* out, Box* boxes, uint8_t* valid,
                      const MaskCropParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
