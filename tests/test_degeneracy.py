"""Degeneracy and causal-coverage scores against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from srae.errors import InputError
from srae.metrics.degeneracy import (
    causal_coverage,
    concept_purity,
    contribution_shares,
    degeneracy_summary,
    feature_shares,
    group_mass,
    n_eff,
    part_effect_summary,
    top_share,
    used_parts,
)

# Row shares (0.75, 0.25) and (0.5, 0.5): mean p = (0.625, 0.375).
C2 = np.array([[3.0, 1.0], [1.0, 1.0]])
# exp(-(0.625 ln 0.625 + 0.375 ln 0.375)) = exp(0.6615632...)
N_EFF_C2 = 1.9378192408783848


# --- contributions ---------------------------------------------------------------------------


def test_contribution_shares_by_hand() -> None:
    shares = contribution_shares(C2)
    assert shares.dtype == np.float64
    assert shares.tolist() == [[0.75, 0.25], [0.5, 0.5]]


def test_contribution_shares_drop_zero_rows_and_use_absolute_values() -> None:
    shares = contribution_shares([[0.0, 0.0], [2.0, -2.0], [0.0, 0.0]])
    assert shares.shape == (1, 2)
    assert shares[0].tolist() == [0.5, 0.5]


def test_top_share_and_n_eff_by_hand() -> None:
    assert top_share(C2) == pytest.approx(0.625)  # (0.75 + 0.5) / 2
    assert n_eff(C2) == pytest.approx(N_EFF_C2)


def test_zero_row_is_dropped() -> None:
    c = np.array([[3.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    assert top_share(c) == pytest.approx(0.625)
    assert n_eff(c) == pytest.approx(N_EFF_C2)


def test_negative_contributions() -> None:
    assert top_share([[2.0, -2.0]]) == pytest.approx(0.5)
    assert n_eff([[2.0, -2.0]]) == pytest.approx(2.0)
    assert top_share([[-1.0, -3.0]]) == pytest.approx(-0.25)  # signed max -1 over 4


def test_single_feature() -> None:
    assert top_share([[2.0], [5.0]]) == pytest.approx(1.0)
    assert n_eff([[2.0], [5.0]]) == pytest.approx(1.0)
    assert top_share([[-2.0]]) == pytest.approx(-1.0)


def test_degenerate_and_even_explanations_bound_n_eff() -> None:
    one = [[4.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert top_share(one) == pytest.approx(1.0)
    assert n_eff(one) == pytest.approx(1.0)
    even = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert top_share(even) == pytest.approx(0.3333333333333333)
    assert n_eff(even) == pytest.approx(3.0)


def test_no_mass_gives_nan() -> None:
    assert math.isnan(top_share([[0.0, 0.0]]))
    assert math.isnan(n_eff([[0.0, 0.0]]))
    assert math.isnan(top_share(np.zeros((0, 3))))
    assert math.isnan(n_eff(np.zeros((0, 3))))
    assert contribution_shares(np.zeros((0, 3))).shape == (0, 3)


def test_feature_shares_by_hand() -> None:
    # column means (2, 1), mean y = 4
    assert feature_shares(C2, [5.0, 3.0]).tolist() == pytest.approx([0.5, 0.25])


def test_feature_shares_nan_cases() -> None:
    assert np.isnan(feature_shares(C2, [-1.0, 1.0])).all()  # mean(y) = 0
    assert np.isnan(feature_shares(C2, [-3.0, 1.0])).all()
    empty = feature_shares(np.zeros((0, 2)), np.zeros(0))
    assert empty.shape == (2,)
    assert np.isnan(empty).all()


def test_degeneracy_summary() -> None:
    out = degeneracy_summary(C2, [5.0, 3.0])
    assert set(out) == {"top_share", "n_eff", "feature_shares"}
    assert out["top_share"] == pytest.approx(0.625)
    assert out["n_eff"] == pytest.approx(N_EFF_C2)
    assert isinstance(out["feature_shares"], list)
    assert out["feature_shares"] == pytest.approx([0.5, 0.25])


@pytest.mark.parametrize(
    "c, y",
    [
        ([1.0, 2.0], [1.0]),  # 1-D contributions
        (np.ones((2, 2, 1)), [1.0, 1.0]),  # 3-D contributions
        ([[1.0, np.nan]], [1.0]),  # NaN
        ([["a", "b"]], [1.0]),  # not numbers
        (C2, [1.0, 2.0, 3.0]),  # y of another length
        (C2, [[1.0, 2.0]]),  # y 2-D
        (C2, [1.0, np.inf]),  # y not finite
    ],
)
def test_bad_contribution_inputs(c, y) -> None:
    with pytest.raises(InputError):
        degeneracy_summary(c, y)


def test_bad_contributions_one_line_message() -> None:
    with pytest.raises(InputError, match=r"contributions: expected shape \(M, n\)") as info:
        top_share([1.0, 2.0])
    assert "\n" not in str(info.value)


# --- used parts ------------------------------------------------------------------------------

# Means: crown 0.5, wing 10, belly 2, beak -3, tail 3. Sum of positive means 15.5, 10% = 1.55.
PLANTED = {
    "crown": [0.4, 0.6, 0.5, 0.5],  # reliable (SE 0.0408) but 0.5 < 1.55: too small
    "wing": [10.0, 11.0, 9.0, 10.0],  # used (SE 0.408)
    "belly": [8.0, -6.0, 9.0, -3.0],  # mean 2 >= 1.55 but SE 3.81: 2 - 7.6 < 0, noise
    "beak": [-3.0, -2.0, -4.0, -3.0],  # negative
    "tail": [3.0, 3.5, 2.5, 3.0],  # used, listed after wing
}


def test_used_parts_planted() -> None:
    assert used_parts(PLANTED) == ["wing", "tail"]


def test_used_parts_thresholds() -> None:
    assert used_parts(PLANTED, min_fraction=0.0) == ["crown", "wing", "tail"]
    assert used_parts(PLANTED, z=0.0) == ["wing", "belly", "tail"]
    assert used_parts(PLANTED, min_fraction=0.5) == ["wing"]  # 10 >= 7.75, 3 < 7.75


def test_used_parts_needs_two_finite_values() -> None:
    drops = {"wing": [5.0, np.nan, np.inf], "tail": [1.0, 1.2]}
    # wing has one finite value (mean 5, no SE): not used, but its mean counts in the total
    assert used_parts(drops) == ["tail"]
    assert used_parts(drops, min_fraction=0.2) == []  # 1.1 < 0.2 * 6.1
    assert used_parts({}) == []


def test_part_effect_summary_by_hand() -> None:
    table = part_effect_summary(PLANTED)
    assert list(table.columns) == ["part", "mean", "se", "count", "share", "used"]
    assert table["part"].tolist() == ["crown", "wing", "belly", "beak", "tail"]
    assert table["mean"].tolist() == pytest.approx([0.5, 10.0, 2.0, -3.0, 3.0])
    assert table["se"].tolist() == pytest.approx(
        [0.040824829046386304, 0.408248290463863, 3.8078865529319543, 0.408248290463863,
         0.2041241452319315])
    assert table["count"].tolist() == [4, 4, 4, 4, 4]
    assert table["share"].tolist() == pytest.approx(
        [0.5 / 15.5, 10.0 / 15.5, 2.0 / 15.5, -3.0 / 15.5, 3.0 / 15.5])
    assert table["used"].tolist() == [False, True, False, False, True]
    assert table["used"].dtype == bool


def test_part_effect_summary_no_positive_effect() -> None:
    table = part_effect_summary({"beak": [-1.0, -2.0], "wing": [np.nan]})
    assert np.isnan(table["share"]).all()
    assert table["count"].tolist() == [2, 0]
    assert math.isnan(table["mean"].iloc[1])
    assert not table["used"].any()


def test_used_parts_bad_inputs() -> None:
    with pytest.raises(InputError, match="drops"):
        used_parts({"wing": ["a", "b"]})
    with pytest.raises(InputError, match="min_fraction"):
        used_parts(PLANTED, min_fraction=-0.1)
    with pytest.raises(InputError, match="z"):
        used_parts(PLANTED, z=float("nan"))


# --- group mass ------------------------------------------------------------------------------

WING_COLUMNS = ["left wing", "Right Wing ", "belly", "context"]
WING_HIST = np.array(
    [
        [1.0, 1.0, 2.0, 0.0],  # -> wing 0.5, belly 0.5, context 0
        [0.0, 0.0, 0.0, 0.0],  # dead feature -> NaN row
        [0.0, 3.0, 0.0, 1.0],  # -> wing 0.75, belly 0, context 0.25
    ]
)


def test_group_mass_wing_grouped() -> None:
    mass, names = group_mass(WING_HIST, WING_COLUMNS, {"wing": ["left wing", "right wing"]})
    assert names == ["wing", "belly", "context"]
    assert mass.shape == (3, 3)
    assert mass[0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert np.isnan(mass[1]).all()
    assert mass[2].tolist() == pytest.approx([0.75, 0.0, 0.25])


def test_group_mass_order_groups_first_then_columns() -> None:
    hist = [[1.0, 2.0, 3.0, 4.0]]
    mass, names = group_mass(hist, ["left wing", "belly", "right wing", "tail"],
                             {"tail": ["Tail"], "wing": ["left wing", "right wing"]})
    assert names == ["tail", "wing", "belly"]
    assert mass[0].tolist() == pytest.approx([0.4, 0.4, 0.2])


def test_group_mass_without_groups_normalises() -> None:
    mass, names = group_mass([[1.0, 3.0]], ["a", "b"], {})
    assert names == ["a", "b"]
    assert mass.tolist() == [[0.25, 0.75]]


def test_group_mass_known_member_adds_zero_mass() -> None:
    mass, names = group_mass(WING_HIST, WING_COLUMNS,
                             {"wing": ["left wing", "right wing"], "tail": ["tail"]}, known=["Tail"])
    assert names == ["wing", "tail", "belly", "context"]
    assert mass[0].tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert np.isnan(mass[1]).all()


def test_group_mass_errors() -> None:
    with pytest.raises(InputError, match="both"):
        group_mass(WING_HIST, WING_COLUMNS, {"wing": ["left wing"], "side": ["Left Wing"]})
    with pytest.raises(InputError, match="tail"):
        group_mass(WING_HIST, WING_COLUMNS, {"tail": ["tail"]})
    with pytest.raises(InputError, match="column_names"):
        group_mass(WING_HIST, ["left wing", "right wing"], {})
    with pytest.raises(InputError, match="belly"):  # group name equals an ungrouped column
        group_mass(WING_HIST, WING_COLUMNS, {"belly": ["left wing"]})
    with pytest.raises(InputError, match="hist"):
        group_mass([[1.0, -1.0, 0.0, 0.0]], WING_COLUMNS, {})
    with pytest.raises(InputError, match="string"):
        group_mass(WING_HIST, WING_COLUMNS, {"wing": "left wing"})


# --- causal coverage and purity --------------------------------------------------------------

GROUPS = ["wing", "belly", "tail", "context"]
MASS = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],  # f0: wing, share 0.5
        [0.6, 0.2, 0.2, 0.0],  # f1: wing again, share 0.3
        [0.1, 0.0, 0.9, 0.0],  # f2: tail, but share 0.05 < 0.1
        [np.nan] * 4,  # f3: dead
        [0.1, 0.1, 0.0, 0.8],  # f4: context (not used), share 0.2
        [0.0, 0.0, 0.8, 0.2],  # f5: tail, share NaN
    ]
)
SHARES = [0.5, 0.3, 0.05, 0.4, 0.2, np.nan]
USED = ["wing", "tail"]


def test_causal_coverage_two_features_on_one_part() -> None:
    assert causal_coverage(MASS, GROUPS, SHARES, USED) == pytest.approx(0.5)


def test_causal_coverage_low_share_feature_counts_when_threshold_lowered() -> None:
    assert causal_coverage(MASS, GROUPS, SHARES, USED, min_share=0.01) == pytest.approx(1.0)


def test_causal_coverage_single_map() -> None:
    used = ["wing", "tail", "belly"]
    assert causal_coverage([[0.1, 0.2, 0.6, 0.1]], GROUPS, [1.0], used) == pytest.approx(1.0 / 3.0)
    assert causal_coverage([[0.1, 0.2, 0.1, 0.6]], GROUPS, [1.0], used) == pytest.approx(0.0)


def test_causal_coverage_ties_go_to_first_group() -> None:
    mass = [[0.4, 0.2, 0.4, 0.0]]
    assert causal_coverage(mass, GROUPS, [1.0], ["tail"]) == pytest.approx(0.0)
    assert causal_coverage(mass, GROUPS, [1.0], ["wing"]) == pytest.approx(1.0)


def test_causal_coverage_names_case_insensitive_and_deduplicated() -> None:
    assert causal_coverage(MASS, GROUPS, SHARES, [" Wing", "TAIL", "wing"]) == pytest.approx(0.5)


def test_causal_coverage_empty_used_is_nan() -> None:
    assert math.isnan(causal_coverage(MASS, GROUPS, SHARES, []))


def test_concept_purity_by_hand() -> None:
    # f0 (0.7 on wing) and f1 (0.6 on wing); f4 lands on context, f2/f3/f5 do not qualify
    assert concept_purity(MASS, GROUPS, SHARES, USED) == pytest.approx(0.65)
    # with f2 qualifying: (0.7 + 0.6 + 0.9) / 3
    assert concept_purity(MASS, GROUPS, SHARES, USED, min_share=0.01) == pytest.approx(0.7333333333333334)


def test_concept_purity_none_is_nan() -> None:
    assert math.isnan(concept_purity(MASS, GROUPS, SHARES, ["belly"]))
    assert math.isnan(concept_purity(MASS, GROUPS, SHARES, []))


def test_coverage_from_group_mass() -> None:
    mass, names = group_mass(WING_HIST, WING_COLUMNS, {"wing": ["left wing", "right wing"]})
    # f0 ties wing/belly at 0.5 -> wing; f2 -> wing. belly is never covered.
    assert causal_coverage(mass, names, [0.6, 0.2, 0.4], ["wing", "belly"]) == pytest.approx(0.5)
    assert concept_purity(mass, names, [0.6, 0.2, 0.4], ["wing", "belly"]) == pytest.approx(0.625)


def test_coverage_errors() -> None:
    with pytest.raises(InputError, match="shares"):
        causal_coverage(MASS, GROUPS, [0.5, 0.5], USED)
    with pytest.raises(InputError, match="group_names"):
        causal_coverage(MASS, GROUPS[:3], SHARES, USED)
    with pytest.raises(InputError, match="mass"):
        causal_coverage([0.5, 0.5], ["a", "b"], [1.0], ["a"])
    with pytest.raises(InputError, match="mass"):
        concept_purity([[0.5, -0.5]], ["a", "b"], [1.0], ["a"])
    with pytest.raises(InputError, match="wings"):
        causal_coverage(MASS, GROUPS, SHARES, ["wings"])


def test_coverage_is_undefined_without_any_known_share():
    mass = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert np.isnan(causal_coverage(mass, ["wing", "tail"], [np.nan, np.nan], ["wing", "tail"]))
    assert np.isnan(concept_purity(mass, ["wing", "tail"], [np.nan, np.nan], ["wing", "tail"]))
    assert causal_coverage(mass, ["wing", "tail"], [0.05, np.nan], ["wing", "tail"]) == 0.0  # known, too small
