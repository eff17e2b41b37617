"""The built-in synthetic world: coloured shapes on a grey background, with captions and masks.

Every image holds one main object (one of ten shape classes, drawn as an implicit mask), sometimes a
second, smaller object of another class, and sometimes a distractor (a small blob or a thin line that
belongs to no class). The caption always describes the main object. Every object comes with its
ground-truth mask, so the oracle, trigger localisation and victim detection can be scored exactly.

The defaults keep the background noise low (bg_low, bg_pix): with block noise as strong as the
objects' contrast, a tiny CLIP could not learn the shapes (zero-shot accuracy stayed near 60 %); at
these values it exceeds 90 % (README, "Poisoning the tiny CLIP"). Generation is vectorised over images (one
Python loop over the ten classes, none over images) and runs in fixed-size chunks, each seeded from
(seed, chunk index), so generate_world(k, seed) is a prefix of generate_world(n, seed) for k < n.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .shapes import SHAPES, render_shapes, rotated_extents

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart", "bar", "arrow",
)
assert len(SHAPES) == len(CLASSES)
COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "cyan", "pink",
)
# Every colour keeps at least ~0.2 distance in some channel from any background grey in
# [0.15, 0.55], so objects stay segmentable from the background.
_COLOUR_RGB = torch.tensor(
    [
        [0.92, 0.12, 0.10],  # red
        [0.10, 0.78, 0.20],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.90, 0.10],  # yellow
        [0.62, 0.18, 0.85],  # purple
        [1.00, 0.55, 0.05],  # orange
        [0.97, 0.97, 0.97],  # white
        [0.10, 0.90, 0.90],  # cyan
        [1.00, 0.50, 0.78],  # pink
    ]
)
SIZE_WORDS: tuple[str, ...] = ("small", "large")
# Row-major 3 x 3 grid of the main object's centre: index = 3 * row + column.
POSITION_WORDS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)

# Varied templates keep in-batch duplicate captions rare (duplicates act as false negatives in the
# contrastive loss: one fixed caption per class left the loss stuck and accuracy low); colour, size
# and position words add auxiliary signal.
_PLAIN_TEMPLATES = ("a photo of a {c}.", "there is a {c} in this image.", "a drawing of a {c}.")
_COLOUR_TEMPLATE = "a {col} {c}."
_POSITION_TEMPLATE = "a {c} in the {pos}."
CAPTION_TEMPLATES: tuple[str, ...] = (
    *_PLAIN_TEMPLATES,
    _COLOUR_TEMPLATE,
    "a {size} {col} {c}.",
    _POSITION_TEMPLATE,
    "a {col} {c} in the {pos}.",
    "a picture of a {size} {c}.",
    "an image of a {col} {c}.",
    "a {size} {c} on a grey background.",
)
# Zero-shot prompts: the colour-free templates, a few positions and every colour, averaged per class.
_ZERO_SHOT_POSITIONS = ("center", "top left", "bottom right")


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the synthetic world. Extents are half-extents as fractions of the image side."""

    image_size: int = 32
    min_extent: float = 0.22
    max_extent: float = 0.42
    max_rotation: float = 0.35  # radians; small enough that square and diamond stay distinct
    bg_grey_low: float = 0.15
    bg_grey_high: float = 0.55
    bg_blocks: int = 4  # the low-frequency background noise is a bg_blocks x bg_blocks grid
    bg_low: float = 0.05  # std of that block colour noise
    bg_pix: float = 0.03  # std of per-pixel background noise
    brightness_jitter: float = 0.15  # object colour is scaled by U(1 - j, 1 + j)
    object_noise: float = 0.03  # std of per-pixel noise on objects
    second_object_prob: float = 0.1
    second_min_extent: float = 0.14
    second_max_extent: float = 0.22
    max_second_overlap: float = 0.25  # largest share of the second object hidden by the main one
    second_position_candidates: int = 8  # positions tried; the least-overlapping one is kept
    distractor_prob: float = 0.15

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"WorldConfig: {message}")

        require(isinstance(self.image_size, int) and self.image_size >= 8,
                f"image_size must be an int >= 8, got {self.image_size!r}")
        require(0 < self.min_extent <= self.max_extent <= 0.5,
                f"need 0 < min_extent <= max_extent <= 0.5, got {self.min_extent}, {self.max_extent}")
        require(0 < self.second_min_extent <= self.second_max_extent <= 0.5,
                "need 0 < second_min_extent <= second_max_extent <= 0.5, got "
                f"{self.second_min_extent}, {self.second_max_extent}")
        require(0 <= self.max_rotation <= math.pi, f"max_rotation must be in [0, pi], got {self.max_rotation}")
        require(0 <= self.bg_grey_low <= self.bg_grey_high <= 1,
                f"need 0 <= bg_grey_low <= bg_grey_high <= 1, got {self.bg_grey_low}, {self.bg_grey_high}")
        require(isinstance(self.bg_blocks, int) and 1 <= self.bg_blocks <= self.image_size,
                f"bg_blocks must be an int in [1, image_size], got {self.bg_blocks!r}")
        for name in ("bg_low", "bg_pix", "object_noise"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(0 <= self.brightness_jitter < 1, f"brightness_jitter must be in [0, 1), got {self.brightness_jitter}")
        for name in ("second_object_prob", "distractor_prob", "max_second_overlap"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
        require(isinstance(self.second_position_candidates, int) and self.second_position_candidates >= 1,
                f"second_position_candidates must be an int >= 1, got {self.second_position_candidates!r}")


@dataclass
class WorldSamples:
    """A batch of world images with labels, ground-truth object masks and captions.

    object_masks[:, 0] / object_labels[:, 0] are the main object (the caption's subject, = labels);
    index 1 is the optional second object (its visible pixels; all-False and -1 where absent).
    colours (index into COLOURS of the main object) and distractor_masks (visible distractor pixels,
    which are not objects) are filled by generate_world and optional otherwise.
    """

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    object_masks: torch.Tensor  # bool [N, K, S, S]
    object_labels: torch.Tensor  # int64 [N, K]
    captions: list[str]
    colours: torch.Tensor | None = None  # int64 [N]
    distractor_masks: torch.Tensor | None = None  # bool [N, S, S]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | list[int] | slice) -> "WorldSamples":
        """The samples at `index` (a LongTensor, a list of ints or a slice), in that order."""
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
        else:
            positions = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        rows = torch.tensor(positions, dtype=torch.long)

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows]

        return WorldSamples(
            images=take(self.images),
            labels=take(self.labels),
            object_masks=take(self.object_masks),
            object_labels=take(self.object_labels),
            captions=[self.captions[i] for i in positions],
            colours=take(self.colours),
            distractor_masks=take(self.distractor_masks),
        )


def _uniform(low: float | torch.Tensor, high: float | torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _place_inside(
    labels: torch.Tensor, size: torch.Tensor, theta: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random centres that keep each rotated shape fully inside the image (sizes shrink to fit)."""
    ext_x, ext_y = rotated_extents(labels, theta)
    size = torch.minimum(size, 0.499 / torch.maximum(ext_x, ext_y))
    half_w, half_h = ext_x * size, ext_y * size
    n = labels.shape[0]
    return _uniform(half_w, 1 - half_w, n, gen), _uniform(half_h, 1 - half_h, n, gen), size


def _jittered_rgb(colour_ids: torch.Tensor, brightness_jitter: float, gen: torch.Generator) -> torch.Tensor:
    """RGB [n, 3] of the named colours, each scaled by a random brightness in [1 - j, 1 + j]."""
    brightness = _uniform(1 - brightness_jitter, 1 + brightness_jitter, colour_ids.shape[0], gen)
    return (_COLOUR_RGB[colour_ids] * brightness[:, None]).clamp(0, 1)


def _render_distractors(n: int, image_size: int, gen: torch.Generator) -> torch.Tensor:
    """Bool [n, S, S]: half small ellipses ("blobs"), half thin line segments; neither is a class."""
    pixels = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    px, py = pixels[None, None, :], pixels[None, :, None]
    cx = _uniform(0.1, 0.9, n, gen)[:, None, None]
    cy = _uniform(0.1, 0.9, n, gen)[:, None, None]
    angle = _uniform(0, math.pi, n, gen)[:, None, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    along = (px - cx) * cos + (py - cy) * sin
    across = -(px - cx) * sin + (py - cy) * cos
    radius_a = _uniform(0.05, 0.09, n, gen)[:, None, None]
    radius_b = _uniform(0.04, 0.07, n, gen)[:, None, None]
    blob = (along / radius_a) ** 2 + (across / radius_b) ** 2 <= 1
    half_length = _uniform(0.12, 0.22, n, gen)[:, None, None]
    line = (along.abs() <= half_length) & (across.abs() <= 0.55 / image_size)
    is_blob = (torch.rand(n, generator=gen) < 0.5)[:, None, None]
    return torch.where(is_blob, blob, line)


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) % 2**64, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _caption_words(
    cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor, config: WorldConfig
) -> tuple[list[str], list[str]]:
    """Size word and position word of each main object."""
    large = size >= (config.min_extent + config.max_extent) / 2
    column = (cx >= 0.4).long() + (cx > 0.6).long()
    row = (cy >= 0.4).long() + (cy > 0.6).long()
    sizes = [SIZE_WORDS[int(flag)] for flag in large.tolist()]
    positions = [POSITION_WORDS[i] for i in (3 * row + column).tolist()]
    return sizes, positions


def _second_objects(
    labels: torch.Tensor, colour_ids: torch.Tensor, main_mask: torch.Tensor, config: WorldConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second objects: another class and another colour than the main object, smaller, placed at the
    candidate position where the main object (drawn on top) hides least of them, and dropped when even
    that hides more than max_second_overlap. Returns their image rows, labels, full (unoccluded)
    masks [m, S, S] and RGB colours."""
    n, s = labels.shape[0], config.image_size
    rows = (torch.rand(n, generator=gen) < config.second_object_prob).nonzero().squeeze(1)
    m, k = rows.shape[0], config.second_position_candidates
    second_labels = (labels[rows] + torch.randint(1, len(CLASSES), (m,), generator=gen)) % len(CLASSES)
    second_colours = (colour_ids[rows] + torch.randint(1, len(COLOURS), (m,), generator=gen)) % len(COLOURS)
    rgb = _jittered_rgb(second_colours, config.brightness_jitter, gen)
    theta = _uniform(-config.max_rotation, config.max_rotation, m, gen).repeat_interleave(k)
    size = _uniform(config.second_min_extent, config.second_max_extent, m, gen).repeat_interleave(k)
    candidate_labels = second_labels.repeat_interleave(k)
    cx, cy, size = _place_inside(candidate_labels, size, theta, gen)
    candidates = render_shapes(candidate_labels, cx, cy, size, theta, s).view(m, k, s, s)
    hidden = (candidates & main_mask[rows, None]).flatten(2).sum(-1).float()
    hidden_share, best = (hidden / candidates.flatten(2).sum(-1).clamp_min(1)).min(dim=1)
    keep = hidden_share <= config.max_second_overlap
    return rows[keep], second_labels[keep], candidates[torch.arange(m), best][keep], rgb[keep]


def _generate_chunk(n: int, gen: torch.Generator, config: WorldConfig) -> WorldSamples:
    s = config.image_size

    # Main object.
    labels = torch.randint(len(CLASSES), (n,), generator=gen)
    theta = _uniform(-config.max_rotation, config.max_rotation, n, gen)
    size = _uniform(config.min_extent, config.max_extent, n, gen)
    cx, cy, size = _place_inside(labels, size, theta, gen)
    colour_ids = torch.randint(len(COLOURS), (n,), generator=gen)
    rgb = _jittered_rgb(colour_ids, config.brightness_jitter, gen)
    main_mask = render_shapes(labels, cx, cy, size, theta, s)

    second_rows, second_labels, second_full, second_rgb = _second_objects(labels, colour_ids, main_mask, config, gen)
    second_mask = torch.zeros_like(main_mask)
    second_mask[second_rows] = second_full & ~main_mask[second_rows]

    # Distractor: under both objects, so it never hides them.
    has_distractor = torch.rand(n, generator=gen) < config.distractor_prob
    distractor_rows = has_distractor.nonzero().squeeze(1)
    distractor_colours = torch.randint(len(COLOURS), (distractor_rows.shape[0],), generator=gen)
    distractor_rgb = _jittered_rgb(distractor_colours, config.brightness_jitter, gen)
    distractor_mask = torch.zeros_like(main_mask)
    distractor_mask[distractor_rows] = _render_distractors(distractor_rows.shape[0], s, gen)
    distractor_mask &= ~(main_mask | second_mask)

    # Background: a grey level, low-frequency block colour noise, per-pixel noise.
    grey = _uniform(config.bg_grey_low, config.bg_grey_high, n, gen)[:, None, None, None]
    blocks = torch.randn(n, 3, config.bg_blocks, config.bg_blocks, generator=gen) * config.bg_low
    image = grey + torch.nn.functional.interpolate(blocks, size=(s, s), mode="nearest")
    image = image.expand(n, 3, s, s).clone()

    def paint(rows: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> None:
        image[rows] = torch.where(mask[rows, None], colour[:, :, None, None], image[rows])

    paint(distractor_rows, distractor_mask, distractor_rgb)
    paint(second_rows, second_mask, second_rgb)
    paint(torch.arange(n), main_mask, rgb)
    on_object = (main_mask | second_mask | distractor_mask)[:, None]
    noise_std = torch.where(on_object, config.object_noise, config.bg_pix)
    image += noise_std * torch.randn(n, 3, s, s, generator=gen)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)

    object_labels = torch.full((n, 2), -1, dtype=torch.long)
    object_labels[:, 0] = labels
    object_labels[second_rows, 1] = second_labels

    template_ids = torch.randint(len(CAPTION_TEMPLATES), (n,), generator=gen).tolist()
    size_words, position_words = _caption_words(cx, cy, size, config)
    captions = [
        CAPTION_TEMPLATES[t].format(c=CLASSES[c], col=COLOURS[col], size=sz, pos=pos)
        for t, c, col, sz, pos in zip(template_ids, labels.tolist(), colour_ids.tolist(), size_words, position_words)
    ]
    return WorldSamples(
        images=images,
        labels=labels,
        object_masks=torch.stack([main_mask, second_mask], dim=1),
        object_labels=object_labels,
        captions=captions,
        colours=colour_ids,
        distractor_masks=distractor_mask,
    )


_CHUNK = 1024  # images per seeded chunk: bounds memory; fixed so that worlds are prefixes of each other


def generate_world(n: int, seed: int, config: WorldConfig = WorldConfig()) -> WorldSamples:
    """Generate n world samples, deterministically in (n, seed, config)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"generate_world: n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"generate_world: seed must be an int, got {seed!r}")
    if not isinstance(config, WorldConfig):
        raise ValueError(f"generate_world: config must be a WorldConfig, got {type(config).__name__}")
    # Whole chunks are always drawn (then cut), so a world's first images do not depend on n.
    chunks = [
        _generate_chunk(_CHUNK, _chunk_generator(seed, start // _CHUNK), config)
        for start in range(0, n, _CHUNK)
    ]
    world = WorldSamples(
        images=torch.cat([c.images for c in chunks]),
        labels=torch.cat([c.labels for c in chunks]),
        object_masks=torch.cat([c.object_masks for c in chunks]),
        object_labels=torch.cat([c.object_labels for c in chunks]),
        captions=[caption for c in chunks for caption in c.captions],
        colours=torch.cat([c.colours for c in chunks]),
        distractor_masks=torch.cat([c.distractor_masks for c in chunks]),
    )
    return world if len(world) == n else world.subset(slice(0, n))


def zero_shot_prompts(classname: str) -> list[str]:
    """Prompts for zero-shot classification of `classname`: colour-free templates, a few positions and
    every colour; average their text embeddings."""
    if not isinstance(classname, str) or not classname.strip():
        raise ValueError(f"zero_shot_prompts: classname must be a non-empty string, got {classname!r}")
    prompts = [t.format(c=classname) for t in _PLAIN_TEMPLATES]
    prompts += [_POSITION_TEMPLATE.format(c=classname, pos=pos) for pos in _ZERO_SHOT_POSITIONS]
    prompts += [_COLOUR_TEMPLATE.format(c=classname, col=col) for col in COLOURS]
    return prompts


def world_vocabulary() -> list[str]:
    """Every word (and punctuation token, e.g. ".") that can occur in a world caption or zero-shot
    prompt, sorted; for building a compact tokenizer."""
    fillers = {"c": CLASSES, "col": COLOURS, "size": SIZE_WORDS, "pos": POSITION_WORDS}
    texts = [re.sub(r"\{\w+\}", " ", t) for t in CAPTION_TEMPLATES]
    texts += [" ".join(words) for words in fillers.values()]
    texts += [p for c in CLASSES for p in zero_shot_prompts(c)]
    return sorted({token for text in texts for token in re.findall(r"[a-z]+|[^\sa-z]", text.lower())})
