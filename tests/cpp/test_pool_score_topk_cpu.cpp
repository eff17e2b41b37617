// Unit tests of the torch-free mask_pool, region_score and region_topk CPU cores (run by ctest).
// The full comparisons against the PyTorch reference live in tests/test_mask_pool.py,
// tests/test_region_score.py and tests/test_region_topk.py; these pin the shared rules: patch
// counting (plain and bit-packed), the online-softmax merge, the fast exp, and top-k ranking (ties
// to the lower index, NaN lowest, -0 == +0).
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/mask_pool.h"
#include "cpu/region_score.h"
#include "cpu/region_topk.h"
#include "expect.h"

namespace {

using cpp_tests::expect;
using cpp_tests::failures;
using cpp_tests::serial;

void test_mask_pool_counts_and_weights() {
  using clipfast::MaskPoolParams;
  // One image, 2x2 grid of 2x3-pixel patches, features [4 patches, 2 channels].
  MaskPoolParams p{};
  p.batch = 1; p.masks = 2; p.patches = 4; p.dim = 2; p.heads = 1; p.grid_h = 2; p.grid_w = 2;
  p.mask_h = 4; p.mask_w = 6; p.patch_h = 2; p.patch_w = 3; p.row_bytes = 6; p.packed = false;
  p.has_logits = false;
  const std::vector<float> features = {1, 10, 2, 20, 3, 30, 4, 40};
  std::vector<uint8_t> masks(2 * 4 * 6, 0);
  masks[0] = 1;                          // mask 0: one pixel of patch 0 ...
  for (int x = 3; x < 6; ++x) masks[6 * 3 + x] = 255;  // ... and three of patch 3
  std::vector<float> pooled(4);
  std::vector<uint8_t> valid(2);
  clipfast::cpu::mask_pool(features.data(), masks.data(), nullptr, pooled.data(), valid.data(), p, serial);
  expect(valid[0] == 1 && valid[1] == 0, "mask_pool: valid flags");
  expect(std::fabs(pooled[0] - (1 * 1 + 3 * 4) / 4.f) < 1e-6f, "mask_pool: count-weighted mean");
  expect(pooled[2] == 0.f && pooled[3] == 0.f, "mask_pool: empty mask pools to zeros");

  // The same masks bit-packed (1 byte per 6-pixel row) give the same result.
  MaskPoolParams q = p;
  q.packed = true; q.row_bytes = 1;
  std::vector<uint8_t> packed(2 * 4, 0);
  for (int i = 0; i < 2 * 4; ++i)
    for (int x = 0; x < 6; ++x) packed[i] |= (masks[i * 6 + x] != 0) << x;
  std::vector<float> pooled_packed(4);
  clipfast::cpu::mask_pool(features.data(), packed.data(), nullptr, pooled_packed.data(), valid.data(), q, serial);
  expect(pooled_packed == pooled, "mask_pool: bit-packed masks agree");

  // Logits: weight = count * exp(logit - max over covered patches); huge logits stay finite.
  MaskPoolParams r = p;
  r.has_logits = true;
  const std::vector<float> logits = {1000.f, 0.f, 0.f, 1000.f + std::log(2.f)};
  clipfast::cpu::mask_pool(features.data(), masks.data(), logits.data(), pooled.data(), valid.data(), r, serial);
  expect(std::fabs(pooled[0] - (1 * 1 + 6 * 4) / 7.f) < 1e-4f, "mask_pool: attention-weighted mean");
}

void test_softmax_pieces() {
  using namespace clipfast;
  float worst = 0.f;
  for (float x = -69.f; x <= 0.f; x += 0.013f)  // below -69.3 the result is clamped to 2^-100
    worst = std::fmax(worst, std::fabs(cpu::exp_nonpositive(x) - std::exp(x)) / std::exp(x));
  expect(worst < 1e-5f, "exp_nonpositive: relative error below 1e-5 on [-69, 0]");  // float rounding of x * log2(e)
  // Merging states in any grouping gives the full softmax; ties keep the lower index.
  const float logits[5] = {0.5f, 2.f, -1.f, 2.f, 1.f};
  SoftmaxState left = softmax_empty(), right = softmax_empty();
  for (int i = 0; i < 3; ++i) left = softmax_push(left, logits[i], i);
  for (int i = 3; i < 5; ++i) right = softmax_push(right, logits[i], i);
  const SoftmaxState both = softmax_merge(right, left);
  float sum = 0.f;
  for (float l : logits) sum += std::exp(l - 2.f);
  expect(both.argmax == 1 && both.max == 2.f, "softmax_merge: max and lowest argmax");
  expect(std::fabs(both.sum - sum) < 1e-5f, "softmax_merge: sum of exp");
}

void test_region_topk_ranking() {
  const float nan = std::nanf("");
  const std::vector<float> scores = {0.5f, 0.9f, 0.5f, nan, -0.f, 0.f, 0.9f, 0.1f};
  const std::vector<int64_t> labels = {0, 0, 0, 0, 1, 1, 7, -1};
  std::vector<int64_t> counts(2), indices(2 * 3);
  clipfast::cpu::region_topk(scores.data(), labels.data(), 8, 2, 3, counts.data(), indices.data(), serial);
  expect(counts[0] == 4 && counts[1] == 2, "region_topk: counts ignore out-of-range labels");
  expect(indices[0] == 1 && indices[1] == 0 && indices[2] == 2, "region_topk: ties to the lower index, NaN last");
  expect(indices[3] == 4 && indices[4] == 5 && indices[5] == -1, "region_topk: -0 ties +0, -1 padding");
}

}  // namespace

int main() {
  test_mask_pool_counts_and_weights();
  test_softmax_pieces();
  test_region_topk_ranking();
  if (failures == 0) std::printf("all pool/score/topk core tests passed\n");
  return failures == 0 ? 0 : 1;
}
