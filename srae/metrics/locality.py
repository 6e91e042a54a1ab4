"""Locality: how much of each x-feature's heatmap mass falls on each part / object (see
docs/design.md, "Math contracts").

``part_probabilities`` is the paper's Algorithm 1 (CUB parts, Voronoi cells with an
inverse-distance weight, a "context" column for mass outside the bounding box);
``object_probabilities`` is its ADE20K counterpart (exact object masks); ``entropy`` turns a
histogram into the locality score. All work is vectorised numpy: the per-image geometry
(Voronoi cell and weight of every pixel) is computed once with one array pass per part, and is
then applied to any number of maps with one ``bincount``.

Conventions (docs/design.md, "Data contracts"): on an ``H x W`` map pixel (row i, col j) has its centre at
``(x = j + 0.5, y = i + 0.5)``; a bbox ``(x, y, w, h)`` is the closed box ``[x, x+w] x [y, y+h]``
and a pixel is inside iff its centre is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from srae.arrays import as_numpy  # also srae.metrics.locality.as_numpy, as before
from srae.errors import InputError

log = logging.getLogger(__name__)


def check_maps(maps: Any, ndim: int, name: str = "maps") -> np.ndarray:
    """Validate heatmaps: numeric, ``ndim`` dims, finite and non-negative."""
    arr = as_numpy(maps, name)
    if arr.ndim != ndim:
        raise InputError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if arr.size:
        with np.errstate(over="ignore"):  # an overflowing sum only triggers the full check
            total = float(arr.sum(dtype=np.float64))
        check_values(arr, total, name)
    return arr


def check_values(arr: np.ndarray, total: Any, name: str) -> None:
    """Raise unless ``arr`` (whose float64 sum(s) is ``total``) is finite and non-negative.

    A finite float64 sum proves every entry finite (NaN and inf propagate), so the full
    ``isfinite`` pass only runs when the sum is not finite (overflow or a bad value).
    """
    if not np.isfinite(total).all() and not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or inf")
    if arr.size and arr.min() < 0:
        raise InputError(f"{name}: contains negative values (heatmaps must be non-negative)")


@dataclass(frozen=True)
class PartGeometry:
    """Per-pixel Voronoi assignment of one image on an ``H x W`` grid.

    ``cell[k]`` is the column of flat pixel ``k``: a part index ``p`` (inside the bbox, nearest
    visible part), ``num_parts`` (context: outside the bbox) or ``-1`` (inside the bbox but no
    part is visible, so the pixel counts nowhere). ``weight[k]`` is ``1 - dbar`` in a part
    cell and ``1`` in the context column. ``matrix`` is the ``(P+1, H*W)`` CSR matrix of
    those weights (row = column of the histogram), so a histogram row is one sparse mat-vec.
    """

    height: int
    width: int
    num_parts: int
    cell: np.ndarray  # (H*W,) int64
    weight: np.ndarray  # (H*W,) float64
    matrix: sparse.csr_matrix = field(repr=False, compare=False)

    @classmethod
    def build(cls, height: int, width: int, num_parts: int, cell: np.ndarray, weight: np.ndarray) -> PartGeometry:
        """Group pixels by column (stable, so pixel order is kept inside a column)."""
        key = np.where(cell >= 0, cell, num_parts + 1)  # uncounted pixels sort last, then dropped
        order = np.argsort(key.astype(np.int16) if num_parts < 30000 else key, kind="stable")
        counts = np.bincount(key, minlength=num_parts + 2)[: num_parts + 1]
        indptr = np.concatenate([[0], np.cumsum(counts)])
        keep = order[: indptr[-1]]
        matrix = sparse.csr_matrix((weight[keep], keep, indptr), shape=(num_parts + 1, cell.size))
        return cls(height, width, num_parts, cell, weight, matrix)

    def apply(self, maps: np.ndarray) -> np.ndarray:
        """Histogram ``(n, P+1)`` of already validated maps ``(n, H, W)`` (normalised here).

        Dividing each row by its map's total afterwards equals normalising the map first (up to
        rounding); an all-zero map gives a zero row.
        """
        flat = maps.reshape(maps.shape[0], self.height * self.width)  # n may be 0
        return self.apply_flat(flat, flat.sum(axis=1, dtype=np.float64))

    def apply_flat(self, flat: np.ndarray, total: np.ndarray) -> np.ndarray:
        """:meth:`apply` on maps ``(n, H*W)`` (any float dtype; each row is cast to float64 by
        the mat-vec) whose float64 row sums ``total`` are known."""
        raw = np.empty((flat.shape[0], self.num_parts + 1))
        for k in range(flat.shape[0]):  # per map, not per pixel: one C-level sparse mat-vec each
            raw[k] = self.matrix @ flat[k]
        return raw / np.where(total > 0, total, 1.0)[:, None]


def _inside_range(lo: float, length: float, size: int) -> tuple[int, int]:
    """Contiguous index range ``[a, b)`` of pixel centres ``c + 0.5`` inside ``[lo, lo+length]``."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    inside = np.flatnonzero((centres >= lo) & (centres <= lo + length))
    if inside.size == 0:
        return 0, 0
    return int(inside[0]), int(inside[-1]) + 1


def part_geometry(parts: Any, bbox: Any, height: int, width: int) -> PartGeometry:
    """Voronoi cells of the visible parts inside ``bbox`` and their Algorithm-1 weights.

    ``parts`` is ``(P, 3)`` (x, y, visible) in map coordinates, ``bbox`` is ``(x, y, w, h)``
    in map coordinates or None for the whole map. Nearest part by Euclidean distance from
    pixel centres, ties to the lower part index; in cell ``G_p`` the weight is
    ``1 - d / max_{G_p} d`` (weight 1 everywhere in the cell if that max is 0).
    """
    parts_arr = as_numpy(parts, "parts").astype(np.float64, copy=False)
    if parts_arr.ndim != 2 or parts_arr.shape[1] != 3:
        raise InputError(f"parts: expected shape (P, 3) of x, y, visible; got {parts_arr.shape}")
    num_parts = parts_arr.shape[0]
    visible = np.flatnonzero(parts_arr[:, 2] > 0)
    if not np.isfinite(parts_arr[visible, :2]).all():
        raise InputError("parts: a visible part has a NaN or infinite coordinate")
    if bbox is None:
        bx, by, bw, bh = 0.0, 0.0, float(width), float(height)
    else:
        box = as_numpy(bbox, "bbox").astype(np.float64).ravel()
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] < 0 or box[3] < 0:
            raise InputError(f"bbox: expected finite (x, y, w, h) with w, h >= 0; got {box.tolist()}")
        bx, by, bw, bh = (float(v) for v in box)

    cell = np.full((height, width), num_parts, dtype=np.int64)
    weight = np.ones((height, width), dtype=np.float64)
    r0, r1 = _inside_range(by, bh, height)
    c0, c1 = _inside_range(bx, bw, width)
    if r1 > r0 and c1 > c0:
        ys = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        if visible.size == 0:
            cell[r0:r1, c0:c1] = -1
            weight[r0:r1, c0:c1] = 0.0
        else:
            dy2 = (ys - parts_arr[visible, 1][:, None, None]) ** 2  # (V, h, 1)
            dx2 = (xs - parts_arr[visible, 0][:, None, None]) ** 2  # (V, 1, w)
            best_sq = dy2[0] + dx2[0]
            best = np.full(best_sq.shape, visible[0], dtype=np.int64)
            sq = np.empty_like(best_sq)
            closer = np.empty(best_sq.shape, dtype=bool)
            for v in range(1, visible.size):  # one vector pass per part (P <= ~15), never per pixel
                np.add(dy2[v], dx2[v], out=sq)
                np.less(sq, best_sq, out=closer)  # strict: ties keep the lower part index
                np.copyto(best_sq, sq, where=closer)
                np.copyto(best, visible[v], where=closer)
            dist = np.sqrt(best_sq).ravel()
            flat_best = best.ravel()
            dmax = np.zeros(num_parts)
            np.maximum.at(dmax, flat_best, dist)
            denom = dmax[flat_best]
            dbar = np.divide(dist, denom, out=np.zeros_like(dist), where=denom > 0)
            cell[r0:r1, c0:c1] = best
            weight[r0:r1, c0:c1] = (1.0 - dbar).reshape(r1 - r0, c1 - c0)
    return PartGeometry.build(height, width, num_parts, cell.ravel(), weight.ravel())


def part_probabilities(maps: Any, parts: Any, bbox: Any) -> np.ndarray:
    """Paper Algorithm 1 for one image: ``(n, H, W)`` maps -> ``(n, P+1)`` part probabilities.

    Each map is normalised to sum 1 (an all-zero map gives a zero row). Column ``p`` is
    ``sum_{G_p} (1 - dbar) * S`` over the Voronoi cell of visible part ``p`` inside the bbox
    (invisible parts get 0); the last column (context) is the mass outside the bbox.
    """
    arr = _summable(check_maps(maps, 3))
    geom = part_geometry(parts, bbox, arr.shape[1], arr.shape[2])
    return geom.apply(arr)


def _summable(arr: np.ndarray) -> np.ndarray:
    """``arr`` ``(n, H, W)``, with any map whose float64 sum overflows (finite entries near the
    float64 limit) divided by its maximum first: normalisation to sum 1 undoes the scale."""
    if arr.size == 0 or arr.dtype.itemsize < 8:  # float32 and smaller cannot overflow a float64 sum
        return arr
    flat = arr.reshape(arr.shape[0], -1)
    with np.errstate(over="ignore"):
        tot = flat.sum(axis=1, dtype=np.float64)
    if np.isfinite(tot).all():
        return arr
    peak = flat.max(axis=1).astype(np.float64)
    scale = np.where(np.isfinite(tot) | (peak <= 0), 1.0, peak)
    return (flat.astype(np.float64) / scale[:, None]).reshape(arr.shape)


def resize_labels_nearest(label_map: Any, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to ``height x width``.

    Map pixel (i, j) takes the source pixel under its centre:
    ``src_row = floor((i + 0.5) * H_src / height)``, same for columns.
    """
    labels = as_numpy(label_map, "label_map")
    if labels.ndim != 2:
        raise InputError(f"label_map: expected 2 dimensions, got shape {labels.shape}")
    src_h, src_w = labels.shape
    if labels.size == 0:
        raise InputError(f"label_map: is empty (shape {labels.shape})")
    if (src_h, src_w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.int64), src_w - 1)
    return labels[rows[:, None], cols[None, :]]


def object_probabilities(maps: Any, label_map: Any, num_labels: int | None = None) -> np.ndarray:
    """Mass of each object label: ``(n, H, W)`` maps -> ``(n, num_labels)``.

    Each map is normalised to sum 1 (an all-zero map gives a zero row); column ``k`` is the
    mass on pixels labelled ``k`` (0 = unlabeled in ADE20K, kept so rows sum to 1).
    ``label_map`` is an integer array at any resolution; it is nearest-neighbour resized to the
    map grid. ``num_labels`` defaults to ``label_map.max() + 1``.
    """
    arr = _summable(check_maps(maps, 3))
    n, height, width = arr.shape
    labels = resize_labels_nearest(label_map, height, width)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"label_map: expected integer labels, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError("label_map: contains negative labels")
    top = int(labels.max()) + 1 if labels.size else 0
    k = top if num_labels is None else int(num_labels)
    if top > k:
        raise InputError(f"label_map: label {top - 1} is not below num_labels={k}")
    flat = arr.reshape(n, arr.shape[1] * arr.shape[2]).astype(np.float64, copy=False)  # n may be 0
    total = flat.sum(axis=1)
    prob = flat / np.where(total > 0, total, 1.0)[:, None]
    idx = (np.arange(n)[:, None] * k + labels.ravel().astype(np.int64)[None, :]).ravel()
    return np.bincount(idx, weights=prob.ravel(), minlength=n * k).reshape(n, k)


def entropy(hist: Any) -> np.ndarray:
    """Locality of each row of ``hist`` ``(n, K)``: entropy (natural log) of the row normalised.

    ``0 log 0 = 0``. A row with no mass has no distribution: its entropy is NaN (callers
    drop such features and say so; see :func:`srae.scoring`).
    """
    h = as_numpy(hist, "hist")
    q, has_mass = normalised_rows(h[None, :] if h.ndim == 1 else h)
    terms = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    out = terms.sum(axis=1)
    out[~has_mass] = np.nan
    return out


def normalised_rows(hist: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a non-negative ``(n, K)`` histogram and normalise each row to sum 1.

    Returns the normalised rows (all-zero rows stay zero) and a mask of rows with mass.
    """
    h = as_numpy(hist, "hist").astype(np.float64)
    if h.ndim != 2:
        raise InputError(f"hist: expected shape (n, K), got {h.shape}")
    if h.size and (not np.isfinite(h).all() or h.min() < 0):
        raise InputError("hist: contains NaN, inf or negative values")
    total = h.sum(axis=1, keepdims=True)
    q = np.divide(h, total, out=np.zeros_like(h), where=total > 0)
    return q, total[:, 0] > 0
