"""The probe-set-wide decisions, from every shard's per-image columns.

Candidates are the images with trigger evidence: an explaining region that passes the transplant
test (any patch trigger, either oracle mode), or, with a trusted model, discordance (the trusted
model confidently says another label and grounds the model's label nowhere: image-wide triggers
too). A label is a target when its candidates are far more frequent than the other labels' pooled
rate predicts (one-sided binomial test, Bonferroni over labels, count and effect floors) after
leaving out its two largest source classes: a backdoor pulls victims from every class, an ordinary
confusion from one or two neighbours, which this keeps from ever looking like a target.

Self mode has no discordance, and an image-wide trigger has no region to find: the suspect's own
crops carry it and agree with it. There two tests add image-wide targets, sharing the significance:
the mirror test (mirror_label_test), a label whose images a horizontal flip relabels far more often
than it relabels that label's objects shown alone, and the object-alone test (object_alone_test), a
label the whole images get far more often from other labels' objects shown alone than the other
way round, from more than two source labels. Their victims are the target's images whose object
alone is not the target: those the flip relabels, named by the flip, where the flip sees the trigger
best, else all of them, named by their object alone (the trigger gone, the object kept).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta, binom

from .config import ScanConfig
from .result import ImageColumns, LabelTest, ScanResult, TriggerEstimate
from .shards import ScanShard

TRIMMED_SOURCES = 2  # a label's largest source classes left out of its candidate count
# The mirror test's null rate for a label: the upper bound of this one-sided Clopper-Pearson interval
# of its objects' mirror rate (a label with few objects alone gets a wide, forgiving bound).
OBJECT_RATE_CONFIDENCE = 0.975
IMAGE_WIDE_TESTS = 2  # self mode's image-wide tests (mirror_label_test, object_alone_test)
# Both image-wide tests read each image's largest region, shown alone, as its object; they run only
# where that holds for most of the probe set: the object alone keeps the whole image's label for at
# least this share of the images (object_agreement). Calibrated on (benchmarks/object_agreement.py,
# results/object_agreement.json): the world's built-in segmenter gives 0.839-0.960 on the 40 saved
# self-mode scans of the efficacy matrix (clean, patch and image-wide models: a backdoor's victims,
# a few % of a probe, disagree by design) and 0.917-0.965 on the 5 clean seeds; regions blind to the
# content (the pipeline bench's fixed oracle, 16 discs or cells) give 0.11-0.18 on those 5 clean
# models, where without this gate the tests flagged labels on all 10 scans (the mirror test 'arrow'
# on 9, which the background test then confirmed on seed 0: a false alarm). Why it transfers: it
# checks the tests' own assumption on the probe set itself, and a segmenter that does isolate
# objects falls below it only if more than half the probe images are poisoned.
MIN_OBJECT_AGREEMENT = 0.5


def decide(classnames: list[str], shards: list[ScanShard], config: ScanConfig, seconds: dict) -> ScanResult:
    columns = ImageColumns.cat([shard.columns() for shard in shards])
    if not columns.readable.any():
        raise ValueError(f"scan: none of the {len(columns)} probe images could be read")
    trigger_masks = {i: mask for shard in shards for i, mask in shard.unpacked_trigger_masks().items()}
    patch_evidence = columns.flip_rate >= config.min_flip_rate
    candidate = (patch_evidence | columns.discordant) & columns.readable
    sources = torch.where(columns.reference_label >= 0, columns.reference_label, columns.oracle_label)
    label_test, targets = decide_targets(columns.image_label, candidate, sources, len(classnames), config)
    # A target's trigger is a patch when its patch evidence alone passes the same test: with a trusted
    # model a patch target's candidates also hold discordant images (the two models' confusions), which
    # can outnumber the patch victims on a label clean models confuse (a 4px patch on 'star': 58 patch
    # victims and 61 other discordant images, which a majority rule called image-wide).
    # (Without discordant candidates, self mode, the candidates are the patch evidence: the same test.)
    patch_targets = targets if not (candidate & ~patch_evidence).any() else \
        decide_targets(columns.image_label, patch_evidence & columns.readable, sources, len(classnames), config)[1]
    # Self mode's image-wide tests share the significance, so the stated family-wise rate holds for both;
    # they run where the oracle's largest regions are the images' objects (MIN_OBJECT_AGREEMENT).
    image_wide_significance = config.significance / IMAGE_WIDE_TESTS
    agreement = object_agreement(columns)
    mirror_test, mirrored, object_test, one_way = None, [], None, []
    if agreement is not None and agreement >= MIN_OBJECT_AGREEMENT:
        mirror_test, mirrored = mirror_label_test(columns, len(classnames), image_wide_significance, config.min_count)
        object_test, one_way = object_alone_test(columns, len(classnames), image_wide_significance, config.min_count)
    image_wide = sorted(set(mirrored + one_way) - set(targets))
    for label in image_wide:
        # Victims: the target's images whose object alone the model does not call the target (a real
        # target-class object says the target alone too), by the test that sees the trigger best (the
        # smaller p-value): where the flip breaks it, those the flip relabels, named by the flip;
        # else all of them, named by their object alone. Measured on the 13 image-wide targets of the
        # self-mode matrix at 9eeef2f / 203bc16 (benchmarks/mirror_victims.py; truth: poisoned probe
        # images labelled the target): on Blended and SIG, where the flip's p-value is the smaller
        # (all 9), the flip's rule has precision 0.90-0.99, the object's 0.71-0.95, recall within 2
        # points; on WaNet (4), where the object's is, recall 0.30-0.55 (flip) against 0.93-0.97
        # (object) at precision 0.84-0.95 both. (Before b415e9f's object filter the flip's rule had
        # precision 0.58-0.95.)
        by_flip = label in mirrored and (label not in one_way or
                                         mirror_test.p_values[label] <= object_test.p_values[label])
        evidence = columns.readable & (columns.image_label == label) & (columns.object_label != label)
        if by_flip:
            evidence &= mirror_relabelled(columns)
        candidate = candidate | evidence
        name = columns.mirror_label if by_flip else columns.object_label
        columns.oracle_label = torch.where(evidence, name, columns.oracle_label)
    targets = sorted(targets + image_wide)
    triggers = [trigger_estimate(target, candidate, patch_evidence, columns, trigger_masks, target in patch_targets)
                for target in targets]
    return ScanResult(**vars(columns), classnames=classnames, patch_evidence=patch_evidence, candidate=candidate,
                      label_test=label_test, targets=targets, triggers=triggers, seconds=seconds,
                      mirror_test=mirror_test, object_test=object_test, object_agreement=agreement)


def object_agreement(columns: ImageColumns) -> float | None:
    """The share of probe images whose largest region shown alone keeps the image's label (None where
    the objects alone were not labelled: trusted mode, the mirror test off)."""
    measured = columns.readable & (columns.object_label >= 0)
    if not measured.any():
        return None
    return float((columns.object_label[measured] == columns.image_label[measured]).double().mean())


def mirror_relabelled(columns: ImageColumns) -> torch.Tensor:
    """bool [N]: the mirror test measured the image and the flip changed its label."""
    return (columns.mirror_label >= 0) & (columns.mirror_label != columns.image_label)


def mirror_label_test(columns: ImageColumns, num_labels: int, significance: float,
                      min_count: int) -> tuple[LabelTest | None, list[int]]:
    """The object-controlled mirror test (self mode): n_l images labelled l, c_l of them relabelled
    by a horizontal flip; of the objects shown alone (each image's largest region, the rest filled)
    that the model labels l, the share the flip relabels and its upper bound f_l
    (OBJECT_RATE_CONFIDENCE). l is a target when P(X >= c_l), X ~ Binomial(n_l, f_l), is below
    significance / num_labels and c_l >= min_count. A fragile image-wide trigger (a blend, a signal,
    a warp) is broken by the flip, which relabels its victims, and is mostly gone from an object
    shown alone, whose background was most of it; a label the flip confuses by its own shape (an
    arrow) is confused alone as well, so its own rate covers it. (The scan's pooled test would take
    the other labels' rate as the null: on clean models the arrows, relabelled 17-30 %, then flagged
    on every one; benchmarks/purification.py.) Returns (None, []) where the labels were not measured."""
    measured = columns.readable & (columns.mirror_label >= 0)
    if not measured.any():
        return None, []
    return object_controlled_test(columns.image_label[measured], columns.mirror_label[measured],
                                  columns.object_label[measured], columns.mirror_object_label[measured], num_labels,
                                  significance, min_count)


def object_controlled_test(label: torch.Tensor, transformed: torch.Tensor, object_label: torch.Tensor,
                           transformed_object: torch.Tensor, num_labels: int, significance: float,
                           min_count: int) -> tuple[LabelTest, list[int]]:
    """The per-label test behind mirror_label_test, for any label-changing transform T: the model's
    labels of the images and of them under T, of the objects alone and of them under T (int64 [N]
    each). Each label's count of images T relabels against its own objects' T-rate bound
    (OBJECT_RATE_CONFIDENCE); LabelTest.sources counts the distinct labels T gives them."""
    relabelled, alone_relabelled = transformed != label, transformed_object != object_label
    predicted = torch.bincount(label, minlength=num_labels)
    changed = torch.bincount(label[relabelled], minlength=num_labels)
    alone = torch.bincount(object_label, minlength=num_labels)
    alone_changed = torch.bincount(object_label[alone_relabelled], minlength=num_labels)
    threshold = significance / num_labels
    expected, p_values, sources, targets = [], [], [], []
    for index in range(num_labels):
        n, c, n_alone, c_alone = (int(counts[index]) for counts in (predicted, changed, alone, alone_changed))
        rate = 1.0 if c_alone == n_alone else float(beta.ppf(OBJECT_RATE_CONFIDENCE, c_alone + 1, n_alone - c_alone))
        p = float(binom.sf(c - 1, n, rate)) if c > 0 else 1.0
        expected.append(n * rate)
        p_values.append(p)
        sources.append(len(transformed[relabelled & (label == index)].unique()))
        if p < threshold and c >= min_count:
            targets.append(index)
    return LabelTest(predicted.tolist(), changed.tolist(), expected, p_values, threshold, sources), targets


def object_alone_test(columns: ImageColumns, num_labels: int, significance: float,
                      min_count: int) -> tuple[LabelTest | None, list[int]]:
    """The object-alone flow test (self mode): which labels does the whole image get that the object
    shown alone does not? flow[l, k] counts images the model labels l whose largest region alone
    (the rest median-filled) it labels k != l. For label l, over the source labels k other than its
    TRIMMED_SOURCES largest, a_l = sum_k flow[l, k] (into l) and b_l = sum_k flow[k, l] (out of l's
    objects: the whole image says k where the object alone says l). l is a target when P(X >= a_l),
    X ~ Binomial(a_l + b_l, 1/2), is below significance / num_labels and a_l >= min_count.

    An image-wide trigger is in the whole image and mostly gone from the object shown alone (its
    background was most of it), so its victims flow one way, into the target, from every class; a
    clean model's disagreements between the two views of a pair of labels go both ways about equally,
    but for a neighbour it confuses one way, which the trimmed sources leave out, as the pooled test
    does. Unlike the mirror test it needs no transform to break the trigger (a mirror-symmetric or
    flip-robust one too; WaNet strength 6 seeds 1-2). LabelTest.candidates holds a_l, expected
    (a_l + b_l) / 2, sources the distinct k with flow[l, k] > 0. Returns (None, []) where the objects
    alone were not labelled (trusted mode, mirror_test off)."""
    measured = columns.readable & (columns.object_label >= 0)
    if not measured.any():
        return None, []
    label, alone = columns.image_label[measured], columns.object_label[measured]
    predicted = torch.bincount(label, minlength=num_labels)
    into, source, flows, trimmed = source_flows(label, alone, num_labels)
    # b_l: the flow back from l's objects into its kept sources' labels, i.e. all of l's objects' flow
    # less, for each trimmed source k, flow[k, l] (looked up among the non-zero entries)
    keys, by_key = (into * num_labels + source).sort()
    reverse = source * num_labels + into
    position = torch.searchsorted(keys, reverse).clamp(max=max(len(keys) - 1, 0))
    back = torch.where(keys[position] == reverse, flows[by_key[position]], 0)
    a = torch.bincount(into[~trimmed], weights=flows[~trimmed].double(), minlength=num_labels).long()
    b = (torch.bincount(source, weights=flows.double(), minlength=num_labels)
         - torch.bincount(into[trimmed], weights=back[trimmed].double(), minlength=num_labels)).long()
    a_values, b_values = a.numpy(), b.numpy()
    p_values = np.where(a_values > 0, binom.sf(a_values - 1, a_values + b_values, 0.5), 1.0)
    threshold = significance / num_labels
    targets = [index for index in range(num_labels) if p_values[index] < threshold and a_values[index] >= min_count]
    sources = torch.bincount(into, minlength=num_labels)
    return LabelTest(predicted.tolist(), a.tolist(), ((a + b) / 2).tolist(), p_values.tolist(), threshold,
                     sources.tolist()), targets


def source_flows(label: torch.Tensor, source: torch.Tensor,
                 num_labels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How many images of each label come from each source label (source >= 0 and != label), as the
    non-zero entries of that [C, C] table, never the table itself (a 20k-label vocabulary would take
    gigabytes): (label, source, count, trimmed) per entry, each label's sources largest count first
    (ties: the lower source label first), trimmed marking its TRIMMED_SOURCES largest."""
    known = (source >= 0) & (source != label)
    keys, counts = torch.unique(label[known] * num_labels + source[known], return_counts=True)
    into, source = keys // num_labels, keys % num_labels
    order = torch.from_numpy(np.lexsort((source.numpy(), -counts.numpy(), into.numpy())))
    into, source, counts = into[order], source[order], counts[order]
    trimmed = torch.arange(len(into)) - torch.searchsorted(into, into) < TRIMMED_SOURCES
    return into, source, counts, trimmed


def trimmed_counts(image_label: torch.Tensor, candidate: torch.Tensor, sources: torch.Tensor,
                   num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label: candidates less those of its TRIMMED_SOURCES largest source classes (images of
    unknown source, -1, are never left out), and the number of distinct known sources."""
    mine = candidate & (image_label >= 0)
    into, _, counts, trimmed = source_flows(image_label[mine], sources[mine], num_labels)
    left_out = torch.bincount(into[trimmed], weights=counts[trimmed].double(), minlength=num_labels).long()
    return torch.bincount(image_label[mine], minlength=num_labels) - left_out, torch.bincount(into, minlength=num_labels)


def decide_targets(image_label: torch.Tensor, candidate: torch.Tensor, sources: torch.Tensor, num_labels: int,
                   config: ScanConfig) -> tuple[LabelTest, list[int]]:
    """A label is a target when its trimmed candidate count c_l is improbable under the other
    labels' pooled rate: P(X >= c_l), X ~ Binomial(n_l, rate) below significance / num_labels,
    and c_l >= min_count and >= min_effect times the expected count."""
    readable = image_label >= 0  # unreadable probe images are labelled -1
    predicted = torch.bincount(image_label[readable], minlength=num_labels)
    candidates, distinct = trimmed_counts(image_label, candidate & readable, sources, num_labels)
    threshold = config.significance / num_labels
    expected, p_values, targets = [], [], []
    for label in range(num_labels):
        others_n = int(predicted.sum() - predicted[label])
        others_c = int(candidates.sum() - candidates[label])
        # The null rate pools the other labels; +1/+2 keeps it away from 0 with few candidates.
        rate = (others_c + 1) / (others_n + 2)
        n_l, c_l = int(predicted[label]), int(candidates[label])
        expected.append(n_l * rate)
        p = float(binom.sf(c_l - 1, n_l, rate)) if c_l > 0 else 1.0
        p_values.append(p)
        if p < threshold and c_l >= config.min_count and c_l >= config.min_effect * n_l * rate:
            targets.append(label)
    test = LabelTest(predicted.tolist(), candidates.tolist(), expected, p_values, threshold, distinct.tolist())
    return test, targets


def trigger_estimate(target: int, candidate: torch.Tensor, patch_evidence: torch.Tensor, columns: ImageColumns,
                     trigger_masks: dict[int, torch.Tensor], is_patch: bool) -> TriggerEstimate:
    """What the target's victims say about its trigger: a patch when its victims with a region that
    passed the transplant test are by themselves significant (is_patch; its box: the pixels in at
    least half of those regions), else image-wide."""
    victims = torch.nonzero(candidate & (columns.image_label == target)).flatten()
    patched = victims[patch_evidence[victims]]
    kind = "patch" if is_patch else "image-wide"
    height, width = next(iter(trigger_masks.values())).shape if trigger_masks else (0, 0)
    region_masks = (torch.stack([trigger_masks[int(i)] for i in patched]) if len(patched) else
                    torch.zeros(0, height, width, dtype=torch.bool))
    consensus = (region_masks.float().mean(0) >= 0.5 if len(patched) else
                 torch.zeros(height, width, dtype=torch.bool))
    box = None
    if kind == "patch" and consensus.any():
        rows, cols = torch.nonzero(consensus.any(1)).flatten(), torch.nonzero(consensus.any(0)).flatten()
        box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return TriggerEstimate(target, kind, victims, patched, region_masks, columns.flip_rate[patched], consensus, box)
