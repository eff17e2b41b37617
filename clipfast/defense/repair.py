"""Stage 3, repair: fine-tune the poisoned model's image tower on the compact set with CleanCLIP's
objective for the whole step budget, measuring the held-out ASR and clean-agreement estimates as it
goes (the verdict takes the last ones).

DESIGN.md stops early when the ASR estimate is below target and clean accuracy is within tolerance.
We do not stop by default (`RepairConfig.target_asr`): with the compact set's feature anchoring, the
clean accuracy a repair loses is lost in its first tens of steps and comes back as it goes on, so
a repair stopped at its first zero ASR estimate kept that loss (see RepairConfig.target_asr). The
clean-agreement estimate is reported, and `clean_within_tolerance` says whether it held.

The estimates use only what the scan knows: for ASR, held-out victims (scan victims not in the
compact set) and held-out clean images with the recovered trigger pasted on (in self mode the pasted
images alone, see holdout_estimator); for clean accuracy, held-out grounded probe images, scored by
agreement with their pre-repair labels. Ground truth is never consulted here.

With a trusted model (trusted mode), the trusted model also caps how much the suspect may say the
target labels on each compact-set image (RepairConfig.target_bound_weight): an image-wide trigger's
victims have no trigger-free view to anchor, and the cap is the trusted model's own answer; a patch
trigger's have theirs, and get a lighter cap (patch_target_bound_weight)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from clipfast.data.probe import ProbeSet, as_probe_set
from clipfast.models import ClipBundle, ZeroShotClassifier, freeze_text_tower, text_tower_trains
from clipfast.rundir import untied
from clipfast.train.cleanclip import CleanCLIPObjective, TargetBound
from clipfast.train.loop import TrainConfig, TrainResult, train

from .curate import CompactSet
from .scan import ScanResult
from .unlearning import RecoveredTrigger, recover_triggers, with_triggers


@dataclass(frozen=True)
class RepairConfig:
    max_steps: int = 150
    batch_size: int = 64
    lr: float = 2e-4
    freeze_text: bool = True  # keep the zero-shot head (text embeddings) fixed; only the image tower unlearns
    warmup_steps: int = 10
    # The held-out estimates every this many steps: the log's trend, and the verdict from the last.
    # Each is a forward pass over ~1000 images (the held-out triggered ones, 460-580 in the efficacy
    # matrix, and holdout_clean), about 5 training steps of batch 64.
    eval_every: int = 25
    # A checkpoint (model, optimiser, step) every this many steps and at the end: an interrupted
    # repair resumes there, losing at most this many steps. Each writes the whole training state
    # (the world's tiny model: 5.2 MB on disk; ViT-bigG: ~25 GB by parameter count, weights plus AdamW's
    # two moments), so raise it for big models; it never changes results.
    checkpoint_every: int = untied(25)
    # Stop once the held-out ASR estimate is at or below this; None (default) runs the whole budget.
    # Measured (benchmarks/repair_variants.py on the 31e5e48 efficacy matrix's cached models and
    # scans, the 14 patch cases that stopped at an estimate of 0 after 10-75 steps, both oracle
    # modes): run to 150 steps instead, CA drop median 0.56 -> 0.24 points (worst 1.26 -> 0.64) at
    # ASR median 0.65 -> 0.65 % (worst 1.03 -> 1.00); over all 18 patch cases per mode, CA drop
    # median 0.53 -> 0.28 (self) and 0.37 -> 0.32 (trusted), ASR median 1.04 -> 0.97 % (self) and
    # 0.82 -> 0.84 % (trusted). A trusted label-consistent model stopped at step 15 lost 2.2 points;
    # run to the end it gained 2.4 (ASR 0 -> 1.1 %). It costs time only (tiny model, 2-core CPU:
    # 2-11 s -> 15-21 s).
    target_asr: float | None = None
    # "removed" needs the 95 % upper bound of the held-out ASR at or below this (defense/verdict.py)
    max_asr: float = 0.05
    clean_tolerance: float = 0.015  # report whether held-out clean agreement stayed >= 1 - this
    # CleanCLIP's in-modal term; 0 by default: on a compact set of a few hundred pairs it cost clean
    # accuracy (weight 1 lost 2.7 CA points on the demo model, 0 lost 0.1, at the same ASR).
    self_supervised_weight: float = 0.0
    # Feature anchoring to the pre-repair embeddings of the trigger-free images (CleanCLIPObjective):
    # what keeps clean accuracy while the trigger is unlearned (demo model, 32 replay images per label:
    # weight 1 lost about 4.5 CA points, weight 20 about 2.2; the larger replay set did the rest, curate.py).
    anchor_weight: float = 20.0
    # The trusted model's target bound (trusted mode only). Its zero-shot probability of the target
    # labels caps the suspect's on every compact-set image (train.cleanclip.TargetBound, at this
    # weight), and the anchors are held harder while it applies (the bounded_*_anchor_weight of the
    # trigger's kind instead of anchor_weight). Image-wide triggers: their victims have no
    # trigger-free view to anchor (a patch victim's is its image with the patch filled), so the cap is
    # what corrects them. Swept with benchmarks/repair_variants.py on the trusted matrix cases (rows:
    # benchmarks/results/teacher_bound.jsonl): weights 1-20, anchors 20 / 40, the bound on every image
    # or on the unanchored ones; fitted on the WaNet (4) and SIG amplitude 20 (3) models, then run
    # unchanged on the 7 other image-wide ones.
    # Over the 14: ASR median 1.16 -> 0.64 %, worst 3.77 -> 2.72 %, WaNet strength 6 median 3.41 ->
    # 1.43 %; CA drop median 0.74 -> 0.87, worst 1.48 -> 1.38 points (anchors 40). 0: off.
    target_bound_weight: float = 10.0
    # With nothing anchoring their victims, the anchors elsewhere are what keeps clean accuracy: 40 ->
    # 60 -> 80 on the 14 (d15be4e's saved scans, rows in benchmarks/results/bounded_anchors.jsonl) took
    # the CA drop median 0.87 -> 0.71 -> 0.61, worst 1.38 -> 0.98 -> 0.88 points (WaNet strength 6
    # median 1.12 -> 0.74 -> 0.72, under the 1 point from 60 on) for ASR median 0.64 -> 0.71 ->
    # 0.68 %, worst 2.72 -> 3.05 -> 3.17 % (WaNet strength 6 median 1.43 -> 1.49 -> 1.56 %): 60, the
    # least ASR given up for every image-wide configuration's CA drop median under 1.
    bounded_image_wide_anchor_weight: float = 60.0
    # Patch triggers: their victims have their anchors, and the image-wide weight cost CA there (the 18
    # trusted patch cases: drop median 0.31 -> 0.67, worst 1.30 -> 1.84 points, for ASR median 0.70 ->
    # 0.52 %); weight 2 kept it (drop median 0.31 -> 0.36, worst 1.30 -> 1.36) and lowered ASR in all
    # 18 (median 0.70 -> 0.57 %, worst 2.88 -> 2.65 %, 4 px corner median 0.94 -> 0.76 %), weight 5
    # lost up to 1.64 (benchmarks/repair_variants.py on e2b4754's saved scans, rows in
    # results/bound_patches.jsonl: made at de270a5 with a flag, since removed, that repaired patch cases
    # as image-wide ones with these weights; anchors 40 in both). Chosen on all 18 (no held-out patch
    # models); the 3 label-consistent models were not in the sweep. 0: off for patches.
    patch_target_bound_weight: float = 2.0
    # Patch victims are anchored to their own trigger-free views, and their CA drop is inside its bound
    # already: anchors 60 instead of 40 (ae944fa's saved scans, the 21 trusted patch and
    # label-consistent cases, bounded_anchors.jsonl) took the CA drop median 0.30 -> 0.22 points for
    # higher ASR in 16 of 21 (median 0.60 -> 0.65 %, worst 2.65 -> 2.72 %): patches stay at 40.
    bounded_patch_anchor_weight: float = 40.0
    # Self mode has no bound: its one reference, the suspect's own pre-repair answer on each image's
    # trigger-free view, is what the anchors hold already. As a ceiling it moved the self cases little
    # (3f200b2's saved scans, weight 2: the 18 patch cases' ASR median 0.77 -> 0.73 %, lower in 15 of
    # 21 with the label-consistent ones; the 4 px corner over 3 models x 3 repair seeds median 1.05 %
    # either way) and took back most of the label-consistent models' CA gain (median +0.84 -> +0.22
    # points: the suspect's own answers on their target-class images are the misnamed ones):
    # benchmarks/results/self_bound.jsonl, from the prototype of 0be2085.
    holdout_clean: int = 512
    seed: int = 0
    # fast: the training loop's mixed precision (bf16 autocast on a GPU) and fused AdamW, plus what
    # is asked for below; reference: the plain fp32 loop with torch's standard AdamW.
    engine: str = "fast"
    accumulation_steps: int = 1  # micro-batches per step: negatives come from each, so it changes results
    compile: bool = untied(False)
    grad_checkpointing: bool = untied(False)
    sharding: str = untied("ddp")  # under torchrun: ddp (replicated) or fsdp (image tower sharded across ranks)
    progress: bool = untied(True)

    def __post_init__(self):
        if self.engine not in ("fast", "reference"):
            raise ValueError(f"RepairConfig.engine must be fast or reference, got {self.engine!r}")
        if self.engine == "reference" and (self.compile or self.accumulation_steps != 1 or self.grad_checkpointing):
            raise ValueError("the reference repair loop is plain fp32: no compile, accumulation or checkpointing")
        if (self.target_bound_weight or self.patch_target_bound_weight) and not self.freeze_text:
            raise ValueError("RepairConfig.target_bound_weight and patch_target_bound_weight need freeze_text=True "
                             "(the bound reads fixed class embeddings); set them to 0 to train the text tower")
        if self.sharding == "fsdp" and not self.freeze_text:
            raise ValueError("sharding='fsdp' shards the image tower only; it needs freeze_text=True")

    def train_config(self) -> TrainConfig:
        speed = (dict(precision="fp32", fused_optimizer=False) if self.engine == "reference" else
                 dict(compile=self.compile, accumulation_steps=self.accumulation_steps,
                      grad_checkpointing=self.grad_checkpointing))
        return TrainConfig(steps=self.max_steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=self.warmup_steps, seed=self.seed, eval_every=self.eval_every,
                           checkpoint_every=self.checkpoint_every, progress=self.progress, sharding=self.sharding, **speed)


@dataclass
class RepairResult:
    train: TrainResult
    stopped_early: bool
    estimates: dict  # last held-out asr_estimate / clean_agreement
    clean_within_tolerance: bool
    # the weight at which a trusted model capped the target labels (RepairConfig.target_bound_weight
    # or patch_target_bound_weight); 0: no bound
    target_bound_weight: float = 0.0
    anchor_weight: float = 0.0  # the anchors' weight (RepairConfig.anchor_weight, or a bounded_* one)

    def summary(self) -> dict:
        return {"steps": self.train.step, "stopped_early": self.stopped_early, "estimates": self.estimates,
                "clean_within_tolerance": self.clean_within_tolerance, "target_bound_weight": self.target_bound_weight,
                "anchor_weight": self.anchor_weight}


def holdout_estimator(scan: ScanResult, compact: CompactSet, probe_images: ProbeSet | torch.Tensor, prompts,
                      holdout_clean: int, seed: int, triggers: list[RecoveredTrigger] | None = None,
                      classifier: ZeroShotClassifier | None = None) -> Callable[[ClipBundle], dict]:
    """eval_fn for the training loop: the attack success rate on held-out triggered images (victims
    not in the compact set whose oracle label is not a target, those with patch evidence for a patch
    target, and held-out clean images of non-target labels with the recovered trigger put on where it
    can be: asr_hits of asr_n; in self mode the pasted images alone when there are any), and agreement
    with the pre-repair labels on held-out clean images. Both parts are reported on their own too
    (asr_victim_hits / _n, asr_pasted_hits / _n). classifier: the trained model's zero-shot classifier
    when its text tower stays frozen (its class embeddings then never change), else None."""
    probe_images = as_probe_set(probe_images)
    in_compact = torch.zeros(len(probe_images), dtype=torch.bool)
    in_compact[compact.source_indices] = True
    targets = torch.tensor(scan.targets)
    # A patch target's held-out victims are those with patch evidence: its other candidates are
    # discordant images (trusted mode) that are mostly the two models' confusions, which repair
    # rightly leaves as they are. Counted, they held the trusted 'star' target's estimate at 7.4 %
    # (b83ddc0's matrix row; 1.0 % without them, 2.8 % measured on the test world).
    patch_victims = {trigger.target: trigger.patch_indices for trigger in scan.triggers if trigger.kind == "patch"}
    victims = torch.cat([torch.as_tensor(patch_victims.get(target, scan.victims(target)), dtype=torch.long)
                         for target in scan.targets]).unique()
    victims = victims[~in_compact[victims]]
    # A victim whose oracle label is a target is right to be called the target after repair (a
    # label-consistent attack's victims are target-class images; a real target-class image can be
    # among the victims): the attack success rate counts images of other labels only.
    victims = victims[~torch.isin(scan.oracle_label[victims], targets)]
    clean = scan.clean_indices()
    clean = clean[~in_compact[clean]]
    clean = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:holdout_clean]]
    prompt_kwargs = {} if prompts is None else {"prompts": prompts}
    fixed_classifier = classifier
    clean_pictures = probe_images.read(clean)  # read once
    source = ~torch.isin(scan.image_label[clean], targets)  # ASR counts images of other labels only
    if triggers is None:
        triggers = recover_triggers(scan, probe_images, seed)
    triggered = probe_images.read(victims)
    held_out_victims = len(triggered)  # the rest: held-out clean images with the trigger pasted on
    # A warp's held-out victims alone over-estimated its ASR after repair (in the matrix they are
    # poisoned training pairs, memorised with the target caption: 5.9-29 % estimated against 2.0-5.1 %
    # measured on the test world, the four trusted WaNet cases of the b0d5586 matrix); with its
    # victims' backgrounds under held-out clean objects added (unlearning.py) the estimate was
    # 2.9-6.7 % against 1.7-3.8 % measured (the same four cases at 68f76cd, this machine's models).
    if triggers:  # else (e.g. a warp recovered without a segmenter) the held-out victims alone measure it
        triggered = torch.cat([triggered, with_triggers(clean_pictures[source], triggers, seed + 1)])
    # Without a trusted model a victim's oracle label is the suspect's own name for its object, and a
    # label-consistent attack teaches the suspect to misname its target class: held-out victims that
    # are true target-class images, rightly called the target after repair, counted as attack
    # successes (self-mode label-consistent cases at 4013548: victims 18-80 % hits against the pasted
    # images' 0-4 % and 0.02-5.6 % measured on the test world). So in self mode the estimate counts
    # the pasted images, whose labels are the held-out clean images' own, and the victims only when
    # nothing could be pasted. Over 27 self-mode cases (the patch family, label-consistent models) the
    # pasted images alone gave the verdict the measured ASR's answer in all 27, the victims counted
    # too in 22 (benchmarks/estimate_calibration.py, results/estimate_calibration.json).
    # The image-wide targets' victims (self mode: the mirror and object-alone tests, scan/decide.py)
    # are counted: images whose object alone the suspect calls the target are not among them, and
    # their oracle labels (the mirrored image's or the object alone's) are never the target. Without
    # them a warp's pasted composites alone said *removed* at 3.1 % (upper bound 4.8 %) where 6.9 % was
    # measured on the test world (WaNet strength 6 seed 0 at 31b1f8c; its held-out victims: 12 of 71
    # still the target).
    image_wide_victims = torch.cat([trigger.victim_indices for trigger in scan.triggers if trigger.kind == "image-wide"]
                               + [torch.zeros(0, dtype=torch.long)])
    if scan.oracle_mode == "trusted" or len(triggered) == held_out_victims:
        counted_victims = torch.ones(held_out_victims, dtype=torch.bool)
    else:
        counted_victims = torch.isin(victims, image_wide_victims)

    def estimate(bundle: ClipBundle) -> dict:
        nonlocal fixed_classifier
        # A frozen text tower keeps the class embeddings: encode the vocabulary once.
        classifier = (ZeroShotClassifier(bundle, scan.classnames, **prompt_kwargs) if fixed_classifier is None
                      else fixed_classifier.encoding_with(bundle))
        if not text_tower_trains(bundle.model):
            fixed_classifier = classifier
        out = {}
        if len(triggered):
            success = torch.isin(classifier.predict(triggered)[0][:, 0], targets)
            # Both parts, to calibrate each against the measured ASR: the victims' labels are the
            # oracle's, the pasted images' are the grounded clean images' own.
            parts = {"victim": success[:held_out_victims], "pasted": success[held_out_victims:]}
            for part, hits in parts.items():
                out.update({f"asr_{part}_hits": int(hits.sum()), f"asr_{part}_n": len(hits)})
            counted = torch.cat([parts["victim"][counted_victims], parts["pasted"]])  # not empty: see counted_victims
            out.update(asr_estimate=float(counted.float().mean()), asr_hits=int(counted.sum()), asr_n=len(counted))
        if len(clean):
            predicted = classifier.predict(clean_pictures)[0][:, 0]
            out["clean_agreement"] = float((predicted == scan.image_label[clean]).float().mean())
        return out

    return estimate


def target_bound(suspect: ZeroShotClassifier, trusted_bundle: ClipBundle, compact: CompactSet, scan: ScanResult,
                 prompts, weight: float) -> TargetBound:
    """The trusted model's ceiling on the suspect's target labels for each compact-set image."""
    prompt_kwargs = {} if prompts is None else {"prompts": prompts}
    trusted = ZeroShotClassifier(trusted_bundle, scan.classnames, **prompt_kwargs)
    is_target = torch.zeros(len(scan.classnames), dtype=torch.bool)
    is_target[list(scan.targets)] = True
    share = trusted.logits(compact.images).softmax(-1)[:, is_target.to(trusted.class_embeddings.device)].sum(-1)
    return TargetBound(share.float().cpu(), suspect.class_embeddings, is_target, weight)


def repair(bundle: ClipBundle, compact: CompactSet, scan: ScanResult, probe_images: ProbeSet | torch.Tensor,
           out_dir: str | Path,
           *, prompts=None, config: RepairConfig = RepairConfig(),
           triggers: list[RecoveredTrigger] | None = None, trusted_bundle: ClipBundle | None = None) -> RepairResult:
    """Fine-tune bundle.model in place; resumable from out_dir like any training run. triggers: as
    curate takes them (put on held-out clean images for the ASR estimate). trusted_bundle: the trusted
    clean model of trusted mode (the scan's grounding model), which bounds the target labels'
    share (RepairConfig.target_bound_weight for an image-wide trigger, patch_target_bound_weight for
    patches)."""
    if len(compact) == 0:
        raise ValueError("repair: the compact set is empty")
    # With the text tower frozen the vocabulary is encoded once, for the estimate and the bound.
    classifier = (ZeroShotClassifier(bundle, scan.classnames, **({} if prompts is None else {"prompts": prompts}))
                  if config.freeze_text else None)
    estimate = holdout_estimator(scan, compact, probe_images, prompts, config.holdout_clean, config.seed, triggers,
                                 classifier)

    train_config = config.train_config()
    # Anchors: what the model said before repair about each image without the trigger. Replay images
    # keep their embeddings; an unlearning pair (clean image + recovered trigger) is pulled to its clean
    # image's embedding, so the model learns to ignore the trigger rather than relearn the classes.
    # A patch victim is pulled to its view with the trigger region filled (curate.py); other victims
    # (image-wide triggers, warps) have no clean view: their captions correct them, and in trusted
    # mode the trusted model's target bound caps what any image may still say (RepairConfig.target_bound_weight;
    # lighter for patches, patch_target_bound_weight).
    bound_weight, anchor_weight = 0.0, config.anchor_weight
    if trusted_bundle is not None and scan.triggers:
        image_wide = any(trigger.kind == "image-wide" for trigger in scan.triggers)
        bound_weight = config.target_bound_weight if image_wide else config.patch_target_bound_weight
        if bound_weight:  # the bounded weight replaces anchor_weight, also where that is 0
            anchor_weight = (config.bounded_image_wide_anchor_weight if image_wide
                             else config.bounded_patch_anchor_weight)
    bound = target_bound(classifier, trusted_bundle, compact, scan, prompts, bound_weight) if bound_weight else None
    anchors = bundle.encode_images(compact.clean_views) if anchor_weight else None
    objective = CleanCLIPObjective(compact.captions, bundle.tokenizer, config.self_supervised_weight, config.seed,
                                   text_view=not config.freeze_text, anchors=anchors, anchored=compact.has_clean_view,
                                   anchor_weight=anchor_weight, target_bound=bound)
    if config.freeze_text:
        freeze_text_tower(bundle.model)
    result = train(bundle, compact.images, compact.captions, train_config, out_dir, objective=objective,
                   eval_fn=estimate, stop_when=None if config.target_asr is None else
                   lambda metrics: metrics.get("asr_estimate", 0.0) <= config.target_asr)
    estimates = result.last_eval or {}
    clean_ok = estimates.get("clean_agreement", 1.0) >= 1.0 - config.clean_tolerance
    return RepairResult(result, result.stopped_early, estimates, clean_ok, bound_weight, anchor_weight)
