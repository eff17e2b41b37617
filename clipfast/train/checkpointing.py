"""A training run's directory: the checkpoint it resumes from and its JSON-lines log.

The checkpoint is an ordinary model checkpoint (models.checkpoint: loadable on its own) plus the
training state: step, whether an early stop ended the run, the tied config, the training-set size,
AdamW state keyed by parameter name, the gradient scaler and the RNG states. It is written by rank 0
from full (unsharded) state dicts, so it resumes on one process or on any number of ranks, under
DDP or FSDP2 (train/sharding.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipfast import distributed
from clipfast.errors import RunMismatchError
from clipfast.models.bundle import ClipBundle
from clipfast.models.checkpoint import load_state_dict_strict, read_checkpoint, save_checkpoint
from clipfast.rundir import check_same_run, tied_settings, write_atomically

from .sharding import full_model_state, full_optimizer_state, load_training_state

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainingState:
    """What a checkpoint holds besides the weights (the optimiser, scaler and RNGs are restored in place)."""

    step: int
    stopped_early: bool


def save_training_checkpoint(path: Path, bundle: ClipBundle, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler, state: TrainingState, config, n_samples: int) -> None:
    """Collective under torch.distributed (full state dicts are gathered); rank 0 writes."""
    ranks = distributed.current()
    weights, optimizer_state = full_model_state(train_model), full_optimizer_state(train_model, optimizer)
    if ranks.is_main:
        train_state = {
            "step": state.step,
            "stopped_early": state.stopped_early,
            "config": tied_settings(config),
            "n_samples": n_samples,
            "optimizer_by_name": optimizer_state,
            "grad_scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        save_checkpoint(bundle, path, extra={"train_state": train_state}, state_dict=weights)
    ranks.barrier()


def resume_training(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    config, n_samples: int, sharded: bool) -> TrainingState:
    """Load the checkpoint at `path` into model, optimizer, scaler and the RNGs; RunMismatchError
    when it belongs to a run with other tied settings or another training set size."""
    payload = read_checkpoint(path)
    state = payload.get("train_state")
    if state is None:
        raise RunMismatchError(f"{path} is a model checkpoint without training state; use an empty out_dir")
    check_same_run({**state["config"], "training set size": state["n_samples"]},
                   {**tied_settings(config), "training set size": n_samples}, str(path))
    if not sharded:
        load_state_dict_strict(model, payload["state_dict"], source=str(path))
    load_training_state(model, optimizer, payload["state_dict"], state["optimizer_by_name"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return TrainingState(int(state["step"]), bool(state["stopped_early"]))


class TrainingLog:
    """The run's JSON-lines log (rank 0 writes it): one record per logged interval or evaluation."""

    def __init__(self, path: Path):
        self.path = path
        self.writes = distributed.current().is_main

    def start_fresh(self) -> None:
        if self.writes:
            self.path.unlink(missing_ok=True)

    def resume_at(self, step: int) -> None:
        """Drop records written after the checkpoint a run resumes from (they will be redone)."""
        if not self.writes or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomically(self.path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))

    def append(self, record: dict) -> None:
        if self.writes:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
