"""The synthetic world's ten shapes as implicit masks, and how to render them at any pose.

Each shape takes local coordinates (u, v) of an object (v points down, as image rows do, and the
shape fills roughly [-1, 1]^2 with its bounding box centred) and returns the inside mask. Shapes are
listed in the order of the world's CLASSES.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

ShapeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 1.0


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.8


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Upward equilateral triangle (circumradius R, spanning [-R, R/2] about its centroid), moved
    # up by R/4 to centre its bounding box.
    radius = 1.15
    v = v - radius / 4
    inside = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):  # inside = all three edge half-planes; edge normals point away from vertices
        angle = math.pi / 2 + 2 * math.pi * k / 3
        inside &= u * math.cos(angle) + v * math.sin(angle) <= radius / 2
    return inside


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Five-pointed star pointing up: fold the angle into one half-spike [0, pi/5] (0 = outer tip,
    # pi/5 = inner corner) and test against the straight edge between them.
    outer, inner = 1.0, 0.5
    v = v - (outer - outer * math.cos(math.pi / 5)) / 2  # spans [-1, cos 36deg]: centre it
    sector = 2 * math.pi / 5
    phi = torch.remainder(torch.atan2(v, u) + math.pi / 2, sector)
    psi = torch.minimum(phi, sector - phi)
    r = torch.sqrt(u * u + v * v)
    qx, qy = r * torch.cos(psi), r * torch.sin(psi)
    dx, dy = inner * math.cos(math.pi / 5) - outer, inner * math.sin(math.pi / 5)
    return dx * qy - dy * (qx - outer) >= 0


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rr = u * u + v * v
    return (rr <= 1.0) & (rr >= 0.5 * 0.5)


def _diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # A tall rhombus, not a square at 45 degrees: with +-0.35 rad rotation those would overlap.
    return u.abs() / 0.7 + v.abs() <= 1.0


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (x^2 + y^2 - 1)^3 <= x^2 y^3 spans x in +-1.139, y in [-1, 1.236]; scale and centre to +-1.
    x = u * 1.139
    y = -v * 1.139 + 0.118
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _bar(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 1.0) & (v.abs() <= 0.3)


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Pointing right: a shaft plus a triangular head with its tip at u = 1.
    shaft = (u >= -1.0) & (u <= 0.1) & (v.abs() <= 0.22)
    head = (u >= 0.0) & (v.abs() <= 0.7 * (1.0 - u))
    return shaft | head


SHAPES: tuple[ShapeFn, ...] = (  # in the order of world.CLASSES
    _circle, _square, _triangle, _star, _cross, _ring, _diamond, _heart, _bar, _arrow,
)


@functools.lru_cache(maxsize=None)
def _shape_outlines() -> tuple[torch.Tensor, ...]:
    """Per class, boundary points of the shape (float [P, 2] of u, v), to compute rotated extents."""
    grid = torch.linspace(-1.2, 1.2, 121)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    outlines = []
    for shape in SHAPES:
        inside = shape(u, v)
        padded = torch.nn.functional.pad(inside[None, None].float(), (1, 1, 1, 1))
        interior = torch.nn.functional.max_pool2d(1 - padded, 3, stride=1)[0, 0] == 0
        boundary = inside & ~interior
        outlines.append(torch.stack([u[boundary], v[boundary]], dim=1))
    return tuple(outlines)


def rotated_extents(labels: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-aligned half-extents (in units of the object's size) of each rotated shape."""
    ext_x = torch.empty_like(theta)
    ext_y = torch.empty_like(theta)
    outlines = _shape_outlines()
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().squeeze(1)
        points = outlines[cls]  # [P, 2]
        cos, sin = torch.cos(theta[rows])[:, None], torch.sin(theta[rows])[:, None]
        u, v = points[:, 0][None], points[:, 1][None]
        # local -> image offsets: dx = u cos - v sin, dy = u sin + v cos
        ext_x[rows] = (u * cos - v * sin).abs().amax(dim=1)
        ext_y[rows] = (u * sin + v * cos).abs().amax(dim=1)
    return ext_x, ext_y


def _local_coords(
    cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor, theta: torch.Tensor, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-local coordinates (u, v) of every pixel centre, float [n, S, S]."""
    pixels = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    dx = pixels[None, None, :] - cx[:, None, None]
    dy = pixels[None, :, None] - cy[:, None, None]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    scale = size[:, None, None]
    return (dx * cos + dy * sin) / scale, (-dx * sin + dy * cos) / scale


def render_shapes(
    labels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor, theta: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """Bool [n, S, S] masks of shapes of the given classes and poses (one pass per class)."""
    masks = torch.zeros(labels.shape[0], image_size, image_size, dtype=torch.bool)
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().squeeze(1)
        u, v = _local_coords(cx[rows], cy[rows], size[rows], theta[rows], image_size)
        masks[rows] = SHAPES[cls](u, v)
    return masks
