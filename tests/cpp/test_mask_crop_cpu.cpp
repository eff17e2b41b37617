// Unit tests of the torch-free mask_crop CPU core (run by ctest). The full comparison against the
// PyTorch reference lives in tests/test_mask_crop.py; these pin the geometry rules and edge cases.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/mask_crop.h"
#include "expect.h"

namespace {

using cpp_tests::expect;
using cpp_tests::failures;
using cpp_tests::serial;

clipfast::MaskCropParams params(int64_t b, int64_t m, int64_t c, int64_t h, int64_t w, int64_t s,
                                double margin, float scale) {
  clipfast::MaskCropParams p{};
  p.batch = b; p.masks = m; p.channels = c; p.height = h; p.width = w; p.out_size = s;
  p.margin = margin; p.square = false; p.input_scale = scale; p.background = 0.5f;
  for (int i = 0; i < clipfast::kMaxChannels; ++i) { p.mean[i] = 0.25f * i; p.inv_std[i] = 2.f; }
  return p;
}

void test_tight_box() {
  std::vector<uint8_t> mask(5 * 7, 0);
  mask[1 * 7 + 2] = 1;
  mask[3 * 7 + 6] = 1;  // touches the right border
  const clipfast::Box b = clipfast::cpu::tight_box(mask.data(), 5, 7);
  expect(b.y0 == 1 && b.y1 == 4 && b.x0 == 2 && b.x1 == 7, "tight box of two pixels");
  std::vector<uint8_t> empty(5 * 7, 0);
  const clipfast::Box e = clipfast::cpu::tight_box(empty.data(), 5, 7);
  expect(e.y0 == 0 && e.y1 == 0 && e.x0 == 0 && e.x1 == 0, "empty mask has an empty box");
}

void test_expand_box_clips() {
  const clipfast::Box b = clipfast::expand_box({1, 2, 9, 6}, 0.25, false, 10, 7);  // 8 tall, 4 wide
  expect(b.y0 == 0 && b.y1 == 10 && b.x0 == 1 && b.x1 == 7, "margin floor(0.25*side), clipped");
  // Square: side 8 + 2 * floor(0.25 * 8) = 12, centred, not clipped.
  const clipfast::Box s = clipfast::expand_box({1, 2, 9, 6}, 0.25, true, 10, 7);
  expect(s.y0 == -1 && s.y1 == 11 && s.x0 == -2 && s.x1 == 10, "square box keeps the aspect ratio");
}

void test_identity_crop() {
  // A full mask, no margin, S == image side: the crop is the normalised image itself.
  const int64_t C = 3, H = 6, W = 6;
  std::vector<float> image(C * H * W);
  for (size_t i = 0; i < image.size(); ++i) image[i] = 0.01f * static_cast<float>(i % 97);
  std::vector<uint8_t> mask(H * W, 1);
  std::vector<float> out(C * H * W);
  clipfast::Box box;
  uint8_t valid = 0;
  const auto p = params(1, 1, C, H, W, H, 0.0, 1.f);
  clipfast::cpu::mask_crop(image.data(), mask.data(), out.data(), &box, &valid, p, serial);
  bool same = true;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < H * W; ++i)
      same &= std::fabs(out[c * H * W + i] - (image[c * H * W + i] - p.mean[c]) * p.inv_std[c]) < 1e-6f;
  expect(same && valid == 1, "identity crop reproduces the normalised image");
}

void test_empty_and_outside_pixels() {
  // Mask 0 empty, mask 1 a single pixel: its crop is that pixel (margin 0 -> 1x1 box) everywhere.
  const int64_t C = 2, H = 4, W = 5, S = 3;
  std::vector<uint8_t> image(C * H * W);
  for (size_t i = 0; i < image.size(); ++i) image[i] = static_cast<uint8_t>(7 * i);
  std::vector<uint8_t> masks(2 * H * W, 0);
  masks[H * W + 2 * W + 3] = 1;
  std::vector<clipfast::bf16> out(2 * C * S * S);
  clipfast::Box boxes[2];
  uint8_t valid[2] = {7, 7};
  const auto p = params(1, 2, C, H, W, S, 0.5, 1.f / 255.f);
  clipfast::cpu::mask_crop(image.data(), masks.data(), out.data(), boxes, valid, p, serial);
  expect(valid[0] == 0 && valid[1] == 1, "valid flags");
  bool ok = true;
  for (int64_t c = 0; c < C; ++c) {
    const float empty_value = (0.5f - p.mean[c]) * p.inv_std[c];
    const float pixel = (image[c * H * W + 2 * W + 3] / 255.f - p.mean[c]) * p.inv_std[c];
    for (int64_t i = 0; i < S * S; ++i) {
      ok &= std::fabs(clipfast::to_float(out[c * S * S + i]) - empty_value) < 2e-2f;
      ok &= std::fabs(clipfast::to_float(out[(C + c) * S * S + i]) - pixel) < 2e-2f;
    }
  }
  expect(ok, "empty mask -> background; single-pixel mask -> that pixel (bf16 output)");
}

void test_bf16_rounding() {
  expect(clipfast::to_float(clipfast::bf16_from_float(1.f)) == 1.f, "bf16 keeps 1.0");
  // 1 + 2^-8 lies halfway between two bf16 values: ties go to even (1.0).
  expect(clipfast::to_float(clipfast::bf16_from_float(1.00390625f)) == 1.f, "bf16 ties to even");
  expect(std::isnan(clipfast::to_float(clipfast::bf16_from_float(std::nanf("")))), "bf16 keeps NaN");
}

}  // namespace

int main() {
  test_tight_box();
  test_expand_box_clips();
  test_identity_crop();
  test_empty_and_outside_pixels();
  test_bf16_rounding();
  if (failures == 0) std::printf("mask_crop CPU core: all tests passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
