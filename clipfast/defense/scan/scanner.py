"""The shard loop: segment each batch of probe images, score it with the model under test (and the
grounding model), turn the scores into per-image columns, and run the causal test as soon as a
shard's last batch is in.

Batch b's scores are recorded after batch b+1 is submitted, so with the fast scorer the device never
waits for the host; the oracle segments ahead in a background thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from clipfast.data.prefetch import prefetch
from clipfast.data.probe import ProbeSet
from clipfast.errors import NonFiniteError
from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.ops import pack_mask_bits
from clipfast.oracle import Segmentation, Segmenter

from .causal import largest_drops
from .config import ScanConfig
from .result import ImageColumns
from .scorers import PendingScores, make_scorer
from .shards import ScanShard

STAGES = ("text_encoding", "segment", "regions", "causal_test")  # the scan's stage times, in seconds


class NonFiniteScoresError(NonFiniteError):
    """The model produced NaN or inf scores (broken weights or input)."""


@dataclass
class _Batch:
    shard: int
    lo: int
    images: torch.Tensor  # uint8 [B, 3, H, W]
    readable: torch.Tensor  # bool [B]
    segmentation: Segmentation
    masks: torch.Tensor  # segmentation.masks, pinned on a GPU machine
    objects: torch.Tensor  # bool [B, M]: real regions of at least the object size


@dataclass
class _OpenShard:
    lo: int
    hi: int
    last_batch: int  # lo of its last batch
    parts: list[ImageColumns] = field(default_factory=list)
    # probe index -> (its image, its non-object region masks), for ungrounded images only
    small_regions: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class ShardScanner:
    def __init__(self, bundle: ClipBundle, classnames: list[str], probe: ProbeSet, segmenter: Segmenter,
                 prompts: Callable[[str], list[str]] | None, grounding_bundle: ClipBundle | None, config: ScanConfig):
        self.probe, self.segmenter, self.config = probe, segmenter, config
        self.seconds = dict.fromkeys(STAGES, 0.0)
        prompt_kwargs = {} if prompts is None else {"prompts": prompts}
        start = time.perf_counter()
        self.suspect = make_scorer(bundle, ZeroShotClassifier(bundle, classnames, **prompt_kwargs), config)
        self.grounder = self.suspect if grounding_bundle is None else make_scorer(
            grounding_bundle, ZeroShotClassifier(grounding_bundle, classnames, **prompt_kwargs), config)
        self.seconds["text_encoding"] = time.perf_counter() - start
        _, height, self.width = probe.image_shape
        self.min_area = config.object_min_fraction * height * self.width
        self.pin = bundle.device.type == "cuda"  # page-locked host batches: asynchronous copies to the GPU
        self._oracle_seconds = 0.0

    def run(self, shards: list[tuple[int, int, int]]) -> Iterator[tuple[int, ScanShard]]:
        """Scan the (index, lo, hi) shards; yield (index, shard) as each one completes."""
        size = self.config.batch_size
        batches = [(k, lo, min(lo + size, hi)) for k, shard_lo, hi in shards for lo in range(shard_lo, hi, size)]
        self._open = {k: _OpenShard(lo, hi, max(b_lo for j, b_lo, _ in batches if j == k)) for k, lo, hi in shards}
        start, pending = time.perf_counter(), None
        stream = prefetch(self._segmented(batches), self.config.prefetch if self.suspect.runs_ahead else 0)
        for batch in tqdm(stream, total=len(batches), desc="scan", unit="batch", disable=not self.config.progress):
            own = self.suspect.submit(batch.images, batch.masks, batch.objects)
            ground = own if self.grounder is self.suspect else self.grounder.submit(batch.images, batch.masks,
                                                                                     batch.objects)
            if pending is not None:
                yield from self._record(*pending)
            pending = (batch, own, ground)
        if pending is not None:
            yield from self._record(*pending)
        self.seconds["segment"] = self._oracle_seconds  # oracle busy time (overlapped with encoding when it runs ahead)
        self.seconds["regions"] = time.perf_counter() - start - self.seconds["causal_test"]

    def _segmented(self, batches: list[tuple[int, int, int]]) -> Iterator[_Batch]:
        ranges = [(lo, hi) for _, lo, hi in batches]
        for (k, _, _), (lo, images, readable) in zip(batches, self.probe.batches(ranges)):
            start = time.perf_counter()
            segmentation = self.segmenter.segment(images)
            self._oracle_seconds += time.perf_counter() - start
            masks = segmentation.masks
            if self.pin:
                images, masks = images.pin_memory(), masks.pin_memory()
            objects = segmentation.valid & (masks.flatten(2).sum(-1) >= self.min_area)
            yield _Batch(k, lo, images, readable, segmentation, masks, objects)

    def _record(self, batch: _Batch, own_pending: PendingScores,
                ground_pending: PendingScores) -> Iterator[tuple[int, ScanShard]]:
        """Host-side bookkeeping of one batch, once its scores are on the host."""
        config, readable, objects = self.config, batch.readable, batch.objects
        own = own_pending.result()
        ground = own if ground_pending is own_pending else ground_pending.result()
        probs = own.image_prob[readable]
        if not (torch.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
            raise NonFiniteScoresError(f"scan: the model's scores of probe images {batch.lo}..{batch.lo + len(readable) - 1}"
                                       " are NaN or inf; its weights or the images are broken")
        label = own.image_label[:, None]
        if self.grounder is self.suspect:  # region_score already has q_ij(L_i) for the suspect's own L_i
            grounded = (own.region_image_prob >= config.grounding_threshold).any(-1)
        else:  # threshold >= 0.5: q'_ij(L_i) passes it only as region j's top label
            grounded = ((ground.region_label == label) & (ground.region_prob >= config.grounding_threshold)).any(-1)
        self_supported = (own.region_label == label).any(-1)
        # Regions are sorted largest first, so the first object region is the largest one.
        first_object = objects.float().argmax(-1)
        oracle_label = torch.where(objects.any(-1), ground.region_label.gather(1, first_object[:, None]).squeeze(1), -1)
        columns = ImageColumns(readable=readable, image_label=own.image_label, image_prob=own.image_prob,
                               grounded=grounded, ungrounded=~grounded & ~self_supported,
                               causal_drop=torch.zeros(len(readable)), discrepancy=own.discrepancy,
                               oracle_label=oracle_label, region_counts=batch.segmentation.counts).where_readable()
        shard = self._open[batch.shard]
        shard.parts.append(columns)
        small = batch.segmentation.valid & ~objects
        for j in torch.nonzero(columns.ungrounded & small.any(-1)).flatten().tolist():
            # copies, so that the batch itself is not kept alive until the shard ends
            shard.small_regions[batch.lo + j] = (batch.images[j].clone(), batch.segmentation.masks[j, small[j]])
        if batch.lo == shard.last_batch:
            yield batch.shard, self._finish(batch.shard)

    def _finish(self, index: int) -> ScanShard:
        shard = self._open.pop(index)
        columns = ImageColumns.cat(shard.parts)
        start = time.perf_counter()
        columns.causal_drop, masks = largest_drops(
            self.suspect.class_probs, shard.small_regions, columns.image_label, columns.image_prob, shard.lo,
            self.config.batch_size, self.suspect.removals_per_image)
        self.seconds["causal_test"] += time.perf_counter() - start
        passing = {i: pack_mask_bits(mask)[0] for i, mask in masks.items()
                   if columns.causal_drop[i - shard.lo] >= self.config.min_causal_drop}
        return ScanShard(**vars(columns), lo=shard.lo, hi=shard.hi, width=self.width, trigger_masks=passing)
