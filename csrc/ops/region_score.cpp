// region_score: input checks (shared with CUDA) and the CPU implementation: the logits are made
// tile by tile with ATen's fp32 matmul and reduced while in cache, so [B, M, C] never exists.
#include "region_score.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/region_score.h"

namespace clipfast {
namespace ops {

RegionScoreCall prepare_region_score(const at::Tensor& image_embeddings, const at::Tensor& region_embeddings,
                                     const at::Tensor& region_valid, const at::Tensor& text_embeddings,
                                     double logit_scale) {
  TORCH_CHECK(image_embeddings.dim() == 2 && region_embeddings.dim() == 3 && region_valid.dim() == 2 &&
                  text_embeddings.dim() == 2,
              "region_score: expected image [B, D], regions [B, M, D], valid [B, M], text [C, D]; got ",
              image_embeddings.sizes(), ", ", region_embeddings.sizes(), ", ", region_valid.sizes(), ", ",
              text_embeddings.sizes());
  const int64_t B = image_embeddings.size(0), D = image_embeddings.size(1);
  TORCH_CHECK(region_embeddings.size(0) == B && region_embeddings.size(2) == D,
              "region_score: region_embeddings ", region_embeddings.sizes(), " do not match image_embeddings ",
              image_embeddings.sizes());
  TORCH_CHECK(region_valid.size(0) == B && region_valid.size(1) == region_embeddings.size(1),
              "region_score: region_valid ", region_valid.sizes(), " must be [B, M]");
  TORCH_CHECK(text_embeddings.size(0) >= 1 && text_embeddings.size(1) == D,
              "region_score: text_embeddings must be [C >= 1, ", D, "], got ", text_embeddings.sizes());
  const auto dtype = image_embeddings.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && region_embeddings.scalar_type() == dtype &&
                  text_embeddings.scalar_type() == dtype,
              "region_score: embeddings must all be float32 or all bfloat16");
  TORCH_CHECK(region_valid.scalar_type() == at::kBool || region_valid.scalar_type() == at::kByte,
              "region_score: region_valid must be bool or uint8, got ", region_valid.scalar_type());
  for (const at::Tensor* t : {&region_embeddings, &region_valid, &text_embeddings})
    TORCH_CHECK(t->device() == image_embeddings.device(), "region_score: all inputs must be on ",
                image_embeddings.device());
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0, "region_score: logit_scale must be positive");

  RegionScoreCall call;
  RegionScoreParams& p = call.params;
  p.batch = B;
  p.regions = region_embeddings.size(1);
  p.classes = text_embeddings.size(0);
  p.dim = D;
  p.logit_scale = static_cast<float>(logit_scale);
  call.images = image_embeddings.contiguous();
  call.regions = region_embeddings.contiguous();
  call.text = text_embeddings.contiguous();
  call.valid = region_valid.contiguous().to(at::kByte);
  const auto opts = image_embeddings.options();
  call.image_label = at::empty({B}, opts.dtype(at::kLong));
  call.image_prob = at::empty({B}, opts.dtype(at::kFloat));
  call.region_label = at::empty({B, p.regions}, opts.dtype(at::kLong));
  call.region_prob = at::empty({B, p.regions}, opts.dtype(at::kFloat));
  call.region_image_prob = at::empty({B, p.regions}, opts.dtype(at::kFloat));
  call.discrepancy = at::empty({B}, opts.dtype(at::kFloat));
  return call;
}

namespace {

constexpr int64_t kRowTile = 1024;  // rows per GEMM: 1024 x C fp32 logits (4 MB at C = 1000)

// Softmax states of `rows` rows of x [rows, D] against text_t [D, C] fp32 (pre-transposed). Tile by
// tile: one fp32 BLAS call using every thread (bf16 rows widened first, as the reference computes
// in fp32), then the rows of the tile reduced in parallel while the logits are still in cache.
template <typename T>
void softmax_states(const T* x, int64_t rows, const at::Tensor& text_t, const float* row_inv_norm,
                    const float* text_inv_norm, const RegionScoreParams& p, SoftmaxState* states) {
  const int64_t C = p.classes, D = p.dim;
  at::Tensor dots = at::empty({std::min(kRowTile, rows), C}, text_t.options());
  at::Tensor widened = std::is_same_v<T, float> ? at::Tensor() : at::empty({std::min(kRowTile, rows), D},
                                                                             text_t.options());
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t n = std::min(kRowTile, rows - r0);
    at::Tensor block;
    if constexpr (std::is_same_v<T, float>) {
      block = at::from_blob(const_cast<float*>(x + r0 * D), {n, D}, text_t.options());
    } else {
      float* w = widened.mutable_data_ptr<float>();
      at::parallel_for(0, n * D, 1 << 14, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) w[i] = to_float(x[r0 * D + i]);
      });
      block = widened.narrow(0, 0, n);
    }
    at::Tensor out = dots.narrow(0, 0, n);
    at::mm_out(out, block, text_t);
    float* logits = out.mutable_data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> row_scale(hi - lo);
      for (int64_t r = lo; r < hi; ++r) row_scale[r - lo] = p.logit_scale * row_inv_norm[r0 + r];
      cpu::softmax_rows(logits + lo * C, hi - lo, C, row_scale.data(), text_inv_norm, states + r0 + lo);
    });
  }
}

template <typename T>
void region_score_cpu_typed(RegionScoreCall& call) {
  const RegionScoreParams& p = call.params;
  const int64_t B = p.batch, M = p.regions, C = p.classes, D = p.dim;
  const T* images = static_cast<const T*>(call.images.const_data_ptr());
  const T* regions = static_cast<const T*>(call.regions.const_data_ptr());
  const T* text = static_cast<const T*>(call.text.const_data_ptr());
  std::vector<float> image_inv(B), region_inv(B * M), text_inv(C);
  auto norms = [](const T* x, int64_t rows, int64_t dim, float* out) {
    at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) { cpu::inverse_norms(x + lo * dim, hi - lo, dim, out + lo); });
  };
  norms(images, B, D, image_inv.data());
  norms(regions, B * M, D, region_inv.data());
  norms(text, C, D, text_inv.data());
  std::vector<SoftmaxState> image_states(B), region_states(B * M);
  const at::Tensor text_t = call.text.to(at::kFloat).t().contiguous();  // [D, C]
  softmax_states(images, B, text_t, image_inv.data(), text_inv.data(), p, image_states.data());
  softmax_states(regions, B * M, text_t, region_inv.data(), text_inv.data(), p, region_states.data());
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    cpu::region_score_finish(regions, call.valid.const_data_ptr<uint8_t>(), text, region_inv.data(), text_inv.data(),
                             image_states.data(), region_states.data(), p, lo, hi,
                             call.image_label.mutable_data_ptr<int64_t>(), call.image_prob.mutable_data_ptr<float>(),
                             call.region_label.mutable_data_ptr<int64_t>(), call.region_prob.mutable_data_ptr<float>(),
                             call.region_image_prob.mutable_data_ptr<float>(),
                             call.discrepancy.mutable_data_ptr<float>());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_score_cpu(
    const at::Tensor& image_embeddings, const at::Tensor& region_embeddings, const at::Tensor& region_valid,
    const at::Tensor& text_embeddings, double logit_scale) {
  RegionScoreCall call =
      prepare_region_score(image_embeddings, region_embeddings, region_valid, text_embeddings, logit_scale);
  if (call.images.scalar_type() == at::kFloat) region_score_cpu_typed<float>(call);
  else region_score_cpu_typed<bf16>(call);
  return {call.image_label, call.image_prob, call.region_label, call.region_prob, call.region_image_prob,
          call.discrepancy};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CPU, m) { m.impl("region_score", &region_score_cpu); }

}  // namespace ops
}  // namespace clipfast
