"""ScanConfig: every setting of the scan, validated. Fields marked untied() never change a
decision (they only change speed or output): a shard or run directory resumes across them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clipfast.models.precision import PRECISIONS
from clipfast.rundir import untied

ENGINES = ("fast", "reference")
REGION_MODES = ("crop", "packed")
AUTO_REGIONS = "auto"  # ScanConfig.regions: packed in self mode on the fast engine, else crop (for_oracle)


@dataclass(frozen=True)
class ScanConfig:
    grounding_threshold: float = 0.5  # a region grounds a label when its probability reaches this (>= 0.5)
    crop_margin: float = 0.2  # mask_crop's box margin, as a fraction of the box side
    crop_square: bool = True  # square crop boxes keep the region's aspect ratio
    crop_background: float = 0.35  # fill outside the mask, in [0, 1] pixel units
    # Where no crop says L_i, the region whose removal takes away at least this share of p(L_i)
    # explains it (a majority of the label's probability: the region decides it).
    min_causal_drop: float = 0.5
    # The transplant test (evidence.py): an explaining region is trigger evidence when, pasted onto
    # other probe images, it turns at least min_flip_rate of them to its label. Calibrated on what the
    # two kinds of region do by definition, not on any trigger: a working backdoor turns most images
    # it is pasted on (its attack success rate, >= 0.9 for the attacks this tool is judged on), while
    # an object that explains its own image rarely overrides another image's own object; 0.5 is the
    # midpoint, and the per-label test (not one image) decides. Recipients: images of other labels
    # whose largest region is at least recipient_size_ratio times the pasted region (an image's label
    # follows its largest object: measured on the demo model, with a ratio of 1 a pasted object of
    # the same size took the label over half the time, so 11 % of clean images passed; with 2, 2.7 %
    # did, against 32 of 33 victims) and covered by it at most max_recipient_overlap (a pasted
    # object must not simply hide the recipient's), drawn from the first recipient_pool images of
    # the shard. A rate is evidence only when measured on at least min_recipients recipients: one or
    # two are a coin toss, not a rate. (Measured on the efficacy models, seed 0, self mode: every
    # poisoned candidate of the 4 and 10 px BadNet models had all 8 recipients, while the large
    # objects that made a Blended and a SIG model flag a wrong label ('bar', 'cross': correctly
    # classified images whose crops do not ground them) had 1 or 2 in 30 of 33 and 46 of 52 cases.)
    min_flip_rate: float = 0.5
    # The background test that confirms an image-wide target (confirm.py): the victims' backgrounds,
    # objects removed, with clean objects of other labels pasted on, must be labelled the target at
    # least this often by the suspect (and less often by the trusted model). Measured on the efficacy
    # models (trusted mode): backdoors 40-87 % (WaNet strengths 3 and 6, seeds 0-2: 59-87 %; Blended
    # 84 %; SIG 40 %), the 'star' confusions of clean suspects (5 seeds) 0-2.2 %. 0.2 sits far from
    # both, and transfers for the reason the test works: a trigger outside the object overrides the
    # object by definition (attack success >= 0.9), a confusion is gone with the confused object.
    min_background_flip: float = 0.2
    min_recipients: int = 4
    transplant_recipients: int = 8
    recipient_pool: int = 64
    max_recipient_overlap: float = 0.1
    recipient_size_ratio: float = 2.0
    # family-wise false-alarm rate of the target-label test (and of self mode's two image-wide tests together)
    significance: float = 1e-3
    min_effect: float = 3.0  # a target must also occur >= this many times more often than expected
    min_count: int = 5  # and in at least this many images
    # Self mode: the object-controlled mirror test for image-wide triggers (decide.mirror_label_test),
    # 3 more whole-image encodes per probe image. A label is a target when a horizontal flip relabels
    # far more of its images than it relabels that label's objects shown alone. Its only thresholds are
    # significance and min_count above, nothing fitted. Measured on the efficacy matrix's self-mode
    # models (first on 22 of them with benchmarks/purification.py; then on the saved scans of all 40,
    # benchmarks/image_wide_tests.py, rows in results/image_wide_tests.jsonl): 11 of 14 image-wide
    # targets found (Blended, SIG, WaNet), no label flagged on the 5 clean models (smallest p 0.0032
    # against 5e-5) and none but the target on the 21 patch / label-consistent ones (0.037). It transfers as far as its premise does: a fragile
    # image-wide trigger is broken by mirroring the whole image and mostly absent from an object shown
    # alone, while a label's own mirror sensitivity (arrows: 17-30 % relabelled on clean models) is the
    # same alone. A mirror-symmetric trigger survives the flip.
    # The object-alone test (decide.object_alone_test) reads the same objects' labels, no encode more:
    # a label whole images get from other labels' objects alone far more often than the other way
    # round, from more than its two largest source labels (one-sided binomial at 1/2). The two tests
    # share significance (each at half). Measured on the saved scans of the same 40 self-mode models
    # (benchmarks/image_wide_tests.py): it adds WaNet strength 6 seeds 1-2
    # (p 1e-53, 3e-46) and flags no label on the 5 clean models (smallest p 0.029) or any label but
    # the target on the 21 patch / label-consistent ones (0.011); on WaNet strength 6 seed 1 it also
    # flags 'ring' (p 2.6e-6), 68 of whose 74 images it counts are poisoned ones (the warp sends 106
    # poisoned probe images to 'ring'). It transfers where its premise holds: a trigger outside the
    # object is gone when the object is shown alone, so its victims flow one way from every class,
    # while two labels a clean model mixes up disagree both ways. It can fail where whole images
    # rightly carry a label their objects do not (a scene label such as 'seashore'): untested, the
    # synthetic world has none, and confirm.py's background test would likely pass on such a label too.
    mirror_test: bool = True
    # fast: batched across images, ops on the model's device, autocast, the oracle running ahead in a
    # thread, no host sync inside the loop; reference: the public tools' image-by-image fp32 pipeline.
    # Both reach the same decisions up to the encoders' numerics, so the engine ties a run.
    engine: str = "fast"
    # fast engine: crop (each region's crop re-encoded as a whole image) | packed (each region its own
    # sequence of its masked patches, all packed into one encoder pass; clipfast/models/packed.py) |
    # auto (default): packed in self mode, crop with a trusted model or a tower packing cannot take
    # (for_oracle). Measured on the
    # efficacy matrix (README, "Packed regions"): in self mode packed evidence named by crops repairs
    # label-consistent models to 0.02-0.78 % ASR where crops leave 0.42-5.62 % (the suspect's crops
    # call the degraded target-class victims other labels, packed sequences see the trigger), the
    # patch family as well (ASR median 0.77 vs 0.84 %, victim recall 1.000 vs 0.939); with a trusted
    # model packed ranks WaNet victims worse for the compact set (ASR 2.2-5.0 vs 1.7-3.8 %), so crop.
    regions: str = AUTO_REGIONS
    # How the grounding model sees the regions it names (the images' grounding, the victims' oracle
    # labels): crop (default) or packed; the model under test's own region scores, which find the
    # trigger, follow `regions`. Crops name regions better on the tiny world, whose 4x4 token grid
    # leaves an object a few native-resolution tokens while a crop gives it all 16
    # (benchmarks/packed_ca_causes.py, 9 self-mode patch cases at e353012: victims' oracle labels right
    # 0.97 vs 0.76 (medians), grounded images' labels 0.993 vs 0.968 right); repairs from a packed scan
    # that names with crops lost CA 0.24 points (median; worst 1.20) against 0.60 (1.70) naming packed.
    # A grounding model of its own (a trusted model, or self mode's crop naming of packed evidence) crops
    # only the regions the scan reads on the fast engine (scanner.name_until_grounded, exact).
    grounding_regions: str = "crop"
    # packed regions: a patch is a region's token from this share of its pixels on (0: any pixel, so
    # that every mask pixel is seen, as in a crop); a region with no such patch keeps its best ones.
    packed_min_coverage: float = 0.0
    precision: str = "auto"  # fast engine: auto (bf16 where native: GPUs, AVX512-BF16/AMX CPUs) | fp32 | bf16
    # Probe images per shard: the unit of work of a rank and of a resumed run (a multiple of
    # batch_size keeps batches whole). It sets how the causal test batches its encodes, so it ties.
    shard_size: int = 4096
    batch_size: int = untied(256)  # probe images per oracle / encoder batch
    compile: bool = untied(False)  # fast engine: torch.compile the image encoder
    encode_batch: int = untied(1024)  # fast engine: most encoder inputs (images + crops) per forward
    # fast engine: oracle batches segmented ahead in a background thread (0: inline). None: 2 when the
    # model is on a GPU (the host segments while the device encodes), 0 on a CPU, where the thread
    # takes the encoder's own cores (measured on the 2-core CI machine at afc2e39: the demo scan took
    # 1.56 s with it, 0.84 s without).
    prefetch: int | None = untied(None)
    backend: str = untied("auto")  # op backend (see clipfast.ops)
    progress: bool = untied(True)

    def __post_init__(self):
        if not 0.5 <= self.grounding_threshold <= 1.0:
            raise ValueError(f"grounding_threshold must be in [0.5, 1], got {self.grounding_threshold}")
        if not 0.0 < self.min_flip_rate <= 1.0 or not 0.0 < self.min_background_flip <= 1.0:
            raise ValueError("min_flip_rate and min_background_flip must be in (0, 1]")
        if not 0.0 <= self.max_recipient_overlap <= 1.0:
            raise ValueError("max_recipient_overlap must be in [0, 1]")
        if self.transplant_recipients < 1 or self.recipient_pool < 2:
            raise ValueError("transplant_recipients must be >= 1 and recipient_pool >= 2")
        if not 1 <= self.min_recipients <= self.transplant_recipients:
            raise ValueError(f"min_recipients must be in [1, transplant_recipients={self.transplant_recipients}], "
                             f"got {self.min_recipients}")
        if not 0.0 < self.significance < 1.0:
            raise ValueError(f"significance must be in (0, 1), got {self.significance}")
        if not 0.0 < self.min_causal_drop <= 1.0:
            raise ValueError(f"min_causal_drop must be in (0, 1], got {self.min_causal_drop}")
        if self.batch_size < 1 or self.min_count < 1 or self.encode_batch < 1 or self.shard_size < 1:
            raise ValueError("batch_size, encode_batch, shard_size and min_count must be >= 1")
        if self.engine not in ENGINES:
            raise ValueError(f"ScanConfig.engine must be fast or reference, got {self.engine!r}")
        if self.regions not in REGION_MODES + (AUTO_REGIONS,):
            raise ValueError(f"ScanConfig.regions must be one of {REGION_MODES + (AUTO_REGIONS,)}, got {self.regions!r}")
        if self.grounding_regions not in REGION_MODES:
            raise ValueError(f"ScanConfig.grounding_regions must be one of {REGION_MODES}, got {self.grounding_regions!r}")
        if self.engine == "reference" and "packed" in (self.regions, self.grounding_regions):
            raise ValueError("the reference scan crops regions; packed regions need engine='fast'")
        if not 0.0 <= self.packed_min_coverage <= 1.0:
            raise ValueError(f"packed_min_coverage must be in [0, 1], got {self.packed_min_coverage}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"ScanConfig.prefetch must be >= 0, got {self.prefetch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def for_oracle(self, trusted: bool, packable: bool) -> "ScanConfig":
        """This config with regions='auto' resolved, the one place the rule lives: packed in self
        mode (no trusted model names the regions) on the fast engine when the suspect's image tower
        takes the packed encoding (packable: models.packed.check_vision_tower), crop otherwise."""
        if self.regions != AUTO_REGIONS:
            return self
        return replace(self, regions="packed" if self.engine == "fast" and not trusted and packable else "crop")
