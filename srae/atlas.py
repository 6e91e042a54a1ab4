"""A concept atlas: for each x-feature, the images that excite it most, with its map on them,
so a reader can name the concept it stands for (matplotlib, Agg backend; no Prefect).

Row ``x{i}`` shows the ``top`` images with the largest ``E_i`` among those given (ties: the
lower row first), each with x-feature i's heatmap over it (relative to that map's own maximum:
the shape is what names a concept), and a label with the mean contribution ``v_i E_i`` over
the given images and on how many of them it fires. An x-feature that fires on none of them is
labelled dead and shows no images; one that fires on fewer than ``top`` shows only those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from srae.errors import InputError
from srae.figures import as_maps, map_scales, overlay, signed

__all__ = ["top_images", "atlas_labels", "concept_atlas"]


def _activations(activations: np.ndarray) -> np.ndarray:
    e = np.asarray(activations, dtype=np.float64)
    if e.ndim != 2:
        raise InputError(f"activations: expected (M, n) x-feature values E, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise InputError("activations: contains NaN or inf")
    return e


def top_images(activations: np.ndarray, top: int = 4) -> np.ndarray:
    """``(M, n)`` x-feature activations E -> ``(n, top)`` row indices: per x-feature, the rows
    with the largest E_i, largest first, ties broken by the lower row; only rows where it fires
    (E_i > 0) count, the remaining slots are -1 (all -1: it fires on none of them)."""
    e = _activations(activations)
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise InputError(f"top {top!r}: expected a positive int")
    m, n = e.shape
    out = np.full((n, int(top)), -1, dtype=np.int64)
    for i in range(n):
        order = np.argsort(-e[:, i], kind="stable")[: int(top)]  # stable: ties keep row order
        order = order[e[order, i] > 0]
        out[i, : len(order)] = order
    return out


def _contributions(activations: np.ndarray, contributions: np.ndarray | None) -> np.ndarray:
    """(M, n) ``v_i E_i``: given as such, or as ``v`` (n,) to multiply E by."""
    e = _activations(activations)
    if contributions is None:
        raise InputError("contributions: give (M, n) v_i E_i or v (n,)")
    c = np.asarray(contributions, dtype=np.float64)
    if c.ndim == 1 and c.shape[0] == e.shape[1]:
        c = e * c[None, :]
    if c.shape != e.shape:
        raise InputError(f"contributions {c.shape}: expected {e.shape} (v_i E_i) or ({e.shape[1]},) (v)")
    if not np.isfinite(c).all():
        raise InputError("contributions: contains NaN or inf")
    return c


def atlas_labels(activations: np.ndarray, contributions: np.ndarray, dead: Sequence[int] = ()) -> list[str]:
    """One label per x-feature (1-based names, as in Fig. 4): its mean ``v_i E_i`` over the
    given images and on how many of them it fires, or "dead". ``contributions`` (M, n) or v
    (n,); ``dead``: x-features (0-based) that fire on no training image."""
    e = _activations(activations)
    c = _contributions(e, contributions)
    m, n = e.shape
    off = {int(i) for i in dead}
    labels = []
    for i in range(n):
        fires = int((e[:, i] > 0).sum())
        train = "\n(dead on training)" if i in off else ""
        if fires == 0:
            labels.append(f"x{i + 1}: dead\nfires on 0/{m}{train}")
        else:
            labels.append(f"x{i + 1}: mean v_i E_i = {signed(c[:, i].mean())}\nfires on {fires}/{m}{train}")
    return labels


def _item(rows: Any, k: int, what: str) -> np.ndarray:
    try:
        x = rows[int(k)]
    except (IndexError, KeyError) as exc:
        raise InputError(f"{what}: no row {int(k)}") from exc
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def concept_atlas(images: Any, maps: Any, activations: np.ndarray, contributions: np.ndarray, *,
                  ids: Sequence[int] | np.ndarray | None = None, top: int = 4, title: str | None = None,
                  dead: Sequence[int] = ()):
    """The concept atlas as a matplotlib Figure (not shown, Agg canvas).

    ``activations`` (M, n): the x-features E of M images; ``contributions`` (M, n) ``v_i E_i``
    or ``v`` (n,). ``images`` (uint8 (H, W, 3) each) and ``maps`` (each (n, h, w): that
    image's x-feature heatmaps, resized to the image) are anything indexable by row 0..M-1
    (arrays, lists, or a dict of only the rows drawn: :func:`top_images` says which); only
    the rows drawn are read. ``ids``: image ids printed on the panels (default: the rows).
    ``dead``: x-features (0-based) that fire on no training image; their labels say so.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    e = _activations(activations)
    c = _contributions(e, contributions)
    m, n = e.shape
    if n == 0:
        raise InputError("activations: no x-features")
    names = np.arange(m) if ids is None else np.asarray(ids).reshape(-1)
    if len(names) != m:
        raise InputError(f"ids: {len(names)} for {m} images")
    if any(not 0 <= int(i) < n for i in dead):
        raise InputError(f"dead: x-feature indices must be in 0..{n - 1}, got {sorted(int(i) for i in dead)}")
    picks = top_images(e, top)
    labels = atlas_labels(e, c, dead)
    cmap = colormaps["jet"]
    cell = 1.6
    fig = Figure(figsize=(cell * (top + 1.4), cell * n + (0.7 if title else 0.4)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, top + 1, squeeze=False, width_ratios=[1.4] + [1.0] * top)
    for i in range(n):
        lab = axes[i, 0]
        lab.axis("off")
        quiet = picks[i, 0] < 0
        lab.text(0.0, 0.5, labels[i], fontsize=9, va="center", ha="left", transform=lab.transAxes,
                 color="0.45" if quiet else "black", fontweight="normal" if quiet else "bold")
        for j in range(top):
            ax = axes[i, j + 1]
            k = int(picks[i, j])
            if k < 0:
                ax.axis("off")
                continue
            img = _item(images, k, "images")
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                raise InputError(f"images: row {k} should be uint8 (H, W, 3), got {img.dtype} {img.shape}")
            mk = _item(maps, k, "maps")
            if mk.ndim != 3 or mk.shape[0] != n:
                raise InputError(f"maps: row {k} should be ({n}, h, w), got {mk.shape}")
            heat = as_maps(mk[None, i:i + 1].astype(np.float32), img.shape[:2], "maps")[0, 0]
            ax.imshow(overlay(img, heat / map_scales(heat), cmap))
            ax.set_title(f"#{names[k]}  E={e[k, i]:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    note = (f"per x-feature: the {top} images (of {m}) that excite it most (largest E_i), its map over "
            "each (to its own max)")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=11 if title else 9)
    return fig
