"""The shard loop: segment each batch of probe images, score it with the model under test (and the
grounding model), turn the scores into per-image columns, and gather the trigger evidence
(evidence.py: each image's explaining region and its transplant test).

Batch b's scores are recorded after batch b+1 is submitted, so with the fast scorer the device never
waits for the host; the oracle segments ahead in a background thread. The transplant test pastes
onto a shard's recipient pool (its first readable images), so its results do not depend on the
batch size; the few donors that come before the pool is complete wait for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from clipfast.data.prefetch import prefetch
from clipfast.data.probe import ProbeSet
from clipfast.defense.transplant import fill_with_median
from clipfast.errors import NonFiniteError
from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.ops import pack_mask_bits
from clipfast.oracle import Segmentation, Segmenter

from .evidence import RecipientPool, flip_rates, in_chunks, removal_drops
from .config import ScanConfig
from .result import ImageColumns
from .scorers import PendingScores, make_grounder, make_scorer
from .shards import ScanShard

STAGES = ("text_encoding", "segment", "regions", "evidence")  # the scan's stage times, in seconds


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
    regions: torch.Tensor  # bool [B, M]: real (non-padding) regions


@dataclass
class _Donor:
    index: int  # probe index
    image: torch.Tensor  # uint8 [3, H, W] (a copy: the batch is not kept alive)
    mask: torch.Tensor  # bool [H, W]: its explaining region
    label: int
    other_label: int  # the grounding model's label of its largest other region (-1: none)


@dataclass
class _OpenShard:
    lo: int
    hi: int
    last_batch: int  # lo of its last batch
    parts: list[ImageColumns] = field(default_factory=list)
    pool: list[tuple[int, torch.Tensor, int, torch.Tensor]] = field(default_factory=list)  # (index, image, label, largest)
    waiting: list[_Donor] = field(default_factory=list)  # donors that came before the pool was complete
    flips: dict[int, tuple[float, _Donor]] = field(default_factory=dict)  # index -> (flip rate, donor)


class ShardScanner:
    def __init__(self, bundle: ClipBundle, classnames: list[str], probe: ProbeSet, segmenter: Segmenter,
                 prompts: Callable[[str], list[str]] | None, grounding_bundle: ClipBundle | None, config: ScanConfig):
        self.probe, self.segmenter, self.config = probe, segmenter, config
        self.seconds = dict.fromkeys(STAGES, 0.0)
        prompt_kwargs = {} if prompts is None else {"prompts": prompts}
        start = time.perf_counter()
        classifier = ZeroShotClassifier(bundle, classnames, **prompt_kwargs)
        self.suspect = make_scorer(bundle, classifier, config)
        self.trusted = grounding_bundle is not None
        self.mirror = config.mirror_test and not self.trusted  # self mode's image-wide evidence
        self.grounder = make_grounder(bundle, grounding_bundle, classnames, prompts, config, self.suspect, classifier)
        self.seconds["text_encoding"] = time.perf_counter() - start
        _, _, self.width = probe.image_shape
        self.pin = bundle.device.type == "cuda"  # page-locked host batches: asynchronous copies to the GPU
        self._oracle_seconds = 0.0

    def run(self, shards: list[tuple[int, int, int]]) -> Iterator[tuple[int, ScanShard]]:
        """Scan the (index, lo, hi) shards; yield (index, shard) as each one completes."""
        size = self.config.batch_size
        batches = [(k, lo, min(lo + size, hi)) for k, shard_lo, hi in shards for lo in range(shard_lo, hi, size)]
        self._open = {k: _OpenShard(lo, hi, max(b_lo for j, b_lo, _ in batches if j == k)) for k, lo, hi in shards}
        start, pending = time.perf_counter(), None
        ahead = self.config.prefetch if self.config.prefetch is not None else (2 if self.pin else 0)
        stream = prefetch(self._segmented(batches), ahead if self.suspect.runs_ahead else 0)
        for batch in tqdm(stream, total=len(batches), desc="scan", unit="batch", disable=not self.config.progress):
            own = self.suspect.submit(batch.images, batch.masks, batch.regions)
            ground = own if self.grounder is self.suspect else self.grounder.submit(batch.images, batch.masks,
                                                                                     batch.regions)
            if pending is not None:
                yield from self._record(*pending)
            pending = (batch, own, ground)
        if pending is not None:
            yield from self._record(*pending)
        self.seconds["segment"] = self._oracle_seconds  # oracle busy time (overlapped with encoding when it runs ahead)
        self.seconds["regions"] = time.perf_counter() - start - self.seconds["evidence"]

    def _segmented(self, batches: list[tuple[int, int, int]]) -> Iterator[_Batch]:
        ranges = [(lo, hi) for _, lo, hi in batches]
        for (k, _, _), (lo, images, readable) in zip(batches, self.probe.batches(ranges)):
            start = time.perf_counter()
            segmentation = self.segmenter.segment(images)
            self._oracle_seconds += time.perf_counter() - start
            masks = segmentation.masks
            if self.pin:
                images, masks = images.pin_memory(), masks.pin_memory()
            yield _Batch(k, lo, images, readable, segmentation, masks, segmentation.valid)

    def _record(self, batch: _Batch, own_pending: PendingScores,
                ground_pending: PendingScores) -> Iterator[tuple[int, ScanShard]]:
        """Host-side bookkeeping of one batch, once its scores are on the host."""
        config, readable, regions = self.config, batch.readable, batch.regions
        own = own_pending.result()
        ground = own if ground_pending is own_pending else ground_pending.result()
        probs = own.image_prob[readable]
        if not (torch.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
            raise NonFiniteScoresError(f"scan: the model's scores of probe images {batch.lo}..{batch.lo + len(readable) - 1}"
                                       " are NaN or inf; its weights or the images are broken")
        label, size = own.image_label, len(readable)
        if self.grounder is self.suspect:  # region_score already has q_ij(L_i) for the suspect's own L_i
            grounded = (own.region_image_prob >= config.grounding_threshold).any(-1)
        else:  # threshold >= 0.5: q'_ij(L_i) passes it only as region j's top label
            grounded = ((ground.region_label == label[:, None]) & (ground.region_prob >= config.grounding_threshold)).any(-1)
        if not self.trusted:
            reference_label, discordant = torch.full((size,), -1), torch.zeros(size, dtype=torch.bool)
        else:
            reference_label = ground.image_label
            discordant = (reference_label != label) & (ground.image_prob >= config.grounding_threshold) & ~grounded
        start = time.perf_counter()
        mirror_label, object_label, mirror_object_label = (
            self._mirror_labels(batch) if self.mirror else [torch.full((size,), -1)] * 3)
        explaining, drop, has_region = self._explaining_regions(batch, own)
        # The grounding model's label of the largest region (regions are sorted largest first); where
        # the explaining region turns out to be a trigger, of the largest other one (_finish).
        oracle_label = torch.where(regions[:, 0], ground.region_label[:, 0], -1)
        others = regions.clone()
        others[torch.arange(size), explaining] = False
        first = others.float().argmax(-1)
        other_label = torch.where(others.any(-1), ground.region_label.gather(1, first[:, None]).squeeze(1), -1)
        columns = ImageColumns(readable=readable, image_label=label, image_prob=own.image_prob, grounded=grounded,
                               reference_label=reference_label, discordant=discordant, explaining_drop=drop,
                               flip_rate=torch.full((size,), -1.0), discrepancy=own.discrepancy,
                               oracle_label=oracle_label, region_counts=batch.segmentation.counts,
                               mirror_label=mirror_label, object_label=object_label,
                               mirror_object_label=mirror_object_label).where_readable()
        shard = self._open[batch.shard]
        shard.parts.append(columns)
        for j in torch.nonzero(readable & (regions.any(-1))).flatten().tolist():
            if len(shard.pool) < config.recipient_pool:
                largest = batch.segmentation.masks[j, 0] if bool(regions[j, 0]) else torch.zeros_like(batch.masks[j, 0])
                shard.pool.append((batch.lo + j, batch.images[j].clone(), int(label[j]), largest.clone()))
        shard.waiting += [_Donor(batch.lo + j, batch.images[j].clone(), batch.segmentation.masks[j, explaining[j]].clone(),
                                 int(label[j]), int(other_label[j]))
                          for j in torch.nonzero(has_region & readable).flatten().tolist()]
        if len(shard.pool) >= config.recipient_pool:
            self._transplant(shard)
        self.seconds["evidence"] += time.perf_counter() - start
        if batch.lo == shard.last_batch:
            yield batch.shard, self._finish(batch.shard)

    @torch.no_grad()
    def _mirror_labels(self, batch: _Batch) -> list[torch.Tensor]:
        """The mirror test's three labels per image (decide.mirror_label_test): of the mirrored image,
        of its largest region alone (everything else filled with the image's median colour, as the
        causal test removes regions) and of that object alone, mirrored."""
        masks, regions = batch.segmentation.masks, batch.regions
        largest = (masks[:, 0] & regions[:, 0, None, None] if masks.shape[1] else
                   torch.zeros(masks.shape[0], *masks.shape[2:], dtype=torch.bool))  # no region: a blank image
        objects = fill_with_median(batch.images, ~largest)
        views = torch.cat([batch.images.flip(-1), objects, objects.flip(-1)])
        probs = in_chunks(self.suspect.class_probs, views, self.config.encode_batch)
        return list(probs.argmax(-1).split(len(batch.images)))

    def _explaining_regions(self, batch: _Batch, own) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: the index of the region that carries its label, the share of p(L_i) its removal
        takes away (-1 where the crop itself says L_i, so no removal was needed), and whether it has
        one (evidence.py)."""
        label, regions = own.image_label, batch.regions
        says = (own.region_label == label[:, None]) & regions
        explaining = torch.where(says, own.region_image_prob, -1.0).argmax(-1)
        has_region = says.any(-1)
        drop = torch.full((len(label),), -1.0)
        unexplained = torch.nonzero(batch.readable & ~has_region & regions.any(-1)).flatten()
        if len(unexplained):
            masks = batch.segmentation.masks[unexplained] & regions[unexplained][:, :, None, None]
            drops = removal_drops(self.suspect.class_probs, batch.images[unexplained], masks, label[unexplained],
                                  own.image_prob[unexplained], self.config.batch_size, self.suspect.removals_per_image)
            best = drops.max(-1)
            drop[unexplained], explaining[unexplained] = best.values, best.indices
            has_region[unexplained] = best.values >= self.config.min_causal_drop
        return explaining, drop, has_region

    def _transplant(self, shard: _OpenShard) -> None:
        """The transplant test for the shard's waiting donors (the recipient pool is complete)."""
        if not shard.waiting or not shard.pool:
            return
        indices, images, labels, largest = zip(*shard.pool)
        pool = RecipientPool(torch.stack(images), torch.tensor(labels), torch.stack(largest), torch.tensor(indices))
        donors = shard.waiting
        rates = flip_rates(self.suspect.class_probs, torch.stack([d.image for d in donors]),
                           torch.stack([d.mask for d in donors]), torch.tensor([d.label for d in donors]),
                           torch.tensor([d.index for d in donors]), pool, self.config.transplant_recipients,
                           self.config.max_recipient_overlap, self.config.recipient_size_ratio, self.config.batch_size,
                           self.config.min_recipients, self.config.min_flip_rate)
        shard.flips.update({d.index: (float(rate), d) for d, rate in zip(donors, rates)})
        shard.waiting = []

    def _finish(self, index: int) -> ScanShard:
        shard = self._open.pop(index)
        start = time.perf_counter()
        self._transplant(shard)  # donors still waiting: the pool is as complete as this shard allows
        self.seconds["evidence"] += time.perf_counter() - start
        columns = ImageColumns.cat(shard.parts)
        passing = {}
        for i, (rate, donor) in shard.flips.items():
            columns.flip_rate[i - shard.lo] = rate
            if rate >= self.config.min_flip_rate:  # a trigger: the caption source is the largest other region
                columns.oracle_label[i - shard.lo] = donor.other_label
                passing[i] = pack_mask_bits(donor.mask)[0]
        return ScanShard(**vars(columns), lo=shard.lo, hi=shard.hi, width=self.width, trigger_masks=passing)
