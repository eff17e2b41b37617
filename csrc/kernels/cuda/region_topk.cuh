// region_topk CUDA core: torch-free launcher (raw pointers + stream). Same semantics as
// clipfast/ops/reference.py (region_topk): per-label counts and the k best entries per label (higher
// score first, ties to the lower index, via rank_key in ../common/region_topk_common.h).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/region_topk_common.h"

namespace clipfast {
namespace cuda {

constexpr int64_t kRegionTopkMaxK = 1024;                      // k per label
constexpr int64_t kRegionTopkMaxEntries = 0xFFFFFFFFll;        // N: indices must fit rank_key's 32 bits
constexpr int64_t kRegionTopkMaxLabels = 0x7FFFFFFFll - 1;     // num_labels

// Scratch memory region_topk needs: ~8 bytes per entry (the bucketed rank keys) + 20 bytes per label
// + the per-segment candidates of labels split over several blocks (<= 2 * ceil(N / segment) * k
// keys, segment >= 16384). Its contents need no initialisation.
size_t region_topk_workspace_bytes(int64_t n, int64_t num_labels, int64_t k);

// scores [N] fp32; labels [N] int64 (entries with a label outside [0, num_labels) are ignored);
// counts [num_labels] int64; indices [num_labels, k] int64 (best first, -1 past a label's count).
// All contiguous device memory; workspace: region_topk_workspace_bytes(...) bytes, 16-byte aligned.
// Requires 0 <= k <= kRegionTopkMaxK, N <= kRegionTopkMaxEntries, num_labels <= kRegionTopkMaxLabels
// (cudaErrorInvalidValue otherwise).
cudaError_t region_topk(const float* scores, const int64_t* labels, int64_t n, int64_t num_labels, int64_t k,
                        int64_t* counts, int64_t* indices, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
