"""Faithfulness of an explanation's prediction to the network's logit (paper Sec. 3)."""

from __future__ import annotations

import numpy as np

from srae.arrays import as_numpy
from srae.errors import InputError


def _np(x, name: str) -> np.ndarray:
    """``x`` as float64, refusing what cannot be a finite score input (NaN would score as a
    plausible number in f_cls and as NaN in f_reg, silently either way)."""
    try:
        arr = np.asarray(as_numpy(x, name), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: not an array of numbers ({exc})") from None
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or inf")
    return arr


def f_reg(y_bar, y_hat) -> float:
    """Mean absolute difference between the explainer's prediction and the logit."""
    y_bar, y_hat = _np(y_bar, "f_reg: y_bar"), _np(y_hat, "f_reg: y_hat")
    if y_bar.shape != y_hat.shape:
        raise InputError(f"f_reg: shapes differ {y_bar.shape} vs {y_hat.shape}")
    if y_bar.size == 0:
        return float("nan")
    return float(np.mean(np.abs(y_bar - y_hat)))


def f_cls(y_bar, logits, target: int) -> float:
    """Fraction of rows whose argmax is unchanged when ``logits[:, target]`` is replaced by ``y_bar``."""
    y_bar, logits = _np(y_bar, "f_cls: y_bar"), _np(logits, "f_cls: logits")
    if logits.ndim != 2 or y_bar.shape != (logits.shape[0],):
        raise InputError(f"f_cls: expected y_bar (M,) and logits (M, C), got {y_bar.shape} and {logits.shape}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise InputError(f"f_cls: target {target!r} must be a class index (int)")
    if not 0 <= target < logits.shape[1]:
        raise InputError(f"f_cls: target {target} outside 0..{logits.shape[1] - 1}")
    if logits.shape[0] == 0:
        return float("nan")
    replaced = logits.copy()
    replaced[:, target] = y_bar
    return float(np.mean(np.argmax(replaced, axis=1) == np.argmax(logits, axis=1)))
