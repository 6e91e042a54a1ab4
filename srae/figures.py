"""The paper's Fig. 4 grid, per category: each row is one image, then ExcitationBP on the
prediction, then the n x-feature heatmaps sorted by contribution ``v_i * E_i`` with that
number above each panel (matplotlib, Agg backend).

By default (``scale="row"``) a panel's brightness says how much its x-feature matters: each
map is normalised to its own maximum (c-MWP per x-feature per image, as in the paper) and then
multiplied by its share of the row's largest ``|v_i E_i|`` (:func:`panel_intensity`), all on
one colour scale; so an x-feature that contributes 5% of the top one peaks at 5% of the scale,
and one under 1% (:data:`MINOR_SHARE`) is drawn muted: a washed-out image, no heat, "(~0)" in
its grey title. ``scale="map"`` draws every map to its own maximum instead (the shape of a
weak x-feature's map shows; only the printed number says how much it matters)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from srae.errors import InputError
from srae.excitation import resize_maps
from srae.stores import temp_beside

__all__ = ["order_features", "map_scales", "panel_intensity", "panel_values", "muted_panels",
           "excitation_grid", "save_excitation_grid"]
NORMALISED_NOTE = ("each heatmap normalised to its own max (c-MWP per x-feature per image); "
                   "only the number above a panel says how much it matters")
ROW_SCALE_NOTE = ("x-feature heat = map / its own max x |v_i E_i| / the row's largest |v_j E_j| (one colour scale)\n"
                  "under 1% of the largest: greyed, no heat, \"~0\"; ExcitationBP to its own max")
SCALES = ("row", "map")

SORTS = ("row", "mean", "none")


def order_features(contributions: np.ndarray, sort: str = "row") -> np.ndarray:
    """(R, n) contributions -> (R, n) x-feature order, largest contribution first: per row
    ("row"), by the mean over rows so columns keep one x-feature each ("mean"), or as is."""
    c = np.asarray(contributions, dtype=np.float64)
    if sort not in SORTS:
        raise InputError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
    if sort == "row":
        return np.argsort(-c, axis=1, kind="stable")
    base = np.argsort(-c.mean(axis=0), kind="stable") if sort == "mean" else np.arange(c.shape[1])
    return np.broadcast_to(base, c.shape).copy()


# An x-feature whose |v_i E_i| is below this share of the row's largest is titled in grey,
# "(~0)", and (on the default row scale) drawn muted: greyed image, no heat.
MINOR_SHARE = 0.01


def signed(v: float) -> str:
    """``v`` with 2 decimals; a value that rounds to zero reads "0.00", not "-0.00"."""
    s = f"{float(v):.2f}"
    return "0.00" if s == "-0.00" else s


def map_scales(maps: np.ndarray) -> np.ndarray:
    """Per-map colour scale of ``(..., H, W)`` maps: each map's own maximum (1 if all 0)."""
    m = np.asarray(maps, dtype=np.float64)
    peak = m.reshape(*m.shape[:-2], -1).max(axis=-1)
    return np.where(peak > 0, peak, 1.0)


def panel_intensity(contributions: np.ndarray) -> np.ndarray:
    """Peak colour value of each x-feature panel on the row scale: ``(R, n)`` contributions
    ``v_i E_i`` -> ``|c_ri| / max_j |c_rj|`` in [0, 1] (a row whose contributions are all 0:
    all 0). The largest contributor of a row peaks at the top of the scale; one contributing
    5% as much peaks at 5%. The sign is not drawn: it is in the panel's title."""
    c = np.abs(np.asarray(contributions, dtype=np.float64))
    if c.ndim != 2 or not np.isfinite(c).all():
        raise InputError(f"contributions: expected finite (R, n) values, got shape {c.shape}")
    top = c.max(axis=1, keepdims=True) if c.shape[1] else np.zeros((len(c), 1))
    return np.divide(c, top, out=np.zeros_like(c), where=top > 0)


def muted_panels(contributions: np.ndarray) -> np.ndarray:
    """``(R, n)`` bool: x-features whose ``|v_i E_i|`` is under :data:`MINOR_SHARE` of the
    row's largest (all of a row that contributes nothing). Their title says "(~0)"; on the row
    scale they are drawn greyed, with no heat."""
    return panel_intensity(contributions) < MINOR_SHARE


def panel_values(xfeature_maps: np.ndarray, contributions: np.ndarray, scale: str = "row") -> np.ndarray:
    """What the grid draws for each x-feature panel: ``(R, n, H, W)`` maps -> values in [0, 1]
    on the colour scale. ``"row"``: each map over its own max, times :func:`panel_intensity`
    (so no pixel of a panel exceeds its x-feature's share of the row's largest contribution);
    ``"map"``: each map over its own max."""
    if scale not in SCALES:
        raise InputError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    m = np.clip(np.asarray(xfeature_maps, dtype=np.float64), 0, None)
    v = m / map_scales(m)[..., None, None]
    if scale == "row":
        c = np.asarray(contributions, dtype=np.float64)
        if c.shape != m.shape[:2]:
            raise InputError(f"contributions {c.shape} do not match maps {m.shape}")
        v = v * panel_intensity(c)[..., None, None]
    return np.clip(v, 0.0, 1.0)


def as_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int], what: str) -> np.ndarray:
    """Heatmaps (a tensor or array, ``(M, H, W)`` or ``(M, n, H, W)``) as a float array of
    ``(M, n) + size`` (``what`` names the argument in errors)."""
    m = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise InputError(f"{what}: expected (R, n, H, W) heatmaps, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InputError(f"{what}: contains NaN or inf")
    if m.shape[2:] != size:
        m = resize_maps(torch.from_numpy(m.astype(np.float32)), size).numpy()
    return np.clip(m, 0, None)


def overlay(image: np.ndarray, values: np.ndarray, cmap) -> np.ndarray:
    """Dimmed greyscale image under a colour heatmap of ``values`` (in [0, 1]) whose opacity
    grows with the value."""
    grey = image.astype(np.float64).mean(axis=2, keepdims=True) / 255.0
    base = np.repeat(0.25 + 0.5 * grey, 3, axis=2)
    v = np.clip(values, 0, 1)
    colour = cmap(v)[..., :3]
    alpha = (0.15 + 0.75 * v)[..., None]
    return base * (1 - alpha) + colour * alpha


def _muted(image: np.ndarray) -> np.ndarray:
    """A washed-out greyscale image with no heat: the panel of an x-feature that adds ~0."""
    grey = image.astype(np.float64).mean(axis=2, keepdims=True) / 255.0
    return np.repeat(0.62 + 0.3 * grey, 3, axis=2)


def excitation_grid(images: np.ndarray, ebp_maps: np.ndarray | torch.Tensor,
                    xfeature_maps: np.ndarray | torch.Tensor, contributions: np.ndarray, *,
                    predictions: Sequence[float] | np.ndarray | None = None, title: str | None = None,
                    sort: str = "row", row_labels: Sequence[str] | None = None,
                    dead: Sequence[int] = (), scale: str = "row"):
    """Build the Fig. 4 grid as a matplotlib Figure (not shown, Agg canvas).

    ``images`` uint8 (R, H, W, 3); ``ebp_maps`` (R, H, W) or (R, 1, H, W): ExcitationBP on
    the logit; ``xfeature_maps`` (R, n, H, W); ``contributions`` (R, n) = ``v_i * E_i``;
    ``predictions`` (R,) the logit y-hat printed above the ExcitationBP panel. ``scale``:
    ``"row"`` (default) draws each x-feature map over its own max times its share of the row's
    largest ``|v_i E_i|`` (:func:`panel_values`), all on one colour scale, so a panel is as
    bright as its x-feature matters; ``"map"`` draws each relative to its own maximum, so a
    faint map's shape shows too. The title says which. A panel whose ``|v_i E_i|`` is under 1%
    of the row's largest (:func:`muted_panels`) is titled in grey with "(~0)" and, on the row
    scale, drawn muted (greyed image, no heat). ``dead``: x-features (0-based) that fire on no
    training image; their panels say so, in grey, so a map of what would excite them is not
    read as evidence the model used.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise InputError(f"images: expected uint8 (R, H, W, 3) with R >= 1, got {images.dtype} {images.shape}")
    r_n, size = len(images), images.shape[1:3]
    ebp = as_maps(ebp_maps, size, "ebp_maps")[:, 0]
    xm = as_maps(xfeature_maps, size, "xfeature_maps")
    contrib = np.asarray(contributions, dtype=np.float64)
    if ebp.shape[0] != r_n or xm.shape[0] != r_n or contrib.shape != xm.shape[:2]:
        raise InputError(f"figure inputs disagree: {r_n} images, ebp {ebp.shape}, x-features {xm.shape}, "
                         f"contributions {contrib.shape}")
    n = xm.shape[1]
    dead_set = {int(i) for i in dead}
    if any(not 0 <= i < n for i in dead_set):
        raise InputError(f"dead: x-feature indices must be in 0..{n - 1}, got {sorted(dead_set)}")
    order = order_features(contrib, sort)
    if dead_set:  # dead panels go last, after the negative contributions
        order = np.array([[i for i in row if i not in dead_set] + [i for i in row if i in dead_set]
                          for row in order])
    if scale not in SCALES:
        raise InputError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    if not np.isfinite(contrib).all():
        raise InputError("contributions: contains NaN or inf")
    ebp_values = ebp / map_scales(ebp)[:, None, None]  # ExcitationBP: its own max on either scale
    x_values = panel_values(xm, contrib, scale)
    minor = muted_panels(contrib)
    muted = minor if scale == "row" else np.zeros_like(minor)
    note = ROW_SCALE_NOTE if scale == "row" else NORMALISED_NOTE
    cmap = colormaps["jet"]
    cell = 1.9
    fig = Figure(figsize=(cell * (n + 2) + 0.8, cell * r_n + (0.8 if title else 0.5)), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(r_n, n + 2, squeeze=False)
    for r in range(r_n):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(row_labels[r] if row_labels is not None else "image", fontsize=9)
        axes[r, 1].imshow(overlay(images[r], ebp_values[r], cmap))
        pred = f" ŷ={float(predictions[r]):.2f}" if predictions is not None else ""
        axes[r, 1].set_title(f"ExcitationBP{pred}", fontsize=9)
        for j, i in enumerate(order[r]):
            ax = axes[r, j + 2]
            ax.imshow(_muted(images[r]) if muted[r, i] else overlay(images[r], x_values[r, i], cmap))
            if muted[r, i]:
                for spine in ax.spines.values():
                    spine.set_edgecolor("0.75")
            if i in dead_set:
                ax.set_title(f"x{i + 1}: dead (0 on training)", fontsize=8, color="0.45")
            elif minor[r, i]:
                ax.set_title(f"x{i + 1}: {signed(contrib[r, i])} (~0)", fontsize=9, color="0.45")
            else:
                ax.set_title(f"x{i + 1}: {signed(contrib[r, i])}", fontsize=10, fontweight="bold")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        # row scale: the bar is the x-features' (ExcitationBP keeps its own, as the title says)
        bar = fig.colorbar(sm, ax=list(axes[r, 2:] if scale == "row" else axes[r, 1:]), shrink=0.85, pad=0.01,
                           aspect=12)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("x share of top |v E|" if scale == "row" else "/ own max", fontsize=7)
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=12 if title else 9)
    return fig


def save_excitation_grid(path: str | Path, images: np.ndarray, ebp_maps: np.ndarray | torch.Tensor,
                         xfeature_maps: np.ndarray | torch.Tensor, contributions: np.ndarray,
                         **kwargs) -> Path:
    """:func:`excitation_grid` written as a PNG at ``path`` (parents created); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = excitation_grid(images, ebp_maps, xfeature_maps, contributions, **kwargs)
    tmp = temp_beside(path)
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
