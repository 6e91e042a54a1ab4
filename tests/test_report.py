"""srae.report / report_html / report_figures: wide tables derived from a fabricated long table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from srae import report as R
from srae.errors import InputError
from srae.report_figures import lasso_chart, metric_charts
from srae.report_html import ReportInputs, build_report, to_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def row(cat, method, metric, split, value, n=5, **hp):
    return R.metric_row("exp", cat, method, metric, split, value, n, hp)


@pytest.fixture
def long_table() -> pd.DataFrame:
    rows = [
        # SRAE F_reg test: category 0 has two rows (averaged first), category 1 one row.
        row(0, "SRAE", "F_reg", "test", 0.1), row(0, "SRAE", "F_reg", "test", 0.3), row(1, "SRAE", "F_reg", "test", 0.6),
        row(0, "SRAE", "F_reg", "train", 0.05), row(1, "SRAE", "F_reg", "train", 0.15),
        row(0, "SRAE", "F_cls", "test", 1.0), row(1, "SRAE", "F_cls", "test", 0.9),
        row(0, "NN", "F_cls", "test", 0.98), row(1, "NN", "F_cls", "test", 1.0),
        row(0, "SRAE", "O1", "test", 0.5), row(1, "SRAE", "O1", "test", 0.7),
        row(0, "SRAE", "locality", "test", 1.0), row(1, "SRAE", "locality", "test", 2.0),
        row(0, "ExcitationBP", "locality", "test", 2.5, n=1), row(1, "ExcitationBP", "locality", "test", 2.7, n=1),
        row(0, "Z", "locality", "test", 1.9, n=16),
        # Lasso: headline rows (sweep false, CV-chosen alpha differs per category) and a sweep.
        row(0, "Lasso", "F_reg", "test", 3.0, n=4, alpha=0.5, sweep=False),
        row(1, "Lasso", "F_reg", "test", 5.0, n=5, alpha=1.0, sweep=False),
        row(0, "Lasso", "F_reg", "train", 2.0, n=3, alpha=1.0, sweep=True),
        row(1, "Lasso", "F_reg", "train", 4.0, n=6, alpha=1.0, sweep=True),
        row(0, "Lasso", "F_reg", "train", 1.0, n=20, alpha=0.1, sweep=True),
        row(1, "Lasso", "F_reg", "train", 0.5, n=30, alpha=0.1, sweep=True),
        row(0, "Lasso", "F_reg", "test", 1.5, n=20, alpha=0.1, sweep=True),
        # masking
        row(0, "SRAE", "mask_acc@original", "test", 1.0), row(1, "SRAE", "mask_acc@original", "test", 0.5),
        row(0, "ExcitationBP", "mask_acc@original", "test", 1.0, n=1),
        row(1, "ExcitationBP", "mask_acc@original", "test", 0.5, n=1),
        row(0, "SRAE", "mask_acc@0.05", "test", 0.9), row(1, "SRAE", "mask_acc@0.05", "test", 0.5),
        row(0, "SRAE", "mask_acc@0.3", "test", 0.4), row(1, "SRAE", "mask_acc@0.3", "test", 0.2),
        row(0, "ExcitationBP", "mask_acc@0.05", "test", 0.6, n=1),
        # concept recovery
        row(0, "SRAE", "concept_recovery", "test", 0.8), row(1, "SRAE", "concept_recovery", "test", 0.4),
        row(1, "NN", "concept_recovery", "test", 0.1),
        # dead x-features (count per category, from meta.json)
        row(0, "SRAE", "dead_x", "train", 2.0), row(1, "SRAE", "dead_x", "train", 1.0),
        row(0, "NN", "dead_x", "train", 0.0),
    ]
    return pd.DataFrame(rows)


def test_table_main_averages_per_category_then_over_categories(long_table):
    t = R.table_main(long_table)
    assert list(t.columns) == ["SRAE", "NN", "SAE", "Lasso", "CAE", "Z", "ExcitationBP"]
    assert list(t.index) == [("F_reg", "train"), ("F_reg", "test"), ("F_cls", "train"), ("F_cls", "test"),
                             ("O1", "test"), ("O2", "test"), ("locality", "test"), ("dead_x", "train")]
    assert t.loc[("dead_x", "train"), "SRAE"] == pytest.approx(1.5)
    assert t.loc[("dead_x", "train"), "NN"] == 0.0
    assert t.loc[("F_reg", "test"), "SRAE"] == pytest.approx(((0.1 + 0.3) / 2 + 0.6) / 2)  # not (0.1+0.3+0.6)/3
    assert t.loc[("F_reg", "train"), "SRAE"] == pytest.approx(0.1)
    assert t.loc[("F_cls", "test"), "NN"] == pytest.approx(0.99)
    assert t.loc[("locality", "test"), "ExcitationBP"] == pytest.approx(2.6)
    assert t.loc[("locality", "test"), "Z"] == pytest.approx(1.9)
    # headline Lasso = the non-sweep rows only
    assert t.loc[("F_reg", "test"), "Lasso"] == pytest.approx(4.0)
    assert math.isnan(t.loc[("F_reg", "train"), "Lasso"])
    assert t[["SAE", "CAE"]].isna().all().all()
    # a fixed headline alpha keeps only that alpha's Lasso rows
    t1 = R.table_main(long_table, lasso_alpha=1.0)
    assert t1.loc[("F_reg", "test"), "Lasso"] == pytest.approx(5.0)


def test_table_lasso_sweep_uses_sweep_rows(long_table):
    s = R.table_lasso_sweep(long_table)
    assert list(s.columns) == [1.0, 0.1]  # descending alpha, as in the paper
    assert s.loc["Num_x", 1.0] == pytest.approx(4.5)
    assert s.loc["Num_x", 0.1] == pytest.approx(25.0)
    assert s.loc["F_reg train", 1.0] == pytest.approx(3.0)
    assert s.loc["F_reg train", 0.1] == pytest.approx(0.75)
    assert s.loc["F_reg test", 0.1] == pytest.approx(1.5)
    assert math.isnan(s.loc["F_reg test", 1.0])


def test_table_masking(long_table):
    m = R.table_masking(long_table)
    assert list(m.index) == [0.05, 0.3]
    assert list(m.columns) == ["Original Image", "Mask by x-features", "Mask by ExcitationBP"]
    assert m["Original Image"].tolist() == pytest.approx([0.75, 0.75])
    assert m.loc[0.05, "Mask by x-features"] == pytest.approx(0.7)
    assert m.loc[0.3, "Mask by x-features"] == pytest.approx(0.3)
    assert m.loc[0.05, "Mask by ExcitationBP"] == pytest.approx(0.6)
    assert math.isnan(m.loc[0.3, "Mask by ExcitationBP"])
    assert R.gamma_metric(0.05) == "mask_acc@0.05"
    # the share of pixels kept, beside the accuracies (category mean first, then over categories)
    areas = [row(0, "SRAE", "mask_area@0.05", "test", 0.9), row(1, "SRAE", "mask_area@0.05", "test", 0.7),
             row(0, "ExcitationBP", "mask_area@0.05", "test", 0.2)]
    m = R.table_masking(pd.concat([long_table, pd.DataFrame(areas)], ignore_index=True))
    assert list(m.columns) == ["Original Image", "Mask by x-features", "Mask by ExcitationBP",
                               "Kept area, x-features", "Kept area, ExcitationBP"]
    assert m.loc[0.05, "Kept area, x-features"] == pytest.approx(0.8)
    assert m.loc[0.05, "Kept area, ExcitationBP"] == pytest.approx(0.2)
    assert math.isnan(m.loc[0.3, "Kept area, x-features"]) and m.loc[0.05, "Mask by x-features"] == pytest.approx(0.7)


def test_table_concepts_and_per_category(long_table):
    c = R.table_concepts(long_table, ["bird_a", "bird_b"])
    assert list(c.index) == ["bird_a", "bird_b", "mean"]
    assert c.loc["mean", "SRAE"] == pytest.approx(0.6)
    assert c.loc["mean", "NN"] == pytest.approx(0.1)  # NaN for bird_a is skipped
    p = R.table_per_category(long_table, "F_cls", "test")
    assert p.loc[1, "SRAE"] == pytest.approx(0.9) and p.loc[0, "NN"] == pytest.approx(0.98)  # 0-based, as the parquet
    named = R.table_per_category(long_table, "F_cls", "test", class_names=["bird_a", "bird_b"])
    from srae.report_html import _flat_for_parquet, to_markdown

    md = to_markdown(named)  # for reading: 1-based ids and names, F_cls as a percentage like Table 1
    assert md.startswith("| class (F_cls test) | SRAE |") and "| 2: bird_b | 90.00% |" in md
    assert "| 2 | 90.00% |" in to_markdown(p)  # no names: the 1-based id
    flat = _flat_for_parquet(named)  # the parquet keeps the integer category column
    assert flat.columns[0] == "category" and flat["category"].tolist() == [0, 1]


def test_validate_metrics_errors(long_table):
    with pytest.raises(InputError, match=r"missing columns \['hparams'\]"):
        R.validate_metrics(long_table.drop(columns=["hparams"]))
    bad = long_table.copy()
    bad.loc[0, "split"] = "val"
    with pytest.raises(InputError, match="split must be train/test"):
        R.validate_metrics(bad)
    assert json.loads(R.validate_metrics(long_table)["hparams"].iloc[16]) == {"alpha": 0.5, "sweep": False}
    frac = long_table.astype({"category": "float64"})
    frac.loc[3, "category"] = 1.5  # used to become category 1 without a word
    with pytest.raises(InputError, match="category 1.5 is not a class index"):
        R.validate_metrics(frac)
    assert R.validate_metrics(long_table.astype({"category": "float64"}))["category"].tolist() == \
        long_table["category"].tolist()
    odd = pd.concat([long_table, pd.DataFrame([row(0, "SRAE", "mask_acc@abc", "test", 0.5)])], ignore_index=True)
    with pytest.raises(InputError, match="masking metric 'mask_acc@abc' is not mask_acc@<gamma>"):
        R.table_masking(odd)


def _main(**cols) -> pd.DataFrame:
    t = R.table_main(pd.DataFrame(columns=list(R.METRIC_COLUMNS)))
    for (metric, split, method), v in cols.items():
        t.loc[(metric, split), method] = v
    return t


def test_findings_follow_the_stated_rules():
    vals = {("F_cls", "test", "SRAE"): 0.99, ("F_cls", "test", "NN"): 1.0, ("F_cls", "test", "SAE"): 0.995,
            ("locality", "test", "SRAE"): 1.2, ("locality", "test", "ExcitationBP"): 1.5,
            ("O1", "test", "SRAE"): 0.5, ("O1", "test", "NN"): 0.9, ("O1", "test", "SAE"): 0.7,
            ("O2", "test", "SRAE"): 2.0, ("O2", "test", "NN"): 4.0, ("O2", "test", "SAE"): 3.0,
            ("F_reg", "test", "SRAE"): 0.1, ("F_reg", "test", "CAE"): 0.5, ("F_reg", "test", "Lasso"): 0.25,
            ("F_reg", "test", "NN"): 0.08, ("F_reg", "test", "SAE"): 0.06}
    t = _main(**{k: v for k, v in []})
    for k, v in vals.items():
        t.loc[(k[0], k[1]), k[2]] = v
    f = R.qualitative_findings(t)
    assert [x.holds for x in f] == [True, True, True, True]
    assert f[0].evidence.startswith("test F_cls: SRAE 99.00%, NN 100.00%, SAE 99.50%; test F_reg: SRAE 0.1,")
    assert "F_reg under 2x the lower of theirs" in f[0].rule and all(x.rule for x in f)
    t.loc[("F_reg", "test"), "SAE"] = 0.05  # SRAE's F_reg 2x the better baseline's: F_cls alone no longer decides
    assert [x.holds for x in R.qualitative_findings(t)] == [False, True, True, True]
    t.loc[("O2", "test"), "SRAE"] = 3.5  # O1 better, O2 worse than SAE -> not "more orthogonal"
    t.loc[("F_reg", "test"), "Lasso"] = 0.15  # Lasso within 2x of SRAE -> not unfaithful
    t.loc[("F_cls", "test"), "SRAE"] = 0.94  # below 0.95
    t.loc[("locality", "test"), "ExcitationBP"] = np.nan
    f = R.qualitative_findings(t)
    assert [x.holds for x in f] == [False, None, False, False]
    assert f[1].verdict == "not evaluated" and "ExcitationBP n/a" in f[1].evidence


def test_build_report_writes_everything(tmp_path, long_table):
    inp = ReportInputs("exp", long_table, tmp_path / "rep", class_names=["bird_a", "bird_b"],
                       failed=[{"category": 2, "stage": "explainers", "method": "SRAE", "error": "planted <failure>"}],
                       bad_inputs=[{"path": "images/x.jpg", "reason": "truncated"}],
                       timings={"dataset": 1.5, "explainers": 10.25}, config_yaml="name: exp\n")
    path = build_report(inp)
    assert path == tmp_path / "rep" / "report.html"
    html = path.read_text()
    assert "planted &lt;failure&gt;" in html and "images/x.jpg" in html
    from srae.report_html import failed_records

    assert failed_records(inp.failed, ["bird_a", "bird_b", "bird_c"]) == [
        {"class": "3: bird_c", "stage": "explainers", "method": "SRAE", "error": "planted <failure>"}]
    assert failed_records([{"category": 0, "stage": "heatmaps", "method": None, "error": "x"}], []) == [
        {"class": "1", "stage": "heatmaps", "error": "x"}]  # 1-based as in the CLI; empty columns dropped
    assert "10.2 s" in html and "11.8 s" in html  # stage time and total in the footer
    assert "qualitative findings hold on this data" in html and "data:image/png;base64," in html
    # readable on a phone: the page sets its viewport, and wide tables scroll inside themselves
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in html
    assert "overflow-x:auto" in html
    schema = pq.read_schema(tmp_path / "rep" / "metrics.parquet")
    assert schema.names == list(R.METRIC_COLUMNS)
    assert str(schema.field("value").type) == "double" and str(schema.field("category").type) == "int64"
    back = R.read_metrics(tmp_path / "rep" / "metrics.parquet")
    assert len(back) == len(long_table)
    main = pd.read_parquet(tmp_path / "rep" / "table_main.parquet")
    assert list(main.columns)[:3] == ["metric", "split", "SRAE"]
    md = (tmp_path / "rep" / "table_main.md").read_text()
    assert "| F_cls | test | 95.00% | 99.00% |" in md
    assert "| F_reg | test | 0.4000 |" in md
    for name in ("table_lasso_sweep", "table_masking", "table_concepts", "table_per_category"):
        assert (tmp_path / "rep" / f"{name}.parquet").is_file() and (tmp_path / "rep" / f"{name}.md").is_file()
    # an empty run still yields a report that says so
    assert inp.metrics is long_table and inp.notes == []  # the caller's inputs are left alone
    empty = build_report(ReportInputs("exp", pd.DataFrame(), tmp_path / "empty"))
    assert "0 categories scored" in empty.read_text()
    assert to_markdown(pd.DataFrame()) == "_(no data)_\n"


def test_figures_are_png(long_table):
    assert metric_charts(R.table_main(long_table)).startswith(PNG)
    assert lasso_chart(R.table_lasso_sweep(long_table)).startswith(PNG)
    with pytest.raises(InputError, match="no values"):
        metric_charts(R.table_main(pd.DataFrame(columns=list(R.METRIC_COLUMNS))))
    with pytest.raises(InputError, match="no Lasso sweep rows"):
        lasso_chart(pd.DataFrame())


def test_metric_charts_keep_methods_whose_value_is_infinite():
    """NN's O2 was inf in every category: its bar and label vanished from the chart, as if NN
    had never been scored; SRAE's mean, which left one category out, said nothing."""
    from srae.report_figures import metric_panels

    o2 = [row(0, "SRAE", "O2", "test", 2.0), row(1, "SRAE", "O2", "test", math.inf),
          row(0, "NN", "O2", "test", math.inf), row(1, "NN", "O2", "test", math.inf),
          row(0, "SAE", "O2", "test", 3.0), row(1, "SAE", "O2", "test", 5.0)]
    main = R.table_main(pd.DataFrame(o2))
    panels = {title: (labels, list(values)) for title, labels, values in metric_panels(main)}
    assert panels["O2 / test"] == (["SRAE (1/2 inf)", "NN", "SAE"], [2.0, math.inf, 4.0])
    assert metric_charts(main).startswith(PNG)


def test_top_parts_table_names_the_part_each_x_feature_lands_on():
    import pandas as pd

    from srae.report import table_top_parts

    top = pd.DataFrame({
        "experiment": "e", "category": [1, 1, 0], "method": ["SRAE", "SRAE", "NN"], "split": "test",
        "feature": [0, 1, 0], "top_part": ["crown", "", "left wing"], "top_mass": [0.4123, float("nan"), 0.5],
        "evidence_mass": [0.5, 0.0, 0.1], "on_evidence": [True, False, False],
    })
    wide = table_top_parts(top, ["sparrow", "finch"])
    assert list(wide.index) == [("sparrow", "NN"), ("finch", "SRAE")]  # class order
    assert wide.loc[("finch", "SRAE"), "x1"] == "crown (0.41)*"
    assert wide.loc[("finch", "SRAE"), "x2"] == "-"
    assert wide.loc[("sparrow", "NN"), "x1"] == "left wing (0.50)"
    assert table_top_parts(pd.DataFrame()).empty
    # an x-feature that fires on no training image says so (the figures grey it out too)
    wide = table_top_parts(top.assign(dead=[False, True, False]), ["sparrow", "finch"])
    assert wide.loc[("finch", "SRAE"), "x2"] == "- (dead)" and wide.loc[("finch", "SRAE"), "x1"] == "crown (0.41)*"


def test_infinite_o2_category_is_left_out_and_counted(tmp_path, long_table):
    inf_rows = [row(0, "SRAE", "O2", "test", 2.0), row(1, "SRAE", "O2", "test", math.inf),
                row(2, "SRAE", "O2", "test", 3.0), row(0, "NN", "O2", "test", 4.0), row(1, "NN", "O2", "test", 5.0),
                row(0, "SAE", "O2", "test", math.inf), row(1, "SAE", "O2", "test", math.inf),
                row(0, "NN", "O1", "test", 0.9), row(0, "SAE", "O1", "test", 0.8)]
    df = pd.concat([long_table, pd.DataFrame(inf_rows)], ignore_index=True)
    t = R.table_main(df)
    assert t.loc[("O2", "test"), "SRAE"] == pytest.approx(2.5)  # mean of the finite categories 0 and 2
    assert t.loc[("O2", "test"), "NN"] == pytest.approx(4.5)
    assert t.loc[("O2", "test"), "SAE"] == math.inf  # every category infinite: the cell stays inf
    assert R.infinite_categories(t) == {("O2", "test", "SRAE"): (1, 3), ("O2", "test", "SAE"): (2, 2)}
    shown = R.main_display(t)
    assert shown.loc[("O2", "test"), "SRAE"] == "2.5000 (1 of 3 inf)"
    assert shown.loc[("O2", "test"), "SAE"] == "inf (2 of 2 inf)"
    assert shown.loc[("O2", "test"), "NN"] == pytest.approx(4.5)
    orth = R.qualitative_findings(t)[2]
    # SRAE's finite O2 mean (2.5) beats NN's (4.5), but SRAE has a singular category and NN none:
    # the infinite count is compared first, so the finding does not hold
    assert orth.holds is False
    assert "O2: SRAE 2.5" in orth.evidence and "SRAE 1 of 3, SAE 2 of 2" in orth.evidence
    # the long table's dead_x rows (SRAE 2 and 1 per category, NN 0, SAE none) explain the inf
    assert "dead x-features (firing on no training image) per category: SRAE 1.5, NN 0, SAE n/a" in orth.evidence
    # with as many infinite categories as NN (1) and fewer than SAE (2), the finite means decide
    df_nn = df.copy()
    df_nn.loc[(df_nn["method"] == "NN") & (df_nn["metric"] == "O2") & (df_nn["category"] == 1), "value"] = math.inf
    orth_nn = R.qualitative_findings(R.table_main(df_nn))[2]
    assert orth_nn.holds is True  # O2: (1, 2.5) < (1, 4.0) and < (2, inf); O1 SRAE 0.6 < min(0.9, 0.8)
    path = build_report(ReportInputs("exp", df, tmp_path / "rep"))
    html = path.read_text()
    assert "2.5000 (1 of 3 inf)" in html and "O2 test SRAE: 1 of 3" in html
    # a NaN category value is skipped by the mean, and the cell says so
    nan_df = pd.concat([df, pd.DataFrame([row(2, "NN", "O2", "test", math.nan)])], ignore_index=True)
    t_nan = R.table_main(nan_df)
    assert t_nan.loc[("O2", "test"), "NN"] == pytest.approx(4.5)
    assert R.missing_categories(t_nan) == {("O2", "test", "NN"): (1, 3)}
    assert R.main_display(t_nan).loc[("O2", "test"), "NN"] == "4.5000 (1 of 3 n/a)"
    assert R.main_display(t_nan).loc[("O2", "test"), "SRAE"] == "2.5000 (1 of 3 inf)"
    assert "| O2 | test | 2.5000 (1 of 3 inf) | 4.5000 | inf (2 of 2 inf) |" in (tmp_path / "rep" / "table_main.md").read_text()
    assert list(R.table_concepts(df).index) == ["0", "1", "mean"]  # no class names: still writable
    assert (tmp_path / "rep" / "table_concepts.parquet").is_file()
    back = pd.read_parquet(tmp_path / "rep" / "table_main.parquet").set_index(["metric", "split"])
    assert back.loc[("O2", "test"), "SRAE"] == pytest.approx(2.5)
