// region_score CUDA core: torch-free launcher (raw pointers + stream). Same semantics as
// clipfast/ops/reference.py (region_score); see DESIGN.md section 3.
//
// Numerics: logits are logit_scale * dot(row, text_c) * inv_norm(row) * inv_norm(text_c), inverse
// L2 norms in fp32 (1 / max(norm, 1e-12), as F.normalize). The dot products run on tensor cores
// with fp32 accumulation: bf16 inputs use bf16 WMMA (16x16x16), whose products of bf16 values are
// exact, so they match the reference (which upcasts bf16 to fp32) up to fp32 summation order; fp32
// inputs use 3xTF32 WMMA (16x16x8; each operand split into a TF32 high part and a TF32 remainder,
// hi*hi + hi*lo + lo*hi), giving about fp32 accuracy (~1e-6 relative on a dot product, versus ~1e-3
// for plain TF32). Probabilities therefore agree with the fp32 reference to ~1e-5 at CLIP's logit
// scale of 100; labels can differ only where two classes' logits tie to within that.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/bf16.h"
#include "../common/region_score_common.h"

namespace clipfast {
namespace cuda {

// Scratch memory region_score needs (inverse norms, per-row partial softmax states of the class
// splits, each region's logit for its image's label); depends on the shape only. Requires
// params.classes >= 1 and < 2^31.
size_t region_score_workspace_bytes(const RegionScoreParams& params);

// images [B, D]; regions [B, M, D]; valid [B, M] (0 / nonzero); text [C, D] (T: float | bf16, all
// contiguous device memory). Outputs: image_label [B], image_prob [B], region_label [B, M] (-1 for
// invalid regions), region_prob [B, M], region_image_prob [B, M] (0 for invalid regions),
// discrepancy [B]. workspace: region_score_workspace_bytes(params) bytes of device memory, 16-byte
// aligned (its contents need no initialisation).
template <typename T>
cudaError_t region_score(const T* images, const T* regions, const uint8_t* valid, const T* text,
                         int64_t* image_label, float* image_prob, int64_t* region_label, float* region_prob,
                         float* region_image_prob, float* discrepancy, void* workspace,
                         size_t workspace_bytes, const RegionScoreParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace clipfast
