"""Findings with their strength (k of N categories, bootstrap intervals), the part-effect and
degeneracy tables: hand-computed values on small fabricated long frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from srae import report as R
from srae.report_html import ReportInputs, build_report, summary_line


def row(cat, method, metric, split, value, n=5, **hp):
    return R.metric_row("exp", cat, method, metric, split, value, n, hp)


def frame(spec: dict[tuple[str, str, str], list[float]]) -> pd.DataFrame:
    """``{(metric, split, method): [value per category 0, 1, ...]}``; NaN entries are left out."""
    rows = [row(c, method, metric, split, v) for (metric, split, method), vals in spec.items()
            for c, v in enumerate(vals) if not (isinstance(v, float) and math.isnan(v))]
    return pd.DataFrame(rows)


def findings(df: pd.DataFrame, **kw) -> list[R.Finding]:
    return R.qualitative_findings(R.table_main(df), df, **kw)


# ---------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_hand_values():
    assert R.bootstrap_ci([0.25, 0.25, 0.25]) == (0.25, 0.25)  # all equal: exactly that value
    assert R.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)  # resampled means 0, .5, 1 with 1/4, 1/2, 1/4
    lo, hi = R.bootstrap_ci([1.0, 2.0, 4.0, 8.0])
    assert 1.0 <= lo < np.mean([1, 2, 4, 8]) < hi <= 8.0
    assert R.bootstrap_ci([1.0, 2.0, 4.0, 8.0]) == (lo, hi)  # seeded: the same every call
    rng = np.random.default_rng(R.BOOTSTRAP_SEED)  # the documented procedure
    v = np.array([1.0, 2.0, 4.0, 8.0])
    means = v[rng.integers(0, 4, size=(R.BOOTSTRAP_RESAMPLES, 4))].mean(axis=1)
    assert (lo, hi) == tuple(np.percentile(means, [2.5, 97.5]))
    assert all(math.isnan(x) for x in R.bootstrap_ci([]))
    assert R.bootstrap_ci([0.5, math.inf, math.nan]) == (0.5, 0.5)  # non-finite values are left out


# ---------------------------------------------------------------------- finding 1, 2
def test_faithfulness_k_of_n_uses_the_per_category_minimum():
    df = frame({("F_cls", "test", "SRAE"): [0.99, 0.96, 0.99], ("F_cls", "test", "NN"): [1.0, 1.0, 0.99],
                ("F_cls", "test", "SAE"): [0.995, 0.99, 1.0], ("F_reg", "test", "SRAE"): [0.1, 0.1, 0.1],
                ("F_reg", "test", "NN"): [0.08, 0.08, 0.08], ("F_reg", "test", "SAE"): [0.09, 0.09, 0.09]})
    f = findings(df)[0]
    assert f.holds is True  # means: SRAE 98% within 2 points of min(99.67%, 99.5%)
    assert f.k_of_n == (2, 3)  # category 1: 96% is 3 points below min(100%, 99%)
    label, mean, lo, hi = f.intervals[0]
    assert label == "SRAE - min(NN, SAE) test F_cls"
    assert mean == pytest.approx((-0.005 - 0.03 + 0.0) / 3)
    assert -0.03 - 1e-12 <= lo <= mean <= hi <= 1e-12
    assert "Per category: holds in 2 of 3 categories" in f.evidence
    assert f.evidence.startswith("test F_cls: SRAE 98.00%")
    assert R.qualitative_findings(R.table_main(df), df) == R.qualitative_findings(R.table_main(df), df)


def test_locality_k_of_n_and_equal_differences():
    df = frame({("locality", "test", "SRAE"): [1.0, 2.0, 1.0],
                ("locality", "test", "ExcitationBP"): [1.5, 1.5, 1.5]})
    f = findings(df)[1]
    assert f.holds is True and f.k_of_n == (2, 3) and "holds in 2 of 3 categories" in f.evidence
    # all per-category differences equal: the interval is exactly that difference
    df = frame({("locality", "test", "SRAE"): [1.0, 1.25, 1.5],
                ("locality", "test", "ExcitationBP"): [1.5, 1.75, 2.0, 9.0]})  # category 3: no SRAE value
    f = findings(df)[1]
    assert f.k_of_n == (3, 3)  # only categories with both values count in N
    assert f.intervals == (("SRAE - ExcitationBP locality", -0.5, -0.5, -0.5),)
    assert "mean SRAE - ExcitationBP locality -0.5 (95% bootstrap interval -0.5 to -0.5)" in f.evidence


def test_old_call_without_the_long_frame_omits_k_of_n():
    df = frame({("locality", "test", "SRAE"): [1.0, 2.0, 1.0],
                ("locality", "test", "ExcitationBP"): [1.5, 1.5, 1.5]})
    f = R.qualitative_findings(R.table_main(df))
    assert len(f) == 4 and all(x.k_of_n is None and x.intervals == () for x in f)
    assert "per category" not in f[1].evidence.lower() and f[1].holds is True
    with pytest.raises(TypeError, match="long metrics frame"):
        R.qualitative_findings(R.table_main(df), 0.95)


# ---------------------------------------------------------------------- finding 3
def test_orthogonality_reports_dead_x_features_both_ways():
    df = frame({("O1", "test", "SRAE"): [0.5, 0.5, 0.5], ("O1", "test", "NN"): [0.9, 0.9, 0.9],
                ("O1", "test", "SAE"): [0.7, 0.7, 0.7],
                ("O2", "test", "SRAE"): [2.0, 2.0, math.inf], ("O2", "test", "NN"): [4.0, 4.0, 4.0],
                ("O2", "test", "SAE"): [3.0, 3.0, 3.0],
                ("dead_x", "train", "SRAE"): [0.0, 0.0, 2.0], ("dead_x", "train", "NN"): [0.0, 0.0, 0.0],
                ("dead_x", "train", "SAE"): [0.0, 0.0, 0.0]})
    f = findings(df)[2]
    assert f.holds is False  # verdict on all categories: SRAE's O2 is infinite in one, NN's and SAE's never
    assert f.k_of_n == (2, 3)  # inf O2 is the worst: category 2 does not count
    assert "all categories: O1: SRAE 0.5, NN 0.9, SAE 0.7; O2: SRAE 2, NN 4, SAE 3" in f.evidence
    assert ("excluding the 1 of 3 categories with dead x-features (firing on no training image) in SRAE, NN or "
            "SAE, 2 left: O1: SRAE 0.5, NN 0.9, SAE 0.7; O2: SRAE 2, NN 4, SAE 3") in f.evidence
    o1, o2 = f.intervals
    assert o1 == ("SRAE - min(NN, SAE) O1", 0.5 - 0.7, 0.5 - 0.7, 0.5 - 0.7)
    assert o2 == ("SRAE - min(NN, SAE) O2", -1.0, -1.0, -1.0)  # over the 2 categories with finite O2
    assert "over the 2 categories with finite values" in f.evidence
    assert "dead x-features included" in f.rule
    # the categories with an infinite O2 left in the excluded means are counted
    df2 = df.copy()
    df2.loc[(df2["metric"] == "dead_x") & (df2["method"] == "SRAE"), "value"] = [0.0, 1.0, 0.0]
    ev = findings(df2)[2].evidence
    assert "excluding the 1 of 3 categories" in ev and "O2: SRAE 2 (1 of 2 inf), NN 4, SAE 3" in ev
    # no dead_x rows: said so, not guessed
    no_dead = df[df["metric"] != "dead_x"]
    assert "dead x-features not recorded (no dead_x rows)" in findings(no_dead)[2].evidence
    none_dead = df.assign(value=np.where(df["metric"] == "dead_x", 0.0, df["value"]))
    assert "no category has a dead x-feature in SRAE, NN or SAE" in findings(none_dead)[2].evidence


# ---------------------------------------------------------------------- finding 4
def test_cae_lasso_unfaithful_by_falling_f_cls_or_large_f_reg():
    spec = {("F_cls", "test", "SRAE"): [0.99, 0.99, 0.99], ("F_reg", "test", "SRAE"): [0.1, 0.1, 0.1],
            ("F_cls", "test", "CAE"): [0.90, 0.90, 0.90], ("F_reg", "test", "CAE"): [0.15, 0.15, 0.15],
            ("F_cls", "test", "Lasso"): [0.985, 0.985, 0.985], ("F_reg", "test", "Lasso"): [0.3, 0.3, 0.15]}
    df = frame(spec)
    f = findings(df)[3]
    # CAE: F_cls 9 points below SRAE's (F_reg only 1.5x); Lasso: F_reg 2.5x on average (F_cls only 0.5 below)
    assert f.holds is True
    assert "CAE: F_cls 9.00 points below SRAE's (at least 2: yes), F_reg 1.5x SRAE's (at least 2x: no)" in f.evidence
    assert "Lasso: F_cls 0.50 points below SRAE's (at least 2: no), F_reg 2.5x SRAE's (at least 2x: yes)" in f.evidence
    assert f.k_of_n == (2, 3)  # category 2: Lasso's F_reg 1.5x and F_cls 0.5 points below: faithful there
    assert "F_cls falls" in f.rule and "at least 2 points below SRAE's or its test F_reg at least 2x" in f.rule
    labels = [i[0] for i in f.intervals]
    assert labels == ["SRAE - CAE test F_cls", "CAE - SRAE test F_reg", "SRAE - Lasso test F_cls",
                      "Lasso - SRAE test F_reg"]
    # neither condition for Lasso -> does not hold
    spec[("F_reg", "test", "Lasso")] = [0.15, 0.15, 0.15]
    f = findings(frame(spec))[3]
    assert f.holds is False and f.k_of_n == (0, 3)
    # the Lasso sweep rows do not enter the per-category comparison
    sweep = pd.DataFrame([row(c, "Lasso", "F_reg", "test", 100.0, alpha=0.1, sweep=True) for c in range(3)])
    assert findings(pd.concat([frame(spec), sweep], ignore_index=True))[3].k_of_n == (0, 3)


# ---------------------------------------------------------------------- finding 5, summary
def test_concept_separation_finding_beyond_the_paper():
    df = frame({("locality", "test", "SRAE"): [1.0, 1.0, 1.0]})
    f = findings(df)
    assert len(f) == 5 and f[4].beyond_paper and f[4].holds is None and f[4].evidence == "no concept_coverage rows"
    line = summary_line(f)
    assert line.startswith("0 of 4 of the paper's qualitative findings hold on this data.")
    assert line.endswith('Beyond the paper, "x-features separate the concepts the CNN uses": not evaluated.')
    cov = frame({("concept_coverage", "test", "SRAE"): [0.75, 0.5, 1.0],
                 ("concept_coverage", "test", "ExcitationBP"): [0.5, 0.5, 0.5]})
    f5 = findings(cov)[4]
    assert f5.holds is True and f5.k_of_n == (2, 3)  # category 1: 0.5 is not above 0.5
    assert f5.intervals[0][:2] == ("SRAE - ExcitationBP concept_coverage", pytest.approx(0.25))
    assert "SRAE 0.75, ExcitationBP 0.5" in f5.evidence
    low = frame({("concept_coverage", "test", "SRAE"): [0.5, 0.5],
                 ("concept_coverage", "test", "ExcitationBP"): [0.0, 0.0]})
    assert findings(low)[4].holds is False  # above ExcitationBP, but not above 0.5
    only_srae = frame({("concept_coverage", "test", "SRAE"): [0.9, 0.9]})
    assert findings(only_srae)[4].holds is None


# ---------------------------------------------------------------------- new tables
def _part_rows() -> list[dict]:
    def pe(cat, part, value, evidence, used):
        return R.metric_row("exp", cat, "CNN", "part_effect", "test", value, None,
                            {"part": part, "evidence": evidence, "used": used, "share": 0.5, "se": 0.1, "count": 8})
    return [pe(0, "crown", 5.321, True, True), pe(0, "wing", 0.4, True, False), pe(0, "tail", -0.1, False, False),
            pe(1, "crown", 3.0, True, True), pe(1, "wing", 2.5, True, True)]


def _degeneracy_rows() -> list[dict]:
    return [row(0, "SRAE", "top_share", "test", 0.9), row(1, "SRAE", "top_share", "test", 0.7),
            row(0, "NN", "top_share", "test", 1.0), row(1, "NN", "top_share", "test", math.nan),
            row(0, "SRAE", "n_eff", "test", 2.0), row(1, "SRAE", "n_eff", "test", 3.0),
            row(0, "Grad-CAM", "concept_coverage", "test", 0.5),
            row(0, "ExcitationBP", "concept_coverage", "test", 0.5),
            row(0, "SRAE", "concept_coverage", "test", 1.0), row(1, "SRAE", "concept_coverage", "test", 0.5),
            row(0, "SRAE", "dead_x", "train", 1.0), row(1, "SRAE", "dead_x", "train", 0.0)]


def test_part_effects_table():
    df = pd.DataFrame(_part_rows())
    t = R.table_part_effects(df, ["sparrow", "finch"])
    assert list(t.index) == ["sparrow", "finch"] and list(t.columns) == ["crown", "wing", "tail"]
    assert t.loc["sparrow", "crown"] == "5.32*" and t.loc["sparrow", "wing"] == "0.40"
    assert t.loc["sparrow", "tail"] == "-0.10" and t.loc["finch", "wing"] == "2.50*"
    assert pd.isna(t.loc["finch", "tail"])
    assert R.evidence_parts_used(df) == (1, 2)  # sparrow does not use its evidence part "wing"
    assert list(R.table_part_effects(df).index) == ["0", "1"]
    assert R.table_part_effects(pd.DataFrame([row(0, "SRAE", "O1", "test", 1.0)])).empty


def test_degeneracy_table():
    t = R.table_degeneracy(pd.DataFrame(_degeneracy_rows()))
    assert list(t.index) == ["top_share", "n_eff", "concept_coverage", "dead_x"]  # purity not recorded
    assert list(t.columns) == ["SRAE", "NN", "ExcitationBP", "Grad-CAM"]
    assert t.loc["top_share", "SRAE"] == pytest.approx(0.8)
    assert t.loc["top_share", "NN"] == pytest.approx(1.0)  # the NaN category is skipped
    assert t.loc["concept_coverage", "SRAE"] == pytest.approx(0.75)
    assert t.loc["dead_x", "SRAE"] == pytest.approx(0.5) and math.isnan(t.loc["n_eff", "NN"])
    assert R.table_degeneracy(pd.DataFrame([row(0, "SRAE", "dead_x", "train", 1.0)])).empty  # dead_x alone: none


def test_report_shows_new_tables_and_strength(tmp_path):
    df = pd.concat([pd.DataFrame(_part_rows() + _degeneracy_rows()),
                    frame({("locality", "test", "SRAE"): [1.0, 2.0], ("locality", "test", "ExcitationBP"): [1.5, 1.5],
                           ("concept_recovery", "test", "SRAE"): [0.5, 0.5]})], ignore_index=True)
    path = build_report(ReportInputs("exp", df, tmp_path / "rep", class_names=["sparrow", "finch"]))
    html = path.read_text()
    i_concepts, i_parts = html.index("Concept recovery"), html.index("Parts the CNN uses")
    i_deg, i_per = html.index("Degeneracy and concept separation"), html.index("Per category: test F_cls")
    assert i_concepts < i_parts < i_deg < i_per
    assert "at least 2 standard errors above 0, and at least 10% of the class" in html
    assert "Classes using every evidence part: 1 of 2." in html and "5.32*" in html
    assert "n_eff: exp(entropy) of the mean contribution shares" in html
    assert "holds in 1 of 2 categories" in html and "(beyond the paper)" in html
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Parts the CNN uses (* = used)" in md and "Classes using every evidence part: 1 of 2." in md
    assert "| sparrow | 5.32* | 0.40 | -0.10 |" in md and "## Degeneracy and concept separation" in md
    assert "| top_share | 0.8000 | 1.0000 |" in md
    assert 'Beyond the paper, "x-features separate the concepts the CNN uses": holds.' in md
    parts = pd.read_parquet(tmp_path / "rep" / "table_part_effects.parquet")
    assert list(parts.columns) == ["class", "crown", "wing", "tail"]
    deg = pd.read_parquet(tmp_path / "rep" / "table_degeneracy.parquet").set_index("metric")
    assert deg.loc["top_share", "SRAE"] == pytest.approx(0.8)
    assert (tmp_path / "rep" / "table_degeneracy.md").is_file()
    # no such rows: the tables are empty, still written, and the report skips them
    bare = build_report(ReportInputs("exp", frame({("locality", "test", "SRAE"): [1.0]}), tmp_path / "bare"))
    text = bare.read_text()
    assert "Parts the CNN uses" not in text and "Degeneracy and concept separation" not in text
    assert (tmp_path / "bare" / "table_part_effects.parquet").is_file()
    assert "Degeneracy" not in (tmp_path / "bare" / "report.md").read_text()
