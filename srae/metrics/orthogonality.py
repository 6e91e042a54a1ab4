"""Orthogonality of x-feature heatmaps: O1 and O2 (paper §4, docs/design.md, "Math contracts").

Each map is normalised to sum 1; x-feature ``l``'s vector is its maps concatenated over
images; ``P`` is their correlation matrix; ``O1 = ||P||_F - sqrt(n)``, ``O2 = -log det P``.
Statistics are accumulated image block by image block (:class:`OrthogonalityStats`), so the
Dask scorer can compute them per chunk and merge; ``orthogonality`` is the one-shot form.

Degenerate cases never produce NaN: a singular correlation matrix (identical or linearly
dependent maps) gives ``O2 = inf`` explicitly; an x-feature with zero variance (e.g. all its
maps are zero) has no defined correlation - its off-diagonal entries are taken as 0 for O1,
and its covariance makes ``P`` singular, so ``O2 = inf``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from srae.errors import InputError
from srae.metrics.locality import check_maps

log = logging.getLogger(__name__)


@dataclass
class OrthogonalityStats:
    """Mergeable sufficient statistics of the x-feature vectors.

    Values are shifted by ``1 / (H*W)`` (the mean of any normalised map) before summing, which
    keeps ``E[x^2] - E[x]^2`` well conditioned; the covariance does not depend on the shift.
    """

    n: int
    pixels: int  # H * W of every map
    count: int = 0  # number of entries per x-feature vector (images * H * W)
    total: np.ndarray | None = None  # (n,) sum of shifted values
    gram: np.ndarray | None = None  # (n, n) sum of products of shifted values

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise InputError(f"orthogonality: needs at least one x-feature, got n={self.n}")
        if self.total is None:
            self.total = np.zeros(self.n)
        if self.gram is None:
            self.gram = np.zeros((self.n, self.n))

    def add(self, maps: Any) -> OrthogonalityStats:
        """Accumulate a block of maps ``(M, n, H, W)``; returns self."""
        arr = check_maps(maps, 4)
        m, n, h, w = arr.shape
        if n != self.n or h * w != self.pixels:
            raise InputError(f"maps: shape {arr.shape} does not match n={self.n}, H*W={self.pixels}")
        for i in range(m):  # one image at a time, fixed order
            flat = arr[i].reshape(n, h * w).astype(np.float64, copy=False)
            self.add_flat(flat, flat.sum(axis=1))
        return self

    def add_flat(self, flat: np.ndarray, total: np.ndarray) -> OrthogonalityStats:
        """Accumulate one image: raw float64 maps ``(n, H*W)`` with row sums ``total``.

        With ``s = S / total`` and shift ``c = 1/(H*W)``: ``sum (s_l - c)(s_l' - c) =
        <s_l, s_l'> - c (u_l + u_l') + c`` where ``u_l`` is 1 for a non-zero map (its ``s``
        sums to 1) and 0 otherwise, so the shifted values are never materialised.
        """
        if flat.shape != (self.n, self.pixels):
            raise InputError(f"maps: shape {flat.shape} does not match ({self.n}, {self.pixels})")
        nonzero = total > 0
        inv = np.where(nonzero, 1.0 / np.where(nonzero, total, 1.0), 0.0)
        used = nonzero.astype(np.float64)
        c = 1.0 / self.pixels
        live = total[nonzero]
        if live.size and (live.max() > 1e100 or live.min() < 1e-100):
            # Raw products would overflow (or underflow) float64: normalise the rows first.
            s = flat * inv[:, None]
            gram = s @ s.T
        else:
            gram = (flat @ flat.T) * np.outer(inv, inv)
        self.gram += gram - c * (used[:, None] + used[None, :]) + c
        self.total += used - 1.0
        self.count += self.pixels
        return self

    def merge(self, other: OrthogonalityStats) -> OrthogonalityStats:
        """Add another block's statistics into self (order matters only at rounding level)."""
        if other.n != self.n or other.pixels != self.pixels:
            raise InputError("orthogonality: cannot merge statistics of different shapes")
        self.count += other.count
        self.total += other.total
        self.gram += other.gram
        return self

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """Correlation matrix ``P`` (undefined entries set to 0) and the per-feature variances."""
        if self.count < 2:
            raise InputError("orthogonality: needs at least two map entries per x-feature")
        mean = self.total / self.count
        cov = (self.gram - self.count * np.outer(mean, mean)) / (self.count - 1)
        cov = (cov + cov.T) / 2.0
        var = np.clip(np.diag(cov).copy(), 0.0, None)
        scale = float(np.max(var)) if var.size else 0.0
        degenerate = var <= scale * 1e-12
        std = np.sqrt(np.where(degenerate, 1.0, var))
        corr = np.clip(cov / np.outer(std, std), -1.0, 1.0)
        corr[degenerate, :] = 0.0
        corr[:, degenerate] = 0.0
        np.fill_diagonal(corr, 1.0)
        return corr, var

    def result(self) -> tuple[float, float]:
        """``(O1, O2)``; see the module docstring for degenerate cases."""
        corr, var = self.correlation()
        n = self.n
        o1 = float(np.linalg.norm(corr, "fro") - math.sqrt(n))
        scale = float(np.max(var)) if var.size else 0.0
        if np.any(var <= scale * 1e-12):
            log.warning("orthogonality: an x-feature has zero variance; O2 = inf")
            return o1, math.inf
        eig = np.linalg.eigvalsh(corr)
        tol = max(n, 1) * np.finfo(np.float64).eps * max(float(eig.max()), 1.0) * 10.0
        if eig.min() <= tol:
            return o1, math.inf
        sign, logdet = np.linalg.slogdet(corr)
        if sign <= 0 or not np.isfinite(logdet):
            return o1, math.inf
        return o1, float(-logdet)


def orthogonality(maps: Any) -> tuple[float, float]:
    """``(O1, O2)`` of x-feature heatmaps ``maps`` ``(M, n, H, W)`` (docs/design.md, "Math contracts")."""
    arr = check_maps(maps, 4)
    _, n, h, w = arr.shape
    return OrthogonalityStats(n=n, pixels=h * w).add(arr).result()
