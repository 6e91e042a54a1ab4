"""F_reg and F_cls against loop references and hand cases."""

import numpy as np
import pytest
import torch

from srae.metrics.faithfulness import f_cls, f_reg


def test_f_reg_loop(rng):
    a, b = rng.normal(size=50), rng.normal(size=50)
    ref = sum(abs(x - y) for x, y in zip(a, b)) / 50
    assert f_reg(a, b) == pytest.approx(ref, rel=1e-12)
    assert f_reg(torch.tensor(a), torch.tensor(b)) == pytest.approx(ref, rel=1e-12)


def test_f_cls_hand_case():
    logits = np.array([[5.0, 1.0, 0.0], [0.0, 3.0, 2.0], [1.0, 0.0, 4.0]])
    # target 1: row0 argmax 0 stays if y_bar < 5; row1 argmax 1 stays if y_bar > 2; row2 stays if < 4
    assert f_cls(np.array([4.0, 2.5, 3.9]), logits, 1) == 1.0
    assert f_cls(np.array([6.0, 2.5, 3.9]), logits, 1) == pytest.approx(2 / 3)
    assert f_cls(np.array([6.0, 1.0, 5.0]), logits, 1) == 0.0


def test_f_cls_loop(rng):
    logits = rng.normal(size=(40, 6))
    y_bar = logits[:, 2] + rng.normal(scale=0.8, size=40)
    ref = 0
    for i in range(40):
        row = list(logits[i])
        orig = row.index(max(row))
        row[2] = y_bar[i]
        ref += row.index(max(row)) == orig
    assert f_cls(y_bar, logits, 2) == pytest.approx(ref / 40)


def test_bad_shapes():
    with pytest.raises(ValueError):
        f_reg(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        f_cls(np.zeros(3), np.zeros((3, 2)), 5)


def test_non_finite_or_malformed_inputs_are_named():
    """NaN scored as NaN (f_reg) or as a plausible fraction (f_cls): both silently wrong."""
    from srae.errors import InputError
    from srae.metrics.faithfulness import f_cls, f_reg

    with pytest.raises(InputError, match="f_reg: y_bar: contains NaN"):
        f_reg(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(InputError, match="f_reg: y_bar"):
        f_reg(None, None)
    logits = np.array([[1.0, 2.0], [3.0, 0.5]])
    with pytest.raises(InputError, match="f_cls: logits: contains NaN"):
        f_cls(np.array([1.0, 1.0]), np.where(logits > 2.5, np.nan, logits), 0)
    with pytest.raises(InputError, match="f_cls: y_bar: contains NaN"):
        f_cls(np.array([np.inf, 1.0]), logits, 0)
    for bad in (1.5, "1", None, True):
        with pytest.raises(InputError, match="must be a class index"):
            f_cls(np.array([1.0, 1.0]), logits, bad)
    assert f_cls(np.array([1.0, 1.0]), logits, np.int64(1)) == 0.5  # row 0 flips to class 0; row 1 keeps 0
