"""Poisoned (and clean) models of the synthetic world as reproducible recipes: the data, the
poisoning and the training in one place, shared by `clipfast poison` and `clipfast demo`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from clipfast.attacks import PoisonedPairs, Trigger, make_trigger, poison_pairs
from clipfast.data.world import CLASSES, WorldSamples, generate_world
from clipfast.models import ClipBundle, load_model, save_checkpoint
from clipfast.rundir import save_json, tied_settings
from clipfast.train import TrainConfig, TrainResult, train

TEST_SEED = 1_000_003  # the test world's seed: models trained with any seed are compared on the same images
TEST_SIZE = 1_000  # test images for CA and ASR
MODEL_NAME = "model.pt"
POISON_NAME = "poison.json"


@dataclass(frozen=True)
class WorldRecipe:
    """rate 0 gives a clean model (the trigger is still defined, to measure its ASR)."""

    attack: str = "badnet"
    trigger_params: tuple[tuple[str, object], ...] = ()
    rate: float = 0.01
    target: str = "heart"
    target_caption: str | None = None
    train_size: int = 40_000
    seed: int = 0  # world, poisoning draw and training
    trigger_seed: int = 0  # per-image trigger randomness (e.g. random patch locations)
    model: str = "clipfast-tiny"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.target not in CLASSES:
            raise ValueError(f"target must be one of {list(CLASSES)}, got {self.target!r}")
        self.make_trigger()  # fail early on a bad attack name or parameter

    @property
    def target_label(self) -> int:
        return CLASSES.index(self.target)

    @property
    def caption(self) -> str:
        return self.target_caption or f"a photo of a {self.target}."

    def make_trigger(self) -> Trigger:
        return make_trigger(self.attack, **dict(self.trigger_params))

    def cache_key(self) -> str:
        """Identifies the trained model: every field that changes its weights."""
        return hashlib.sha256(json.dumps(tied_settings(self), sort_keys=True).encode()).hexdigest()[:16]


def poisoned_world(recipe: WorldRecipe) -> tuple[WorldSamples, PoisonedPairs]:
    """The clean training world and its poisoned pairs (deterministic in the recipe)."""
    world = generate_world(recipe.train_size, seed=recipe.seed)
    pairs = poison_pairs(world.images, world.captions, world.labels, recipe.make_trigger(), recipe.rate,
                         recipe.target_label, recipe.caption, seed=recipe.trigger_seed, num_classes=len(CLASSES))
    return world, pairs


def evaluation_world(size: int = TEST_SIZE, seed: int = TEST_SEED) -> WorldSamples:
    return generate_world(size, seed=seed)


def poison_record(recipe: WorldRecipe, pairs: PoisonedPairs) -> dict:
    trigger = recipe.make_trigger()
    return {
        "attack": trigger.name,
        "trigger": {"name": trigger.name, **dataclasses.asdict(trigger)},
        "trigger_seed": recipe.trigger_seed,
        "clean_label": trigger.clean_label,
        "rate": recipe.rate,
        "target_label": recipe.target_label,
        "target_class": recipe.target,
        "target_caption": recipe.caption,
        "train_size": recipe.train_size,
        "world_seed": recipe.seed,
        "num_poisoned": len(pairs.poisoned_indices),
        "poisoned_indices": pairs.poisoned_indices.tolist(),
    }


def train_world_model(recipe: WorldRecipe, out_dir: str | Path, bundle: ClipBundle | None = None,
                      eval_fn: Callable[[ClipBundle], dict] | None = None, device: str = "cpu",
                      ) -> tuple[ClipBundle, TrainResult, PoisonedPairs]:
    """Train (from scratch, or fine-tune `bundle`) on the recipe's poisoned pairs; writes
    out_dir/poison.json, the training log and checkpoint (resumable) and out_dir/model.pt."""
    out_dir = Path(out_dir)
    _, pairs = poisoned_world(recipe)
    if bundle is None:
        torch.manual_seed(recipe.seed)  # a from-scratch model's initial weights
        bundle = load_model(recipe.model, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(poison_record(recipe, pairs), out_dir / POISON_NAME)
    result = train(bundle, pairs.images, pairs.captions, recipe.train, out_dir, eval_fn=eval_fn)
    save_checkpoint(bundle, out_dir / MODEL_NAME)
    return bundle, result, pairs


def cached_world_model(recipe: WorldRecipe, cache_dir: str | Path, device: str = "cpu") -> tuple[ClipBundle, PoisonedPairs, bool]:
    """The recipe's trained model from cache_dir/<key>/, training it there first if needed.
    Returns (model, poisoned pairs, whether it was trained now)."""
    run_dir = Path(cache_dir) / recipe.cache_key()
    if (run_dir / MODEL_NAME).exists():
        _, pairs = poisoned_world(recipe)
        return load_model(checkpoint=str(run_dir / MODEL_NAME), device=device), pairs, False
    bundle, _, pairs = train_world_model(recipe, run_dir, device=device)
    return bundle, pairs, True
