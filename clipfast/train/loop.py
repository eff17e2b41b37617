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
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from clipfast import distributed
from clipfast.models.bundle import ClipBundle
from clipfast.models.encoder import native_bf16
from clipfast.models.checkpoint import load_state_dict_strict, read_checkpoint, save_checkpoint, write_atomically
from clipfast.perf import count_flops, matrix_rate

from .augment import shift_and_jitter
from .losses import Batch, ClipContrastiveObjective, ClipForward, Objective
from .sharding import (
    SHARDING_MODES,
    full_model_state,
    full_optimizer_state,
    fully_sharded_copy,
    load_training_state,
    unshard_into,
)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learned temperature


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. The defaults are the tiny-world recipe: config E of
    shared/notes/tiny-world-feasibility.md with 2000 steps instead of 1300 (the world now also
    has second objects and distractors; 1300 steps gave CA 83 %, 2000 give 94 %). clipfast-tiny
    runs ~11 steps/s on 2 idle CPU threads, so this is ~3 minutes."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    eval_every: int = 500  # 0: evaluate only at the end (when an eval_fn is given)
    checkpoint_every: int = 100
    log_every: int = 10
    precision: str = "auto"  # auto (GPU: bf16 autocast, fp16 + scaler without bf16; CPU: fp32) | fp32 | bf16 | fp16
    fused_optimizer: bool = True  # False: torch's standard AdamW (the reference loop)
    compile: bool = False  # torch.compile the towers' forward
    accumulation_steps: int = 1  # micro-batches per optimiser step (contrastive negatives come from the micro-batch)
    grad_checkpointing: bool = False  # recompute activations in backward: big models on one GPU
    # Under torch.distributed: ddp replicates the model; fsdp shards the image tower's parameters,
    # gradients and optimiser state across ranks (train/sharding.py). Ignored in one process.
    sharding: str = "ddp"
    measure_mfu: bool = True  # count one step's FLOPs; log model FLOPs utilisation against the measured bf16 matmul rate
    augment: bool = False
    progress: bool = True

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
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.sharding not in SHARDING_MODES:
            raise ValueError(f"TrainConfig.sharding must be one of {SHARDING_MODES}, got {self.sharding!r}")
        if self.accumulation_steps > self.batch_size:
            raise ValueError(f"TrainConfig.accumulation_steps ({self.accumulation_steps}) exceeds batch_size ({self.batch_size})")


# Fields that change the training trajectory: a resumed run must match them.
_TRAJECTORY_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "precision", "augment",
                      "accumulation_steps")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device` (None: plain fp32)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class ResumeMismatchError(ValueError):
    """out_dir holds a checkpoint of a different run."""


class NonFiniteLossError(FloatingPointError):
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


_DATA_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _generator(seed: int, stream: int, counter: int) -> torch.Generator:
    """An independent RNG for (seed, stream, counter), e.g. the data order of one epoch."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + counter) % 2**63)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of step `step`'s batch: consecutive slices of per-epoch permutations seeded by
    (seed, epoch), so that any step's batch is known without replaying earlier steps."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        in_epoch = epochs == epoch
        permutation = torch.randperm(n, generator=_generator(seed, _DATA_ORDER_STREAM, epoch))
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


def train(
    bundle: ClipBundle,
    images: torch.Tensor,
    captions: Sequence[str],
    config: TrainConfig,
    out_dir: str | Path,
    loss: Objective | None = None,
    eval_fn: Callable[[ClipBundle], dict] | None = None,
    stop_when: Callable[[dict], bool] | None = None,
) -> TrainResult:
    """Train bundle.model in place on (images uint8 [N, 3, H, W], captions) pairs.

    Writes out_dir/train_log.jsonl and out_dir/checkpoint.pt (a loadable model checkpoint plus
    the optimizer and RNG state); if that checkpoint exists, training resumes from it.
    eval_fn(bundle) -> metrics runs every config.eval_every steps and at the end; its metrics
    are logged. stop_when(metrics) -> True ends training early at that evaluation; the checkpoint
    records it, so a rerun in the same out_dir does not train further.
    """
    n = len(images)
    if n == 0 or n != len(captions):
        raise ValueError(f"need a non-empty training set with one caption per image, got {n} images, {len(captions)} captions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
    objective = loss or ClipContrastiveObjective()
    model, device = bundle.model, bundle.device
    ranks = distributed.current()
    batch_size = min(config.batch_size, n)  # tiny sets: one batch is the whole set
    if batch_size < ranks.world_size * config.accumulation_steps:
        raise ValueError(f"a batch of {batch_size} cannot be split over {ranks.world_size} ranks x "
                         f"{config.accumulation_steps} micro-batches")
    micro_batches = min(config.accumulation_steps, batch_size)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # Data lives on the training device once; captions are tokenised once.
    images = images.to(device)
    tokens = bundle.tokenizer(list(captions)).to(device)

    was_checkpointing = _set_grad_checkpointing(model, config.grad_checkpointing)
    sharded = ranks.distributed and config.sharding == "fsdp"
    # What trains: the model itself, or its sharded copy (copied back at the end).
    train_model = fully_sharded_copy(model, device) if sharded else model
    train_bundle = dataclasses.replace(bundle, model=train_model) if sharded else bundle
    optimizer = make_optimizer(train_model, config)
    start_step, stopped = 0, False
    # Rank 0's view of the directory decides, so all ranks take the same branch.
    if ranks.broadcast_object(checkpoint_path.exists()):
        start_step, stopped = _resume(checkpoint_path, train_model, optimizer, scaler, config, n, sharded)
        if ranks.is_main:
            _truncate_log(log_path, start_step)
    else:
        torch.manual_seed(config.seed)  # for any stochastic layers (e.g. patch dropout)
        if ranks.is_main:
            log_path.unlink(missing_ok=True)

    def save(step: int) -> None:
        if not bool(torch.isfinite(loss_sum)):  # never checkpoint a model that a NaN/inf loss has touched
            raise NonFiniteLossError(f"training loss is not finite before step {step}; {checkpoint_path} keeps the "
                                     "last finite state (lower the learning rate, or use fp32)")
        weights, optimizer_state = full_model_state(train_model), full_optimizer_state(train_model, optimizer)
        if not ranks.is_main:
            ranks.barrier()
            return
        state = {
            "step": step,
            "stopped_early": stopped,
            "config": asdict(config),
            "n_samples": n,
            "optimizer_by_name": optimizer_state,
            "grad_scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        save_checkpoint(bundle, checkpoint_path, extra={"train_state": state}, state_dict=weights)
        ranks.barrier()

    def evaluate(step: int) -> dict:
        """eval_fn on rank 0 (on every rank when sharded: the forward needs them all), rank 0's
        metrics on every rank (so that every rank stops at the same step)."""
        metrics = None
        if ranks.is_main or sharded:
            train_model.eval()
            metrics = eval_fn(train_bundle)
            train_model.train()
        if ranks.is_main:
            _append_log(log_path, {"kind": "eval", "step": step, **metrics})
        return ranks.broadcast_object(metrics)

    def make_batch(step: int) -> Batch:
        indices = batch_indices(step, batch_size, n, config.seed)  # host: read without a device sync
        on_device = indices.to(device, non_blocking=True)
        batch_images = images[on_device]
        if config.augment:
            batch_images = shift_and_jitter(batch_images, _generator(config.seed, _AUGMENT_STREAM, step))
        return Batch(bundle.preprocess(batch_images), tokens[on_device], indices)

    def forward_backward(forward: ClipForward, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses of the whole batch; gradients accumulated over its micro-batches."""
        parts = torch.arange(len(batch.indices)).tensor_split(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for number, part in enumerate(parts):
            on_device = part.to(device)
            micro = batch if len(parts) == 1 else Batch(batch.images[on_device], batch.tokens[on_device],
                                                        batch.indices[part])
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                losses = objective(forward, micro)
            share = len(part) / len(batch.indices)
            with forward.no_sync(skip=number < len(parts) - 1):  # ranks average gradients once per step
                scaler.scale(losses["loss"] * share).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach().float() * share
        return totals

    train_model.train()
    forward = ClipForward(train_model, tokens, ranks, replicate=not sharded)
    end_step = start_step if stopped else config.steps
    flops_per_step = peak_tflops = None
    if config.measure_mfu and start_step < end_step:
        # One uncounted-in-the-trajectory pass (gradients dropped) on the first batch, eager.
        flops_per_step = count_flops(lambda: forward_backward(forward, make_batch(start_step)))
        optimizer.zero_grad(set_to_none=True)
        peak_tflops = matrix_rate(device.type)
    if config.compile:
        forward = forward.compiled()

    last_eval, final_loss, mfu = None, None, None
    loss_sum, loss_count = torch.zeros((), device=device), 0
    # Training time excludes checkpointing and evaluation (`paused`).
    train_seconds, interval_start, paused = 0.0, time.perf_counter(), 0.0
    progress = tqdm(range(start_step, end_step), initial=start_step, total=config.steps,
                    desc="train", disable=not (config.progress and ranks.is_main), dynamic_ncols=True)
    for step in progress:
        batch = make_batch(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        losses = forward_backward(forward, batch)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            train_model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        loss_sum += losses["loss"]
        loss_count += 1

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            final_loss = loss_sum.item() / loss_count  # the one host sync per log interval
            now = time.perf_counter()
            elapsed = now - interval_start - paused
            train_seconds += elapsed
            record = {
                "kind": "train",
                "step": done,
                "loss": round(final_loss, 5),
                "lr": float(f"{lr_at(step, config):.4g}"),
                "logit_scale": round(bundle.logit_scale, 4),
                "samples_per_s": round(loss_count * batch_size / elapsed, 1),
                **{k: round(v.item(), 5) for k, v in losses.items() if k != "loss"},
            }
            if flops_per_step:
                mfu = flops_per_step * loss_count / elapsed / (peak_tflops * 1e12)
                record["mfu"] = round(mfu, 4)
            if not math.isfinite(final_loss):
                raise NonFiniteLossError(f"training loss is {final_loss} by step {done}; {checkpoint_path} keeps the "
                                         "last finite state (lower the learning rate, or use fp32)")
            if ranks.is_main:
                _append_log(log_path, record)
            progress.set_postfix(loss=f"{final_loss:.3f}", scale=f"{record['logit_scale']:.1f}")
            loss_sum.zero_()
            loss_count, interval_start, paused = 0, now, 0.0
        pause_start = time.perf_counter()
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
        if eval_fn is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            last_eval = evaluate(done)
            if stop_when is not None and done < config.steps and stop_when(last_eval):
                stopped = True
                save(done)
                end_step = done
                break
        paused += time.perf_counter() - pause_start
    progress.close()
    if sharded:
        unshard_into(train_model, model, device)
    _set_grad_checkpointing(model, was_checkpointing)
    model.eval()

    steps_run = end_step - start_step
    rate = steps_run / train_seconds if train_seconds > 0 else 0.0
    return TrainResult(
        step=end_step,
        stopped_early=stopped,
        resumed_from_step=start_step,
        train_seconds=round(train_seconds, 2),
        steps_per_s=round(rate, 3),
        samples_per_s=round(rate * batch_size, 1),
        flops_per_step=flops_per_step,
        mfu=round(flops_per_step * rate / (peak_tflops * 1e12), 4) if flops_per_step and rate else None,
        final_loss=final_loss,
        last_eval=last_eval,
        checkpoint_path=checkpoint_path,
        log_path=log_path,
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


def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            config: TrainConfig, n: int, sharded: bool) -> tuple[int, bool]:
    payload = read_checkpoint(path)
    state = payload.get("train_state")
    if state is None:
        raise ResumeMismatchError(f"{path} is a model checkpoint without training state; use an empty out_dir")
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in _TRAJECTORY_FIELDS if saved.get(k) != getattr(config, k)]
    if state["n_samples"] != n:
        changed.append(f"training set size: {state['n_samples']} -> {n}")
    if changed:
        raise ResumeMismatchError(f"cannot resume from {path}, the run differs: {'; '.join(changed)}. Use a new out_dir.")
    if sharded:
        load_training_state(model, optimizer, payload["state_dict"], state["optimizer_by_name"])
    else:
        load_state_dict_strict(model, payload["state_dict"], source=str(path))
        if "optimizer_by_name" in state:
            load_training_state(model, optimizer, payload["state_dict"], state["optimizer_by_name"])
        else:  # written before optimiser state was keyed by name
            optimizer.load_state_dict(state["optimizer"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), bool(state.get("stopped_early", False))


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_atomically(path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))
