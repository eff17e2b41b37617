"""Which backend an op call gets (clipfast.ops.backends): unknown names are errors, `auto` picks the
C++ kernels for CPU tensors, explicitly requested backends that cannot run say why; and mask bit
packing (pack_mask_bits / unpack_mask_bits), which mask_pool and the scan's shards read."""

import ast
from pathlib import Path

import pytest
import torch
from optest import TRITON_OPS, crop_inputs, pool_inputs, run_crop, score_inputs

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
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible|built without CUDA"):  # CLIPFAST_CUDA=0 builds
        call("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU for Triton"):
        call("triton")


def test_pack_mask_bits_roundtrip():
    masks = torch.rand(2, 3, 5, 19) > 0.5
    packed, width = pack_mask_bits(masks)
    assert packed.shape == (2, 3, 5, 3) and width == 19
    assert torch.equal(unpack_mask_bits(packed, width), masks)


# ------------------------------------------------------------------------ devices of the GPU backends

# The op modules (not __init__.py, nor _launch.py, which defines the guard and the wrapper).
TRITON_SOURCES = sorted(p for p in (Path(__file__).resolve().parent.parent / "clipfast" / "ops" / "triton").glob("*.py")
                        if not p.name.startswith("_"))


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: p.name)
def test_every_triton_launch_is_guarded_to_the_tensors_device(path):
    # Triton launches on the current CUDA device, not the arguments': each wrap_triton(...)[grid](...)
    # launch must sit inside `with on_device(...)` (clipfast/ops/triton/_launch.py).
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(isinstance(item.context_expr, ast.Call)
                                              and getattr(item.context_expr.func, "id", "") == "on_device"
                                              for item in node.items):
            guarded |= {id(inner) for inner in ast.walk(node)}
    launches = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and "wrap_triton" in (getattr(node.func, "attr", ""), getattr(node.func, "id", ""))]
    assert launches
    assert all(id(node) in guarded for node in launches), [node.lineno for node in launches if id(node) not in guarded]


@pytest.mark.skipif(TRITON_OPS is None, reason="triton is not usable")
def test_the_triton_device_guard_is_a_no_op_where_nothing_needs_switching():
    from clipfast.ops.triton._launch import on_device

    with on_device(torch.zeros(1)):  # CPU tensors (the interpreter)
        pass
    if torch.cuda.is_available():
        with on_device(torch.zeros(1, device="cuda")):
            assert torch.cuda.current_device() == 0


def _op_args(op, first, second):
    """Arguments of clipfast::<op> with its first tensor on `first` and the others on `second`."""
    if op == "mask_crop":
        images, masks = crop_inputs(1, 2, 8, 8, torch.uint8)
        return (images.to(first), masks.to(second), 4, 0.1, False, 0.0, [0.5] * 3, [0.2] * 3, torch.float32)
    if op == "mask_pool":
        features, masks, logits = pool_inputs(1, 2, (2, 2), (2, 2), 4, heads=2)
        return (features.to(first), masks.to(second), logits.to(second), 2, 2, 0)
    if op == "region_score":
        images, regions, valid, text = score_inputs(2, 3, 8, 5)
        return (images.to(first), regions.to(second), valid.to(second), text.to(second), 10.0)
    scores, labels = torch.randn(9), torch.randint(0, 3, (9,))
    return (scores.to(first), labels.to(second), 3, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("first,second", [("cpu", "cuda"), ("cuda", "cpu")])
def test_gpu_mixed_devices_get_the_ops_own_message(op, first, second):
    # The dispatcher sends a call with any CUDA tensor to the CUDA kernel; its checks must run before
    # its device guard (a guard built from a CPU tensor fails inside c10 with an internal assert).
    with pytest.raises(RuntimeError, match=f"{op}: .* on (cpu|cuda)") as error:
        getattr(torch.ops.clipfast, op)(*_op_args(op, first, second))
    assert "INTERNAL ASSERT" not in str(error.value)


def _call_on(op, device, backend):
    """The op on small seeded inputs moved to `device`, through `backend`."""
    if op == "mask_crop":
        images, masks = crop_inputs(1, 2, 8, 8, torch.uint8)
        return run_crop(images.to(device), masks.to(device), backend)
    if op == "mask_pool":
        features, masks, logits = pool_inputs(1, 2, (2, 2), (2, 2), 4, heads=2)
        return mask_pool(features.to(device), masks.to(device), (2, 2), logits=logits.to(device), backend=backend)
    if op == "region_score":
        images, regions, valid, text = score_inputs(2, 3, 8, 5)
        return region_score(images.to(device), regions.to(device), valid.to(device), text.to(device), 10.0,
                            backend=backend)
    gen = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(99, generator=gen), torch.randint(0, 3, (99,), generator=gen)
    return region_topk(scores.to(device), labels.to(device), 3, 2, backend=backend)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("op", OPS)
def test_gpu_triton_runs_on_the_tensors_device_not_the_current_one(op):
    want = _call_on(op, "cpu", "reference")
    with torch.cuda.device(0):  # current: cuda:0; tensors: cuda:1
        got = _call_on(op, "cuda:1", "triton")
        torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=1e-4, rtol=1e-4)
