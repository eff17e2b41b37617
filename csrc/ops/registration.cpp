// The clipfast operator library: every op schema in one place, plus the Python module init that
// lets `import clipfast._C` load the registrations. Backend implementations live beside this file.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(clipfast, m) {
  m.def(
      "mask_crop(Tensor images, Tensor masks, int out_size, float margin, bool square, float background, "
      "float[] mean, float[] std, ScalarType out_dtype) -> (Tensor crops, Tensor boxes, Tensor valid)");
  m.def(
      "mask_pool(Tensor features, Tensor masks, Tensor? logits, int grid_h, int grid_w, int packed_width) "
      "-> (Tensor pooled, Tensor valid)");
  m.def(
      "region_score(Tensor image_embeddings, Tensor region_embeddings, Tensor region_valid, "
      "Tensor text_embeddings, float logit_scale) -> (Tensor image_label, Tensor image_prob, "
      "Tensor region_label, Tensor region_prob, Tensor region_image_prob, Tensor discrepancy)");
  m.def("region_topk(Tensor scores, Tensor labels, int num_labels, int k) -> (Tensor counts, Tensor indices)");
  m.def(
      "region_patches(Tensor images, Tensor masks, int grid_h, int grid_w, int min_pixels, float background, "
      "float[] mean, float[] std, ScalarType out_dtype, int packed_width) -> (Tensor pixels, Tensor image, "
      "Tensor patch, Tensor offsets)");
}

static struct PyModuleDef clipfast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "clipfast compiled operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&clipfast_c_module); }
