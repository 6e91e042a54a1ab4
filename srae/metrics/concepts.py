"""Concept recovery on data with ground truth (beyond the paper).

Synthetic datasets name, per class, the parts (or objects) that carry the class evidence.
Given an x-feature histogram over parts/objects (rows of ``part_probabilities`` or
``object_probabilities`` averaged over images), this module measures how much of the
x-features' located mass falls on those evidence columns:

- ``evidence_mass``: per x-feature, the fraction of its (row-normalised) mass on evidence.
- ``concept_recovery``: the mean of that fraction over x-features, a score in [0, 1]
  (optionally weighted, e.g. by ``|v_i|``).
- ``concept_coverage``: the fraction of evidence columns that are the top column of at least
  one x-feature (do the x-features find *all* the evidence, not just one part?).
- ``top_part_table``: per x-feature, the column it lands on most.
- ``concept_summary``: all of these for one histogram, with evidence objects absent from the
  scored images counted as missed (``with_evidence_columns``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from srae.errors import InputError
from srae.arrays import as_numpy
from srae.metrics.locality import normalised_rows

log = logging.getLogger(__name__)


def evidence_columns(column_names: Sequence[str], evidence: Sequence[str]) -> list[int]:
    """Indices of the histogram columns whose name is an evidence name.

    Matching is exact after stripping and lower-casing. An evidence name that matches no
    column raises InputError (a typo in the ground truth would otherwise score 0 silently).
    """
    norm = [str(c).strip().lower() for c in column_names]
    out: list[int] = []
    for name in evidence:
        key = str(name).strip().lower()
        hits = [i for i, c in enumerate(norm) if c == key]
        if not hits:
            raise InputError(f"evidence: {name!r} is not one of the columns {list(column_names)}")
        out.extend(hits)
    return sorted(set(out))


def with_evidence_columns(hist: Any, column_names: Sequence[str], evidence: Sequence[str],
                          known: Sequence[str] = ()) -> tuple[np.ndarray, list[str], list[int]]:
    """``(hist, names, evidence columns)`` ready for the concept statistics.

    An evidence name that is no column but one of the ``known`` names (e.g. an object of the
    dataset that appears in none of the scored images) gets a zero column, so recovery and
    coverage count it as missed instead of failing. A name that is neither a column nor known
    still raises InputError (a typo in the ground truth)."""
    q = as_numpy(hist, "hist").astype(np.float64)
    if q.ndim != 2 or q.shape[1] != len(column_names):
        raise InputError(f"column_names: {len(column_names)} names for a histogram of shape {q.shape}")
    names = [str(c) for c in column_names]
    have = {n.strip().lower() for n in names}
    lookup = {str(k).strip().lower() for k in known}
    absent = []
    for name in evidence:
        key = str(name).strip().lower()
        if key not in have and key in lookup:
            absent.append(str(name).strip())
            have.add(key)
    if absent:
        log.info("evidence %s: in none of the scored images; counted as missed", absent)
        q = np.concatenate([q, np.zeros((q.shape[0], len(absent)))], axis=1)
        names += absent
    return q, names, evidence_columns(names, evidence)


def _check_columns(columns: Sequence[int], k: int) -> np.ndarray:
    raw = np.asarray(list(columns))
    if raw.size and (raw.dtype == bool or not np.issubdtype(raw.dtype, np.number)
                     or not np.array_equal(raw, np.round(raw))):
        raise InputError(f"evidence columns {raw.tolist()}: expected integer column indices")
    cols = raw.astype(np.int64)
    if cols.size and (cols.min() < 0 or cols.max() >= k):
        raise InputError(f"evidence columns {cols.tolist()} out of range for {k} histogram columns")
    return cols


def evidence_mass(hist: Any, columns: Sequence[int]) -> np.ndarray:
    """``(n,)`` fraction of each row's mass on ``columns``; NaN for a row with no mass."""
    q, has_mass = normalised_rows(hist)
    cols = _check_columns(columns, q.shape[1])
    mass = q[:, cols].sum(axis=1) if cols.size else np.zeros(q.shape[0])
    return np.where(has_mass, np.clip(mass, 0.0, 1.0), np.nan)


def concept_recovery(hist: Any, columns: Sequence[int], weights: Any = None) -> float:
    """Mean (or ``weights``-weighted mean) of ``evidence_mass`` over x-features with mass.

    Returns a float in [0, 1], or NaN when no x-feature has any mass (callers drop it).
    """
    mass = evidence_mass(hist, columns)
    ok = ~np.isnan(mass)
    if not ok.any():
        return float("nan")
    if weights is None:
        return float(mass[ok].mean())
    w = np.abs(as_numpy(weights, "weights").astype(np.float64).ravel())
    if w.shape != mass.shape or not np.isfinite(w).all():
        raise InputError(f"weights: expected {mass.shape[0]} finite values, got shape {w.shape}")
    if w[ok].sum() <= 0:
        return float(mass[ok].mean())
    return float(np.sum(w[ok] * mass[ok]) / np.sum(w[ok]))


def concept_coverage(hist: Any, columns: Sequence[int]) -> float:
    """Fraction of evidence columns that are the top column of at least one x-feature."""
    q, has_mass = normalised_rows(hist)
    cols = _check_columns(columns, q.shape[1])
    if cols.size == 0:
        return float("nan")
    tops = set(np.argmax(q[has_mass], axis=1).tolist()) if has_mass.any() else set()
    return float(np.mean([int(c) in tops for c in cols]))


def top_part_table(hist: Any, column_names: Sequence[str], columns: Sequence[int]) -> pd.DataFrame:
    """Per x-feature: the column it lands on most, its share, and the evidence share.

    Columns of the frame: ``feature`` (0-based), ``top_part`` (name, or "" with no mass),
    ``top_mass``, ``evidence_mass`` and ``on_evidence`` (the top column is an evidence one).
    """
    q, has_mass = normalised_rows(hist)
    if len(column_names) != q.shape[1]:
        raise InputError(f"column_names: {len(column_names)} names for {q.shape[1]} histogram columns")
    cols = _check_columns(columns, q.shape[1])
    top = np.argmax(q, axis=1)
    ev = evidence_mass(q, cols)
    return pd.DataFrame(
        {
            "feature": np.arange(q.shape[0]),
            "top_part": [str(column_names[t]) if m else "" for t, m in zip(top, has_mass)],
            "top_mass": np.where(has_mass, q[np.arange(q.shape[0]), top], np.nan),
            "evidence_mass": ev,
            "on_evidence": [bool(m and t in set(cols.tolist())) for t, m in zip(top, has_mass)],
        }
    )


def concept_summary(hist: Any, column_names: Sequence[str], evidence: Sequence[str],
                    known: Sequence[str] = ()) -> tuple[dict[str, float], pd.DataFrame]:
    """``concept_recovery`` and ``concept_coverage`` (NaN ones left out) and the
    :func:`top_part_table` of one mean histogram, with absent ``known`` evidence names as zero
    columns (:func:`with_evidence_columns`)."""
    q, names, cols = with_evidence_columns(hist, column_names, evidence, known)
    values = {"concept_recovery": concept_recovery(q, cols), "concept_coverage": concept_coverage(q, cols)}
    return {k: v for k, v in values.items() if not np.isnan(v)}, top_part_table(q, names, cols)
