"""Concept recovery scores on hand-built histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from srae.errors import InputError
from srae.metrics.concepts import (
    concept_coverage,
    concept_recovery,
    evidence_columns,
    evidence_mass,
    concept_summary,
    top_part_table,
    with_evidence_columns,
)

NAMES = ["beak", "crown", "wing", "tail", "context"]
HIST = np.array(
    [
        [2.0, 0.0, 1.0, 0.0, 1.0],  # 3/4 of its mass on beak + wing
        [0.0, 0.0, 0.0, 3.0, 1.0],  # none on evidence
        [0.0, 0.0, 0.0, 0.0, 0.0],  # dead feature
        [0.0, 0.0, 5.0, 0.0, 0.0],  # all on wing
    ]
)


def test_evidence_columns_by_name() -> None:
    assert evidence_columns(NAMES, ["Wing", " beak"]) == [0, 2]
    with pytest.raises(InputError, match="tai1"):
        evidence_columns(NAMES, ["tai1"])


def test_mass_recovery_and_coverage() -> None:
    cols = evidence_columns(NAMES, ["beak", "wing"])
    mass = evidence_mass(HIST, cols)
    np.testing.assert_allclose(mass[[0, 1, 3]], [0.75, 0.0, 1.0], atol=1e-15)
    assert math.isnan(mass[2])
    assert concept_recovery(HIST, cols) == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    weights = np.array([1.0, -3.0, 7.0, 0.0])  # |v_i|; the dead feature's weight is ignored
    assert concept_recovery(HIST, cols, weights) == pytest.approx((0.75 * 1 + 0.0 * 3) / 4)
    # beak is the top of feature 0, wing of feature 3: both evidence columns are found.
    assert concept_coverage(HIST, cols) == 1.0
    assert concept_coverage(HIST, evidence_columns(NAMES, ["beak", "crown"])) == 0.5
    assert math.isnan(concept_recovery(np.zeros((2, 5)), cols))


def test_top_part_table() -> None:
    table = top_part_table(HIST, NAMES, [0, 2])
    assert table["top_part"].tolist() == ["beak", "tail", "", "wing"]
    np.testing.assert_allclose(table["top_mass"].to_numpy()[[0, 1, 3]], [0.5, 0.75, 1.0])
    assert table["on_evidence"].tolist() == [True, False, False, True]
    with pytest.raises(InputError, match="column_names"):
        top_part_table(HIST, NAMES[:-1], [0])


def test_absent_known_evidence_is_a_zero_column() -> None:
    names = ["bed", "lamp"]
    hist = np.array([[3.0, 1.0], [0.0, 2.0]])
    q, out_names, cols = with_evidence_columns(hist, names, ["Bed", "pillow"], known=["bed", "lamp", "Pillow"])
    assert out_names == ["bed", "lamp", "pillow"] and cols == [0, 2]
    np.testing.assert_array_equal(q, [[3.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    values, table = concept_summary(hist, names, ["bed", "pillow"], known=["pillow"])
    assert values["concept_recovery"] == pytest.approx((0.75 + 0.0) / 2)
    assert values["concept_coverage"] == 0.5  # bed is found, pillow never
    assert table["top_part"].tolist() == ["bed", "lamp"]
    with pytest.raises(InputError, match="pilow"):
        with_evidence_columns(hist, names, ["pilow"], known=["pillow"])
    with pytest.raises(InputError, match="column_names"):
        with_evidence_columns(hist, names[:1], ["bed"])


def test_evidence_columns_must_be_integer_indices() -> None:
    h = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    assert concept_recovery(h, np.array([0, 2])) == pytest.approx((4 / 6 + 0.0) / 2)
    for bad in ([0.7], [True], ["a"]):  # 0.7 used to be read as column 0
        with pytest.raises(InputError, match="expected integer column indices"):
            concept_recovery(h, bad)
