"""The probe-set-wide decisions, from every shard's per-image columns.

Candidates are the images with trigger evidence: an explaining region that passes the transplant
test (any patch trigger, either oracle mode), or, with a trusted model, discordance (the trusted
model confidently says another label and grounds the model's label nowhere: image-wide triggers
too). A label is a target when its candidates are far more frequent than the other labels' pooled
rate predicts (one-sided binomial test, Bonferroni over labels, count and effect floors) after
leaving out its two largest source classes: a backdoor pulls victims from every class, an ordinary
confusion from one or two neighbours, which this keeps from ever looking like a target.

Self mode has no discordance, and an image-wide trigger has no region to find: the suspect's own
crops carry it and agree with it. There the mirror test (mirror_label_test) adds image-wide targets:
a label whose images a horizontal flip relabels far more often than it relabels that label's
objects shown alone. Its victims are the target's images the flip relabels whose object alone is
not the target, their oracle label the mirrored image's label (the trigger broken, the object kept).
"""

from __future__ import annotations

import torch
from scipy.stats import beta, binom

from .config import ScanConfig
from .result import ImageColumns, LabelTest, ScanResult, TriggerEstimate
from .shards import ScanShard

TRIMMED_SOURCES = 2  # a label's largest source classes left out of its candidate count
# The mirror test's null rate for a label: the upper bound of this one-sided Clopper-Pearson interval
# of its objects' mirror rate (a label with few objects alone gets a wide, forgiving bound).
OBJECT_RATE_CONFIDENCE = 0.975


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
    mirror_test, mirrored = mirror_label_test(columns, len(classnames), config)
    image_wide = [label for label in mirrored if label not in targets]
    if image_wide:  # the flip's relabelled images of these targets are their victims, named by the flip
        # ... but for those whose object shown alone the model calls the target: that label comes from
        # the object (a real target-class image the flip happens to relabel), and the flip's label would
        # caption it wrong. Measured on the 11 image-wide targets of b415e9f's self-mode matrix
        # (benchmarks/mirror_victims.py, rows in results/mirror_victims.jsonl): victim precision
        # 0.58-0.95 -> 0.90-0.99, recall 0.35-1.00 -> 0.34-1.00 (at most 7 points lost).
        mirror_evidence = (columns.readable & mirror_relabelled(columns) & (columns.object_label != columns.image_label)
                           & torch.isin(columns.image_label, torch.tensor(image_wide)))
        candidate = candidate | mirror_evidence
        columns.oracle_label = torch.where(mirror_evidence, columns.mirror_label, columns.oracle_label)
        targets = sorted(targets + image_wide)
    triggers = [trigger_estimate(target, candidate, patch_evidence, columns, trigger_masks, target in patch_targets)
                for target in targets]
    return ScanResult(**vars(columns), classnames=classnames, patch_evidence=patch_evidence, candidate=candidate,
                      label_test=label_test, targets=targets, triggers=triggers, seconds=seconds,
                      mirror_test=mirror_test)


def mirror_relabelled(columns: ImageColumns) -> torch.Tensor:
    """bool [N]: the mirror test measured the image and the flip changed its label."""
    return (columns.mirror_label >= 0) & (columns.mirror_label != columns.image_label)


def mirror_label_test(columns: ImageColumns, num_labels: int, config: ScanConfig) -> tuple[LabelTest | None, list[int]]:
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
                                  config)


def object_controlled_test(label: torch.Tensor, transformed: torch.Tensor, object_label: torch.Tensor,
                           transformed_object: torch.Tensor, num_labels: int,
                           config: ScanConfig) -> tuple[LabelTest, list[int]]:
    """The per-label test behind mirror_label_test, for any label-changing transform T: the model's
    labels of the images and of them under T, of the objects alone and of them under T (int64 [N]
    each). Each label's count of images T relabels against its own objects' T-rate bound
    (OBJECT_RATE_CONFIDENCE); LabelTest.sources counts the distinct labels T gives them."""
    relabelled, alone_relabelled = transformed != label, transformed_object != object_label
    predicted = torch.bincount(label, minlength=num_labels)
    changed = torch.bincount(label[relabelled], minlength=num_labels)
    alone = torch.bincount(object_label, minlength=num_labels)
    alone_changed = torch.bincount(object_label[alone_relabelled], minlength=num_labels)
    threshold = config.significance / num_labels
    expected, p_values, sources, targets = [], [], [], []
    for index in range(num_labels):
        n, c, n_alone, c_alone = (int(counts[index]) for counts in (predicted, changed, alone, alone_changed))
        rate = 1.0 if c_alone == n_alone else float(beta.ppf(OBJECT_RATE_CONFIDENCE, c_alone + 1, n_alone - c_alone))
        p = float(binom.sf(c - 1, n, rate)) if c > 0 else 1.0
        expected.append(n * rate)
        p_values.append(p)
        sources.append(len(transformed[relabelled & (label == index)].unique()))
        if p < threshold and c >= config.min_count:
            targets.append(index)
    return LabelTest(predicted.tolist(), changed.tolist(), expected, p_values, threshold, sources), targets


def trimmed_counts(image_label: torch.Tensor, candidate: torch.Tensor, sources: torch.Tensor,
                   num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label: candidates less those of its TRIMMED_SOURCES largest source classes (images of
    unknown source, -1, are never left out), and the number of distinct known sources."""
    counts = torch.zeros(num_labels, dtype=torch.int64)
    distinct = torch.zeros(num_labels, dtype=torch.int64)
    for label in range(num_labels):
        mine = candidate & (image_label == label)
        known = sources[mine & (sources >= 0) & (sources != label)]
        per_source = torch.bincount(known, minlength=num_labels)
        counts[label] = int(mine.sum()) - int(per_source.topk(min(TRIMMED_SOURCES, num_labels)).values.sum())
        distinct[label] = int((per_source > 0).sum())
    return counts, distinct


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
