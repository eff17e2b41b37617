"""The fast scan and the reference scan: their building blocks agree, and they run on odd inputs.
(Decisions on a poisoned model are compared in test_end_to_end.py.)"""

import dataclasses

import numpy as np
import pytest
import torch

from clipfast.data.prefetch import prefetch
from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.defense.scan import ScanConfig, reference_crop, scan
from clipfast.defense.scan.scanner import name_until_grounded
from clipfast.defense.scan.shards import ScanShard
from clipfast.defense.scan.scorers import make_scorer
from clipfast.defense.transplant import fill_with_median
from clipfast.models import ZeroShotClassifier, load_model
from clipfast.models.packed import packable
from clipfast.models.precision import inference_dtype
from clipfast.ops import mask_crop
from clipfast.oracle import ClassicalSegmenter


def test_reference_crop_cuts_the_same_pixels_as_mask_crop():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 37, 41), dtype=torch.uint8, generator=gen)
    mask = torch.zeros(1, 1, 37, 41, dtype=torch.bool)
    mask[0, 0, 30:37, 33:40] = torch.rand(7, 7, generator=gen) > 0.3  # near a corner: the square box leaves the image
    mask[0, 0, 30, 33] = mask[0, 0, 36, 39] = True
    picture = reference_crop(image[0].permute(1, 2, 0).numpy(), mask[0, 0], margin=0.2, square=True, background=0.4)
    side = picture.size[0]
    ours = mask_crop(image, mask, side, margin=0.2, square=True, background=0.4).crops[0, 0]  # scale 1: no resampling
    theirs = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_prefetch_keeps_order_and_passes_errors_on():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def failing():
        yield 1
        raise RuntimeError("oracle broke")

    with pytest.raises(RuntimeError, match="oracle broke"):
        list(prefetch(failing(), depth=2))
    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer stops: so does the producer
    assert len(produced) < 10


def test_auto_regions_are_packed_in_self_mode_only():
    """regions='auto' (the default) resolves to packed evidence only where it was measured to help and
    can run: self mode, the fast engine, a tower the packed encoding takes; explicit modes stay."""
    auto = ScanConfig()
    assert auto.regions == "auto"
    assert auto.for_oracle(trusted=False, packable=True).regions == "packed"
    assert auto.for_oracle(trusted=True, packable=True).regions == "crop"
    assert auto.for_oracle(trusted=False, packable=False).regions == "crop"
    assert ScanConfig(engine="reference").for_oracle(trusted=False, packable=True).regions == "crop"
    assert ScanConfig(regions="crop").for_oracle(trusted=False, packable=True).regions == "crop"
    assert ScanConfig(regions="packed").for_oracle(trusted=True, packable=True).regions == "packed"
    assert packable(load_model("clipfast-tiny").model) and not packable(torch.nn.Linear(2, 2))


def test_scan_settings_are_checked():
    with pytest.raises(ValueError, match="engine"):
        ScanConfig(engine="turbo")
    with pytest.raises(ValueError, match="packed regions need engine='fast'"):
        ScanConfig(engine="reference", regions="packed")
    with pytest.raises(ValueError, match="packed regions need engine='fast'"):
        ScanConfig(engine="reference", grounding_regions="packed")
    with pytest.raises(ValueError, match="grounding_regions"):
        ScanConfig(grounding_regions="pool")
    with pytest.raises(ValueError, match="packed_min_coverage"):
        ScanConfig(packed_min_coverage=1.5)
    with pytest.raises(ValueError, match="precision"):
        ScanConfig(precision="fp8")
    assert inference_dtype("fp32", torch.device("cpu")) is None
    assert inference_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.fixture(scope="module")
def small_world():
    torch.manual_seed(0)
    return load_model("clipfast-tiny"), generate_world(61, seed=5).images


@pytest.mark.parametrize("settings, evidence", [(dict(engine="reference"), "crop"), (dict(batch_size=16), "packed"),
                                                (dict(regions="crop", prefetch=2, batch_size=16), "crop"),
                                                (dict(regions="packed", precision="bf16", batch_size=7), "packed"),
                                                (dict(regions="packed", encode_batch=3, batch_size=16), "packed")])
def test_every_engine_scans_an_odd_sized_probe_set(small_world, settings, evidence):
    bundle, images = small_world
    result = scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts,
                  config=ScanConfig(progress=False, **settings))
    # the report says how the regions were seen (the default, auto, is packed evidence in self mode)
    assert result.region_modes == {"evidence": evidence, "naming": "crop"}
    assert result.summary()["regions"] == result.region_modes
    assert len(result.image_label) == 61 and (result.region_counts > 0).any()
    assert 0 < result.image_prob.min() and result.image_prob.max() <= 1
    assert result.seconds["regions"] > 0 and result.seconds["segment"] > 0



@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_the_mirror_tests_labels_are_the_models_labels_of_the_three_views(small_world, engine):
    """Self mode: per image, the model's label of the mirrored image, of its largest region alone (the
    rest median-filled) and of that object mirrored; a trusted-mode scan does not measure them."""
    bundle, images = small_world
    images = images[:13]
    config = ScanConfig(progress=False, engine=engine, precision="fp32", batch_size=5)
    result = scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts, config=config)
    largest = ClassicalSegmenter().segment(images)
    objects = fill_with_median(images, ~(largest.masks[:, 0] & largest.valid[:, 0, None, None]))
    classifier = ZeroShotClassifier(bundle, list(CLASSES), prompts=zero_shot_prompts)
    for column, views in (("mirror_label", images.flip(-1)), ("object_label", objects),
                          ("mirror_object_label", objects.flip(-1))):
        agree = getattr(result, column) == classifier.predict(views)[0][:, 0]
        assert agree.all(), column
    trusted = scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts, config=config,
                   grounding_bundle=bundle)
    assert (trusted.mirror_label == -1).all() and trusted.mirror_test is None
    off = scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts,
               config=dataclasses.replace(config, mirror_test=False))
    assert (off.object_label == -1).all() and off.mirror_test is None

@pytest.mark.slow  # the session's trained model (~1 min), three scans
def test_packed_regions_find_triggers_while_crops_name_them(poisoned_world):
    """regions sets how the suspect's own region scores are encoded (the trigger evidence),
    grounding_regions how the grounding model names regions: with packed + crop (self mode, the
    suspect encoded both ways) the scores are the packed scan's and the grounding the crop scan's."""
    bundle, pairs, _ = poisoned_world
    images = pairs.images[:200]
    scans = {(regions, naming): scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts,
                                     config=ScanConfig(progress=False, precision="fp32", regions=regions,
                                                       grounding_regions=naming))
             for regions, naming in [("crop", "crop"), ("packed", "packed"), ("packed", "crop")]}
    mixed, crop, packed = scans["packed", "crop"], scans["crop", "crop"], scans["packed", "packed"]
    assert torch.equal(mixed.discrepancy, packed.discrepancy) and torch.equal(mixed.grounded, crop.grounded)
    assert not torch.equal(crop.grounded, packed.grounded)  # the two namings differ: the check above can fail
    assert (mixed.reference_label == -1).all() and not mixed.discordant.any()  # still the self oracle


def test_fast_and_reference_scores_agree_on_an_untrained_model(small_world):
    bundle, images = small_world
    fast, reference = (scan(bundle, list(CLASSES), images, ClassicalSegmenter(), prompts=zero_shot_prompts,
                            config=ScanConfig(progress=False, engine=engine, precision="fp32"))
                       for engine in ("fast", "reference"))
    assert torch.equal(fast.image_label, reference.image_label)
    torch.testing.assert_close(fast.image_prob, reference.image_prob, atol=1e-4, rtol=1e-4)
    # Crops differ only in the resize filter (bilinear kernel vs PIL bicubic): labels mostly agree.
    assert (fast.oracle_label == reference.oracle_label).float().mean() >= 0.8


def _eager_grounding(probs: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor, threshold: float):
    """The definition: every scored region named, an image grounded where any one grounds its label."""
    top = probs.max(-1)
    named = torch.where(scored, top.indices, -1)
    return ((named == labels[:, None]) & (top.values >= threshold)).any(-1), named


@pytest.mark.parametrize("images, regions, classes, seed", [(7, 13, 5, 0), (16, 1, 3, 1), (5, 32, 11, 2), (9, 6, 2, 3),
                                                             (3, 0, 4, 4)])
def test_naming_until_grounded_is_naming_every_region(images, regions, classes, seed):
    """name_until_grounded gives every image the grounding of the definition and the largest region's
    label, names each region it names as the definition does, and names at most max(1, 2g) regions
    of an image whose first grounding region is g (all of them where none grounds)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(images, regions, classes, generator=gen) * torch.rand(images, regions, 1, generator=gen) * 6
    probs = logits.softmax(-1)
    scored = torch.rand(images, regions, generator=gen) > 0.2
    labels = torch.randint(0, classes, (images,), generator=gen)
    # A region's mask holds one pixel that says which (image, region) it is: the fake grounding model
    # reads it back, and counts what it was asked.
    side = 1 + int((images * regions) ** 0.5)
    masks = torch.zeros(images, regions, side * side, dtype=torch.bool)
    masks.view(-1, side * side)[torch.arange(images * regions), torch.arange(images * regions)] = True
    masks = masks.view(images, regions, side, side)
    asked = []

    def region_probs(pictures, region_masks):
        assert len(pictures) == len(region_masks) <= 4
        which = region_masks.flatten(1).float().argmax(1)
        asked.extend(which.tolist())
        return probs.view(-1, classes)[which]

    grounded, named = name_until_grounded(region_probs, torch.zeros(images, 3, side, side, dtype=torch.uint8), masks,
                                          scored, labels, 0.5, chunk=4)
    expected_grounded, expected_named = _eager_grounding(probs, scored, labels, 0.5)
    assert torch.equal(grounded, expected_grounded)
    was_named = named >= 0
    assert torch.equal(named[was_named], expected_named[was_named])
    if regions:
        assert torch.equal(named[:, 0], expected_named[:, 0])  # the oracle label's region
    assert len(asked) == len(set(asked)) == int(was_named.sum())  # each region named at most once
    hits = (expected_named == labels[:, None]) & (probs.max(-1).values >= 0.5)
    for i in range(images):
        count = int(was_named[i].sum())
        if hits[i].any():
            assert count <= max(1, 2 * int(hits[i].float().argmax()))
        else:
            assert torch.equal(was_named[i], scored[i])
    if images == 7:  # the case that tests a saving: some image grounded before its last region
        assert int(was_named.sum()) < int(scored.sum())


@pytest.mark.slow  # the session's trained model (~1 min), eight small scans
@pytest.mark.parametrize("oracle", ["classical", "cells"])
def test_naming_only_what_the_scan_reads_changes_no_column(poisoned_world, oracle, monkeypatch, tmp_path):
    """The fast engine names a separate grounding model's regions lazily (name_until_grounded, and the
    passing donors' other regions the naming did not reach at the end); every column of the scan equals
    naming every region, in self mode (packed evidence, crop naming) and with a trusted model; with
    the naming's labels withheld, the passing donors' caption labels, then all named at the end, too."""
    from clipfast.bench.pipeline import FixedOracle
    from clipfast.defense.scan import scanner

    bundle, pairs, _ = poisoned_world
    images = pairs.images[:160]
    segmenter = ClassicalSegmenter() if oracle == "classical" else FixedOracle(9, "cells")
    config = ScanConfig(progress=False, precision="fp32", batch_size=48, regions="packed")
    columns = {}
    lazily = scanner.name_until_grounded

    def unnamed(*args, **kwargs):  # the same grounding, no region's name kept
        grounded, named = lazily(*args, **kwargs)
        return grounded, torch.full_like(named, -1)

    for lazy in ("unnamed", True, False):
        if lazy == "unnamed":
            monkeypatch.setattr(scanner, "name_until_grounded", unnamed)
        if lazy is True:
            monkeypatch.setattr(scanner, "name_until_grounded", lazily)
        if not lazy:  # every region named, as the reference engine does
            monkeypatch.setattr(scanner.ShardScanner, "name_lazily", property(lambda self: False, lambda self, v: None),
                                raising=False)
        for mode, kwargs in (("self", {}), ("trusted", dict(grounding_bundle=bundle))):
            result = scan(bundle, list(CLASSES), images, segmenter, prompts=zero_shot_prompts, config=config,
                          shard_dir=tmp_path / f"{lazy}-{mode}", **kwargs)
            columns[lazy, mode] = {name: value for name, value in vars(result).items() if isinstance(value, torch.Tensor)}
            columns[lazy, mode]["targets"] = torch.tensor(result.targets)
    for mode in ("self", "trusted"):
        for name, value in columns[False, mode].items():
            assert torch.equal(columns[True, mode][name], value), (mode, name)
            if name != "oracle_label":
                assert torch.equal(columns["unnamed", mode][name], value), (mode, name)
        passing = columns[False, mode]["flip_rate"] >= config.min_flip_rate
        assert passing.any()
        assert torch.equal(columns["unnamed", mode]["oracle_label"][passing], columns[False, mode]["oracle_label"][passing])
    assert (columns[True, "trusted"]["reference_label"] >= 0).all()  # the trusted model's whole-image labels
    # Both ways name a trigger's caption source at the end: it is the crop label, as every region's
    # crop scores give it, of the image's largest region other than the trigger region.
    shards = [ScanShard(**torch.load(path)["shard"]) for path in sorted((tmp_path / "True-self").glob("shard-*.pt"))]
    trigger_masks = {i: mask for shard in shards for i, mask in shard.unpacked_trigger_masks().items()}
    assert trigger_masks  # some passing donors to check (2 with the cells, more with the classical oracle)
    oracle_label = columns[True, "self"]["oracle_label"]
    crops = ScanConfig(progress=False, precision="fp32", regions="crop")
    scorer = make_scorer(bundle, ZeroShotClassifier(bundle, list(CLASSES), prompts=zero_shot_prompts), crops)
    for i, trigger in trigger_masks.items():
        lo = i - i % config.batch_size  # segmented with its batch (the fixed oracle's masks go by batch position)
        segmentation = segmenter.segment(images[lo : lo + config.batch_size])
        masks, valid = segmentation.masks[i - lo : i - lo + 1], segmentation.valid[i - lo : i - lo + 1]
        other = [j for j in range(masks.shape[1]) if valid[0, j] and not torch.equal(masks[0, j], trigger)]
        scores = scorer.submit(images[i : i + 1], masks, valid).result()
        assert int(oracle_label[i]) == (int(scores.region_label[0, other[0]]) if other else -1), i
