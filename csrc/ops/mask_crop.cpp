// mask_crop: input checks (shared with CUDA) and the CPU implementation.
#include "mask_crop.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/mask_crop.h"
#include "dispatch.h"

namespace clipfast {
namespace ops {

MaskCropCall prepare_mask_crop(const at::Tensor& images, const at::Tensor& masks, int64_t out_size,
                               double margin, bool square, double background, at::ArrayRef<double> mean,
                               at::ArrayRef<double> std, at::ScalarType out_dtype) {
  TORCH_CHECK(images.dim() == 4, "mask_crop: images must be [B, C, H, W], got shape ",
              images.sizes());
  TORCH_CHECK(masks.dim() == 4, "mask_crop: masks must be [B, M, H, W], got shape ", masks.sizes());
  TORCH_CHECK(images.size(0) == masks.size(0) && images.size(2) == masks.size(2) &&
                  images.size(3) == masks.size(3),
              "mask_crop: masks ", masks.sizes(), " do not match images ", images.sizes(),
              " (batch and H, W must agree)");
  TORCH_CHECK(images.device() == masks.device(), "mask_crop: images are on ", images.device(),
              " but masks on ", masks.device());
  const auto in_type = images.scalar_type();
  TORCH_CHECK(in_type == at::kByte || in_type == at::kFloat || in_type == at::kBFloat16,
              "mask_crop: images must be uint8, float32 or bfloat16, got ", in_type);
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "mask_crop: masks must be bool or uint8, got ", masks.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "mask_crop: out_dtype must be float32 or bfloat16, got ", out_dtype);
  const int64_t channels = images.size(1);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, "mask_crop: images must have 1 to ",
              kMaxChannels, " channels, got ", channels);
  TORCH_CHECK(out_size >= 1, "mask_crop: out_size must be positive, got ", out_size);
  TORCH_CHECK(std::isfinite(margin) && margin >= 0, "mask_crop: margin must be >= 0, got ", margin);
  TORCH_CHECK(std::isfinite(background), "mask_crop: background must be finite");
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels &&
                  static_cast<int64_t>(std.size()) == channels,
              "mask_crop: mean and std need one value per channel (", channels, "), got ",
              mean.size(), " and ", std.size());

  MaskCropCall call;
  MaskCropParams& p = call.params;
  p.batch = images.size(0);
  p.masks = masks.size(1);
  p.channels = channels;
  p.height = images.size(2);
  p.width = images.size(3);
  p.out_size = out_size;
  p.margin = margin;
  p.square = square;
  p.input_scale = in_type == at::kByte ? 1.f / 255.f : 1.f;
  p.background = static_cast<float>(background);
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK(std::isfinite(mean[c]) && std::isfinite(std[c]) && std[c] > 0,
                "mask_crop: mean must be finite and std positive, got mean ", mean[c], " std ",
                std[c], " for channel ", c);
    p.mean[c] = static_cast<float>(mean[c]);
    p.inv_std[c] = static_cast<float>(1.0 / std[c]);
  }

  call.images = images.contiguous();
  call.masks = masks.contiguous();
  call.crops = at::empty({p.batch, p.masks, channels, out_size, out_size},
                         images.options().dtype(out_dtype));
  call.boxes = at::empty({p.batch, p.masks, 4}, images.options().dtype(at::kInt));
  call.valid = at::empty({p.batch, p.masks}, images.options().dtype(at::kBool));
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_crop_cpu(
    const at::Tensor& images, const at::Tensor& masks, int64_t out_size, double margin,
    bool square, double background, at::ArrayRef<double> mean, at::ArrayRef<double> std,
    at::ScalarType out_dtype) {
  MaskCropCall call =
      prepare_mask_crop(images, masks, out_size, margin, square, background, mean, std, out_dtype);
  auto parallel = [](int64_t begin, int64_t end, auto&& fn) {
    at::parallel_for(begin, end, /*grain_size=*/1, fn);
  };
  dispatch_in_out(call.images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    cpu::mask_crop(static_cast<const In*>(call.images.const_data_ptr()),
                   static_cast<const uint8_t*>(call.masks.const_data_ptr()),
                   static_cast<Out*>(call.crops.mutable_data_ptr()),
                   static_cast<Box*>(call.boxes.mutable_data_ptr()),
                   static_cast<uint8_t*>(call.valid.mutable_data_ptr()), call.params, parallel);
  });
  return {call.crops, call.boxes, call.valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast, CPU, m) { m.impl("mask_crop", &mask_crop_cpu); }

}  // namespace ops
}  // namespace clipfast
