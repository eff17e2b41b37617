// mask_pool CUDA core: torch-free launcher (raw pointers + stream). Same semantics as the CPU core in
// ../cpu/mask_pool.h and clipfast/ops/reference.py (mask_pool); see DESIGN.md section 3.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/bf16.h"
#include "../common/mask_pool_common.h"

namespace clipfast {
namespace cuda {

// Threads per block of the mask_pool kernel.
constexpr int kMaskPoolThreads = 256;

// Dynamic shared memory (bytes) one mask_pool block needs, choosing the fastest layout that fits
// in `max_shared_bytes` (the device's opt-in limit per block, cudaDevAttrMaxSharedMemoryPerBlockOptin):
// per-patch counts, the covered-patch list and the normalised weights of every head (P * (2 + heads)
// * 4 bytes), or without the weights (P * 2 * 4 bytes; weights are then recomputed from the logits
// while pooling, slower). Returns 0 when not even that fits (P too large for this device): the glue
// reports it. `*weights_in_shared` (optional) says which layout was picked.
size_t mask_pool_shared_bytes(const MaskPoolParams& params, size_t max_shared_bytes,
                              bool* weights_in_shared = nullptr);

// features [B, P, D]; masks [B, M, mask_h, row_bytes] uint8 (0 / nonzero per pixel, or bit-packed
// when params.packed); logits [B, heads, P] fp32 or nullptr (params.has_logits); pooled [B, M, D];
// valid [B, M] (1 where the mask covers at least one pixel). All contiguous device memory.
// T: float | bf16. Requires mask_h * row_bytes < 2^31 and P < 2^31 (checked by the glue); returns
// cudaErrorInvalidValue when shared memory cannot hold one block's state (see above).
template <typename T>
cudaError_t mask_pool(const T* features, const uint8_t* masks, const float* logits, T* pooled,
                      uint8_t* valid, const MaskPoolParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
