// region_score's parameters and the online-softmax state every backend reduces with.
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace clipfast {

struct RegionScoreParams {
  int64_t batch;      // B images
  int64_t regions;    // M regions per image
  int64_t classes;    // C labels
  int64_t dim;        // D embedding width
  float logit_scale;  // softmax temperature (CLIP's exp(logit_scale))
};

// Softmax over a row of logits seen piece by piece: running max, its index (lowest on ties) and
// sum of exp(logit - max). Merging two states is associative, so tiles can be reduced in any order.
struct SoftmaxState {
  float max;
  int64_t argmax;
  float sum;
};

// argmax < 0 marks a state that has seen nothing.
CLIPFAST_HD SoftmaxState softmax_empty() { return SoftmaxState{0.f, -1, 0.f}; }

CLIPFAST_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  if (b.argmax < 0) return a;
  if (a.argmax < 0) return b;
  const bool b_wins = b.max > a.max || (b.max == a.max && b.argmax < a.argmax);
  const SoftmaxState& hi = b_wins ? b : a;
  const SoftmaxState& lo = b_wins ? a : b;
#if defined(__CUDA_ARCH__)
  const float scaled = lo.sum * __expf(lo.max - hi.max);
#else
  const float scaled = lo.sum * std::exp(lo.max - hi.max);
#endif
  return SoftmaxState{hi.max, hi.argmax, hi.sum + scaled};
}

CLIPFAST_HD SoftmaxState softmax_push(SoftmaxState s, float logit, int64_t index) {
  return softmax_merge(s, SoftmaxState{logit, index, 1.f});
}

}  // namespace clipfast
