"""The training loop shared by poisoning (from scratch or fine-tuning) and repair.

AdamW (betas 0.9/0.98, weight decay on matrices only; fused kernels unless the reference loop is
asked for), linear warm-up then cosine decay, bf16 autocast on GPU (fp16 with a gradient scaler where
bf16 is missing), optional torch.compile, gradient accumulation and activation checkpointing, a
JSON-lines log with samples/s and model FLOPs utilisation, atomic periodic checkpoints, resume from
`out_dir`. Under torch.distributed (torchrun) the global batch is split across ranks by DDP
(train/losses.py: ClipForward); rank 0 writes the log and the checkpoints, which are ordinary
single-model checkpoints, so a run resumes on any number of ranks.

Determinism: the batch order and augmentations of step s are functions of (seed, s) only, and
the learning rate is a function of s only, so a run resumed from a checkpoint at step s
continues exactly like the uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from clipfast import distributed
from clipfast.errors import NonFiniteError
from clipfast.models.bundle import ClipBundle
from clipfast.models.precision import TRAINING_PRECISIONS, training_dtype
from clipfast.perf import count_flops, matrix_rate
from clipfast.rundir import untied

from .augment import shift_and_jitter
from .checkpointing import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainingLog,
    TrainingState,
    resume_training,
    save_training_checkpoint,
)
from .losses import Batch, ClipContrastiveObjective, ClipForward, Objective
from .randomness import AUGMENT, DATA_ORDER, seeded_generator
from .sharding import SHARDING_MODES, fully_sharded_copy, unshard_into

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learned temperature

@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. The defaults are the tiny-world recipe (clipfast-tiny on the
    synthetic world). Fields marked untied() never change the trained weights, so a run resumes
    across them and cached models are shared."""

    steps: int = 1800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    precision: str = "auto"  # clipfast.models.precision: auto | fp32 | bf16 | fp16
    accumulation_steps: int = 1  # micro-batches per optimiser step (contrastive negatives come from the micro-batch)
    augment: bool = False
    eval_every: int = untied(500)  # 0: evaluate only at the end (when an eval_fn is given)
    checkpoint_every: int = untied(100)
    # False: write no checkpoint at all (benchmarks: a ViT-bigG checkpoint is ~25 GB); the run cannot resume.
    save_checkpoints: bool = untied(True)
    log_every: int = untied(10)
    fused_optimizer: bool = untied(True)  # False: torch's standard AdamW (the reference loop); same update
    compile: bool = untied(False)  # torch.compile the towers' forward
    grad_checkpointing: bool = untied(False)  # recompute activations in backward: big models on one GPU
    # Under torch.distributed: ddp replicates the model; fsdp shards the image tower's parameters,
    # gradients and optimiser state across ranks (train/sharding.py). Ignored in one process.
    sharding: str = untied("ddp")
    measure_mfu: bool = untied(True)  # count one step's FLOPs; log model FLOPs utilisation against the measured bf16 matmul rate
    progress: bool = untied(True)

    def __post_init__(self):
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig needs lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {TRAINING_PRECISIONS}, got {self.precision!r}")
        if self.sharding not in SHARDING_MODES:
            raise ValueError(f"TrainConfig.sharding must be one of {SHARDING_MODES}, got {self.sharding!r}")
        if self.accumulation_steps > self.batch_size:
            raise ValueError(f"TrainConfig.accumulation_steps ({self.accumulation_steps}) exceeds batch_size ({self.batch_size})")


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or inf; training stops before writing such a model."""


@dataclass
class TrainResult:
    step: int  # the step the model is at now
    stopped_early: bool  # stop_when ended training before config.steps
    resumed_from_step: int  # 0 for a fresh run
    train_seconds: float  # wall time of this call's optimisation steps (evals and checkpoints excluded)
    steps_per_s: float
    samples_per_s: float
    flops_per_step: int | None  # model FLOPs of one optimiser step (forward + backward), when measured
    mfu: float | None  # model FLOPs utilisation against the measured bf16 matmul rate
    final_loss: float | None  # mean loss of the last logged interval (None if no step ran)
    last_eval: dict | None
    checkpoint_path: Path
    log_path: Path


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimisation step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of step `step`'s batch: consecutive slices of per-epoch permutations seeded by
    (seed, epoch), so that any step's batch is known without replaying earlier steps."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        in_epoch = epochs == epoch
        permutation = torch.randperm(n, generator=seeded_generator(seed, DATA_ORDER, epoch))
        out[in_epoch] = permutation[positions[in_epoch] % n]
    return out


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        # biases, norms, logit scale: no decay
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused=None is torch's standard implementation (for-each on a GPU), the reference loop's.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=config.fused_optimizer or None)


class _TrainingRun:
    """The state of one train() call: the model being trained (or its sharded copy), the optimiser,
    the data on the device, and how one step, one evaluation and one checkpoint are done."""

    def __init__(self, bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str], config: TrainConfig,
                 objective: Objective):
        self.bundle, self.config, self.objective = bundle, config, objective
        self.ranks, self.device, self.n = distributed.current(), bundle.device, len(images)
        self.batch_size = min(config.batch_size, self.n)  # tiny sets: one batch is the whole set
        if self.batch_size < self.ranks.world_size * config.accumulation_steps:
            raise ValueError(f"a batch of {self.batch_size} cannot be split over {self.ranks.world_size} ranks x "
                             f"{config.accumulation_steps} micro-batches")
        self.micro_batches = min(config.accumulation_steps, self.batch_size)
        self.amp_dtype = training_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # Data lives on the training device once; captions are tokenised once.
        self.images = images.to(self.device)
        self.tokens = bundle.tokenizer(list(captions)).to(self.device)
        self.sharded = self.ranks.distributed and config.sharding == "fsdp"
        # What trains: the model itself, or its sharded copy (copied back by finish()).
        self.model = fully_sharded_copy(bundle.model, self.device) if self.sharded else bundle.model
        self.train_bundle = dataclasses.replace(bundle, model=self.model) if self.sharded else bundle
        self.optimizer = make_optimizer(self.model, config)
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
        self.forward: ClipForward | None = None

    def start(self) -> None:
        self.model.train()
        self.forward = ClipForward(self.model, self.tokens, self.ranks, replicate=not self.sharded)

    def batch(self, step: int) -> Batch:
        indices = batch_indices(step, self.batch_size, self.n, self.config.seed)  # host: read without a device sync
        on_device = indices.to(self.device, non_blocking=True)
        images = self.images[on_device]
        if self.config.augment:
            images = shift_and_jitter(images, seeded_generator(self.config.seed, AUGMENT, step))
        return Batch(self.bundle.preprocess(images), self.tokens[on_device], indices, step)

    def forward_backward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses of the whole batch; gradients accumulated over its micro-batches."""
        parts = torch.arange(len(batch.indices)).tensor_split(self.micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for number, part in enumerate(parts):
            on_device = part.to(self.device)
            micro = batch if len(parts) == 1 else Batch(batch.images[on_device], batch.tokens[on_device],
                                                        batch.indices[part], batch.step, number)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                losses = self.objective(self.forward, micro)
            share = len(part) / len(batch.indices)
            with self.forward.no_sync(skip=number < len(parts) - 1):  # ranks average gradients once per step
                self.scaler.scale(losses["loss"] * share).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach().float() * share
        return totals

    def step(self, step: int) -> dict[str, torch.Tensor]:
        batch = self.batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward_backward(batch)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.loss_sum += losses["loss"]
        self.loss_count += 1
        return losses

    def step_flops(self, step: int) -> int:
        """Model FLOPs of one optimiser step, counted on a pass whose gradients are dropped."""
        flops = count_flops(lambda: self.forward_backward(self.batch(step)))
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    def evaluate(self, eval_fn: Callable[[ClipBundle], dict]) -> dict:
        """eval_fn on rank 0 (on every rank when sharded: the forward needs them all), rank 0's
        metrics on every rank (so that every rank stops at the same step)."""
        metrics = None
        if self.ranks.is_main or self.sharded:
            self.model.eval()
            metrics = eval_fn(self.train_bundle)
            self.model.train()
        return self.ranks.broadcast_object(metrics)

    def checkpoint(self, path: Path, state: TrainingState) -> None:
        if not bool(torch.isfinite(self.loss_sum)):  # never checkpoint a model that a NaN/inf loss has touched
            raise NonFiniteLossError(f"training loss is not finite before step {state.step}; {path} keeps the "
                                     "last finite state (lower the learning rate, or use fp32)")
        save_training_checkpoint(path, self.bundle, self.model, self.optimizer, self.scaler, state, self.config,
                                 self.n)

    def finish(self) -> None:
        if self.sharded:
            unshard_into(self.model, self.bundle.model, self.device)
        self.bundle.model.eval()


def train(
    bundle: ClipBundle,
    images: torch.Tensor,
    captions: Sequence[str],
    config: TrainConfig,
    out_dir: str | Path,
    objective: Objective | None = None,
    eval_fn: Callable[[ClipBundle], dict] | None = None,
    stop_when: Callable[[dict], bool] | None = None,
) -> TrainResult:
    """Train bundle.model in place on (images uint8 [N, 3, H, W], captions) pairs with `objective`
    (default: CLIP's contrastive loss).

    Writes out_dir/train_log.jsonl and out_dir/checkpoint.pt (a loadable model checkpoint plus
    the optimizer and RNG state; none with config.save_checkpoints=False); if that checkpoint
    exists, training resumes from it.
    eval_fn(bundle) -> metrics runs every config.eval_every steps and at the end; its metrics
    are logged. stop_when(metrics) -> True ends training early at that evaluation; the checkpoint
    records it, so a rerun in the same out_dir does not train further.
    """
    n = len(images)
    if n == 0 or n != len(captions):
        raise ValueError(f"need a non-empty training set with one caption per image, got {n} images, {len(captions)} captions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, log = out_dir / CHECKPOINT_NAME, TrainingLog(out_dir / LOG_NAME)
    was_checkpointing = _set_grad_checkpointing(bundle.model, config.grad_checkpointing)
    run = _TrainingRun(bundle, images, captions, config, objective or ClipContrastiveObjective())
    state = TrainingState(0, False)
    # Rank 0's view of the directory decides, so all ranks take the same branch.
    if run.ranks.broadcast_object(checkpoint_path.exists()):
        state = resume_training(checkpoint_path, run.model, run.optimizer, run.scaler, config, n, run.sharded)
        log.resume_at(state.step)
    else:
        torch.manual_seed(config.seed)  # for any stochastic layers (e.g. patch dropout)
        log.start_fresh()
    start_step = state.step
    run.start()
    end_step = start_step if state.stopped_early else config.steps
    flops_per_step = peak_tflops = None
    if config.measure_mfu and start_step < end_step:
        flops_per_step, peak_tflops = run.step_flops(start_step), matrix_rate(run.device.type)
    if config.compile:
        run.forward = run.forward.compiled()

    last_eval, final_loss = None, None
    # Training time excludes checkpointing and evaluation (`paused`).
    train_seconds, interval_start, paused = 0.0, time.perf_counter(), 0.0
    progress = tqdm(range(start_step, end_step), initial=start_step, total=config.steps,
                    desc="train", disable=not (config.progress and run.ranks.is_main), dynamic_ncols=True)
    for step in progress:
        losses = run.step(step)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            final_loss = run.loss_sum.item() / run.loss_count  # the one host sync per log interval
            now = time.perf_counter()
            elapsed = now - interval_start - paused
            train_seconds += elapsed
            record = {"kind": "train", "step": done, "loss": round(final_loss, 5),
                      "lr": float(f"{lr_at(step, config):.4g}"), "logit_scale": round(bundle.logit_scale, 4),
                      "samples_per_s": round(run.loss_count * run.batch_size / elapsed, 1),
                      **{k: round(v.item(), 5) for k, v in losses.items() if k != "loss"}}
            if flops_per_step:
                record["mfu"] = round(flops_per_step * run.loss_count / elapsed / (peak_tflops * 1e12), 4)
            if not math.isfinite(final_loss):
                raise NonFiniteLossError(f"training loss is {final_loss} by step {done}; {checkpoint_path} keeps the "
                                         "last finite state (lower the learning rate, or use fp32)")
            log.append(record)
            progress.set_postfix(loss=f"{final_loss:.3f}", scale=f"{record['logit_scale']:.1f}")
            run.loss_sum.zero_()
            run.loss_count, interval_start, paused = 0, now, 0.0
        pause_start = time.perf_counter()
        if config.save_checkpoints and (done % config.checkpoint_every == 0 or done == config.steps):
            run.checkpoint(checkpoint_path, TrainingState(done, False))
        if eval_fn is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            last_eval = run.evaluate(eval_fn)
            log.append({"kind": "eval", "step": done, **last_eval})
            if stop_when is not None and done < config.steps and stop_when(last_eval):
                if config.save_checkpoints:
                    run.checkpoint(checkpoint_path, TrainingState(done, True))
                end_step = done
                state.stopped_early = True
                break
        paused += time.perf_counter() - pause_start
    progress.close()
    run.finish()
    _set_grad_checkpointing(bundle.model, was_checkpointing)

    rate = (end_step - start_step) / train_seconds if train_seconds > 0 else 0.0
    return TrainResult(
        step=end_step,
        stopped_early=state.stopped_early,
        resumed_from_step=start_step,
        train_seconds=round(train_seconds, 2),
        steps_per_s=round(rate, 3),
        samples_per_s=round(rate * run.batch_size, 1),
        flops_per_step=flops_per_step,
        mfu=round(flops_per_step * rate / (peak_tflops * 1e12), 4) if flops_per_step and rate else None,
        final_loss=final_loss,
        last_eval=last_eval,
        checkpoint_path=checkpoint_path,
        log_path=log.path,
    )


def _set_grad_checkpointing(model: torch.nn.Module, enable: bool) -> bool:
    """Switch open_clip's activation checkpointing; returns the previous setting."""
    visual = getattr(model, "visual", None)
    previous = bool(getattr(getattr(visual, "transformer", None), "grad_checkpointing", False))
    if enable != previous:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing: activation checkpointing "
                             "needs an open_clip model")
        model.set_grad_checkpointing(enable)
    return previous
