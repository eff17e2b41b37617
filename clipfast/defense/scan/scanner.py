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
from clipfast.ops import RegionScores, pack_mask_bits
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
    # the grounding model's label of its largest other region (-1: it has none), or, where the naming
    # has not reached that region, None and the region (bool [H, W]), named only if the donor passes
    other_label: int | None
    other: torch.Tensor | None = None


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
        # A grounder of its own that crops (a trusted model; self mode's crop naming of packed evidence)
        # would re-encode every region as a whole image, yet the scan reads only whether some region
        # grounds L_i and the largest region's label: the fast engine names just those (_ground), the
        # reference engine names every region as the public method does.
        self.name_lazily = (self.grounder is not self.suspect and config.engine == "fast"
                            and config.grounding_regions == "crop")
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
            ground = (None if self.grounder is self.suspect or self.name_lazily else
                      self.grounder.submit(batch.images, batch.masks, batch.regions))
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
                ground_pending: PendingScores | None) -> Iterator[tuple[int, ScanShard]]:
        """Host-side bookkeeping of one batch, once its scores are on the host."""
        config, readable, regions = self.config, batch.readable, batch.regions
        own = own_pending.result()
        probs = own.image_prob[readable]
        if not (torch.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
            raise NonFiniteScoresError(f"scan: the model's scores of probe images {batch.lo}..{batch.lo + len(readable) - 1}"
                                       " are NaN or inf; its weights or the images are broken")
        label, size = own.image_label, len(readable)
        grounded, named, whole = self._ground(batch, own, None if ground_pending is None else ground_pending.result())
        if not self.trusted:
            reference_label, discordant = torch.full((size,), -1), torch.zeros(size, dtype=torch.bool)
        else:
            reference_label, reference_prob = whole
            discordant = (reference_label != label) & (reference_prob >= config.grounding_threshold) & ~grounded
        start = time.perf_counter()
        mirror_label, object_label, mirror_object_label = (
            self._mirror_labels(batch) if self.mirror else [torch.full((size,), -1)] * 3)
        explaining, drop, has_region = self._explaining_regions(batch, own)
        # The grounding model's label of the largest region (regions are sorted largest first); where
        # the explaining region turns out to be a trigger, of the largest other one (_finish).
        oracle_label = torch.where(regions[:, 0], named[:, 0], -1)
        others = regions.clone()
        others[torch.arange(size), explaining] = False
        first = others.float().argmax(-1)
        has_other = others.any(-1) & batch.segmentation.masks[torch.arange(size), first].flatten(1).any(-1)
        other_label = torch.where(has_other, named.gather(1, first[:, None]).squeeze(1), -1)
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
        masks = batch.segmentation.masks
        for j in torch.nonzero(has_region & readable).flatten().tolist():
            unnamed = bool(has_other[j]) and int(other_label[j]) < 0  # left to _finish, if it passes
            shard.waiting.append(_Donor(batch.lo + j, batch.images[j].clone(), masks[j, explaining[j]].clone(),
                                        int(label[j]), None if unnamed else int(other_label[j]),
                                        masks[j, first[j]].clone() if unnamed else None))
        if len(shard.pool) >= config.recipient_pool:
            self._transplant(shard)
        self.seconds["evidence"] += time.perf_counter() - start
        if batch.lo == shard.last_batch:
            yield batch.shard, self._finish(batch.shard)

    @torch.no_grad()
    def _ground(self, batch: _Batch, own: RegionScores, ground: RegionScores | None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Per image whether some region grounds its label L_i (the grounding model's top label of it
        is L_i at >= grounding_threshold), the grounding model's labels of the regions it named
        [B, M] (-1 where not named; the largest region always is), and in trusted mode its label and
        probability of each whole image."""
        threshold, label = self.config.grounding_threshold, own.image_label
        if self.grounder is self.suspect:  # region_score already has q_ij(L_i) for the suspect's own L_i
            return (own.region_image_prob >= threshold).any(-1), own.region_label, None
        if ground is not None:  # threshold >= 0.5: q'_ij(L_i) passes it only as region j's top label
            grounded = ((ground.region_label == label[:, None]) & (ground.region_prob >= threshold)).any(-1)
            return grounded, ground.region_label, (ground.image_label, ground.image_prob) if self.trusted else None
        scored = batch.readable[:, None] & batch.regions & batch.masks.flatten(2).any(-1)  # what submit scores
        grounded, named = name_until_grounded(self.grounder.region_probs, batch.images, batch.masks, scored, label,
                                              threshold, self.config.encode_batch)
        whole = None
        if self.trusted:
            top = in_chunks(self.grounder.class_probs, batch.images, self.config.encode_batch).max(-1)
            whole = (top.indices, top.values)
        return grounded, named, whole

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

    @torch.no_grad()
    def _name_others(self, donors: list[_Donor]) -> torch.Tensor:
        """The grounding model's label of each donor's largest other region (-1: it has none), naming
        those the scan's naming did not reach."""
        labels = torch.tensor([-1 if donor.other_label is None else donor.other_label for donor in donors])
        which = [k for k, donor in enumerate(donors) if donor.other_label is None]
        for lo in range(0, len(which), self.config.encode_batch):
            part = which[lo : lo + self.config.encode_batch]
            images, others = torch.stack([donors[k].image for k in part]), torch.stack([donors[k].other for k in part])
            labels[part] = self.grounder.region_probs(images, others).argmax(-1)
        return labels

    def _finish(self, index: int) -> ScanShard:
        shard = self._open.pop(index)
        start = time.perf_counter()
        self._transplant(shard)  # donors still waiting: the pool is as complete as this shard allows
        self.seconds["evidence"] += time.perf_counter() - start
        columns = ImageColumns.cat(shard.parts)
        passing = {}
        for i, (rate, donor) in shard.flips.items():
            columns.flip_rate[i - shard.lo] = rate
            if rate >= self.config.min_flip_rate:
                passing[i] = pack_mask_bits(donor.mask)[0]
        # A trigger's caption source is its largest other region; where the (lazy) naming did not
        # reach it, it is named here, for the passing donors only: a few regions, not every donor's.
        triggers = [donor for i, (_, donor) in shard.flips.items() if i in passing]
        if triggers:
            start = time.perf_counter()
            columns.oracle_label[torch.tensor([d.index - shard.lo for d in triggers])] = self._name_others(triggers)
            self.seconds["evidence"] += time.perf_counter() - start
        return ScanShard(**vars(columns), lo=shard.lo, hi=shard.hi, width=self.width, trigger_masks=passing)


def name_until_grounded(region_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                        masks: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor, threshold: float,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether some scored region of each image grounds its label (the grounding model's top label of
    the region is labels[i] at >= threshold) and the labels of the regions named on the way [B, M]
    (-1: not named), naming as few regions as that takes: region 0 (the largest) of every image, then,
    for the images no named region grounds yet, regions 1, 2-3, 4-7, ... (at most log2(M) + 1
    rounds; an image whose first grounding region is g gets at most max(1, 2g) named). Exact: an
    image stops only once a region grounds it, and any one does. region_probs(images [K, 3, H, W],
    masks [K, H, W]) -> softmax [K, C]; images [B, 3, H, W], masks [B, M, H, W], scored bool [B, M];
    `chunk` regions per call."""
    named = torch.full(scored.shape, -1)
    grounded = torch.zeros(len(labels), dtype=torch.bool)
    lo, count = 0, scored.shape[1]
    while lo < count:
        hi = max(1, 2 * lo)
        want = scored.clone()
        want[:, :lo] = want[:, hi:] = False
        if lo:
            want &= ~grounded[:, None]
        index = torch.nonzero(want)
        if len(index):
            top = torch.cat([region_probs(images[part[:, 0]], masks[part[:, 0], part[:, 1]])
                             for part in index.split(chunk)]).max(-1)
            named[index[:, 0], index[:, 1]] = top.indices
            hits = (top.indices == labels[index[:, 0]]) & (top.values >= threshold)
            grounded[index[hits, 0]] = True
        lo = hi
    return grounded, named
