"""Stage 1, scan (EftCLIP Algorithm 1): find the backdoor's target label and trigger.

For every probe image i: L_i = the poisoned model's top label on the whole image; the oracle
segments the image and every object-sized region becomes a crop (ops.mask_crop, square boxes);
S_i = the labels of L_i that the grounding model gives some object region with probability >=
grounding_threshold; P_i = L_i minus S_i, refined by dropping labels the poisoned model itself
gives to an object region (its top label). Then a causal refinement: L_i stays in P_i only if
removing some region that is NOT object-sized (filled with the image's median colour) takes away at
least `min_causal_drop` of p(L_i): a trigger patch explains the label, a mere misclassification has
no such region. Across the probe set, a label is a target when it lands in P_i far more often than
the other labels' rate predicts (one-sided binomial test, Bonferroni over labels, plus an
effect-size and count floor). The trigger of each victim is its region with the largest drop.

Two engines compute the per-image and per-region scores: `fast` (the default: batched across
images, ops on the model's device, autocast, no host sync inside the loop) and `reference`
(defense/reference.py: the public tools' image-by-image fp32 pipeline). Everything after the
scores is shared, so both reach the same decisions up to the encoders' numerics.

Only the top-1 label is used (k = 1 in DESIGN.md): a grounding threshold >= 0.5 makes "some
region's probability for L_i passes the threshold" a property region_score reports without
materialising [B, M, C] probabilities.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from scipy.stats import binom
from tqdm import tqdm

from clipfast import distributed
from clipfast.data.prefetch import prefetch
from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.models import ClipBundle, ZeroShotClassifier
from clipfast.models.checkpoint import write_atomically
from clipfast.models.encoder import ImageEncoder, inference_dtype
from clipfast.models.regions import encode_regions_pooled
from clipfast.ops import RegionScores, mask_crop, pack_mask_bits, region_score
from clipfast.ops.reference import unpack_mask_bits
from clipfast.oracle import Segmenter

from .reference import ReferenceRegionScorer


@dataclass(frozen=True)
class ScanConfig:
    grounding_threshold: float = 0.5  # a region grounds a label when its probability reaches this (>= 0.5)
    object_min_fraction: float = 0.03  # smaller regions are not objects (a trigger patch is smaller)
    crop_margin: float = 0.2  # mask_crop's box margin, as a fraction of the box side
    crop_square: bool = True  # square crop boxes keep the region's aspect ratio
    crop_background: float = 0.35  # fill outside the mask, in [0, 1] pixel units
    min_causal_drop: float = 0.5  # removing the trigger region must take away this share of p(L_i)
    significance: float = 1e-3  # family-wise false-alarm rate of the target-label test
    min_effect: float = 3.0  # a target must also occur >= this many times more often than expected
    min_count: int = 5  # and in at least this many images
    batch_size: int = 256  # probe images per oracle / encoder batch
    # fast: batched across images, ops.mask_crop (or ops.mask_pool) on the model's device, autocast,
    # the oracle running ahead in a thread, no host sync inside the loop; reference: the public
    # tools' image-by-image fp32 pipeline (clipfast/defense/reference.py).
    engine: str = "fast"
    regions: str = "crop"  # fast engine: crop (re-encode each region) | pool (one encoder pass, ops.mask_pool)
    precision: str = "auto"  # fast engine: auto (bf16 where native: GPUs, AVX512-BF16/AMX CPUs) | fp32 | bf16
    compile: bool = False  # fast engine: torch.compile the image encoder
    encode_batch: int = 1024  # fast engine: most encoder inputs (images + crops) per forward
    # fast engine: oracle batches segmented ahead in a background thread (0: inline). Even on 2 CPU
    # cores it did not cost: see the "fast crop prefetch=0" row of `clipfast bench --suite pipeline`.
    prefetch: int = 2
    # Probe images per shard: the unit of work of a rank and of a resumed run (a multiple of
    # batch_size keeps batches whole). Changing it changes how the causal test batches, so it ties.
    shard_size: int = 4096
    backend: str = "auto"  # op backend (see clipfast.ops)
    progress: bool = True

    def __post_init__(self):
        if not 0.5 <= self.grounding_threshold <= 1.0:
            raise ValueError(f"grounding_threshold must be in [0.5, 1], got {self.grounding_threshold}")
        if not 0.0 <= self.object_min_fraction < 1.0:
            raise ValueError(f"object_min_fraction must be in [0, 1), got {self.object_min_fraction}")
        if not 0.0 < self.significance < 1.0:
            raise ValueError(f"significance must be in (0, 1), got {self.significance}")
        if not 0.0 < self.min_causal_drop <= 1.0:
            raise ValueError(f"min_causal_drop must be in (0, 1], got {self.min_causal_drop}")
        if self.batch_size < 1 or self.min_count < 1 or self.encode_batch < 1 or self.shard_size < 1:
            raise ValueError("batch_size, encode_batch, shard_size and min_count must be >= 1")
        if self.engine not in ("fast", "reference"):
            raise ValueError(f"ScanConfig.engine must be fast or reference, got {self.engine!r}")
        if self.regions not in ("crop", "pool"):
            raise ValueError(f"ScanConfig.regions must be crop or pool, got {self.regions!r}")
        if self.engine == "reference" and self.regions != "crop":
            raise ValueError("the reference scan crops regions; regions='pool' needs engine='fast'")
        if self.prefetch < 0:
            raise ValueError(f"ScanConfig.prefetch must be >= 0, got {self.prefetch}")
        inference_dtype(self.precision, torch.device("cpu"))  # validates the name


@dataclass
class LabelTest:
    """The per-label evidence behind the target decision."""

    predicted: list[int]  # n_l: images whose whole-image label is l
    candidates: list[int]  # c_l: of those, images where l is ungrounded (l in P_i)
    expected: list[float]  # e_l = n_l * (pooled ungrounded rate of the other labels)
    p_values: list[float]  # P(X >= c_l), X ~ Binomial(n_l, that rate)
    threshold: float  # Bonferroni-corrected significance level


@dataclass
class TriggerEstimate:
    target: int
    victim_indices: torch.Tensor  # [V] probe indices of the victims
    region_masks: torch.Tensor  # bool [V, H, W]: each victim's trigger region
    region_drops: torch.Tensor  # [V]: share of p(t*) its removal takes away
    consensus_mask: torch.Tensor  # bool [H, W]: pixels in >= half of the victims' trigger regions
    box: tuple[int, int, int, int] | None  # (y0, x0, y1, x1) of the consensus, None when it is empty


@dataclass
class ScanResult:
    classnames: list[str]
    image_label: torch.Tensor  # [N] L_i
    image_prob: torch.Tensor  # [N]
    grounded: torch.Tensor  # [N] bool: L_i in S_i
    ungrounded: torch.Tensor  # [N] bool: L_i in P_i after dropping labels C_p gives object regions
    causal_drop: torch.Tensor  # [N] largest share of p(L_i) removing one non-object region takes away (ungrounded only)
    candidate: torch.Tensor  # [N] bool: L_i in P_i after the causal refinement
    discrepancy: torch.Tensor  # [N] p_i(L_i) - max_j q_ij(L_i) over object regions
    oracle_label: torch.Tensor  # [N] grounding model's label of the largest object region, -1 if none
    region_counts: torch.Tensor  # [N] regions the oracle found
    label_test: LabelTest
    targets: list[int]
    triggers: list[TriggerEstimate]
    seconds: dict[str, float] = field(default_factory=dict)
    readable: torch.Tensor | None = None  # [N] bool: decoded; unreadable images take part in nothing (None: all)

    @property
    def found(self) -> bool:
        return bool(self.targets)

    def victims(self, target: int) -> torch.Tensor:
        """Probe indices whose whole-image label is the target and a candidate (Algorithm 2)."""
        return torch.nonzero(self.candidate & (self.image_label == target)).flatten()

    def summary(self) -> dict:
        return {
            "target_found": self.found,
            "targets": [self.classnames[t] for t in self.targets],
            "probe_images": len(self.image_label),
            "unreadable": 0 if self.readable is None else int((~self.readable).sum()),
            "mean_regions_per_image": float(self.region_counts.float().mean()),
            "ungrounded": int(self.ungrounded.sum()),
            "candidates": int(self.candidate.sum()),
            "label_test": {name: {"predicted": n, "candidates": c, "expected": round(e, 3), "p_value": p}
                           for name, n, c, e, p in zip(self.classnames, self.label_test.predicted,
                                                       self.label_test.candidates, self.label_test.expected,
                                                       self.label_test.p_values)},
            "significance_threshold": self.label_test.threshold,
            "triggers": [{"target": self.classnames[t.target], "box": t.box, "victims_used": len(t.victim_indices),
                          "consensus_pixels": int(t.consensus_mask.sum())} for t in self.triggers],
            "seconds": self.seconds,
        }


class _HostCopy:
    """RegionScores on their way to the host: on a GPU the copy is queued behind the work that
    makes them and waited for only when result() is called, so the loop never blocks on the batch
    it just submitted."""

    def __init__(self, scores: RegionScores):
        if scores.image_label.device.type != "cuda":
            self.scores, self.event = RegionScores(*(t.cpu() for t in scores)), None
            return
        self.scores = RegionScores(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                                     for t in scores))
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> RegionScores:
        if self.event is not None:
            self.event.synchronize()
        return self.scores


class _RegionScorer:
    """One model's view of probe images and their object regions, batched across images: the
    images and their region crops (ops.mask_crop) go through the encoder together, or the regions
    are pooled from the images' own encoder pass (ops.mask_pool); ops.region_score reduces them."""

    def __init__(self, bundle: ClipBundle, classifier: ZeroShotClassifier, config: ScanConfig):
        self.bundle, self.classifier, self.config = bundle, classifier, config
        self.encoder = ImageEncoder(bundle, config.precision, config.compile, config.encode_batch)
        self.text = classifier.class_embeddings.to(bundle.device)

    @torch.no_grad()
    def submit(self, images: torch.Tensor, masks: torch.Tensor, object_regions: torch.Tensor) -> _HostCopy:
        """Queue the scoring of a batch. masks and object_regions are host tensors, so which crops
        to encode is known without waiting for the device."""
        bundle, config, device = self.bundle, self.config, self.bundle.device
        valid = object_regions & masks.flatten(2).any(-1)  # an empty mask has no crop
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        pixels = bundle.preprocess(images)
        if config.regions == "pool":
            with self.encoder.autocast():
                image_embeddings, region_embeddings, _ = encode_regions_pooled(
                    bundle, pixels, _at_encoder_resolution(masks, bundle.image_size), backend=config.backend)
        else:
            dtype = self.encoder.dtype or torch.float32  # crops written in the encoder's precision: half the bytes
            crops = mask_crop(images, masks, bundle.image_size, margin=config.crop_margin, square=config.crop_square,
                              background=config.crop_background, mean=bundle.mean, std=bundle.std, out_dtype=dtype,
                              backend=config.backend)
            index = torch.nonzero(valid.flatten()).flatten().to(device, non_blocking=True)
            embeddings = self.encoder(torch.cat([pixels.to(dtype), crops.crops.flatten(0, 1)[index]]))
            image_embeddings = embeddings[: len(images)]
            region_embeddings = embeddings.new_zeros(masks.shape[0] * masks.shape[1], embeddings.shape[1])
            region_embeddings[index] = embeddings[len(images):]
            region_embeddings = region_embeddings.view(*masks.shape[:2], -1)
        scores = region_score(image_embeddings, region_embeddings, valid.to(device, non_blocking=True), self.text,
                              self.classifier.logit_scale, backend=config.backend)
        return _HostCopy(scores)

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the vocabulary [K, C] of whole uint8 images [K, 3, H, W]."""
        embeddings = self.encoder(self.bundle.preprocess(images))
        return (self.classifier.logit_scale * embeddings @ self.text.T).softmax(-1).cpu()


def _at_encoder_resolution(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks [B, M, H, W] through the same shorter-side resize and centre crop as the images."""
    height, width = masks.shape[-2:]
    if (height, width) == (size, size):
        return masks
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = torch.nn.functional.interpolate(masks.flatten(0, 1)[:, None].float(), size=new, mode="nearest")[:, 0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return resized[:, top : top + size, left : left + size].view(*masks.shape[:2], size, size) > 0.5


@dataclass
class ScanShard:
    """The per-image results of probe images [lo, hi): what one rank computes, one file holds and a
    resumed run keeps. Decisions need every shard (scan() gathers them)."""

    lo: int
    hi: int
    width: int  # of the probe images (to unpack trigger_masks)
    readable: torch.Tensor  # [K] bool: the image could be decoded (unreadable ones take part in nothing)
    image_label: torch.Tensor  # [K] L_i (-1 when unreadable)
    image_prob: torch.Tensor
    grounded: torch.Tensor
    ungrounded: torch.Tensor
    causal_drop: torch.Tensor
    discrepancy: torch.Tensor
    oracle_label: torch.Tensor
    region_counts: torch.Tensor
    # probe index -> its largest-drop region, where the drop passes min_causal_drop; bit-packed
    # (ops.pack_mask_bits, 8x smaller): every rank receives every shard's masks
    trigger_masks: dict[int, torch.Tensor]


class ScanShardMismatch(ValueError):
    """A shard directory holds results of a scan with other settings, probe set or vocabulary."""


class NonFiniteScoresError(ValueError):
    """The model produced NaN or inf scores (broken weights or input)."""


# Settings that never change a scan's results: they do not tie a shard directory (or a run directory).
RESULT_NEUTRAL_SETTINGS = frozenset({"progress", "backend", "batch_size", "prefetch", "compile", "encode_batch"})


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def shard_path(shard_dir: Path, index: int, count: int) -> Path:
    return Path(shard_dir) / f"shard-{index:05d}-of-{count:05d}.pt"


def _fingerprint(config: ScanConfig, classnames: list[str], n: int, bundle: ClipBundle,
                 grounding_bundle: ClipBundle | None) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k not in RESULT_NEUTRAL_SETTINGS}
    models = [(b.name, sum(p.numel() for p in b.model.parameters())) for b in (bundle, grounding_bundle) if b]
    return json.loads(json.dumps({"settings": settings, "classnames": classnames, "probe_images": n, "models": models}))


def _load_shard(path: Path, fingerprint: dict) -> ScanShard:
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:  # a file that is not ours; atomic writes mean never a partial one
        raise ScanShardMismatch(f"{path} is not a scan shard ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        raise ScanShardMismatch(f"{path} holds results of a scan with other settings, probe set or vocabulary; "
                                "use a new directory")
    return ScanShard(**payload["shard"])


def scan(
    bundle: ClipBundle,
    classnames: Sequence[str],
    probe: ProbeSet | torch.Tensor,
    segmenter: Segmenter,
    *,
    prompts: Callable[[str], list[str]] | None = None,
    grounding_bundle: ClipBundle | None = None,
    config: ScanConfig = ScanConfig(),
    shard_dir: str | Path | None = None,
) -> ScanResult:
    """Run Algorithm 1 over the probe set (uint8 [N, 3, H, W] or a ProbeSet streaming from files).
    grounding_bundle is a trusted clean CLIP; without one the model under test grounds its own crops.

    The probe set is cut into shards of config.shard_size images. Under torch.distributed each rank
    scans the shards k with k % world_size == rank and the per-image results are gathered, so every
    rank reaches the decisions of a single-process run. With shard_dir, each finished shard is
    written there atomically and a rerun (on any number of ranks) scans only the missing ones.
    """
    probe = as_probe_set(probe)
    if len(probe) == 0:
        raise ValueError("scan: the probe set is empty")
    classnames = check_vocabulary(classnames)
    group = distributed.current()
    n, shards = len(probe), shard_ranges(len(probe), config.shard_size)
    fingerprint = _fingerprint(config, classnames, n, bundle, grounding_bundle)
    mine = list(range(group.rank, len(shards), group.world_size))
    done: dict[int, ScanShard] = {}
    if shard_dir is not None:
        done = {k: _load_shard(shard_path(shard_dir, k, len(shards)), fingerprint) for k in mine
                if shard_path(shard_dir, k, len(shards)).exists()}
    todo = [k for k in mine if k not in done]
    seconds = {"text_encoding": 0.0, "segment": 0.0, "regions": 0.0, "causal_test": 0.0}
    if todo:
        def keep(k: int, shard: ScanShard) -> None:
            done[k] = shard
            if shard_dir is not None:
                payload = {"fingerprint": fingerprint, "shard": asdict(shard)}
                write_atomically(shard_path(shard_dir, k, len(shards)), lambda file: torch.save(payload, file))

        _scan_shards(bundle, classnames, probe, segmenter, [(k, *shards[k]) for k in todo], keep, prompts,
                     grounding_bundle, config, seconds)
    # Every rank gets every shard; the slowest rank's stage times are the run's.
    gathered = group.all_gather_object((done, seconds))
    every = {k: shard for shards_of_rank, _ in gathered for k, shard in shards_of_rank.items()}
    seconds = {name: max(times[name] for _, times in gathered) for name in seconds}
    return _decide(classnames, [every[k] for k in range(len(shards))], config, seconds)


def check_vocabulary(classnames: Sequence[str]) -> list[str]:
    """The label vocabulary as a list; ValueError for fewer than two labels, empty or duplicate ones."""
    if isinstance(classnames, str):
        raise ValueError("the label vocabulary must be a sequence of labels, not one string")
    classnames = list(classnames)
    if len(classnames) < 2:
        raise ValueError("the label vocabulary needs at least two labels")
    bad = [i for i, name in enumerate(classnames) if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"empty or non-string labels at positions {bad[:8]}")
    seen, duplicates = set(), []
    for name in classnames:
        if name.strip() in seen:
            duplicates.append(name)
        seen.add(name.strip())
    if duplicates:
        raise ValueError(f"duplicate labels {sorted(set(duplicates))[:8]}: each label must be named once")
    return classnames


def _scan_shards(bundle: ClipBundle, classnames: list[str], probe: ProbeSet, segmenter: Segmenter,
                 shards: list[tuple[int, int, int]], keep: Callable[[int, ScanShard], None], prompts,
                 grounding_bundle: ClipBundle | None, config: ScanConfig, seconds: dict[str, float]) -> None:
    """Scan the given (index, lo, hi) shards and keep(index, shard) each as soon as it is complete."""
    prompt_kwargs = {} if prompts is None else {"prompts": prompts}
    start = time.perf_counter()
    scorer_type = ReferenceRegionScorer if config.engine == "reference" else _RegionScorer
    suspect = scorer_type(bundle, ZeroShotClassifier(bundle, classnames, **prompt_kwargs), config)
    grounder = suspect if grounding_bundle is None else scorer_type(
        grounding_bundle, ZeroShotClassifier(grounding_bundle, classnames, **prompt_kwargs), config)
    seconds["text_encoding"] = time.perf_counter() - start

    _, height, width = probe.image_shape
    min_area = config.object_min_fraction * height * width
    pin = bundle.device.type == "cuda"
    batches = [(k, lo, min(lo + config.batch_size, hi)) for k, shard_lo, hi in shards
               for lo in range(shard_lo, hi, config.batch_size)]
    last_batch_of = {k: max(lo for j, lo, _ in batches if j == k) for k, _, _ in shards}
    bounds = {k: (lo, hi) for k, lo, hi in shards}
    oracle_seconds = []

    def segmented():
        ranges = [(lo, hi) for _, lo, hi in batches]
        for (k, _, _), (lo, images, readable) in zip(batches, probe.batches(ranges)):
            t0 = time.perf_counter()
            segmentation = segmenter.segment(images)
            oracle_seconds.append(time.perf_counter() - t0)
            masks = segmentation.masks
            if pin:  # page-locked, so the copies to the GPU are asynchronous
                images, masks = images.pin_memory(), masks.pin_memory()
            areas = masks.flatten(2).sum(-1)
            yield k, lo, images, readable, segmentation, masks, segmentation.valid & (areas >= min_area)

    current: dict[int, dict] = {}  # shard index -> its arrays while it is being scanned

    def arrays(k: int) -> dict:
        if k not in current:
            size = bounds[k][1] - bounds[k][0]
            current[k] = {"readable": torch.zeros(size, dtype=torch.bool),
                          "image_label": torch.full((size,), -1, dtype=torch.int64), "image_prob": torch.zeros(size),
                          "grounded": torch.zeros(size, dtype=torch.bool),
                          "ungrounded": torch.zeros(size, dtype=torch.bool), "discrepancy": torch.zeros(size),
                          "oracle_label": torch.full((size,), -1, dtype=torch.int64),
                          "region_counts": torch.zeros(size, dtype=torch.int64), "small_regions": {}}
        return current[k]

    def record(k, lo, images, readable, segmentation, objects, own_scores, ground_scores) -> None:
        """Host-side bookkeeping of one batch, once its scores are on the host."""
        own = own_scores.result()
        ground = own if ground_scores is own_scores else ground_scores.result()
        probs = own.image_prob[readable]
        if not (torch.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
            raise NonFiniteScoresError(f"scan: the model's scores of probe images {lo}..{lo + len(readable) - 1} are "
                                       "NaN or inf; its weights or the images are broken")
        shard = arrays(k)
        sl = slice(lo - bounds[k][0], lo - bounds[k][0] + len(readable))
        label = own.image_label[:, None]
        if grounder is suspect:  # region_score already has q_ij(L_i) for the suspect's own L_i
            grounded = (own.region_image_prob >= config.grounding_threshold).any(-1)
        else:  # threshold >= 0.5: q'_ij(L_i) passes it only as region j's top label
            grounded = ((ground.region_label == label) & (ground.region_prob >= config.grounding_threshold)).any(-1)
        self_supported = (own.region_label == label).any(-1)
        # Regions are sorted largest first, so the first object region is the largest one.
        has_object = objects.any(-1)
        first_object = objects.float().argmax(-1)
        oracle_label = torch.where(has_object, ground.region_label.gather(1, first_object[:, None]).squeeze(1), -1)
        shard["readable"][sl] = readable
        shard["image_label"][sl] = torch.where(readable, own.image_label, -1)
        shard["image_prob"][sl] = torch.where(readable, own.image_prob, 0.0)
        shard["discrepancy"][sl] = torch.where(readable, own.discrepancy, 0.0)
        shard["grounded"][sl] = grounded & readable
        shard["ungrounded"][sl] = ~grounded & ~self_supported & readable
        shard["oracle_label"][sl] = torch.where(readable, oracle_label, -1)
        shard["region_counts"][sl] = torch.where(readable, segmentation.counts, 0)
        small = segmentation.valid & ~objects
        for j in torch.nonzero(shard["ungrounded"][sl] & small.any(-1)).flatten().tolist():
            shard["small_regions"][lo + j] = (images[j].clone(), segmentation.masks[j, small[j]])  # not the batch
        if lo == last_batch_of[k]:
            finish(k)

    def finish(k: int) -> None:
        shard = current.pop(k)
        t0 = time.perf_counter()
        per_image = config.engine == "reference"  # the reference encodes each image's removals as one batch
        drops, masks = _causal_test(suspect.class_probs, shard.pop("small_regions"), shard["image_label"],
                                    shard["image_prob"], bounds[k][0], config.batch_size, per_image)
        seconds["causal_test"] += time.perf_counter() - t0
        passing = {i: pack_mask_bits(mask)[0] for i, mask in masks.items()
                   if drops[i - bounds[k][0]] >= config.min_causal_drop}
        keep(k, ScanShard(*bounds[k], width, causal_drop=drops, trigger_masks=passing, **shard))

    # Batch b's scores are recorded after batch b+1 is submitted: the device never waits for the host.
    start, pending = time.perf_counter(), None
    stream = prefetch(segmented(), config.prefetch if config.engine == "fast" else 0)
    for k, lo, images, readable, segmentation, masks, objects in tqdm(
            stream, total=len(batches), desc="scan", unit="batch", disable=not config.progress):
        own = suspect.submit(images, masks, objects)
        ground = own if grounder is suspect else grounder.submit(images, masks, objects)
        if pending is not None:
            record(*pending)
        pending = (k, lo, images, readable, segmentation, objects, own, ground)
    record(*pending)
    seconds["segment"] = sum(oracle_seconds)  # oracle busy time (overlapped with encoding in the fast engine)
    seconds["regions"] = time.perf_counter() - start - seconds["causal_test"]  # the segment + encode + score loop


def _decide(classnames: list[str], shards: list[ScanShard], config: ScanConfig, seconds: dict) -> ScanResult:
    """The probe-set-wide decisions (target labels, triggers) from every shard's per-image results."""
    columns = {name: torch.cat([getattr(shard, name) for shard in shards])
               for name in ("readable", "image_label", "image_prob", "grounded", "ungrounded", "causal_drop",
                            "discrepancy", "oracle_label", "region_counts")}
    if not columns["readable"].any():
        raise ValueError(f"scan: none of the {len(columns['readable'])} probe images could be read")
    width = shards[0].width
    trigger_masks = {i: unpack_mask_bits(packed, width) for shard in shards for i, packed in shard.trigger_masks.items()}
    candidate = columns["ungrounded"] & (columns["causal_drop"] >= config.min_causal_drop)
    image_label = columns["image_label"]
    label_test, targets = _decide_targets(image_label, candidate, len(classnames), config)
    triggers = [_trigger_estimate(target, candidate, image_label, columns["causal_drop"], trigger_masks)
                for target in targets]
    return ScanResult(classnames, image_label, columns["image_prob"], columns["grounded"], columns["ungrounded"],
                      columns["causal_drop"], candidate, columns["discrepancy"], columns["oracle_label"],
                      columns["region_counts"], label_test, targets, triggers, seconds, columns["readable"])


@torch.no_grad()
def _causal_test(class_probs: Callable[[torch.Tensor], torch.Tensor],
                 small_regions: dict[int, tuple[torch.Tensor, torch.Tensor]], image_label: torch.Tensor,
                 image_prob: torch.Tensor, offset: int, batch_size: int,
                 per_image: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """For each probe image i in small_regions (its image and its non-object region masks): remove
    each region in turn (fill with the image's median colour) and find the largest relative drop of
    p(L_i). image_label / image_prob / the returned drops are indexed by i - offset (0 where not
    tested); also returns, per tested image, the mask of the region with that drop."""
    drops = torch.zeros(len(image_label))
    best_masks = {}
    pairs = [(i, j) for i, (_, masks) in small_regions.items() for j in range(len(masks))]
    pair_drop = torch.zeros(len(pairs))
    bounds = (torch.tensor([len(masks) for _, masks in small_regions.values()]).cumsum(0).tolist() if per_image else
              list(range(batch_size, len(pairs), batch_size)) + [len(pairs)])
    lo = 0
    for hi in bounds:
        chunk = pairs[lo:hi]
        if not chunk:
            continue
        local = torch.tensor([i - offset for i, _ in chunk])
        masks = torch.stack([small_regions[i][1][j] for i, j in chunk])[:, None]  # [K, 1, H, W]
        originals = torch.stack([small_regions[i][0] for i, _ in chunk])
        median = originals.flatten(2).median(-1).values[:, :, None, None]
        probs = class_probs(torch.where(masks, median, originals))
        kept = probs.gather(1, image_label[local][:, None]).squeeze(1)
        pair_drop[lo:hi] = (image_prob[local] - kept) / image_prob[local]
        lo = hi
    for k, (i, j) in enumerate(pairs):
        if i not in best_masks or pair_drop[k] > drops[i - offset]:
            drops[i - offset], best_masks[i] = pair_drop[k], small_regions[i][1][j]
    return drops, best_masks


def _trigger_estimate(target: int, candidate: torch.Tensor, image_label: torch.Tensor, causal_drop: torch.Tensor,
                      trigger_masks: dict[int, torch.Tensor]) -> TriggerEstimate:
    victims = torch.nonzero(candidate & (image_label == target)).flatten()
    region_masks = torch.stack([trigger_masks[int(i)] for i in victims])
    consensus = region_masks.float().mean(0) >= 0.5
    box = None
    if consensus.any():
        rows, cols = torch.nonzero(consensus.any(1)).flatten(), torch.nonzero(consensus.any(0)).flatten()
        box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return TriggerEstimate(target, victims, region_masks, causal_drop[victims], consensus, box)


def _decide_targets(image_label: torch.Tensor, candidate: torch.Tensor, num_labels: int,
                    config: ScanConfig) -> tuple[LabelTest, list[int]]:
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
