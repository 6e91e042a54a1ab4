"""Vectorised soft-edged shapes for the synthetic datasets.

Every shape is evaluated on whole coordinate grids at once and returns a coverage map in
[0, 1] (an approximate signed distance turned into a one-pixel ramp), which anti-aliases
edges without supersampling. Coordinates may be any frame (pixels or a canonical object
frame); ``px`` is the size of one pixel in that frame's units.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np

Array = np.ndarray


def _ramp(dist: Array, px: float) -> Array:
    """Coverage from a signed distance (positive inside)."""
    return np.clip(dist / px + 0.5, 0.0, 1.0)


def local(u: Array, v: Array, centre: tuple[float, float], rot_deg: float) -> tuple[Array, Array]:
    """Coordinates relative to ``centre`` in a frame rotated by ``rot_deg`` (counter-clockwise)."""
    t = np.deg2rad(rot_deg)
    du, dv = u - centre[0], v - centre[1]
    return du * np.cos(t) + dv * np.sin(t), -du * np.sin(t) + dv * np.cos(t)


def ellipse(u: Array, v: Array, centre: tuple[float, float], a: float, b: float, rot_deg: float,
            px: float) -> Array:
    """Coverage of an ellipse with semi-axes ``a`` (along the rotated x axis) and ``b``."""
    x, y = local(u, v, centre, rot_deg)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    grad = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2) / np.maximum(r, 1e-6)
    dist = (1.0 - r) / np.maximum(grad, 1e-6)
    return _ramp(dist, px)


def polygon(u: Array, v: Array, pts: list[tuple[float, float]], px: float) -> Array:
    """Coverage of a convex polygon (vertices in either winding)."""
    p = np.asarray(pts, dtype=float)
    area = 0.5 * np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1])
    sign = 1.0 if area > 0 else -1.0
    dist = np.full(u.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        norm = np.hypot(ex, ey) or 1.0
        d = sign * (ex * (v - y0) - ey * (u - x0)) / norm
        dist = np.minimum(dist, d)
    return _ramp(dist, px)


def capsule(u: Array, v: Array, p0: tuple[float, float], p1: tuple[float, float], half_width: float,
            px: float) -> Array:
    """Coverage of a thick line segment with round ends."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    denom = ax * ax + ay * ay or 1.0
    t = np.clip(((u - p0[0]) * ax + (v - p0[1]) * ay) / denom, 0.0, 1.0)
    dist = half_width - np.hypot(u - (p0[0] + t * ax), v - (p0[1] + t * ay))
    return _ramp(dist, px)


def halfplane(u: Array, v: Array, point: tuple[float, float], normal: tuple[float, float], px: float) -> Array:
    """Coverage of the half-plane on the side ``normal`` points to."""
    n = np.asarray(normal, dtype=float)
    n = n / (np.linalg.norm(n) or 1.0)
    return _ramp((u - point[0]) * n[0] + (v - point[1]) * n[1], px)


def paint(img: Array, alpha: Array, colour: Array | tuple[float, float, float]) -> None:
    """Alpha-blend ``colour`` (RGB triple or an ``H x W x 3`` array) into ``img`` in place.

    ``img`` may be a view (a crop of a larger image); callers crop to the shape's bounds.
    """
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, dtype=img.dtype)


def crop(shape: tuple[int, int], xs: Sequence[float], ys: Sequence[float], pad: float) -> tuple[slice, slice] | None:
    """Row/column slices covering points ``(xs, ys)`` (pixels) plus ``pad``; None if off-image."""
    h, w = shape
    c0, c1 = max(0, math.floor(min(xs) - pad)), min(w, math.ceil(max(xs) + pad) + 1)
    r0, r1 = max(0, math.floor(min(ys) - pad)), min(h, math.ceil(max(ys) + pad) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> Array:
    """Low-frequency noise in [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    h, w = shape
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def muted_colour(rng: np.random.Generator, hue: tuple[float, float] = (0.0, 1.0),
                 sat: tuple[float, float] = (0.05, 0.35), val: tuple[float, float] = (0.3, 0.85)) -> Array:
    """A random colour (0-255 floats) from an HSV box; the defaults are dull, low-saturation tones."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(*hue) % 1.0, rng.uniform(*sat), rng.uniform(*val))
    return np.array([r, g, b]) * 255.0


def pixel_grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(x, y)`` of a ``size x size`` image: ``x = col + 0.5``."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)
