"""The defence's set logic on hand-made cases: target decision, curation, run directories, the
CleanCLIP objective."""

import pytest
import torch
from scipy.stats import binom

from clipfast.defense.curate import CurateConfig, curate
from clipfast.defense.pipeline import claim_run_directory, load_scan, save_scan
from clipfast.defense.scan import ImageColumns, LabelTest, ScanConfig, ScanResult, ScanShard, decide_targets
from clipfast.defense.scan.decide import decide, object_alone_test, trimmed_counts
from clipfast.defense.scan.result import Flips, TriggerEstimate
from clipfast.errors import RunMismatchError
from clipfast.ops import pack_mask_bits
from clipfast.train.cleanclip import augment_caption


def labels_with_candidates(per_label_predicted, per_label_candidates):
    labels, candidate = [], []
    for label, (n, c) in enumerate(zip(per_label_predicted, per_label_candidates)):
        labels += [label] * n
        candidate += [True] * c + [False] * (n - c)
    return torch.tensor(labels), torch.tensor(candidate)


UNKNOWN_SOURCES = torch.full((1800,), -1)  # no source class known: nothing is left out of the counts


def test_target_is_the_label_with_far_more_candidates_than_the_others_rate():
    labels, candidate = labels_with_candidates([300] * 6, [3, 2, 4, 30, 1, 3])
    test, targets = decide_targets(labels, candidate, UNKNOWN_SOURCES[:len(labels)], 6, ScanConfig())
    assert targets == [3]
    assert test.candidates == [3, 2, 4, 30, 1, 3]
    assert test.p_values[3] < test.threshold < min(p for i, p in enumerate(test.p_values) if i != 3)


@pytest.mark.parametrize("candidates", [[3, 2, 4, 5, 1, 3], [0] * 6, [4, 0, 0, 0, 0, 0]])
def test_no_false_alarm_without_an_outlier(candidates):
    labels, candidate = labels_with_candidates([300] * 6, candidates)
    assert decide_targets(labels, candidate, UNKNOWN_SOURCES[:len(labels)], 6, ScanConfig())[1] == []


def test_a_significant_but_tiny_count_is_not_a_target():
    labels, candidate = labels_with_candidates([50, 5000], [4, 0])  # p tiny, but only 4 images
    assert decide_targets(labels, candidate, torch.full((len(labels),), -1), 2, ScanConfig(min_count=5))[1] == []


def test_a_confusion_from_one_or_two_classes_is_not_a_target_but_victims_from_many_are():
    labels, candidate = labels_with_candidates([300] * 6, [3, 2, 4, 30, 1, 3])
    from_two = torch.full((len(labels),), 0)
    from_two[(labels == 3).nonzero().flatten()[:30]] = torch.tensor([1] * 16 + [2] * 14)  # label 3 absorbs 1 and 2
    test, targets = decide_targets(labels, candidate, from_two, 6, ScanConfig())
    assert targets == [] and test.candidates[3] == 0 and test.sources[3] == 2
    from_many = from_two.clone()
    from_many[(labels == 3).nonzero().flatten()[:30]] = torch.tensor([0, 1, 2, 4, 5] * 6)  # a backdoor's victims
    test, targets = decide_targets(labels, candidate, from_many, 6, ScanConfig())
    assert targets == [3] and test.candidates[3] == 18 and test.sources[3] == 5



def mirror_columns(per_label, seed=0):
    """Self-mode columns, 300 images per label: per_label[l] = (share of l's images the mirror
    relabels, share of l's objects alone it relabels); relabelled images go to the next label."""
    generator = torch.Generator().manual_seed(seed)
    count = 300 * len(per_label)
    columns = ImageColumns.empty(count)
    columns.readable = torch.ones(count, dtype=torch.bool)  # (empty()'s columns share their tensors)
    columns.grounded = columns.readable.clone()
    columns.image_label = torch.arange(len(per_label)).repeat_interleave(300)
    columns.object_label = columns.image_label.clone()
    columns.mirror_label, columns.mirror_object_label = columns.image_label.clone(), columns.image_label.clone()
    for label, (image_rate, object_rate) in enumerate(per_label):
        rows = (columns.image_label == label).nonzero().flatten()
        flipped = rows[torch.rand(len(rows), generator=generator) < image_rate]
        columns.mirror_label[flipped] = (label + 1) % len(per_label)
        alone = rows[torch.rand(len(rows), generator=generator) < object_rate]
        columns.mirror_object_label[alone] = (label + 1) % len(per_label)
    return columns


def decided(columns, config=ScanConfig(), patch=None):
    patch = torch.zeros(len(columns), dtype=torch.bool) if patch is None else patch
    columns.flip_rate = torch.where(patch, 0.9, -1.0)
    shard = ScanShard(**vars(columns), lo=0, hi=len(columns), width=4,
                      trigger_masks={int(i): pack_mask_bits(torch.ones(4, 4, dtype=torch.bool))[0]
                                     for i in patch.nonzero().flatten()})
    return decide([f"label{k}" for k in range(6)], [shard], config, {})


def test_the_mirror_test_flags_a_label_the_flip_relabels_far_more_than_its_objects_alone():
    """Self mode, no region evidence: label 4's images are relabelled by the flip 40 % of the time and
    its objects alone 2 % (an image-wide trigger the flip breaks); label 2 is relabelled 25 % both
    ways (a shape the flip confuses: an arrow), which the other labels' pooled rate would flag."""
    columns = mirror_columns([(0.01, 0.01), (0.02, 0.02), (0.25, 0.25), (0.0, 0.0), (0.4, 0.02), (0.01, 0.01)])
    relabelled = (columns.image_label == 4) & (columns.mirror_label != 4)
    # the victims' objects alone are their source class, but for 7 real target-class images the flip relabels
    genuine = relabelled.nonzero().flatten()[:7]
    columns.object_label[relabelled] = columns.mirror_object_label[relabelled] = 5
    columns.object_label[genuine] = columns.mirror_object_label[genuine] = 4
    result = decided(columns)
    assert result.targets == [4] and [t.kind for t in result.triggers] == ["image-wide"]
    test = result.mirror_test
    assert test.p_values[4] < test.threshold < min(p for k, p in enumerate(test.p_values) if k != 4)
    victims = relabelled.clone()
    victims[genuine] = False  # the model calls their object alone the target: target-class objects
    assert torch.equal(result.triggers[0].victim_indices, victims.nonzero().flatten())
    # the victims are named by the flip (their source, in this world), nothing else is renamed
    assert (result.oracle_label[victims] == 5).all() and (result.oracle_label[~victims] == -1).all()
    summary = result.summary()["mirror_test"]
    assert summary["label4"]["mirror_changed"] == int(relabelled.sum())


@pytest.mark.parametrize("per_label", [
    [(0.01, 0.01)] * 6,  # nothing relabelled anywhere
    [(0.3, 0.25)] + [(0.01, 0.01)] * 5,  # one mirror-sensitive shape, as sensitive alone
    [(0.05, 0.0)] * 6,  # few relabelled images: below min_count's reach on no label
])
def test_no_mirror_target_without_an_image_wide_outlier(per_label):
    columns = mirror_columns(per_label)
    if per_label[0] == (0.05, 0.0):  # keep the count under min_count
        columns.mirror_label = torch.where(torch.arange(len(columns)) % 300 < 4, (columns.image_label + 1) % 6,
                                           columns.image_label)
    assert decided(columns).targets == []


def test_a_label_without_objects_alone_is_never_a_mirror_target():
    columns = mirror_columns([(0.01, 0.01)] * 4 + [(0.5, 0.0), (0.01, 0.01)])
    columns.object_label[columns.object_label == 4] = 0  # the model never names an object alone 'label4'
    columns.mirror_object_label = columns.object_label.clone()
    assert decided(columns).targets == []


def test_a_patch_target_the_mirror_also_flags_stays_a_patch_and_trusted_scans_skip_the_test():
    columns = mirror_columns([(0.01, 0.01)] * 3 + [(0.4, 0.02)] + [(0.01, 0.01)] * 2)
    patch = torch.zeros(len(columns), dtype=torch.bool)
    patch[(columns.image_label == 3).nonzero().flatten()[:40]] = True
    result = decided(columns, patch=patch)
    assert result.targets == [3] and [t.kind for t in result.triggers] == ["patch"]
    assert len(result.triggers[0].victim_indices) == 40  # the patch evidence, not the flip's images
    unmeasured = mirror_columns([(0.01, 0.01)] * 4 + [(0.5, 0.0), (0.01, 0.01)])
    unmeasured.mirror_label[:] = -1  # trusted mode (or mirror_test off): the columns are not measured
    unmeasured.object_label[:] = unmeasured.mirror_object_label[:] = -1
    result = decided(unmeasured)
    assert result.targets == [] and result.mirror_test is None and result.summary()["mirror_test"] is None
    assert result.object_test is None and result.summary()["object_test"] is None


def object_flow_columns(flows, exchange=3):
    """Self-mode columns, 300 images per label of 6, none relabelled by the flip; flows[(l, k)] = n:
    n more of label l's images have their object alone labelled k; and every ordered pair of labels
    exchanges `exchange` such images both ways (a clean model's symmetric disagreements)."""
    columns = mirror_columns([(0.0, 0.0)] * 6)
    pairs = {(label, source): exchange for label in range(6) for source in range(6) if label != source}
    for pair, count in flows.items():
        pairs[pair] += count
    for (label, source), count in pairs.items():
        rows = ((columns.image_label == label) & (columns.object_label == label)).nonzero().flatten()[:count]
        columns.object_label[rows] = columns.mirror_object_label[rows] = source
    return columns


def test_the_object_test_flags_a_label_whole_images_get_from_every_other_labels_objects():
    """A flip-robust image-wide trigger on label 4: 12 of its images from each other label's objects
    (the trigger gone with the background), which the flip relabels nowhere."""
    columns = object_flow_columns({(4, source): 12 for source in (0, 1, 2, 3, 5)})
    result = decided(columns)
    assert result.targets == [4] and [t.kind for t in result.triggers] == ["image-wide"]
    assert result.mirror_test.p_values[4] > result.mirror_test.threshold  # the flip does not see it
    test = result.object_test
    assert test.p_values[4] < test.threshold < min(p for k, p in enumerate(test.p_values) if k != 4)
    # into label 4 from the 3 sources left after trimming its 2 largest: 3 x (12 + 3); out: 3 x 3
    assert test.candidates[4] == 45 and test.expected[4] == 27.0
    victims = (columns.image_label == 4) & (columns.object_label != 4)
    assert torch.equal(result.triggers[0].victim_indices, victims.nonzero().flatten())
    # each victim named by its object alone; no other image renamed
    assert torch.equal(result.oracle_label[victims], columns.object_label[victims])
    assert (result.oracle_label[~victims] == -1).all()
    assert result.summary()["object_test"]["label4"] == {"predicted": 300, "whole_not_object": 45, "object_not_whole": 9,
                                                       "p_value": test.p_values[4]}


def test_an_image_wide_targets_victims_come_from_the_test_that_sees_it_best():
    """Label 4 flagged by both tests: the flip relabels 40 of its 215 victims (a warp the flip mostly
    keeps), the object alone has lost it in all: all 215 are victims, named by their objects; with
    the flip relabelling most victims, its p-value is the smaller and the flip's rule holds."""
    for relabelled, rule in ((40, "object"), (180, "flip")):
        columns = object_flow_columns({(4, source): 40 for source in (0, 1, 2, 3, 5)})
        victims = (columns.image_label == 4) & (columns.object_label != 4)
        flipped = victims.nonzero().flatten()[torch.randperm(int(victims.sum()),
                                                             generator=torch.Generator().manual_seed(0))[:relabelled]]
        columns.mirror_label[flipped] = 5
        result = decided(columns)
        mirror, alone = result.mirror_test.p_values[4], result.object_test.p_values[4]
        assert result.targets == [4] and max(mirror, alone) < result.object_test.threshold
        found = result.triggers[0].victim_indices
        if rule == "object":
            assert alone < mirror and torch.equal(found, victims.nonzero().flatten())
            assert torch.equal(result.oracle_label[found], columns.object_label[found])
        else:
            assert mirror < alone and torch.equal(found, flipped.sort().values)
            assert (result.oracle_label[found] == 5).all()


def test_the_image_wide_tests_run_only_where_the_largest_region_is_the_object():
    """With regions blind to the content (the object alone keeps the image's label for few images) both
    image-wide tests are off, even under the strongest one-way flow and flip, and the verdict says
    why; from MIN_OBJECT_AGREEMENT of the probe set on they run as before."""
    from clipfast.defense.pipeline import verdict_of
    from clipfast.defense.repair import RepairConfig
    from clipfast.defense.scan.decide import MIN_OBJECT_AGREEMENT

    columns = object_flow_columns({(4, source): 40 for source in (0, 1, 2, 3, 5)})
    victims = (columns.image_label == 4) & (columns.object_label != 4)
    columns.mirror_label[victims] = 5
    agreeing = columns.object_label == columns.image_label
    result = decided(columns)
    assert result.targets == [4] and result.object_agreement == pytest.approx(float(agreeing.double().mean()))
    assert result.summary()["object_agreement"] == result.object_agreement >= MIN_OBJECT_AGREEMENT
    # fragments for objects: most images' object alone is another label (not the trigger's victims)
    fragments = agreeing.nonzero().flatten()
    for share, runs in ((0.5, False), (0.25, True)):  # of the agreeing images relabelled
        blind = object_flow_columns({(4, source): 40 for source in (0, 1, 2, 3, 5)})
        blind.mirror_label[victims] = 5
        moved = fragments[: int(share * len(columns)) + 1] if not runs else fragments[: int(share * len(fragments))]
        blind.object_label[moved] = (blind.image_label[moved] + 1) % 6
        result = decided(blind)
        assert (result.object_agreement >= MIN_OBJECT_AGREEMENT) == runs
        if runs:
            assert result.mirror_test is not None and result.object_test is not None
        else:
            assert result.mirror_test is None and result.object_test is None and result.targets == []
            verdict = verdict_of(result, None, RepairConfig())
            assert verdict.status == "no_backdoor" and "image-wide tests did not run" in verdict.message
            assert f"{100 * result.object_agreement:.0f} % of the probe images" in verdict.message


@pytest.mark.parametrize("flows", [
    {},  # symmetric disagreements only
    {(2, 1): 80, (2, 3): 40},  # a label whole images get from one or two neighbours' objects: trimmed
    {(0, 5): 30, (5, 0): 30},  # a heavy exchange, both ways
])
def test_no_object_test_target_without_a_one_way_flow_from_many_labels(flows):
    result = decided(object_flow_columns(flows))
    assert result.targets == [] and result.object_test is not None


def dense_object_flows(label, alone, num_labels):
    """The object-alone test's a_l and b_l from the whole [C, C] flow matrix, its definition."""
    flow = torch.zeros(num_labels, num_labels, dtype=torch.int64)
    flow.index_put_((label, alone), torch.ones_like(label), accumulate=True)
    flow.fill_diagonal_(0)
    a, b = [], []
    for index in range(num_labels):
        sources = [k for k in range(num_labels) if flow[index, k] > 0]
        trimmed = sorted(sources, key=lambda k: (-int(flow[index, k]), k))[:2] + [index]
        kept = torch.ones(num_labels, dtype=torch.bool)
        kept[trimmed] = False
        a.append(int(flow[index, kept].sum()))
        b.append(int(flow[kept, index].sum()))
    return a, b


@pytest.mark.parametrize("seed, num_labels, count", [(0, 7, 500), (1, 13, 2000), (2, 3, 50), (3, 40, 300)])
def test_the_object_tests_sparse_flows_equal_the_dense_definition(seed, num_labels, count):
    """Skewed random labels (ties, labels with one or no source, unmeasured rows) against the [C, C] matrix."""
    generator = torch.Generator().manual_seed(seed)
    columns = ImageColumns.empty(count)
    columns.readable = torch.rand(count, generator=generator) < 0.95
    columns.image_label = (torch.rand(count, generator=generator) ** 2 * num_labels).long()
    columns.object_label = torch.where(torch.rand(count, generator=generator) < 0.7, columns.image_label,
                                       torch.randint(-1, num_labels, (count,), generator=generator))
    test, _ = object_alone_test(columns, num_labels, 1e-3, 5)
    measured = columns.readable & (columns.object_label >= 0)
    a, b = dense_object_flows(columns.image_label[measured], columns.object_label[measured], num_labels)
    assert test.candidates == a and test.expected == [(x + y) / 2 for x, y in zip(a, b)]
    assert test.p_values == pytest.approx([binom.sf(x - 1, x + y, 0.5) if x else 1.0 for x, y in zip(a, b)])


@pytest.mark.parametrize("seed, num_labels, count", [(0, 7, 500), (1, 2, 60), (2, 1, 20), (3, 30, 0)])
def test_trimmed_counts_equal_their_label_by_label_definition(seed, num_labels, count):
    """The pooled test's trimmed counts (through the sparse source table) against a per-label loop."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(count, generator=generator) ** 2 * num_labels).long()
    sources = torch.randint(-1, num_labels, (count,), generator=generator)
    candidate = torch.rand(count, generator=generator) < 0.5
    expected_counts, expected_distinct = [], []
    for label in range(num_labels):
        mine = candidate & (labels == label)
        per_source = torch.bincount(sources[mine & (sources >= 0) & (sources != label)], minlength=num_labels)
        expected_counts.append(int(mine.sum()) - int(per_source.sort(descending=True).values[:2].sum()))
        expected_distinct.append(int((per_source > 0).sum()))
    counts, distinct = trimmed_counts(labels, candidate, sources, num_labels)
    assert counts.tolist() == expected_counts and distinct.tolist() == expected_distinct


def test_the_object_test_takes_a_large_vocabulary_without_a_label_by_label_matrix():
    columns = object_flow_columns({(4, source): 40 for source in (0, 1, 2, 3, 5)})  # p ~ 1e-28 < 1e-8 (Bonferroni)
    test, targets = object_alone_test(columns, 50_000, 1e-3 / 2, 5)  # 6 labels used of 50k: the flow stays sparse
    assert targets == [4] and len(test.p_values) == 50_000


def test_the_image_wide_tests_share_the_significance():
    """Self mode's two image-wide tests each take half of it: the family-wise rate stays the stated one."""
    result = decided(object_flow_columns({}), ScanConfig(significance=2e-3))
    assert result.mirror_test.threshold == result.object_test.threshold == pytest.approx(2e-3 / 2 / 6)


def test_a_target_is_a_patch_when_its_patch_victims_alone_are_significant():
    """Trusted mode: a patch target's candidates also hold discordant clean confusions. Label 3 has 30
    patch victims and 40 discordant images without patch evidence (more than the patch victims: a
    majority rule called this image-wide); label 5 has discordance alone (an image-wide trigger)."""
    labels, candidate = labels_with_candidates([400] * 6, [3, 2, 4, 70, 1, 70])
    patch = torch.zeros_like(candidate)
    patch[(labels == 3).nonzero().flatten()[:30]] = True  # the first 30 of label 3's 70 candidates
    columns = ImageColumns.empty(len(labels))
    columns.readable[:] = True
    columns.image_label = labels
    columns.flip_rate = torch.where(patch, 0.9, -1.0)
    columns.discordant = candidate & ~patch
    shard = ScanShard(**vars(columns), lo=0, hi=len(labels), width=4,
                      trigger_masks={int(i): pack_mask_bits(torch.ones(4, 4, dtype=torch.bool))[0]
                                     for i in patch.nonzero().flatten()})
    result = decide([f"label{k}" for k in range(6)], [shard], ScanConfig(), {})
    assert result.targets == [3, 5]
    assert [trigger.kind for trigger in result.triggers] == ["patch", "image-wide"]
    assert len(result.triggers[0].victim_indices) == 70 and len(result.triggers[0].patch_indices) == 30
    assert result.triggers[0].box == (0, 0, 4, 4)


def hand_made_scan():
    """12 probe images, 4 labels, target 3. Victims (candidates labelled 3): 0, 1, 2, 4, 5."""
    n = 12
    image_label = torch.tensor([3, 3, 3, 0, 3, 3, 1, 2, 3, 0, 1, 2])
    candidate = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    oracle_label = torch.tensor([0, 0, 1, 0, 0, 3, 1, 2, 3, 0, 1, 2])  # victim 5's oracle says the target
    discrepancy = torch.tensor([0.5, 0.9, 0.7, 0, 0.9, 0.8, 0, 0, 0, 0, 0, 0])
    grounded = ~candidate
    test = LabelTest([0] * 4, [0] * 4, [0.0] * 4, [1.0] * 4, 1e-3, [0] * 4)
    return ScanResult(readable=torch.ones(n, dtype=torch.bool), image_label=image_label, image_prob=torch.ones(n),
                      grounded=grounded, reference_label=torch.full((n,), -1), discordant=torch.zeros(n, dtype=torch.bool),
                      explaining_drop=torch.zeros(n), flip_rate=candidate.float(), discrepancy=discrepancy,
                      oracle_label=oracle_label, region_counts=torch.ones(n, dtype=torch.int64),
                      mirror_label=torch.full((n,), -1), object_label=torch.full((n,), -1),
                      mirror_object_label=torch.full((n,), -1),
                      classnames=["a", "b", "c", "d"], patch_evidence=candidate, candidate=candidate, label_test=test,
                      targets=[3], triggers=[])


def test_curate_picks_top_victims_per_affected_label_and_balanced_replay():
    scan = hand_made_scan()
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous()
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    assert compact.victim_indices.tolist() == [0, 1, 2, 4, 5]
    assert compact.affected_labels == [0, 1]  # victim 5's oracle label is the target: no corrective caption
    victims = compact.source_indices[compact.is_victim].tolist()
    assert victims == [1, 4, 2]  # label 0: 0.9 ties at 1 and 4 -> lower index first; label 1: image 2
    captions = [c for c, v in zip(compact.captions, compact.is_victim) if v]
    assert [c.split()[-1] for c in captions] == ["a.", "a.", "b."]
    replay = compact.source_indices[~compact.is_victim & ~compact.is_synthesized].tolist()
    assert sorted(scan.image_label[replay].tolist()) == [0, 1, 2, 3]  # one per label, class-balanced
    assert all(scan.grounded[replay])
    # no trigger was recovered here: nothing to put on clean images, so no unlearning pairs
    assert not compact.is_synthesized.any()
    assert torch.equal(compact.images[:, 0, 0, 0], compact.source_indices.to(torch.uint8))

    # with victim 0's top-left pixel as a patch trigger: labels 0 and 1 have curated victims and 3 is
    # the target, so only label 2's other clean images get the trigger pasted on
    corner = torch.zeros(1, 2, 2, dtype=torch.bool)
    corner[0, 0, 0] = True
    scan.triggers = [TriggerEstimate(3, "patch", torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0]), corner,
                                     torch.ones(1), corner[0], (0, 0, 1, 1))]
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1, triggered_per_label=0))
    synthesized = compact.source_indices[compact.is_synthesized]
    replay = compact.source_indices[~compact.is_victim & ~compact.is_synthesized].tolist()
    assert sorted(synthesized.tolist()) == sorted({7, 11} - set(replay)) and len(synthesized) == 1
    pasted = compact.images[compact.is_synthesized]
    assert (pasted[:, :, 0, 0] == 0).all() and torch.equal(pasted[:, 0, 1, 1], synthesized.to(torch.uint8))
    assert torch.equal(compact.clean_views[compact.is_synthesized][:, 0, 0, 0], synthesized.to(torch.uint8))

    # a patch trigger tops every non-target label up to triggered_per_label trigger-bearing images:
    # label 0 has its 2 curated victims, label 1 one victim and one pasted image, label 2 a pasted
    # image (its only clean image besides the replay one), label 3 (the target) none
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1, triggered_per_label=2))
    synthesized = compact.source_indices[compact.is_synthesized]
    replay = compact.source_indices[~compact.is_victim & ~compact.is_synthesized].tolist()
    assert sorted(synthesized.tolist()) == sorted({6, 10, 7, 11} - set(replay)) and len(synthesized) == 2
    assert sorted(scan.image_label[synthesized].tolist()) == [1, 2]

    # victims mostly of the target class (label-consistent poisoning: their captions correct nothing):
    # every non-target label gets pasted images, curated victim or not
    scan.oracle_label[torch.tensor([0, 1, 2])] = 3
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    synthesized = compact.source_indices[compact.is_synthesized]
    replay = compact.source_indices[~compact.is_victim & ~compact.is_synthesized].tolist()
    assert sorted(synthesized.tolist()) == sorted({3, 9, 6, 10, 7, 11} - set(replay))
    assert sorted(scan.image_label[synthesized].tolist()) == [0, 1, 2]


def test_a_patch_victims_clean_view_is_itself_with_its_trigger_region_filled():
    scan = hand_made_scan()
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous()
    images[1, :, 0, 0] = 200  # victim 1 carries a one-pixel patch trigger at the top left
    corner = torch.zeros(1, 2, 2, dtype=torch.bool)
    corner[0, 0, 0] = True
    scan.triggers = [TriggerEstimate(3, "patch", torch.tensor([0, 1, 2, 4, 5]), torch.tensor([1]), corner,
                                     torch.ones(1), corner[0], (0, 0, 1, 1))]
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    row = compact.source_indices.tolist().index(1)
    assert compact.is_victim[row] and compact.has_clean_view[row]
    assert compact.images[row, 0, 0, 0] == 200  # the victim keeps its trigger (its caption corrects it)
    assert (compact.clean_views[row] == 1).all()  # its anchor view: the region filled with its background
    others = compact.is_victim.clone()
    others[row] = False  # victims 4 and 2 have no recovered region: no clean view, not anchored
    assert others.sum() == 2 and not compact.has_clean_view[others].any()
    assert compact.has_clean_view[~compact.is_victim].all()


def test_curate_refuses_a_scan_without_target():
    scan = hand_made_scan()
    scan.targets = []
    with pytest.raises(ValueError, match="no target label"):
        curate(scan, torch.zeros(12, 3, 2, 2, dtype=torch.uint8))


def test_scan_result_round_trips_through_its_file(tmp_path):
    scan = hand_made_scan()
    save_scan(scan, tmp_path / "scan.pt")
    loaded = load_scan(tmp_path / "scan.pt")
    assert loaded.targets == [3] and torch.equal(loaded.candidate, scan.candidate)
    assert loaded.label_test == scan.label_test
    # an image-wide trigger's transplant tests, and an unconfirmed label's, come back as they were
    empty = torch.zeros(2, 2, dtype=torch.bool)
    scan.triggers = [TriggerEstimate(3, "image-wide", torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64),
                                     empty[None, :0], torch.zeros(0), empty, None, Flips(0.01, 0.0), Flips(0.8, 0.01),
                                     False)]
    scan.unconfirmed = {"b": {"pattern": Flips(0.02, 0.03), "background": Flips(0.0, 0.01)}}
    save_scan(scan, tmp_path / "scan.pt")
    loaded = load_scan(tmp_path / "scan.pt")
    assert loaded.triggers[0].background == Flips(0.8, 0.01) and loaded.triggers[0].additive is False
    assert loaded.unconfirmed == scan.unconfirmed and loaded.summary()["unconfirmed"] == scan.summary()["unconfirmed"]


def test_run_directory_refuses_other_settings(tmp_path):
    claim_run_directory(tmp_path, {"scan": {"a": 1}, "inputs": {"model": "x"}})
    claim_run_directory(tmp_path, {"scan": {"a": 1}, "inputs": {"model": "x"}})  # same settings: fine
    with pytest.raises(RunMismatchError, match="differences in: scan"):
        claim_run_directory(tmp_path, {"scan": {"a": 2}, "inputs": {"model": "x"}})


def test_caption_views_keep_the_label_word():
    generator = torch.Generator().manual_seed(0)
    views = {augment_caption("a photo of a small heart.", generator) for _ in range(50)}
    assert len(views) > 3
    assert all(v.endswith("heart.") for v in views)
    assert augment_caption("a heart.", generator) == "a heart."


def test_a_flip_rate_needs_enough_recipients():
    """The transplant test: a region pasted onto recipients whose largest object is at least twice
    its size; a rate from fewer than min_recipients of them is no rate (-1), so one lucky flip of one
    recipient is not trigger evidence."""
    from clipfast.defense.scan.evidence import RecipientPool, flip_rates

    size = 16
    images = torch.zeros(6, 3, size, size, dtype=torch.uint8)
    largest = torch.zeros(6, size, size, dtype=torch.bool)
    largest[:, 8:, :] = True  # every recipient's object: the bottom half (128 pixels)
    pool = RecipientPool(images, torch.tensor([1, 1, 2, 2, 3, 3]), largest, torch.arange(10, 16))
    marker = 255  # the "model": label 0 where the marker pixel value is present, else label 1

    def class_probs(batch):
        hit = (batch == marker).flatten(1).any(1)
        return torch.stack([hit.float(), (~hit).float()], 1)

    donors = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    donors[:, :, :4, :4] = marker
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, :4, :4] = True  # 16 pixels: every recipient qualifies (128 >= 2 * 16)
    masks[1, :8, :5] = True  # 40 pixels: recipients qualify (128 >= 2 * 40)
    rates = flip_rates(class_probs, donors, masks, torch.tensor([0, 0]), torch.tensor([0, 1]), pool, 8, 0.1, 2.0,
                       4, min_recipients=4)
    assert rates.tolist() == [1.0, 1.0]
    masks[1] = False
    masks[1, :8, :9] = True  # 72 pixels: no recipient's object is twice as large
    rates = flip_rates(class_probs, donors, masks, torch.tensor([0, 0]), torch.tensor([0, 1]), pool, 8, 0.1, 2.0,
                       4, min_recipients=4)
    assert rates.tolist() == [1.0, -1.0]
    few = RecipientPool(images[:3], torch.tensor([1, 1, 0]), largest[:3], torch.arange(10, 13))  # 2 of another label
    assert flip_rates(class_probs, donors[:1], masks[:1], torch.tensor([0]), torch.tensor([0]), few, 8, 0.1, 2.0, 4,
                      min_recipients=4).tolist() == [-1.0]
    assert flip_rates(class_probs, donors[:1], masks[:1], torch.tensor([0]), torch.tensor([0]), few, 8, 0.1, 2.0, 4,
                      min_recipients=2).tolist() == [1.0]
    with pytest.raises(ValueError, match="min_recipients"):
        ScanConfig(min_recipients=9)


def test_the_transplant_test_stops_early_only_where_the_decision_is_settled():
    """flip_rates with min_rate: a donor none of whose first n - c + 1 recipients flips (c: the flips
    min_rate needs) gets no more encodes; every donor's pass / fail and every passing rate stay those
    of the full test."""
    from clipfast.defense.scan.evidence import RecipientPool, flip_rates

    size, recipients = 16, 10
    images = torch.zeros(recipients, 3, size, size, dtype=torch.uint8)
    images[:, :, 0, 15] = torch.arange(recipients, dtype=torch.uint8)[:, None] * 20  # a per-recipient "susceptibility"
    largest = torch.zeros(recipients, size, size, dtype=torch.bool)
    largest[:, 8:, :] = True
    pool = RecipientPool(images, torch.full((recipients,), 1), largest, torch.arange(100, 100 + recipients))
    encoded = []

    def class_probs(batch):  # label 0 where the donor's marker value beats the recipient's susceptibility
        encoded.append(len(batch))
        hit = batch[:, 0, 0, 0].int() >= 255 - batch[:, 0, 0, 15].int()
        return torch.stack([hit.float(), (~hit).float()], 1)

    strengths = [255, 0, 130, 175, 215, 100]  # flips every / no / some recipients
    donors = torch.zeros(len(strengths), 3, size, size, dtype=torch.uint8)
    donors[:, :, :2, :2] = torch.tensor(strengths, dtype=torch.uint8)[:, None, None, None]
    masks = torch.zeros(len(strengths), size, size, dtype=torch.bool)
    masks[:, :2, :2] = True
    args = (class_probs, donors, masks, torch.zeros(len(strengths), dtype=torch.int64), torch.arange(len(strengths)),
            pool, 8, 0.1, 2.0, 64)
    full = flip_rates(*args, min_recipients=4)
    full_encodes, encoded[:] = sum(encoded), []
    for min_rate in (0.5, 0.3, 0.8):
        early = flip_rates(*args, min_recipients=4, min_rate=min_rate)
        assert ((early >= min_rate) == (full >= min_rate)).all(), min_rate
        assert torch.equal(early[full >= min_rate], full[full >= min_rate])
        assert (early[full < min_rate] <= full[full < min_rate]).all()
    assert full.tolist()[:2] == [1.0, 0.0] and 0 < float(full[3]) < 1  # the cases above are all exercised
    early = flip_rates(*args, min_recipients=4, min_rate=0.5)
    assert sum(encoded[-2:]) < full_encodes


def test_the_held_out_asr_leaves_out_victims_whose_oracle_label_is_the_target():
    """A label-consistent attack's victims are target-class images: called the target after repair,
    they are right, not attack successes (held-out victims here: 0, and 5 whose oracle says the target)."""
    from clipfast.defense.repair import holdout_estimator
    from clipfast.models import load_model

    torch.manual_seed(0)
    scan = hand_made_scan()
    scan.classnames = ["circle", "square", "star", "heart"]  # words the tiny model's tokenizer knows
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    assert sorted(set(compact.victim_indices.tolist()) - set(compact.source_indices.tolist())) == [0, 5]
    estimates = holdout_estimator(scan, compact, images, None, holdout_clean=4, seed=0)(load_model("clipfast-tiny"))
    assert estimates["asr_n"] == 1 and 0 <= estimates["asr_hits"] <= 1
    # the one image is victim 0 (no trigger recovered here, so none pasted: self mode counts the victims)
    assert estimates["asr_victim_n"] == 1 and estimates["asr_victim_hits"] == estimates["asr_hits"]
    assert estimates["asr_pasted_n"] == 0


def test_a_patch_targets_held_out_asr_counts_only_victims_with_patch_evidence():
    """With a trusted model a patch target's victims also hold discordant images without patch
    evidence (mostly the two models' confusions, which repair leaves as they are): the estimate counts
    held-out victims with patch evidence (here held-out victim 0, only when it has it) and the
    trigger pasted on held-out clean images."""
    from clipfast.defense.repair import holdout_estimator
    from clipfast.models import load_model

    scan = patch_target_scan()
    scan.reference_label = scan.image_label.clone()  # a trusted model that agrees on every image
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model, counts = load_model("clipfast-tiny"), []
    for patched in ([1, 2, 4, 5], [0, 1, 2, 4]):
        scan.triggers[0].patch_indices = torch.tensor(patched)
        # (no top-up: in 12 images it would leave no held-out clean image to paste the trigger on)
        compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1, triggered_per_label=0))
        estimates = holdout_estimator(scan, compact, images, None, holdout_clean=4, seed=0)(model)
        assert estimates["asr_n"] == estimates["asr_victim_n"] + estimates["asr_pasted_n"] > estimates["asr_victim_n"]
        counts.append(estimates["asr_n"])
    assert counts[1] == counts[0] + 1


def test_the_self_mode_held_out_asr_counts_the_pasted_images_alone():
    """Without a trusted model the victims' labels are the suspect's (a label-consistent attack makes
    it misname its target class): the estimate is the trigger pasted on held-out clean images, and the
    held-out victims are reported beside it."""
    from clipfast.defense.repair import holdout_estimator
    from clipfast.models import load_model

    scan = patch_target_scan()
    scan.triggers[0].patch_indices = torch.tensor([0, 1, 2, 4])
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1, triggered_per_label=0))
    estimates = holdout_estimator(scan, compact, images, None, holdout_clean=4, seed=0)(load_model("clipfast-tiny"))
    assert estimates["asr_victim_n"] == 1 and estimates["asr_pasted_n"] > 0
    assert (estimates["asr_hits"], estimates["asr_n"]) == (estimates["asr_pasted_hits"], estimates["asr_pasted_n"])
    assert estimates["asr_estimate"] == estimates["asr_pasted_hits"] / estimates["asr_pasted_n"]



def test_the_self_mode_held_out_asr_counts_the_mirror_tests_victims():
    """Self mode's image-wide targets come from the mirror test, whose victims exclude images whose
    object alone is the target and are named by the mirror: they count beside the pasted images (the
    pasted composites alone said *removed* on a warp that kept 6.9 % ASR)."""
    from clipfast.defense.repair import holdout_estimator
    from clipfast.models import load_model

    scan = hand_made_scan()
    scan.classnames = ["circle", "square", "star", "heart"]
    size = 32
    scan.triggers = [TriggerEstimate(3, "image-wide", scan.victims(3), torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(0, size, size, dtype=torch.bool), torch.zeros(0),
                                     torch.zeros(size, size, dtype=torch.bool), None, additive=True)]
    images = torch.randint(0, 256, (12, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    estimates = holdout_estimator(scan, compact, images, None, holdout_clean=4, seed=0)(load_model("clipfast-tiny"))
    assert estimates["asr_victim_n"] >= 1 and estimates["asr_pasted_n"] > 0
    assert estimates["asr_n"] == estimates["asr_victim_n"] + estimates["asr_pasted_n"]
    assert estimates["asr_hits"] == estimates["asr_victim_hits"] + estimates["asr_pasted_hits"]

def patch_target_scan():
    """hand_made_scan with a corner patch trigger recovered for target 3 (patch victims 1, 2, 4, 5)."""
    scan = hand_made_scan()
    scan.classnames = ["circle", "square", "star", "heart"]  # words the tiny model's tokenizer knows
    corner = torch.zeros(4, 32, 32, dtype=torch.bool)
    corner[:, :4, :4] = True
    scan.triggers = [TriggerEstimate(3, "patch", torch.tensor([0, 1, 2, 4, 5]), torch.tensor([1, 2, 4, 5]), corner,
                                     torch.ones(4), corner[0], (0, 0, 4, 4))]
    return scan


@pytest.mark.parametrize("target_asr, steps, stopped", [(None, 4, False), (1.0, 2, True)])
def test_repair_runs_its_whole_budget_unless_a_target_asr_is_set(tmp_path, target_asr, steps, stopped):
    """By default the repair trains every step (the estimates are measured, not acted on); with a
    target_asr it stops at the first estimate at or below it (every estimate is <= 1.0)."""
    from clipfast.defense.repair import RepairConfig, repair
    from clipfast.models import load_model

    torch.manual_seed(0)
    scan = hand_made_scan()
    scan.classnames = ["circle", "square", "star", "heart"]  # words the tiny model's tokenizer knows
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    config = RepairConfig(max_steps=4, batch_size=4, warmup_steps=1, eval_every=2, holdout_clean=4,
                          target_asr=target_asr, progress=False)
    result = repair(load_model("clipfast-tiny"), compact, scan, images, tmp_path, config=config)
    assert (result.train.step, result.stopped_early) == (steps, stopped)
    assert "asr_estimate" in result.estimates


@pytest.mark.parametrize("kind, trusted, weights, bound, anchors", [
    ("image-wide", True, {}, 10.0, 60.0), ("patch", True, {}, 2.0, 40.0), ("image-wide", False, {}, 0.0, 20.0),
    ("patch", False, {}, 0.0, 20.0), ("patch", True, {"patch_target_bound_weight": 0}, 0.0, 20.0),
    ("image-wide", True, {"target_bound_weight": 0, "patch_target_bound_weight": 3}, 0.0, 20.0),
    ("patch", True, {"anchor_weight": 0}, 2.0, 40.0), ("patch", False, {"anchor_weight": 0}, 0.0, 0.0)])
def test_a_trusted_model_caps_the_target_labels_at_the_weight_of_the_trigger_kind(tmp_path, kind, trusted, weights,
                                                                                  bound, anchors):
    """The target bound needs a trusted model; an image-wide trigger's victims get the full weight
    (RepairConfig.target_bound_weight), a patch trigger's, which have their trigger-free views as
    anchors, the lighter patch_target_bound_weight; while bounded, the anchors are held at the
    bounded_*_anchor_weight of the trigger's kind."""
    import dataclasses

    from clipfast.defense.repair import RepairConfig, repair
    from clipfast.models import load_model

    torch.manual_seed(0)
    scan = patch_target_scan()
    scan.triggers = [dataclasses.replace(scan.triggers[0], kind=kind)]
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compact = curate(scan, images, CurateConfig(victims_per_label=2, replay_per_label=1))
    config = RepairConfig(max_steps=2, batch_size=4, warmup_steps=1, eval_every=2, holdout_clean=4, progress=False,
                          **weights)
    result = repair(load_model("clipfast-tiny"), compact, scan, images, tmp_path, config=config,
                    trusted_bundle=load_model("clipfast-tiny") if trusted else None)
    assert result.target_bound_weight == bound and result.summary()["target_bound_weight"] == bound
    assert result.anchor_weight == anchors and result.summary()["anchor_weight"] == anchors


def test_the_target_bound_needs_a_frozen_text_tower():
    from clipfast.defense.repair import RepairConfig

    with pytest.raises(ValueError, match="need freeze_text=True"):
        RepairConfig(freeze_text=False)
    with pytest.raises(ValueError, match="need freeze_text=True"):
        RepairConfig(freeze_text=False, target_bound_weight=0)
    assert not RepairConfig(freeze_text=False, target_bound_weight=0, patch_target_bound_weight=0).freeze_text


def test_repair_checkpoints_on_their_own_cadence_and_it_does_not_tie_a_run():
    """checkpoint_every sets how much an interrupted repair can lose, apart from the estimates'
    cadence, and (like every untied field) a run directory resumes under another value."""
    from clipfast.defense.repair import RepairConfig
    from clipfast.rundir import untied_fields

    train = RepairConfig(eval_every=25, checkpoint_every=100).train_config()
    assert (train.eval_every, train.checkpoint_every) == (25, 100)
    assert "checkpoint_every" in untied_fields(RepairConfig) and "eval_every" not in untied_fields(RepairConfig)
