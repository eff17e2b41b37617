"""Which backend an op call gets (clipfast.ops.backends): unknown names are errors, `auto` picks the
C++ kernels for CPU tensors, explicitly requested backends that cannot run say why; and mask bit
packing (pack_mask_bits / unpack_mask_bits), which mask_pool and the scan's shards read."""

import pytest
import torch
from optest import crop_inputs, pool_inputs, run_crop, score_inputs

from clipfast.ops import (
    BackendUnavailable,
    backends,
    mask_pool,
    pack_mask_bits,
    region_score,
    region_topk,
    unpack_mask_bits,
)

OPS = ["mask_crop", "mask_pool", "region_score", "region_topk"]


def small_call(op):
    """backend -> the op on small CPU inputs with that backend."""
    if op == "mask_crop":
        images, masks = crop_inputs(1, 1, 8, 8, torch.uint8)
        return lambda backend: run_crop(images, masks, backend)
    if op == "mask_pool":
        features, masks, _ = pool_inputs(1, 2, (2, 2), (2, 2), 4)
        return lambda backend: mask_pool(features, masks, (2, 2), backend=backend)
    if op == "region_score":
        images, regions, valid, text = score_inputs(2, 3, 8, 5)
        return lambda backend: region_score(images, regions, valid, text, 10.0, backend=backend)
    scores, labels = torch.randn(9), torch.randint(0, 3, (9,))
    return lambda backend: region_topk(scores, labels, 3, 2, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_is_an_error(op):
    with pytest.raises(ValueError, match="unknown backend"):
        small_call(op)("gpu")


@pytest.mark.parametrize("op", OPS)
def test_auto_picks_the_cpu_kernels_for_cpu_tensors(op):
    assert backends.resolve(op, "auto", torch.device("cpu")) == "cpu"  # the C++ kernels for CPU tensors
    small_call(op)("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
@pytest.mark.parametrize("op", OPS)
def test_explicit_backends_that_cannot_run_say_why(op, monkeypatch):
    call = small_call(op)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible"):
        call("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU for Triton"):
        call("triton")


def test_pack_mask_bits_roundtrip():
    masks = torch.rand(2, 3, 5, 19) > 0.5
    packed, width = pack_mask_bits(masks)
    assert packed.shape == (2, 3, 5, 3) and width == 19
    assert torch.equal(unpack_mask_bits(packed, width), masks)
