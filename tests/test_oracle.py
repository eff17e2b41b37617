"""The oracle's segmenters: the padded layout, the built-in segmenter on the synthetic world, and
segment-anything on a tiny random model (no downloaded weights)."""

import dataclasses

import pytest
import torch

from clipfast.attacks.triggers import make_trigger
from clipfast.data.world import generate_world
from clipfast.oracle import (
    ClassicalSegmenter,
    SamPromptPredictor,
    SamSegmenter,
    Segmentation,
    load_sam,
    make_segmenter,
    pack_masks,
)

torch.set_num_threads(2)

GREY = (110, 110, 110)


def _best_iou(seg: Segmentation, target: torch.Tensor) -> torch.Tensor:
    """float [N]: per image, the IoU of the predicted region that best matches target [N, H, W]."""
    inter = (seg.masks & target[:, None]).flatten(2).sum(-1).float()
    union = (seg.masks | target[:, None]).flatten(2).sum(-1).float()
    return torch.where(seg.valid, inter / union.clamp_min(1), torch.zeros(())).max(1).values


def _canvas(n: int = 1, size: int = 32) -> torch.Tensor:
    """uint8 [n, 3, size, size] of plain grey with a little deterministic noise."""
    noise = torch.randint(-4, 5, (n, 3, size, size), generator=torch.Generator().manual_seed(0))
    return (torch.tensor(GREY)[None, :, None, None] + noise).to(torch.uint8)


def _paint(images: torch.Tensor, mask: torch.Tensor, rgb: tuple[int, int, int]) -> None:
    images[:, :, mask] = torch.tensor(rgb, dtype=torch.uint8)[None, :, None]


def _assert_layout(seg: Segmentation, n: int, size: int, max_masks: int) -> None:
    assert seg.masks.shape == (n, max_masks, size, size) and seg.masks.dtype == torch.bool
    assert seg.counts.shape == (n,) and seg.counts.dtype == torch.int64
    assert seg.scores.shape == (n, max_masks) and seg.scores.dtype == torch.float32
    assert bool((seg.counts >= 0).all() and (seg.counts <= max_masks).all())
    areas = seg.masks.flatten(2).sum(-1)
    assert bool((areas[seg.valid] > 0).all()), "a real region is empty"
    assert not seg.masks[~seg.valid].any(), "padding masks must be empty"
    assert not seg.scores[~seg.valid].any(), "padding scores must be 0"
    assert bool((areas[:, :-1] >= areas[:, 1:]).all()), "regions must come largest first"


# ---------------------------------------------------------------------------------------------
# pack_masks and Segmentation


def _square_masks(sides: list[int], size: int = 8) -> torch.Tensor:
    masks = torch.zeros(len(sides), size, size, dtype=torch.bool)
    for k, side in enumerate(sides):
        masks[k, :side, :side] = True
    return masks


def test_pack_masks_orders_truncates_and_pads():
    first = _square_masks([2, 4, 0, 3])  # areas 4, 16, 0 (dropped), 9
    second = _square_masks([])
    third = _square_masks([5])
    seg = pack_masks([first, second, third], 8, 8, max_masks=2,
                     scores=[torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.zeros(0), torch.tensor([0.7])])
    _assert_layout(seg, 3, 8, 2)
    assert seg.counts.tolist() == [2, 0, 1]
    assert torch.equal(seg.masks[0], first[[1, 3]])  # the two largest, largest first; area 4 cut
    assert torch.allclose(seg.scores, torch.tensor([[0.2, 0.4], [0.0, 0.0], [0.7, 0.0]]))
    assert torch.equal(seg.masks[2, 0], third[0])
    assert seg.valid.tolist() == [[True, True], [False, False], [True, False]]


def test_pack_masks_ties_keep_input_order_and_default_scores():
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0, 0, :3] = True  # area 3
    masks[1, 5, :3] = True  # area 3
    masks[2, :2, 4:] = True  # area 4
    seg = pack_masks([masks], 6, 6, max_masks=4)
    assert torch.equal(seg.masks[0, :3], masks[[2, 0, 1]])
    assert seg.scores[0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_pack_masks_errors():
    with pytest.raises(ValueError, match="max_masks"):
        pack_masks([_square_masks([2])], 8, 8, max_masks=0)
    with pytest.raises(ValueError, match=r"\[k, 8, 8\]"):
        pack_masks([torch.zeros(2, 8, 7, dtype=torch.bool)], 8, 8, max_masks=2)
    with pytest.raises(ValueError, match="2 masks but 1 scores"):
        pack_masks([_square_masks([2, 3])], 8, 8, max_masks=2, scores=[torch.ones(1)])
    with pytest.raises(ValueError, match="score lists"):
        pack_masks([_square_masks([2])], 8, 8, max_masks=2, scores=[])


def test_segmentation_checks_shapes_and_concatenates():
    with pytest.raises(ValueError, match="disagree"):
        Segmentation(torch.zeros(2, 3, 4, 4, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 2))
    a = pack_masks([_square_masks([3, 2])], 8, 8, max_masks=2)
    b = pack_masks([_square_masks([]), _square_masks([4])], 8, 8, max_masks=2)
    both = Segmentation.cat([a, b])
    assert len(both) == 3 and both.counts.tolist() == [2, 0, 1]
    assert torch.equal(both.masks[1:], b.masks)


# ---------------------------------------------------------------------------------------------
# ClassicalSegmenter


@pytest.fixture(scope="module")
def world():
    return generate_world(96, seed=5)


@pytest.mark.parametrize("trigger_name", ["badnet", "badnet_random"])
def test_classical_finds_objects_and_trigger(world, trigger_name):
    trigger = make_trigger(trigger_name)
    images = trigger.apply(world.images)
    footprint = trigger.footprint(len(images), 32, 32)
    seg = ClassicalSegmenter().segment(images)
    _assert_layout(seg, len(images), 32, ClassicalSegmenter.max_masks)
    assert not (seg.masks.sum(1) > 1).any(), "regions must not overlap"

    main = _best_iou(seg, world.object_masks[:, 0] & ~footprint)  # the trigger hides object pixels
    assert main.mean() > 0.95 and main.min() > 0.7
    second = world.object_masks[:, 1].flatten(1).any(1)
    assert second.any(), "fixture should hold second objects"
    assert _best_iou(seg, world.object_masks[:, 1])[second].min() > 0.7
    trigger_iou = _best_iou(seg, footprint)
    near = torch.nn.functional.max_pool2d(footprint[:, None].float(), 3, stride=1, padding=1)[:, 0].bool()
    apart = ~(near & world.object_masks.any(1)).flatten(1).any(1)
    assert apart.sum() > 20
    assert bool((trigger_iou[apart] >= 0.9).all()), "a free-standing trigger must be its own region"


def test_classical_keeps_ring_holes_and_splits_touching_objects():
    images = _canvas()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    radius = ((yy - 12) ** 2 + (xx - 12) ** 2).sqrt()
    ring = (radius <= 9) & (radius >= 5)
    square = torch.zeros(32, 32, dtype=torch.bool)
    square[14:30, 20:31] = True  # overlaps the ring's right edge: one connected blob
    square &= ~ring
    _paint(images, ring, (240, 30, 30))
    _paint(images, square, (30, 60, 240))
    seg = ClassicalSegmenter().segment(images)
    assert seg.counts.item() == 2
    assert _best_iou(seg, ring[None]).item() > 0.95 and _best_iou(seg, square[None]).item() > 0.95
    assert not seg.masks[0, :, 12, 12].any(), "the ring's hole must stay background"


@pytest.mark.parametrize("trigger_name", ["badnet", "label_consistent"])  # 4 x 4 1-px cells, 8 x 8 2-px cells
@pytest.mark.parametrize("on_object", [False, True])
def test_classical_checkerboard_patch_is_one_region(trigger_name, on_object):
    images = _canvas()
    body = torch.zeros(32, 32, dtype=torch.bool)
    body[2:22, 2:22] = True
    _paint(images, body, (240, 160, 20))
    trigger = make_trigger(trigger_name)
    side = trigger.patch_size(32, 32)
    top = 8 if on_object else 23
    images[:, :, top:top + side, top:top + side] = trigger.apply(_canvas())[:, :, 32 - side:, 32 - side:]
    patch = torch.zeros(1, 32, 32, dtype=torch.bool)
    patch[0, top:top + side, top:top + side] = True
    seg = ClassicalSegmenter().segment(images)
    assert seg.counts.item() == 2
    assert _best_iou(seg, patch).item() == 1.0
    assert _best_iou(seg, body[None] & ~patch).item() == 1.0


def test_classical_uniform_image_has_no_regions():
    seg = ClassicalSegmenter(max_masks=3).segment(_canvas(2))
    _assert_layout(seg, 2, 32, 3)
    assert seg.counts.tolist() == [0, 0]


def test_classical_layout_matches_pack_masks_and_is_deterministic(world):
    images = make_trigger("badnet").apply(world.images[:40])
    segmenter = ClassicalSegmenter(max_masks=2)
    seg = segmenter.segment(images)
    _assert_layout(seg, 40, 32, 2)
    assert bool((seg.counts == 2).any()), "max_masks=2 should truncate some images (object + trigger + ...)"
    repacked = pack_masks([m[:c] for m, c in zip(seg.masks, seg.counts)], 32, 32, 2,
                          [s[:c] for s, c in zip(seg.scores, seg.counts)])
    for got, want in zip(dataclasses.astuple(seg), dataclasses.astuple(repacked)):
        assert torch.equal(got, want)
    assert bool(((seg.scores > 0) & (seg.scores <= 1))[seg.valid].all())

    again = segmenter.segment(images.clone())
    chunked = dataclasses.replace(segmenter, chunk_pixels=7 * 32 * 32).segment(images)
    for other in (again, chunked):
        for got, want in zip(dataclasses.astuple(seg), dataclasses.astuple(other)):
            assert torch.equal(got, want)
    # max_masks keeps the largest regions: the 2-mask result is a prefix of the 8-mask one.
    full = ClassicalSegmenter().segment(images)
    assert torch.equal(full.masks[:, :2], seg.masks) and torch.equal(full.counts.clamp(max=2), seg.counts)


def test_classical_input_errors():
    segmenter = ClassicalSegmenter()
    with pytest.raises(ValueError, match="uint8"):
        segmenter.segment(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        segmenter.segment(torch.zeros(2, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        segmenter.segment(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        segmenter.segment(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grow_threshold <= seed_threshold"):
        ClassicalSegmenter(grow_threshold=0.3, seed_threshold=0.2)
    with pytest.raises(ValueError, match="max_masks"):
        ClassicalSegmenter(max_masks=0)
    with pytest.raises(ValueError, match="min_area"):
        ClassicalSegmenter(min_area=1.5)


# ---------------------------------------------------------------------------------------------
# make_segmenter


def test_make_segmenter_builtin_and_errors(tmp_path):
    segmenter = make_segmenter("builtin", max_masks=3, seed_threshold=0.3)
    assert isinstance(segmenter, ClassicalSegmenter) and segmenter.max_masks == 3
    with pytest.raises(ValueError, match="unknown segmenter 'nope'.*builtin, sam"):
        make_segmenter("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        make_segmenter("builtin", colour=1)
    with pytest.raises(ValueError, match="needs checkpoint and model_type"):
        make_segmenter("sam")
    with pytest.raises(ValueError, match="needs model_type"):
        make_segmenter("sam", checkpoint=tmp_path / "sam.pth")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['min_area'\]"):
        make_segmenter("sam", checkpoint=tmp_path / "sam.pth", model_type="vit_b", min_area=0.1)
    with pytest.raises(FileNotFoundError, match="sam.pth"):
        make_segmenter("sam", checkpoint=tmp_path / "sam.pth", model_type="vit_b")


# ---------------------------------------------------------------------------------------------
# segment-anything, on a tiny random model


def _tiny_sam(seed: int = 0):
    modeling = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(seed)
    dim = 32
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(img_size=64, patch_size=16, embed_dim=dim, depth=1, num_heads=2,
                                               out_chans=dim, window_size=0),
        prompt_encoder=modeling.PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                              mask_in_chans=4),
        mask_decoder=modeling.MaskDecoder(
            transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16,
            transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    ).eval()


@pytest.fixture(scope="module")
def tiny_sam():
    return _tiny_sam()


def test_sam_segmenter_layout(tiny_sam):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    segmenter = SamSegmenter(tiny_sam, max_masks=3, points_per_side=4, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0)
    seg = segmenter.segment(images)
    _assert_layout(seg, 2, 64, 3)
    assert bool((seg.counts >= 1).all()), "permissive thresholds should keep some mask"
    with pytest.raises(ValueError, match="uint8"):
        segmenter.segment(images.float())


def test_sam_prompt_predictor(tiny_sam):
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    predictor = SamPromptPredictor(tiny_sam)
    for prompts in ({"boxes": torch.tensor([[4.0, 8.0, 40.0, 50.0]])}, {"points": torch.tensor([[20.0, 30.0]])}):
        seg = predictor.segment_prompts(image, **prompts)
        assert seg.masks.shape == (1, 1, 64, 64) and seg.masks.dtype == torch.bool
        assert seg.counts.tolist() == [1] and seg.scores.shape == (1, 1) and seg.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="exactly one of boxes or points"):
        predictor.segment_prompts(image)
    with pytest.raises(ValueError, match=r"boxes must be a tensor \[K, 4\]"):
        predictor.segment_prompts(image, boxes=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor.segment_prompts(image[None], points=torch.tensor([[1.0, 2.0]]))


def test_load_sam_errors(tmp_path, tiny_sam):
    pytest.importorskip("segment_anything")
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'"):
        load_sam(tmp_path / "x.pth", model_type="vit_x")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sam(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable SAM checkpoint"):
        load_sam(junk)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_sam(tensor_file)
    # The tiny model's weights as vit_b: missing blocks, and shapes that do not fit (load_state_dict
    # alone would raise a bare RuntimeError for those).
    tiny_file = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), tiny_file)
    with pytest.raises(ValueError, match=r"does not fit SAM vit_b: \d+ missing keys .*image_encoder\.blocks\.1\."
                                         r".*of another shape"):
        load_sam(tiny_file, model_type="vit_b")


def test_load_sam_and_make_segmenter_load_matching_weights(tmp_path, tiny_sam, monkeypatch):
    segment_anything = pytest.importorskip("segment_anything")
    # Stand the tiny architecture in for vit_b so that a checkpoint that fits is cheap to make.
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: _tiny_sam(seed=9))
    path = tmp_path / "tiny_vit_b.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = load_sam(path, model_type="vit_b")
    assert not loaded.training
    for key, value in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    segmenter = make_segmenter("sam", checkpoint=path, model_type="vit_b", max_masks=2, points_per_side=2)
    assert isinstance(segmenter, SamSegmenter) and segmenter.max_masks == 2
