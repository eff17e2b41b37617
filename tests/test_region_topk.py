"""region_topk on every backend: against the PyTorch reference (ties, NaN, signed zeros, out-of-range
labels, k above most counts, k = 1024, long buckets, no entries), against sorting, literal small
examples, opcheck, torch.compile, input errors, and the GPU at realistic sizes. Every output is
exact. Inputs and the assertion live in optest.py."""

import pytest
import torch
from optest import (
    ALL_BACKENDS,
    COMPILE_BACKENDS,
    COMPILED_BACKENDS,
    TRITON,
    TRITON_OPS,
    assert_topk_matches_reference,
    device_of,
    generator,
    opcheck,
    skip_if_interpreted,
    topk_inputs,
)

from clipfast.ops import BackendUnavailable, region_topk

# ------------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("n,num_labels,k", [(1, 1, 1), (997, 13, 5), (20011, 101, 37), (5000, 7, 1024)])
def test_matches_reference(backend, n, num_labels, k):
    if n > 100:  # the interpreter's time grows with entries x labels: 997 x 13 takes ~3 s, 20011 x 101 a minute
        skip_if_interpreted(backend, f"{n} entries, {num_labels} labels; test_long_buckets_with_ties covers it")
    scores, labels = topk_inputs(n, num_labels, style="special", seed=n)
    assert_topk_matches_reference(scores, labels, num_labels, k, backend)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_nan_signed_zero_and_out_of_range_labels(backend):
    scores = torch.tensor([float("nan"), -0.0, 0.0, -1.0, float("nan"), float("-inf"), 0.0, 2.0])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 2, 7], dtype=torch.int32)  # 7: ignored
    got = assert_topk_matches_reference(scores, labels, 3, 8, backend)
    # -0 == +0 (index order), then -1, -inf, and the NaNs last (index order).
    assert got.indices[0].tolist() == [1, 2, 3, 5, 0, 4, -1, -1]
    assert got.counts.tolist() == [6, 0, 1]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 37])
def test_long_buckets_with_ties(backend, k):
    # ~1500 entries per label: more than one 1024-key chunk per bucket; 40 distinct scores: many ties.
    scores, labels = topk_inputs(3001, 2, style="few_values", seed=7)
    assert_topk_matches_reference(scores, labels, 2, k, backend)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_small_inputs(backend):
    scores, labels = topk_inputs(50, 20, style="gaussian", seed=8)
    assert_topk_matches_reference(scores, labels, 20, 4, backend)  # k > most labels' counts
    assert_topk_matches_reference(scores, labels, 1, 3, backend)
    got = assert_topk_matches_reference(torch.empty(0), torch.empty(0, dtype=torch.int64), 4, 2, backend)
    assert (got.indices == -1).all() and (got.counts == 0).all()


# ------------------------------------------------------------------ defined results, any backend

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_counts_order_ties_and_padding(backend):
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5])
    labels = torch.tensor([0, 0, 0, 1, -1, 0, 5])
    got = assert_topk_matches_reference(scores, labels, 3, 3, backend)
    assert got.counts.tolist() == [4, 1, 0]
    assert got.indices.tolist() == [[1, 5, 0], [3, -1, -1], [-1, -1, -1]]  # tie 0.5: index 0 before 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_sorting_on_random_input(backend):
    skip_if_interpreted(backend, "1001 entries, 17 labels: ~3-5 s; test_long_buckets_with_ties covers it")
    n, c, k = 1001, 17, 5
    scores, labels = topk_inputs(n, c, style="integers", seed=2)  # many ties
    device = device_of(backend)
    out = region_topk(scores.to(device), labels.to(device), c, k, backend=backend)
    for label in range(c):
        members = [i for i in range(n) if labels[i] == label]
        expected = sorted(members, key=lambda i: (-scores[i].item(), i))[:k]
        assert out.indices[label, : len(expected)].tolist() == expected
        assert out.counts[label] == len(members)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_label_owns_everything(backend):
    device = device_of(backend)
    scores = torch.arange(70000, dtype=torch.float32) % 1000  # ascending runs: worst case for insertion
    labels = torch.full((70000,), 2)
    got = region_topk(scores.to(device), labels.to(device), 4, 3, backend=backend)
    assert got.counts.tolist() == [0, 0, 70000, 0]
    assert got.indices[2].tolist() == [999, 1999, 2999]
    assert (got.indices[[0, 1, 3]] == -1).all()


# ------------------------------------------------------------------------- opcheck, torch.compile

@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_opcheck(backend):
    device = device_of(backend)
    scores, labels = torch.randn(300), torch.randint(0, 9, (300,))
    opcheck(backend, "region_topk", (scores.to(device), labels.to(device), 9, 4))
    scores = torch.randn(40, generator=generator(9))
    labels = torch.randint(-1, 5, (40,), generator=generator(9))
    opcheck(backend, "region_topk", (scores.to(device), labels.to(device), 5, 3))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_matches_reference(backend):
    device = device_of(backend)
    scores, labels = torch.randn(300, device=device), torch.randint(0, 9, (300,), device=device)
    compiled = torch.compile(lambda s, lab: region_topk(s, lab, 9, 4, backend=backend).indices, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(scores, labels), region_topk(scores, labels, 9, 4, backend="reference").indices)


# ---------------------------------------------------------------------------------------- errors

def test_errors():
    with pytest.raises(ValueError, match="1-d of equal length"):
        region_topk(torch.rand(3), torch.zeros(4, dtype=torch.int64), 2, 1)
    with pytest.raises(TypeError, match="labels int32/int64"):
        region_topk(torch.rand(3), torch.zeros(3), 2, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        region_topk(torch.rand(3), torch.zeros(3, dtype=torch.int64), 2, 0)


# ------------------------------------------------------------------------- GPU: realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("k", [16, 100])
def test_gpu_realistic_sizes(backend, k):
    scores, labels = topk_inputs(200_000, 1000, style="realistic", seed=10)  # ties, one long bucket
    assert_topk_matches_reference(scores, labels, 1000, k, backend)


@pytest.mark.gpu
def test_gpu_cuda_k_limit_message_names_backends_that_take_cuda_tensors():
    scores, labels = torch.rand(100, device="cuda"), torch.randint(0, 3, (100,), device="cuda")
    with pytest.raises(RuntimeError, match="triton or reference backend"):
        torch.ops.clipfast.region_topk(scores, labels, 3, 2000)
    assert region_topk(scores, labels, 3, 2000).indices.shape == (3, 2000)  # auto: Triton takes it


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_refuses_2_31_entries(backend):
    # The Triton kernels count entries in int32: at 2^31 they refuse (auto passes over them); views of
    # one element, so nothing is allocated.
    device = device_of(backend)
    scores = torch.zeros(1, device=device).expand(2**31)
    labels = torch.zeros(1, dtype=torch.int64, device=device).expand(2**31)
    with pytest.raises(BackendUnavailable, match="exceed the Triton kernel's limit of 2147483647"):
        region_topk(scores, labels, 4, 2, backend=backend)
    with pytest.raises(ValueError, match="fewer than 2\\^31 entries"):
        TRITON_OPS.region_topk(scores, labels, 4, 2)


@pytest.mark.gpu
@pytest.mark.huge
@pytest.mark.parametrize("backend,entries", [("cuda", 2**31 + 5000),
                                             pytest.param("triton", 2**31 - 1, marks=pytest.mark.triton)])
def test_gpu_huge_entry_counts_do_not_wrap(backend, entries):
    # Entries on both sides of 2^31 (int32's end; Triton takes up to 2^31 - 1, CUDA up to 2^32 - 1):
    # ~40 GB of inputs and scratch. The last 5000 entries get the top scores, so each label's top 4 are
    # its 4 highest indices among them: any index that wrapped would show.
    num_labels, k, planted = 1000, 4, 5000
    labels = torch.arange(entries, device="cuda") % num_labels
    scores = torch.rand(entries, device="cuda")
    first = entries - planted
    scores[first:] = 2.0 + torch.arange(planted, device="cuda", dtype=torch.float32) / planted
    got = region_topk(scores, labels, num_labels, k, backend=backend)
    del scores, labels
    base, extra = divmod(entries, num_labels)
    counts = torch.full((num_labels,), base, dtype=torch.int64)
    counts[:extra] += 1
    assert torch.equal(got.counts.cpu(), counts)
    planted_index = torch.arange(first, entries)
    want = torch.full((num_labels, k), -1, dtype=torch.int64)
    for label in range(num_labels):
        want[label] = planted_index[planted_index % num_labels == label].flip(0)[:k]
    assert torch.equal(got.indices.cpu(), want)


# ------------------------------------------------- more labels than the CUDA kernel counts in shared memory

def sorted_topk(scores, labels, num_labels, k):
    """The selection by two stable sorts (ties and NaN fall as the op orders them): an independent check
    where the reference's per-label loop is too slow."""
    keep = torch.nonzero((labels >= 0) & (labels < num_labels)).flatten()
    order = keep[torch.sort(-scores[keep], stable=True).indices]
    order = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels[order], minlength=num_labels)
    rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[labels[order]]
    top = torch.full((num_labels, k), -1, dtype=torch.int64)
    take = rank < k
    top[labels[order][take], rank[take]] = order[take]
    return counts, top


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_more_labels_than_the_shared_histogram(backend):
    # Above 8192 labels the CUDA kernel counts in a global histogram instead of shared memory.
    skip_if_interpreted(backend, "10000 labels: one interpreted program per label")
    scores, labels = topk_inputs(300_000, 10_000, style="integers", seed=12)  # ties; labels from -1
    device = device_of(backend)
    got = region_topk(scores.to(device), labels.to(device), 10_000, 8, backend=backend)
    counts, top = sorted_topk(scores, labels, 10_000, 8)
    assert torch.equal(got.counts.cpu(), counts)
    assert torch.equal(got.indices.cpu(), top)
