// region_patches: input checks (shared with CUDA) and the CPU implementation.
#include "region_patches.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/region_patches.h"
#include "dispatch.h"

namespace clipfast {
namespace ops {

RegionPatchesCall prepare_region_patches(const at::Tensor& images, const at::Tensor& masks, int64_t grid_h,
                                         int64_t grid_w, int64_t min_pixels, double background,
                                         at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                         at::ScalarType out_dtype, int64_t packed_width) {
  TORCH_CHECK(images.dim() == 4 && masks.dim() == 4, "region_patches: images must be [B, C, H, W] and masks "
              "[B, M, H, W], got ", images.sizes(), " and ", masks.sizes());
  const auto in_type = images.scalar_type();
  TORCH_CHECK(in_type == at::kByte || in_type == at::kFloat || in_type == at::kBFloat16,
              "region_patches: images must be uint8, float32 or bfloat16, got ", in_type);
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "region_patches: masks must be bool or uint8, got ", masks.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "region_patches: out_dtype must be float32 or bfloat16, got ", out_dtype);
  TORCH_CHECK(images.device() == masks.device(), "region_patches: images are on ", images.device(),
              " but masks on ", masks.device());
  const int64_t channels = images.size(1), height = images.size(2), width = images.size(3);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, "region_patches: images must have 1 to ", kMaxChannels,
              " channels, got ", channels);
  TORCH_CHECK(packed_width == 0 || packed_width == width, "region_patches: packed_width must be 0 or the "
              "images' width ", width, ", got ", packed_width);
  const int64_t row_bytes = packed_width ? (width + 7) / 8 : width;
  TORCH_CHECK(masks.size(0) == images.size(0) && masks.size(2) == height && masks.size(3) == row_bytes &&
                  (!packed_width || masks.scalar_type() == at::kByte),
              "region_patches: masks ", masks.sizes(), " ", masks.scalar_type(), " do not match images ",
              images.sizes(), packed_width ? " (bit-packed: uint8 [B, M, H, ceil(W / 8)])" : "");
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1 && height > 0 && width > 0 && height % grid_h == 0 && width % grid_w == 0,
              "region_patches: image size ", height, "x", width, " is not a multiple of the ", grid_h, "x", grid_w,
              " patch grid");
  TORCH_CHECK(min_pixels >= 1, "region_patches: min_pixels must be >= 1, got ", min_pixels);
  TORCH_CHECK(std::isfinite(background), "region_patches: background must be finite");
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std.size()) == channels,
              "region_patches: mean and std need one value per channel (", channels, ")");

  RegionPatchesCall call;
  RegionPatchesParams& p = call.params;
  MaskPoolParams& g = p.grid;
  g.batch = images.size(0);
  g.masks = masks.size(1);
  g.grid_h = grid_h;
  g.grid_w = grid_w;
  g.patches = grid_h * grid_w;
  g.dim = 0;
  g.heads = 1;
  g.mask_h = height;
  g.mask_w = width;
  g.patch_h = height / grid_h;
  g.patch_w = width / grid_w;
  g.row_bytes = row_bytes;
  g.packed = packed_width > 0;
  g.has_logits = false;
  p.channels = channels;
  p.min_pixels = static_cast<int32_t>(std::min<int64_t>(min_pixels, g.patch_h * g.patch_w));
  p.input_scale = in_type == at::kByte ? 1.f / 255.f : 1.f;
  p.background = static_cast<float>(background);
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK(std::isfinite(mean[c]) && std::isfinite(std[c]) && std[c] > 0, "region_patches: mean must be "
                "finite and std positive, got mean ", mean[c], " std ", std[c], " for channel ", c);
    p.mean[c] = static_cast<float>(mean[c]);
    p.inv_std[c] = static_cast<float>(1.0 / std[c]);
  }

  call.images = images.contiguous();
  call.masks = masks.scalar_type() == at::kBool ? masks.contiguous().view(at::kByte) : masks.contiguous();
  const auto index = images.options().dtype(at::kLong);
  call.kept = at::empty({g.batch * g.masks, g.patches}, images.options().dtype(at::kByte));
  call.lengths = at::empty({g.batch * g.masks}, index);
  return call;
}

void finish_selection(RegionPatchesCall& call, at::ScalarType out_dtype) {
  const RegionPatchesParams& p = call.params;
  call.offsets = at::zeros({call.lengths.size(0) + 1}, call.lengths.options());
  call.offsets.slice(0, 1).copy_(at::cumsum(call.lengths, 0));
  const int64_t tokens = call.offsets[-1].item<int64_t>();
  call.pixels = at::empty({tokens, p.channels, p.grid.patch_h, p.grid.patch_w}, call.images.options().dtype(out_dtype));
  call.image_index = at::empty({tokens}, call.lengths.options());
  call.patch_index = at::empty({tokens}, call.lengths.options());
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_patches_cpu(
    const at::Tensor& images, const at::Tensor& masks, int64_t grid_h, int64_t grid_w, int64_t min_pixels,
    double background, at::ArrayRef<double> mean, at::ArrayRef<double> std, at::ScalarType out_dtype,
    int64_t packed_width) {
  RegionPatchesCall call = prepare_region_patches(images, masks, grid_h, grid_w, min_pixels, background, mean, std,
                                                  out_dtype, packed_width);
  auto parallel = [](int64_t begin, int64_t end, auto&& fn) { at::parallel_for(begin, end, 1, fn); };
  const uint8_t* mask_data = call.masks.const_data_ptr<uint8_t>();
  cpu::region_patch_select(mask_data, call.params, call.kept.mutable_data_ptr<uint8_t>(),
                           call.lengths.mutable_data_ptr<int64_t>(), parallel);
  finish_selection(call, out_dtype);
  dispatch_in_out(call.images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    cpu::region_patch_fill(static_cast<const In*>(call.images.const_data_ptr()), mask_data,
                           call.kept.const_data_ptr<uint8_t>(), call.offsets.const_data_ptr<int64_t>(), call.params,
                           static_cast<Out*>(call.pixels.mutable_data_ptr()),
                           call.image_index.mutable_data_ptr<int64_t>(), call.patch_index.mutable_data_ptr<int64_t>(),
                           parallel);
  });
  return outputs(call);
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CPU, m) { m.impl("region_patches", &region_patches_cpu); }

}  // namespace ops
}  // namespace clipfast
