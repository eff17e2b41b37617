"""Seeded random streams: every random choice of a training run (data order, augmentations, CleanCLIP's
views) comes from a generator that is a function of the run's seed and of counters such as the
epoch or the step, never of global RNG state, so a run resumed at any step continues exactly like
the uninterrupted one, on any number of ranks."""

from __future__ import annotations

import torch

DATA_ORDER, AUGMENT, VIEWS = 0, 1, 2  # the streams


def seeded_generator(seed: int, stream: int, *counters: int) -> torch.Generator:
    """An independent generator for (seed, stream, counters...), e.g. the data order of one epoch."""
    state = seed
    for value in (stream, *counters):
        state = state * 1_000_003 + value
    return torch.Generator().manual_seed(state % 2**63)
