"""The CleanCLIP-style baseline: the same objective as repair, on a larger random clean set, with
no pinpointing (no scan, no victims, no early stop). Every report runs it on the same poisoned
model so the two defences compare side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipfast.models import ClipBundle
from clipfast.rundir import untied
from clipfast.train.cleanclip import CleanCLIPObjective
from clipfast.train.loop import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class BaselineConfig:
    steps: int = 150
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 10
    self_supervised_weight: float = 1.0
    seed: int = 0
    eval_every: int = 0  # with an eval_fn: evaluate every this many steps (0: at the end only)
    progress: bool = untied(True)


def cleanclip_baseline(bundle: ClipBundle, clean_images: torch.Tensor, clean_captions: Sequence[str],
                       out_dir: str | Path, config: BaselineConfig = BaselineConfig(),
                       eval_fn: Callable[[ClipBundle], dict] | None = None,
                       stop_when: Callable[[dict], bool] | None = None) -> TrainResult:
    """Fine-tune bundle.model in place on clean pairs with CleanCLIP's objective (resumable).
    stop_when(metrics of eval_fn) ends it early (the benchmark's "time to reach the same ASR")."""
    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=config.warmup_steps, seed=config.seed, eval_every=config.eval_every,
                               checkpoint_every=max(1, config.steps // 5), progress=config.progress)
    objective = CleanCLIPObjective(clean_captions, bundle.tokenizer, config.self_supervised_weight, config.seed)
    return train(bundle, clean_images, clean_captions, train_config, out_dir, objective=objective, eval_fn=eval_fn,
                 stop_when=stop_when)
