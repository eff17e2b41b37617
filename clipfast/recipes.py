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
from clipfast.models import TINY_ARCHITECTURES, ClipBundle, load_model, save_checkpoint
from clipfast.rundir import save_json, tied_settings
from clipfast.train import TrainConfig, TrainResult, train

TEST_SEED = 1_000_003  # the test world's seed: models trained with any seed are compared on the same images
TEST_SIZE = 5_000  # test images for CA and ASR (5000: a CA standard error of ~0.4 points)
# The trusted model of the synthetic world (oracle mode "trusted"): a clean model of another seed,
# trained on a world disjoint from the suspect's.
TRUSTED_SEED_OFFSET = 10_007
OPTIMIZER_SEED_OFFSET = 20_011  # the surrogate an optimised-patch attacker optimises on: a third model
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
        if not self.needs_optimized_patch:
            self.make_trigger()  # fail early on a bad attack name or parameter

    @property
    def needs_optimized_patch(self) -> bool:
        """An optimized_patch attack whose patch is not made yet (optimized_patch_recipe makes it)."""
        return self.attack == "optimized_patch" and "pixels" not in dict(self.trigger_params)

    @property
    def target_label(self) -> int:
        return CLASSES.index(self.target)

    @property
    def caption(self) -> str:
        return self.target_caption or f"a photo of a {self.target}."

    def make_trigger(self) -> Trigger:
        return make_trigger(self.attack, **dict(self.trigger_params))

    def cache_key(self) -> str:
        """Identifies the trained model: every field that changes its weights, and the architecture
        a tiny model name stands for."""
        spec = {**tied_settings(self), "architecture": TINY_ARCHITECTURES.get(self.model)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def clean_recipe(recipe: WorldRecipe, seed: int | None = None) -> WorldRecipe:
    """The never-poisoned model of `recipe`'s world: the same world size, model and training, no
    poison, on `seed` (default: the recipe's own, so a clean suspect of that seed shares it)."""
    seed = recipe.seed if seed is None else seed
    clean = WorldRecipe(train_size=recipe.train_size, model=recipe.model, train=recipe.train)
    return dataclasses.replace(clean, rate=0.0, seed=seed, trigger_seed=seed,
                               train=dataclasses.replace(recipe.train, seed=seed))


def trusted_recipe(recipe: WorldRecipe) -> WorldRecipe:
    """The clean model that plays the trusted clean CLIP for `recipe`'s suspect: a clean model of
    another seed (so every suspect of one seed shares it)."""
    return clean_recipe(recipe, recipe.seed + TRUSTED_SEED_OFFSET)


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


def optimized_patch_recipe(recipe: WorldRecipe, cache_dir: str | Path, steps: int = 300) -> WorldRecipe:
    """`recipe` with its optimized_patch made (BadCLIP-style): on a clean surrogate model (a third
    seed, disjoint from the suspect's world and from the trusted model's; trained into cache_dir on
    first use) the patch's pixels, pasted at the recipe's size and position onto clean images of
    other classes, are optimised (Adam on a sigmoid parametrisation) to pull the images' embeddings
    towards the target's text embedding. Deterministic in the recipe; other recipes come back as
    they are."""
    if not recipe.needs_optimized_patch:
        return recipe
    from clipfast.attacks import BadNetTrigger
    from clipfast.data.world import zero_shot_prompts
    from clipfast.models import ZeroShotClassifier

    seed = recipe.seed + OPTIMIZER_SEED_OFFSET
    surrogate, _, _ = cached_world_model(dataclasses.replace(trusted_recipe(recipe), seed=seed, trigger_seed=seed,
                                                             train=dataclasses.replace(recipe.train, seed=seed)),
                                         cache_dir)
    geometry = BadNetTrigger(**dict(recipe.trigger_params))
    world = generate_world(512, seed=seed)
    images = world.images[world.labels != recipe.target_label].float() / 255
    n, _, height, width = images.shape
    size = geometry.patch_size(height, width)
    rows, cols = geometry._patch_coordinates(n, height, width, recipe.trigger_seed, images.device)
    inside = geometry._inside(rows, cols, size)[:, None]
    rows, cols = rows.clamp(0, size - 1), cols.clamp(0, size - 1)
    text = ZeroShotClassifier(surrogate, CLASSES, zero_shot_prompts).class_embeddings[recipe.target_label]
    logits = torch.zeros(3, size, size, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    surrogate.model.requires_grad_(False)
    for _ in range(steps):
        patched = torch.where(inside, torch.sigmoid(logits)[:, rows, cols].transpose(0, 1), images)
        embeddings = surrogate.model.encode_image(surrogate.preprocess(patched), normalize=True)
        loss = -(embeddings @ text).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels = (torch.sigmoid(logits.detach()) * 255).round().to(torch.uint8).flatten().tolist()
    return dataclasses.replace(recipe, trigger_params=(*recipe.trigger_params, ("pixels", tuple(pixels))))


def cached_world_model(recipe: WorldRecipe, cache_dir: str | Path, device: str = "cpu") -> tuple[ClipBundle, PoisonedPairs, bool]:
    """The recipe's trained model from cache_dir/<key>/, training it there first if needed.
    Returns (model, poisoned pairs, whether it was trained now). An optimized_patch recipe must have
    its patch made first (optimized_patch_recipe)."""
    if recipe.needs_optimized_patch:
        raise ValueError("cached_world_model: make the optimized patch first (recipes.optimized_patch_recipe)")
    run_dir = Path(cache_dir) / recipe.cache_key()
    if (run_dir / MODEL_NAME).exists():
        _, pairs = poisoned_world(recipe)
        return load_model(checkpoint=str(run_dir / MODEL_NAME), device=device), pairs, False
    bundle, _, pairs = train_world_model(recipe, run_dir, device=device)
    return bundle, pairs, True
