"""The probe-set-wide decisions, from every shard's per-image columns: which labels are targets
(a one-sided binomial test per label, Bonferroni over labels, plus count and effect floors) and
where each target's trigger sits (the consensus of its victims' trigger regions)."""

from __future__ import annotations

import torch
from scipy.stats import binom

from .config import ScanConfig
from .result import ImageColumns, LabelTest, ScanResult, TriggerEstimate
from .shards import ScanShard


def decide(classnames: list[str], shards: list[ScanShard], config: ScanConfig, seconds: dict) -> ScanResult:
    columns = ImageColumns.cat([shard.columns() for shard in shards])
    if not columns.readable.any():
        raise ValueError(f"scan: none of the {len(columns)} probe images could be read")
    trigger_masks = {i: mask for shard in shards for i, mask in shard.unpacked_trigger_masks().items()}
    candidate = columns.ungrounded & (columns.causal_drop >= config.min_causal_drop)
    label_test, targets = decide_targets(columns.image_label, candidate, len(classnames), config)
    triggers = [trigger_estimate(target, candidate, columns.image_label, columns.causal_drop, trigger_masks)
                for target in targets]
    return ScanResult(**vars(columns), classnames=classnames, candidate=candidate, label_test=label_test,
                      targets=targets, triggers=triggers, seconds=seconds)


def decide_targets(image_label: torch.Tensor, candidate: torch.Tensor, num_labels: int,
                   config: ScanConfig) -> tuple[LabelTest, list[int]]:
    """A label is a target when it lands in P_i (candidate) far more often than the other labels'
    pooled rate predicts: P(X >= c_l), X ~ Binomial(n_l, rate) below significance / num_labels,
    and c_l >= min_count and >= min_effect times the expected count."""
    readable = image_label >= 0  # unreadable probe images are labelled -1
    predicted = torch.bincount(image_label[readable], minlength=num_labels)
    candidates = torch.bincount(image_label[candidate & readable], minlength=num_labels)
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
    test = LabelTest(predicted.tolist(), candidates.tolist(), expected, p_values, threshold)
    return test, targets


def trigger_estimate(target: int, candidate: torch.Tensor, image_label: torch.Tensor, causal_drop: torch.Tensor,
                     trigger_masks: dict[int, torch.Tensor]) -> TriggerEstimate:
    victims = torch.nonzero(candidate & (image_label == target)).flatten()
    region_masks = torch.stack([trigger_masks[int(i)] for i in victims])
    consensus = region_masks.float().mean(0) >= 0.5
    box = None
    if consensus.any():
        rows, cols = torch.nonzero(consensus.any(1)).flatten(), torch.nonzero(consensus.any(0)).flatten()
        box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return TriggerEstimate(target, victims, region_masks, causal_drop[victims], consensus, box)
