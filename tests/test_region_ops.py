"""region_score and region_topk: the reference against direct, naive computations; errors."""

import pytest
import torch

from clipfast.ops import region_score, region_topk


def test_region_score_matches_full_logits():
    gen = torch.Generator().manual_seed(0)
    b, m, d, c = 3, 41, 77, 13
    image, regions, text = torch.randn(b, d, generator=gen), torch.randn(b, m, d, generator=gen), torch.randn(c, d, generator=gen)
    valid = torch.rand(b, m, generator=gen) > 0.3
    valid[2] = False  # an image without regions
    out = region_score(image, regions, valid, text, 20.0)
    t = torch.nn.functional.normalize(text, dim=-1)
    p = (20 * torch.nn.functional.normalize(image, dim=-1) @ t.T).softmax(-1)
    q = (20 * torch.nn.functional.normalize(regions, dim=-1) @ t.T).softmax(-1)
    for i in range(b):
        label = int(p[i].argmax())
        assert out.image_label[i] == label
        torch.testing.assert_close(out.image_prob[i], p[i, label])
        support = [float(q[i, j, label]) for j in range(m) if valid[i, j]]
        torch.testing.assert_close(out.discrepancy[i], p[i, label] - max(support, default=0.0))
        for j in range(m):
            if valid[i, j]:
                assert out.region_label[i, j] == int(q[i, j].argmax())
                torch.testing.assert_close(out.region_prob[i, j], q[i, j].max())
                torch.testing.assert_close(out.region_image_prob[i, j], q[i, j, label])
            else:
                assert out.region_label[i, j] == -1 and out.region_prob[i, j] == 0 and out.region_image_prob[i, j] == 0


def test_region_score_bf16_embeddings_close_to_fp32():
    gen = torch.Generator().manual_seed(1)
    image, regions, text = torch.randn(5, 33, generator=gen), torch.randn(5, 7, 33, generator=gen), torch.randn(11, 33, generator=gen)
    valid = torch.ones(5, 7, dtype=torch.bool)
    a = region_score(image, regions, valid, text, 10.0)
    b = region_score(image.bfloat16(), regions.bfloat16(), valid, text.bfloat16(), 10.0)
    torch.testing.assert_close(a.image_prob, b.image_prob, atol=2e-2, rtol=0)
    torch.testing.assert_close(a.discrepancy, b.discrepancy, atol=3e-2, rtol=0)


@pytest.mark.parametrize("bad,message", [
    (dict(image=torch.randn(2, 4, 5)), "image_embeddings must be a 2-d"),
    (dict(regions=torch.randn(3, 2, 5)), "do not match"),
    (dict(valid=torch.ones(2, 4, dtype=torch.bool)), "region_valid"),
    (dict(text=torch.randn(4, 6)), "text_embeddings must be"),
    (dict(scale=0.0), "logit_scale"),
])
def test_region_score_errors(bad, message):
    args = dict(image=torch.randn(2, 5), regions=torch.randn(2, 3, 5), valid=torch.ones(2, 3, dtype=torch.bool),
                text=torch.randn(4, 5), scale=10.0) | bad
    with pytest.raises(ValueError, match=message):
        region_score(args["image"], args["regions"], args["valid"], args["text"], args["scale"])


def test_region_topk_counts_order_ties_and_padding():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5])
    labels = torch.tensor([0, 0, 0, 1, -1, 0, 5])
    out = region_topk(scores, labels, num_labels=3, k=3)
    assert out.counts.tolist() == [4, 1, 0]
    assert out.indices.tolist() == [[1, 5, 0], [3, -1, -1], [-1, -1, -1]]  # tie 0.5: index 0 before 2


def test_region_topk_matches_sorting_on_random_input():
    gen = torch.Generator().manual_seed(2)
    n, c, k = 1001, 17, 5
    scores = torch.randint(0, 50, (n,), generator=gen).float()  # many ties
    labels = torch.randint(-1, c, (n,), generator=gen)
    out = region_topk(scores, labels, c, k)
    for label in range(c):
        members = [i for i in range(n) if labels[i] == label]
        expected = sorted(members, key=lambda i: (-scores[i].item(), i))[:k]
        assert out.indices[label, : len(expected)].tolist() == expected
        assert out.counts[label] == len(members)


def test_region_topk_errors():
    with pytest.raises(ValueError, match="1-d of equal length"):
        region_topk(torch.rand(3), torch.zeros(4, dtype=torch.int64), 2, 1)
    with pytest.raises(TypeError, match="labels int32/int64"):
        region_topk(torch.rand(3), torch.zeros(3), 2, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        region_topk(torch.rand(3), torch.zeros(3, dtype=torch.int64), 2, 0)
