// mask_pool: input checks (shared with CUDA) and the CPU implementation.
#include "mask_pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/bf16.h"
#include "cpu/mask_pool.h"

namespace clipfast {
namespace ops {

MaskPoolCall prepare_mask_pool(const at::Tensor& features, const at::Tensor& masks,
                               const std::optional<at::Tensor>& logits, int64_t grid_h, int64_t grid_w,
                               int64_t packed_width) {
  TORCH_CHECK(features.dim() == 3, "mask_pool: features must be [B, P, D], got shape ", features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kBFloat16,
              "mask_pool: features must be float32 or bfloat16, got ", features.scalar_type());
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "mask_pool: grid must be positive, got ", grid_h, "x", grid_w);
  TORCH_CHECK(features.size(1) == grid_h * grid_w, "mask_pool: features have ", features.size(1),
              " tokens but the grid has ", grid_h * grid_w, " patches");
  TORCH_CHECK(masks.dim() == 4 && masks.size(0) == features.size(0), "mask_pool: masks must be [B=",
              features.size(0), ", M, H, W], got ", masks.sizes());
  TORCH_CHECK(masks.device() == features.device(), "mask_pool: features are on ", features.device(),
              " but masks on ", masks.device());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "mask_pool: masks must be bool or uint8, got ", masks.scalar_type());
  TORCH_CHECK(packed_width >= 0, "mask_pool: packed_width must be >= 0, got ", packed_width);
  const bool packed = packed_width > 0;
  const int64_t mask_w = packed ? packed_width : masks.size(3);
  TORCH_CHECK(!packed || (masks.scalar_type() == at::kByte && masks.size(3) == (packed_width + 7) / 8),
              "mask_pool: bit-packed masks of width ", packed_width, " need ", (packed_width + 7) / 8,
              " uint8 bytes per row, got ", masks.sizes(), " ", masks.scalar_type());
  TORCH_CHECK(masks.size(2) > 0 && mask_w > 0 && masks.size(2) % grid_h == 0 && mask_w % grid_w == 0,
              "mask_pool: mask size ", masks.size(2), "x", mask_w, " is not a multiple of the ", grid_h, "x",
              grid_w, " patch grid");

  MaskPoolCall call;
  MaskPoolParams& p = call.params;
  p.batch = features.size(0);
  p.masks = masks.size(1);
  p.patches = features.size(1);
  p.dim = features.size(2);
  p.heads = 1;
  p.has_logits = logits.has_value();
  if (p.has_logits) {
    const at::Tensor& l = *logits;
    TORCH_CHECK(l.dim() == 3 && l.size(0) == p.batch && l.size(2) == p.patches && l.size(1) >= 1 &&
                    p.dim % l.size(1) == 0,
                "mask_pool: logits must be [B, heads, P] with heads dividing D=", p.dim, ", got ", l.sizes());
    TORCH_CHECK(l.is_floating_point() && l.device() == features.device(),
                "mask_pool: logits must be floating point on ", features.device());
    p.heads = l.size(1);
    call.logits = l.to(at::kFloat).contiguous();
  }
  p.grid_h = grid_h;
  p.grid_w = grid_w;
  p.mask_h = masks.size(2);
  p.mask_w = mask_w;
  p.patch_h = p.mask_h / grid_h;
  p.patch_w = mask_w / grid_w;
  p.row_bytes = masks.size(3);
  p.packed = packed;

  call.features = features.contiguous();
  call.masks = masks.scalar_type() == at::kBool ? masks.contiguous().view(at::kByte) : masks.contiguous();
  call.pooled = at::empty({p.batch, p.masks, p.dim}, features.options());
  call.valid = at::empty({p.batch, p.masks}, features.options().dtype(at::kBool));
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor> mask_pool_cpu(const at::Tensor& features, const at::Tensor& masks,
                                                 const std::optional<at::Tensor>& logits, int64_t grid_h,
                                                 int64_t grid_w, int64_t packed_width) {
  MaskPoolCall call = prepare_mask_pool(features, masks, logits, grid_h, grid_w, packed_width);
  auto parallel = [](int64_t begin, int64_t end, auto&& fn) { at::parallel_for(begin, end, 1, fn); };
  const float* logit_data = call.params.has_logits ? call.logits.const_data_ptr<float>() : nullptr;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    cpu::mask_pool(static_cast<const T*>(call.features.const_data_ptr()),
                   call.masks.const_data_ptr<uint8_t>(), logit_data,
                   static_cast<T*>(call.pooled.mutable_data_ptr()),
                   static_cast<uint8_t*>(call.valid.mutable_data_ptr()), call.params, parallel);
  };
  if (call.features.scalar_type() == at::kFloat) run(float{});
  else run(bf16{});
  return {call.pooled, call.valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CPU, m) { m.impl("mask_pool", &mask_pool_cpu); }

}  // namespace ops
}  // namespace clipfast
