"""The built-in segmenter: weight-free, classical, fast. It finds whatever stands out from a smooth
background, which suits the synthetic world (saturated shapes and patch triggers on blocky grey) and
gives sensible regions on simple real images (objects on plain backgrounds).

Per image, vectorised over the batch:
1. Background model: the median colour of a border ring, then `background_passes` refinements in
   which pixels far from the current model (and their neighbours) are set aside and the rest are
   averaged per cell of a coarse grid (shrunk towards the previous model where a cell has few).
2. Foreground by hysteresis on the RGB distance to that model: 8-connected components of pixels
   above `grow_threshold` that hold at least one pixel above `seed_threshold`.
3. Splitting: inside a component, solid colour-uniform parts (8-neighbours closer than
   `part_tolerance`, but no diagonal link across two foreground pixels, so a checkerboard's cells
   stay apart) of at least `min_part_area` become regions of their own, and the rest of such a
   component forms regions by 8-connectivity. So touching objects of different colours come apart,
   and so does a checkerboard trigger pasted next to or onto an object. Components without a large
   uniform part (a checkerboard patch on its own, texture) stay whole.
4. Regions smaller than `min_area` are dropped; the rest are packed largest first.

Holes are never filled: a ring stays a ring. Areas are fractions of the image area, so the defaults
carry over to other image sizes; colour distances are Euclidean in RGB with channels in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .base import Segmentation, Segmenter, check_images, pack_flat_masks

# 8-connectivity inside each image of an [N, H, W] stack, never across images.
_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_PLANE_8[1] = True
# Half of the 8 neighbour offsets (dy, dx): each undirected pixel pair once.
_NEIGHBOUR_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass
class ClassicalSegmenter(Segmenter):
    """Background subtraction + hysteresis + connected components + colour splitting (see module doc).

    max_masks: regions kept per image, largest first.
    border: width in pixels of the border ring whose median colour is the first background model.
    background_cells: the background model is piecewise constant on a cells x cells grid (the world's
        background noise is exactly such a 4 x 4 grid; on real images it is a coarse smooth model).
    background_passes: refinements of the background model (0 = border median only).
    background_prior: pseudo-pixels of the previous model mixed into each cell's mean, so cells
        covered by an object fall back to it.
    seed_threshold: a region needs a pixel at least this far from the background (hysteresis high).
    grow_threshold: pixels this far from the background join an adjacent region (hysteresis low);
        also what the background refinement sets aside. Low enough that a trigger's black cells on
        a dark-grey background still join its white cells.
    min_area: smallest region kept, as a fraction of the image area (the 32-px world's 4 x 4 trigger
        patch is 0.0156, its small distractor blobs about 0.01).
    part_tolerance: largest colour difference between 8-neighbours of one colour-uniform part.
    min_part_area: smallest colour-uniform part that splits a component, as a fraction of the image
        area. Checkerboard cells do not link up into parts (see _uniform_parts), except where one
        colour is background: the 32-px world's 4 x 4 trigger on dark grey leaves 8 white pixels
        (0.0078), below the default.
    chunk_pixels: images are segmented in chunks of about this many pixels, which bounds memory
        and keeps the work cache-sized (256 images of 32 x 32 per chunk by default).
    """

    max_masks: int = 8
    border: int = 2
    background_cells: int = 4
    background_passes: int = 2
    background_prior: float = 4.0
    seed_threshold: float = 0.25
    grow_threshold: float = 0.12
    min_area: float = 0.005
    part_tolerance: float = 0.2
    min_part_area: float = 0.012
    chunk_pixels: int = 1 << 18
    name: str = field(default="builtin", init=False)

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"ClassicalSegmenter: {message}")

        for name in ("max_masks", "border", "background_cells", "chunk_pixels"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"{name} must be an int >= 1, got {value!r}")
        require(isinstance(self.background_passes, int) and self.background_passes >= 0,
                f"background_passes must be an int >= 0, got {self.background_passes!r}")
        require(self.background_prior > 0, f"background_prior must be > 0, got {self.background_prior!r}")
        require(0 < self.grow_threshold <= self.seed_threshold,
                f"need 0 < grow_threshold <= seed_threshold, got {self.grow_threshold}, {self.seed_threshold}")
        require(self.part_tolerance > 0, f"part_tolerance must be > 0, got {self.part_tolerance!r}")
        for name in ("min_area", "min_part_area"):
            value = getattr(self, name)
            require(0 <= value < 1, f"{name} must be a fraction in [0, 1), got {value!r}")

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> Segmentation:
        check_images(images)
        step = max(1, self.chunk_pixels // (images.shape[2] * images.shape[3]))
        return Segmentation.cat([self._segment_chunk(images[start:start + step])
                                 for start in range(0, images.shape[0], step)])

    def _segment_chunk(self, images: torch.Tensor) -> Segmentation:
        pixels = images.detach().cpu().float() / 255
        distance = colour_distance(pixels, self.background(pixels))  # [N, H, W]
        regions = self.label_regions(pixels, distance)
        return self._pack(regions, distance.numpy())

    def background(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W]: the background model of float images [N, 3, H, W] in [0, 1]."""
        n, channels, height, width = pixels.shape
        ring = torch.ones(height, width, dtype=torch.bool)
        ring[self.border:height - self.border, self.border:width - self.border] = False
        # One-hot [cells, pixels] maps turn per-cell sums and the cells' broadcast back into matmuls.
        rows = _cell_map(height, min(self.background_cells, height))
        cols = _cell_map(width, min(self.background_cells, width))
        border_median = pixels[:, :, ring].median(dim=2).values[:, :, None, None]
        cells = border_median.expand(-1, -1, len(rows), len(cols))
        model = border_median.expand_as(pixels)
        for step in range(self.background_passes):
            # The first model ignores the background's own variation, so only clear foreground
            # (seed_threshold) is set aside at first; later passes set aside all of it.
            threshold = self.seed_threshold if step == 0 else self.grow_threshold
            far = colour_distance(pixels, model)[:, None] > threshold
            # Grown by a pixel so that object edges stay out of the background estimate.
            weight = 1 - F.max_pool2d(far.float(), 3, stride=1, padding=1)
            totals = rows @ torch.cat([pixels * weight, weight], dim=1) @ cols.T  # per-cell sums
            sums, counts = totals[:, :channels], totals[:, channels:]
            cells = (sums + self.background_prior * cells) / (counts + self.background_prior)
            model = rows.T @ cells @ cols
        return model

    def label_regions(self, pixels: torch.Tensor, distance: torch.Tensor) -> np.ndarray:
        """int64 [N, H, W]: region ids (0 = background), unique across the batch, before size filtering."""
        colours = pixels.permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]
        distance = distance.numpy()
        # Hysteresis and components in one labelling of the whole stack (skimage's
        # apply_hysteresis_threshold would connect neighbouring images of a stack).
        components, count = ndi.label(distance > self.grow_threshold, structure=_PLANE_8)
        seeded = np.zeros(count + 1, dtype=bool)
        seeded[components[distance > self.seed_threshold]] = True
        seeded[0] = False
        components = np.where(seeded[components], components, 0)
        foreground = components > 0

        area_scale = distance.shape[1] * distance.shape[2]
        parts = self._uniform_parts(colours, foreground)
        part_area = np.bincount(parts.ravel(), weights=foreground.ravel())
        in_large_part = foreground & (part_area[parts] >= self.min_part_area * area_scale)
        split = np.bincount(components[in_large_part], minlength=count + 1) > 0
        split[0] = False
        in_split = split[components]

        # In split components, large parts and the leftover pieces (8-connected) become regions;
        # ids: components first, then parts, then pieces, so they never collide.
        leftover = in_split & ~in_large_part
        pieces, _ = ndi.label(leftover, structure=_PLANE_8)
        regions = np.where(in_split, 0, components)
        regions = np.where(in_large_part, parts + count + 1, regions)
        regions = np.where(leftover, pieces + count + 1 + parts.size, regions)
        return regions

    def _uniform_parts(self, colours: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """int [N, H, W]: ids of colour-uniform parts: foreground pixels linked through 8-neighbours
        whose colours differ by less than part_tolerance (background pixels get ids of their own).
        A diagonal link between two foreground 4-neighbours is cut: that is where the two colours of a
        checkerboard cross, and such a patch must not count as a large solid part."""
        n, height, width = foreground.shape
        index = np.arange(foreground.size).reshape(n, height, width)
        sources, targets = [], []
        for dy, dx in _NEIGHBOUR_OFFSETS:
            rows_a, rows_b = slice(0, height - dy), slice(dy, height)
            cols_a, cols_b = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
            a, b = (slice(None), rows_a, cols_a), (slice(None), rows_b, cols_b)
            close = np.linalg.norm(colours[a] - colours[b], axis=-1) < self.part_tolerance
            linked = foreground[a] & foreground[b] & close
            if dy and dx:
                linked &= ~(foreground[:, rows_a, cols_b] & foreground[:, rows_b, cols_a])
            sources.append(index[a][linked])
            targets.append(index[b][linked])
        sources, targets = np.concatenate(sources), np.concatenate(targets)
        graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)),
                           shape=(foreground.size, foreground.size))
        _, parts = connected_components(graph, directed=False)
        return parts.reshape(n, height, width)

    def _pack(self, regions: np.ndarray, distance: np.ndarray) -> Segmentation:
        """Drop small regions, score the rest by mean distance to the background, pack them."""
        n, height, width = regions.shape
        ids, inverse, areas = np.unique(regions, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(regions.shape)
        contrast = np.bincount(inverse.ravel(), weights=distance.ravel()) / areas
        # Region id -> its image (ids never span images); kept regions stay in id order.
        image_of = np.zeros(len(ids), dtype=np.int64)
        image_of[inverse] = np.arange(n)[:, None, None]
        kept = np.flatnonzero((ids > 0) & (areas >= self.min_area * height * width))
        masks = torch.from_numpy(inverse[image_of[kept]] == kept[:, None, None])
        return pack_flat_masks(masks, torch.from_numpy(image_of[kept]), n, self.max_masks,
                               torch.from_numpy(contrast[kept]).clamp(max=1.0))


def colour_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float [N, H, W]: Euclidean distance between the RGB colours of [N, 3, H, W] images."""
    return (a - b).square().sum(dim=1).sqrt()  # several times faster than linalg.vector_norm(dim=1)


def _cell_map(size: int, cells: int) -> torch.Tensor:
    """float [cells, size]: 1 where pixel i lies in cell c (cells of near-equal size)."""
    cell_of_pixel = torch.arange(size) * cells // size
    return (cell_of_pixel[None, :] == torch.arange(cells)[:, None]).float()
