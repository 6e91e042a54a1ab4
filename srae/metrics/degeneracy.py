"""Degeneracy: does an explanation spread ``y-hat`` over several concepts, or collapse to one?

The paper's degenerate solution is an explanation whose single x-feature *is* ``y-hat``
(Sec. 2.1, Fig. 8). This module scores how close a fitted explanation comes to that, and
whether its x-features cover the parts the CNN actually uses:

- From the contributions ``C`` (``(M, n)``: ``v_i * E_i`` per test-positive image and
  x-feature): ``top_share`` (how much of each prediction the largest contribution carries),
  ``n_eff`` (the effective number of contributing x-features, ``exp`` of the entropy of the
  mean contribution shares, in ``[1, n]``) and ``feature_shares`` (each x-feature's mean
  contribution as a fraction of the mean ``y-hat``).
- From counterfactual logit drops (``y-hat`` of an image minus ``y-hat`` with one part swapped
  out): ``used_parts``, the parts whose removal lowers the logit reliably (mean more than ``z``
  standard errors above 0) and materially (at least ``min_fraction`` of the total positive
  effect), and ``part_effect_summary``, the table behind that decision.
- From an x-feature histogram over parts/objects: ``group_mass`` (merge columns such as
  "left wing" and "right wing" into one group), ``causal_coverage`` (the fraction of used parts
  that are the top group of some live x-feature, each x-feature covering at most one part) and
  ``concept_purity`` (how concentrated those covering x-features are on their part).

A single map of ``y-hat`` (ExcitationBP, Grad-CAM) is one x-feature carrying all of ``y-hat``:
score it with ``shares=[1.0]``; it can cover at most one used part.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from srae.arrays import as_numpy
from srae.errors import InputError
from srae.metrics.locality import normalised_rows

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["part", "mean", "se", "count", "share", "used"]


def _numeric(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 array, or InputError when it is not real numbers."""
    arr = as_numpy(x, name)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) \
            or np.iscomplexobj(arr):
        raise InputError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _contributions(c: Any) -> np.ndarray:
    """Validated ``(M, n)`` float64 contributions (finite)."""
    arr = _numeric(c, "contributions")
    if arr.ndim != 2:
        raise InputError(f"contributions: expected shape (M, n), got {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        raise InputError("contributions: contains NaN or inf")
    return arr


def _rows_with_mass(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows of c with sum_i |c_i| > 0, their sums)``."""
    total = np.abs(c).sum(axis=1)
    keep = total > 0
    return c[keep], total[keep]


def contribution_shares(C: Any) -> np.ndarray:
    """``(M', n)`` rows ``|c_i| / sum_i |c_i|`` of the rows of ``C`` with any contribution.

    Rows whose contributions are all zero have no shares and are dropped (so ``M' <= M``).
    """
    c = _contributions(C)
    rows, total = _rows_with_mass(c)
    return np.abs(rows) / total[:, None]


def top_share(C: Any) -> float:
    """Mean over rows with ``sum_i |c_i| > 0`` of ``max_i c_i / sum_i |c_i|``.

    The largest *signed* contribution is on top, so a prediction made of one positive and one
    equal negative contribution scores 0.5, and an all-negative row scores below 0. 1 means
    every prediction is one x-feature (the degenerate solution); ``1/n`` is an even spread.
    NaN when no row has any contribution.
    """
    c = _contributions(C)
    rows, total = _rows_with_mass(c)
    if rows.shape[0] == 0:
        return float("nan")
    return float(np.mean(rows.max(axis=1) / total))


def n_eff(C: Any) -> float:
    """Effective number of contributing x-features, ``exp(-sum_i p_i log p_i)`` in ``[1, n]``.

    ``p`` is the mean over rows of :func:`contribution_shares` (``0 log 0 = 0``): 1 when one
    x-feature carries all contributions, ``n`` when all carry the same share. NaN when no row
    has any contribution.
    """
    shares = contribution_shares(C)
    if shares.shape[0] == 0:
        return float("nan")
    p = shares.mean(axis=0)
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(np.clip(np.exp(terms.sum()), 1.0, float(p.size)))


def feature_shares(C: Any, y: Any) -> np.ndarray:
    """``(n,)`` mean contribution of each x-feature divided by the mean of ``y``.

    ``y`` is the ``(M,)`` CNN logit ``y-hat`` on the same rows as ``C``. With a faithful linear
    explanation (``v^T E ~ y-hat``) the shares sum to about 1. All NaN when ``M == 0`` or
    ``mean(y) <= 0`` (a share of a non-positive total has no meaning).
    """
    c = _contributions(C)
    yy = _numeric(y, "y")
    if yy.ndim != 1 or yy.shape[0] != c.shape[0]:
        raise InputError(f"y: expected shape ({c.shape[0]},) to match contributions {c.shape}, got {yy.shape}")
    if yy.size and not np.isfinite(yy).all():
        raise InputError("y: contains NaN or inf")
    if c.shape[0] == 0:
        return np.full(c.shape[1], np.nan)
    mean_y = float(yy.mean())
    if mean_y <= 0:
        return np.full(c.shape[1], np.nan)
    return c.mean(axis=0) / mean_y


def degeneracy_summary(C: Any, y: Any) -> dict[str, float | list[float]]:
    """``{"top_share": ..., "n_eff": ..., "feature_shares": [...]}`` of one explanation
    (:func:`top_share`, :func:`n_eff`, :func:`feature_shares` as a list of floats)."""
    c = _contributions(C)
    return {
        "top_share": top_share(c),
        "n_eff": n_eff(c),
        "feature_shares": [float(v) for v in feature_shares(c, y)],
    }


def _check_thresholds(min_fraction: float, z: float) -> None:
    if not (math.isfinite(min_fraction) and 0.0 <= min_fraction <= 1.0):
        raise InputError(f"min_fraction: expected a number in [0, 1], got {min_fraction}")
    if not (math.isfinite(z) and z >= 0.0):
        raise InputError(f"z: expected a finite number >= 0, got {z}")


def _part_stats(drops: Mapping[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(names, mean, se, count)`` over the finite drops of each part (NaN where undefined)."""
    names: list[str] = []
    means, ses, counts = [], [], []
    for name, values in drops.items():
        arr = _numeric(values, f"drops[{name!r}]").ravel()
        arr = arr[np.isfinite(arr)]
        names.append(str(name))
        counts.append(arr.size)
        means.append(float(arr.mean()) if arr.size else float("nan"))
        ses.append(float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size >= 2 else float("nan"))
    return names, np.array(means, dtype=np.float64), np.array(ses, dtype=np.float64), \
        np.array(counts, dtype=np.int64)


def part_effect_summary(drops: Mapping[str, Any], min_fraction: float = 0.1,
                        z: float = 2.0) -> pd.DataFrame:
    """Per part (mapping order): mean logit drop, its standard error, the number of finite
    drops, its share of the positive effect and whether :func:`used_parts` counts it as used.

    Columns ``part``, ``mean``, ``se`` (sample std with ``ddof=1`` over ``sqrt(count)``; NaN
    below 2 values), ``count``, ``share`` (``mean`` over the sum of the parts' positive means;
    NaN when that sum is 0) and ``used`` (bool). Non-finite drops are ignored.
    """
    _check_thresholds(float(min_fraction), float(z))
    names, mean, se, count = _part_stats(drops)
    positive = float(np.sum(np.where(np.isfinite(mean), np.maximum(mean, 0.0), 0.0)))
    share = mean / positive if positive > 0 else np.full(mean.shape, np.nan)
    with np.errstate(invalid="ignore"):
        used = (count >= 2) & (mean > 0) & (mean - z * se > 0) & (mean >= min_fraction * positive)
    return pd.DataFrame(
        {"part": names, "mean": mean, "se": se, "count": count, "share": share,
         "used": used.astype(bool)},
        columns=SUMMARY_COLUMNS,
    )


def used_parts(drops: Mapping[str, Any], min_fraction: float = 0.1, z: float = 2.0) -> list[str]:
    """Names (mapping order) of the parts the CNN uses, judged from counterfactual logit drops.

    ``drops`` maps a part name to its per-image drops ``y-hat(original) - y-hat(part swapped)``.
    A part is used iff it has at least 2 finite drops, their mean ``m`` is positive and more
    than ``z`` standard errors above 0 (``m - z * SE > 0``), and ``m`` is at least
    ``min_fraction`` of the summed positive means of all parts (a tiny but reliable effect is
    not a part the prediction rests on). See :func:`part_effect_summary` for the numbers.
    """
    table = part_effect_summary(drops, min_fraction, z)
    return [str(p) for p, u in zip(table["part"], table["used"]) if u]


def _key(name: Any) -> str:
    return str(name).strip().lower()


def group_mass(hist: Any, column_names: Sequence[str], groups: Mapping[str, Sequence[str]],
               known: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """Row-normalised ``(n, K)`` histogram aggregated into named groups of columns.

    Each row of ``hist`` (an x-feature's located mass over ``K`` named parts or objects) is
    normalised to sum 1; a row with no mass becomes a NaN row. A column whose name (stripped,
    case-insensitive) is a member of a group goes to that group; every other column is a group
    of its own, named after the column. Returns ``((n, G) masses, names)``: the ``groups`` keys
    first in mapping order, then the ungrouped columns in column order.

    InputError for a column listed in two groups, for a group name that is also an ungrouped
    column (the names would be ambiguous) and for a member that is no column, unless it is one
    of the ``known`` names (e.g. a part of the dataset seen in none of the scored images): it
    then adds zero mass.
    """
    q, has_mass = normalised_rows(hist)
    names = [str(c) for c in column_names]
    if len(names) != q.shape[1]:
        raise InputError(f"column_names: {len(names)} names for a histogram of shape {q.shape}")
    col_keys = [_key(c) for c in names]
    present = set(col_keys)
    lookup = {_key(k) for k in known}
    owner: dict[str, str] = {}
    for group, members in groups.items():
        if isinstance(members, str):
            raise InputError(f"groups[{group!r}]: expected a list of column names, got the string {members!r}")
        for member in members:
            key = _key(member)
            if key in owner and owner[key] != str(group):
                raise InputError(f"groups: column {member!r} is listed in both {owner[key]!r} and {str(group)!r}")
            if key not in present and key not in lookup:
                raise InputError(f"groups[{group!r}]: {member!r} is not one of the columns {names}")
            owner[key] = str(group)
    group_names = [str(g) for g in groups]
    ungrouped = [i for i, k in enumerate(col_keys) if k not in owner]
    clash = {_key(g) for g in group_names} & {col_keys[i] for i in ungrouped}
    if clash:
        raise InputError(f"groups: {sorted(clash)} is both a group name and an ungrouped column")
    out_names = group_names + [names[i] for i in ungrouped]
    out = np.zeros((q.shape[0], len(out_names)), dtype=np.float64)
    index = {g: j for j, g in enumerate(group_names)}
    for i, k in enumerate(col_keys):
        if k in owner:
            out[:, index[owner[k]]] += q[:, i]
    for j, i in enumerate(ungrouped):
        out[:, len(group_names) + j] = q[:, i]
    out[~has_mass] = np.nan
    return out, out_names


def _qualifying(mass: Any, group_names: Sequence[str], shares: Any, used: Sequence[str],
                min_share: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(top group, its mass fraction, used group indices)`` of the qualifying x-features.

    Qualifying: a finite share ``>= min_share`` and a mass row that is neither NaN nor all zero.
    """
    m = _numeric(mass, "mass")
    if m.ndim != 2:
        raise InputError(f"mass: expected shape (n, G), got {m.shape}")
    if len(group_names) != m.shape[1]:
        raise InputError(f"group_names: {len(group_names)} names for a mass array of shape {m.shape}")
    if np.isinf(m).any() or (m[np.isfinite(m)] < 0).any():
        raise InputError("mass: contains inf or negative values")
    s = _numeric(shares, "shares").ravel()
    if s.shape[0] != m.shape[0]:
        raise InputError(f"shares: expected {m.shape[0]} values (one per mass row), got {s.shape[0]}")
    if not math.isfinite(float(min_share)):
        raise InputError(f"min_share: expected a finite number, got {min_share}")
    keys = [_key(g) for g in group_names]
    cols: list[int] = []
    for name in used:
        key = _key(name)
        if key not in keys:
            raise InputError(f"used: {name!r} is not one of the groups {list(group_names)}")
        col = keys.index(key)
        if col not in cols:
            cols.append(col)
    total = np.where(np.isnan(m).any(axis=1), 0.0, np.nansum(m, axis=1))
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(s) & (s >= min_share) & (total > 0)
    rows = m[ok]
    top = np.argmax(rows, axis=1) if rows.shape[0] else np.zeros(0, dtype=np.int64)
    frac = rows[np.arange(rows.shape[0]), top] / total[ok] if rows.shape[0] else np.zeros(0)
    return top, frac, cols


def causal_coverage(mass: Any, group_names: Sequence[str], shares: Any, used: Sequence[str],
                    min_share: float = 0.1) -> float:
    """Share of causally used parts that are the top part of a distinct live x-feature
    carrying at least ``min_share`` of ``y-hat`` on average.

    ``mass`` is ``(n, G)`` (e.g. from :func:`group_mass`), ``shares`` the ``(n,)``
    :func:`feature_shares`, ``used`` the :func:`used_parts` (names matched to ``group_names``
    stripped and case-insensitively; a name that is no group is an InputError). An x-feature
    qualifies with a share ``>= min_share`` (NaN never does) and a mass row that is not NaN
    (nor all zero); its top group is the argmax of its row (ties: the first). Each qualifying
    x-feature covers at most one part, so two x-features on the same part count once. NaN when
    ``used`` is empty or no share is finite (e.g. ``y-hat`` not positive on average, where
    shares are undefined). A single map of ``y-hat`` is scored with ``shares=[1.0]``.
    """
    top, _, cols = _qualifying(mass, group_names, shares, used, min_share)
    if not cols or not np.isfinite(_numeric(shares, "shares")).any():
        return float("nan")  # nothing to judge by: no used part, or no x-feature share is known
    tops = set(top.tolist())
    return float(np.mean([c in tops for c in cols]))


def concept_purity(mass: Any, group_names: Sequence[str], shares: Any, used: Sequence[str],
                   min_share: float = 0.1) -> float:
    """Mean, over the qualifying x-features whose top group is a used part (as in
    :func:`causal_coverage`), of the fraction of their mass on that top group.

    1 means every covering x-feature lies entirely on its part. NaN when no qualifying
    x-feature lands on a used part.
    """
    top, frac, cols = _qualifying(mass, group_names, shares, used, min_share)
    on_used = np.isin(top, np.asarray(cols, dtype=np.int64))
    if not on_used.any():
        return float("nan")
    return float(frac[on_used].mean())
