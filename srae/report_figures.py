"""Report figures as PNG bytes (matplotlib, Agg): per-method metric charts, the Lasso sweep.

Inputs are the wide tables of :mod:`srae.report`. The Fig. 1/4 heatmap grids come from
:func:`srae.figures.excitation_grid` (see :func:`figure_png`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from srae import report as R
from srae.errors import InputError


def _figure(figsize: tuple[float, float]):
    """A bare matplotlib Figure (no pyplot): nothing global changes, neither the user's
    backend (a notebook's inline one keeps working) nor pyplot's figure list, so reports can
    be drawn from any thread."""
    from matplotlib.figure import Figure  # imported lazily: matplotlib is slow to import

    return Figure(figsize=figsize)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """PNG bytes of any matplotlib Figure (e.g. :func:`srae.figures.excitation_grid`), with a
    256-colour palette (no dithering): image grids then take about 2.5x fewer bytes in the
    self-contained report, with no visible change to heatmaps drawn from one colour map."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    buf.seek(0)
    with Image.open(buf) as img:
        small = img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def metric_panels(main: pd.DataFrame) -> list[tuple[str, list[str], np.ndarray]]:
    """(title, method labels, values) per row of Table 1/3 with any value; labels say in how
    many categories a mean left out an infinite value (``"SRAE (1/4 inf)"``)."""
    values = main.astype(float)
    left_out = R.infinite_categories(main)
    out = []
    for idx in values.index:
        vals = values.loc[idx].dropna()
        if vals.empty:
            continue
        labels = []
        for c in vals.index:
            k_n = left_out.get((idx[0], idx[1], c)) if isinstance(idx, tuple) and len(idx) == 2 else None
            labels.append(f"{c} ({k_n[0]}/{k_n[1]} inf)" if k_n and k_n[0] < k_n[1] else str(c))
        out.append((" / ".join(str(i) for i in (idx if isinstance(idx, tuple) else (idx,))), labels, vals.to_numpy()))
    if not out:
        raise InputError("metric_charts: the table has no values")
    return out


def metric_charts(main: pd.DataFrame) -> bytes:
    """One bar chart per row of Table 1/3 (metric x split), methods on the x axis. A method
    whose value is infinite (O2 = inf in every category) keeps its place, marked "inf" with no
    bar; one whose mean left some categories out says how many in its label."""
    panels = metric_panels(main)
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = _figure((3.2 * ncol, 2.6 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, (title, labels, values) in zip(axes.flat, panels):
        inf = np.isinf(values)
        ax.bar(range(len(values)), np.where(inf, 0.0, values), color="#4477aa")
        for k in np.flatnonzero(inf):
            ax.text(k, 0, "inf", ha="center", va="bottom", fontsize=7, color="#a31515")
        ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def lasso_chart(sweep: pd.DataFrame) -> bytes:
    """F_reg (train/test) and Num_x against Lasso alpha (Table 2a/5 as a plot)."""
    if sweep.empty:
        raise InputError("lasso_chart: no Lasso sweep rows")
    alphas = np.asarray(sweep.columns, dtype=float)
    fig = _figure((4.5, 3))
    ax = fig.subplots()
    for row in ("F_reg train", "F_reg test"):
        if row in sweep.index:
            ax.plot(alphas, sweep.loc[row].to_numpy(float), marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("F_reg")
    if "Num_x" in sweep.index:
        ax2 = ax.twinx()
        ax2.plot(alphas, sweep.loc["Num_x"].to_numpy(float), color="grey", ls="--", marker="x", label="Num_x")
        ax2.set_ylabel("Num_x")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig)
