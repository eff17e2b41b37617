// region_score CPU core: torch-free pieces around the logit GEMM (which the glue runs tile by tile
// with ATen's CPU BLAS so that [B, M, C] never exists): inverse norms, the softmax reduction of a
// tile of raw dot products, and the per-image finish (region probability of the image's label,
// discrepancy).
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/bf16.h"
#include "../common/region_score_common.h"

namespace clipfast {
namespace cpu {

// The softmax loops vectorise only when GCC may ignore signed zeros, FP traps and errno, which
// nothing here relies on; scoped to these two functions (region_topk relies on signed zeros).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-signed-zeros", "no-trapping-math", "no-math-errno")
#endif

// exp(x) for x <= 0 to ~2e-7 relative error, branch-free so the loops around it vectorise
// (libm's expf does not). Inputs below -69 return 2^-100, nothing beside a softmax sum >= 1.
inline float exp_nonpositive(float x) {
  const float scaled = x * 1.44269504f;                  // log2(e) * x
  const float t = scaled > -100.f ? scaled : -100.f;     // keeps results normal (subnormals are slow)
  const int n = static_cast<int>(t + 128.5f) - 128;     // round(t) without a libm call
  const float f = (t - static_cast<float>(n)) * 0.693147181f;  // |f| <= ln2 / 2
  const float poly =
      1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
  return poly * __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
}

// out[i] = 1 / ||x[i]|| (0 for a zero row) for rows of length dim, in fp32.
template <typename T>
void inverse_norms(const T* x, int64_t rows, int64_t dim, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = x + i * dim;
    float sum = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float v = to_float(row[d]);
      sum += v * v;
    }
    out[i] = sum > 0.f ? 1.f / std::sqrt(sum) : 0.f;
  }
}

// Softmax state of each of `rows` rows of raw dot products dots[rows, classes] (overwritten with the
// logits): logit = row_scale[r] * dot * text_inv_norm[c]. The three loops are SIMD loops.
inline void softmax_rows(float* dots, int64_t rows, int64_t classes, const float* row_scale,
                         const float* text_inv_norm, SoftmaxState* states) {
  for (int64_t r = 0; r < rows; ++r) {
    float* logits = dots + r * classes;
    const float s = row_scale[r];
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) logits[c] = s * logits[c] * text_inv_norm[c];
    float top = -3.402823466e38f;
#pragma omp simd reduction(max : top)
    for (int64_t c = 0; c < classes; ++c) top = logits[c] > top ? logits[c] : top;
    int64_t argmax = 0;
    while (argmax < classes - 1 && logits[argmax] != top) ++argmax;  // first index of the max
    float sum = 0.f, poison = 0.f;
#pragma omp simd reduction(+ : sum, poison)
    for (int64_t c = 0; c < classes; ++c) {
      sum += exp_nonpositive(logits[c] - top);
      poison += logits[c] - logits[c];  // NaN when a logit is NaN or inf: max and exp_nonpositive would hide it
    }
    if (poison != 0.f) sum = top = poison;  // the row's probabilities become NaN, as in the reference
    states[r] = SoftmaxState{top, argmax, sum};
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Outputs of images [lo, hi) from their softmax states: image and region labels/probabilities,
// each valid region's probability for the image's label (one dot product) and the discrepancy.
template <typename T>
void region_score_finish(const T* regions, const uint8_t* valid, const T* text, const float* region_inv_norm,
                         const float* text_inv_norm, const SoftmaxState* image_states,
                         const SoftmaxState* region_states, const RegionScoreParams& p, int64_t lo, int64_t hi,
                         int64_t* image_label, float* image_prob, int64_t* region_label, float* region_prob,
                         float* region_image_prob, float* discrepancy) {
  const int64_t M = p.regions, D = p.dim;
  for (int64_t b = lo; b < hi; ++b) {
    const SoftmaxState& img = image_states[b];
    const int64_t label = img.argmax;
    image_label[b] = label;
    image_prob[b] = 1.f / img.sum;  // exp(max - max) / sum
    const T* label_text = text + label * D;
    float support = 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = b * M + m;
      if (!valid[i]) {
        region_label[i] = -1;
        region_prob[i] = 0.f;
        region_image_prob[i] = 0.f;
        continue;
      }
      const SoftmaxState& reg = region_states[i];
      region_label[i] = reg.argmax;
      region_prob[i] = 1.f / reg.sum;
      const T* row = regions + i * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += to_float(row[d]) * to_float(label_text[d]);
      const float logit = p.logit_scale * dot * region_inv_norm[i] * text_inv_norm[label];
      const float prob = std::exp(logit - reg.max) / reg.sum;
      region_image_prob[i] = prob;
      support = (prob > support || prob != prob) ? prob : support;  // a NaN region makes the max NaN, as in torch
    }
    discrepancy[b] = image_prob[b] - support;
  }
}

}  // namespace cpu
}  // namespace clipfast
