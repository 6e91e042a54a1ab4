"""Report figures as PNG bytes (matplotlib, Agg): per-method metric charts, the Lasso sweep.

Inputs are the wide tables of :mod:`srae.report`. The Fig. 1/4 heatmap grids come from
:func:`srae.figures.excitation_grid` (see :func:`figure_png`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

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
    """PNG bytes of any matplotlib Figure (e.g. :func:`srae.figures.excitation_grid`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def metric_charts(main: pd.DataFrame) -> bytes:
    """One bar chart per row of Table 1/3 (metric x split), methods on the x axis."""
    finite = main.where(np.isfinite(main.astype(float)))
    rows = [idx for idx in finite.index if finite.loc[idx].notna().any()]
    if not rows:
        raise InputError("metric_charts: the table has no values")
    ncol = min(4, len(rows))
    nrow = math.ceil(len(rows) / ncol)
    fig = _figure((3.2 * ncol, 2.6 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, idx in zip(axes.flat, rows):
        vals = finite.loc[idx].dropna()
        ax.bar(range(len(vals)), vals.to_numpy(), color="#4477aa")
        ax.set_xticks(range(len(vals)), [str(c) for c in vals.index], rotation=45, ha="right", fontsize=7)
        ax.set_title(" / ".join(str(i) for i in idx), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
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
