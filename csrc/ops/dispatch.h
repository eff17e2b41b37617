// Maps (image dtype, output dtype) to the kernel cores' element types, once for every backend.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "common/bf16.h"

namespace clipfast {
namespace ops {

// Calls fn(In{}, Out{}) with In in {uint8_t, float, bf16} and Out in {float, bf16}.
template <typename Fn>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, Fn&& fn) {
  auto with_out = [&](auto in_tag) {
    switch (out) {
      case at::kFloat: return fn(in_tag, float{});
      case at::kBFloat16: return fn(in_tag, bf16{});
      default: TORCH_CHECK(false, "clipfast: unsupported output dtype ", out);
    }
  };
  switch (in) {
    case at::kByte: return with_out(uint8_t{});
    case at::kFloat: return with_out(float{});
    case at::kBFloat16: return with_out(bf16{});
    default: TORCH_CHECK(false, "clipfast: unsupported input dtype ", in);
  }
}

}  // namespace ops
}  // namespace clipfast
