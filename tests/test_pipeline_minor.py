"""Pipeline details: a headline Lasso alpha that is also a sweep alpha is trained once, and a
crashed scoring task lists the categories it left unscored as failed-category rows."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from srae import report as R
from srae.config import load_config
from tasks.common import read_work_log
from tasks.explainers import explainer_path, method_settings, shared_variants
from tasks.scoring import scores_path, unscored_failures
from tests.conftest import tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("name", "alpha"), [("cub", 2.5), ("places", 15.0)])
def test_headline_lasso_alpha_in_the_sweep_shares_the_sweep_variant(name, alpha):
    x = load_config(ROOT / "configs" / f"{name}.yaml").explainer
    variants = method_settings(x, "Lasso")
    assert [(v["alpha"], v["sweep"]) for v in variants] == [(alpha, False)] + [(a, True) for a in x.lasso_alphas]
    assert shared_variants(variants) == {1: 0}  # the sweep entry for the headline alpha
    dirs = [explainer_path("root", "f" * 16, "Lasso", v, 3) for v in variants]
    assert dirs[1] == dirs[0] and len(set(dirs)) == len(variants) - 1
    assert shared_variants(method_settings(x, "SRAE")) == {}


def test_cv_headline_lasso_shares_nothing():
    x = load_config(ROOT / "configs" / "demo.yaml").explainer
    assert x.lasso_alpha is None
    assert shared_variants(method_settings(x, "Lasso")) == {}


def test_unscored_failures_one_row_per_unscored_category(tmp_path):
    jobs = [{"heatmaps": str(tmp_path / f"c{c}-{m}.zarr"), "category": c, "method": m}
            for c in (0, 4, 7) for m in ("SRAE", "Lasso", "Z")]
    scores_path(jobs[0]["heatmaps"]).write_text("x")  # category 0: SRAE scored, Lasso and Z not
    for j in jobs[3:6]:  # category 4: every job scored
        scores_path(j["heatmaps"]).write_text("x")
    rows = unscored_failures(jobs, RuntimeError("scheduler went away\ntraceback line"))
    assert rows == [
        {"category": 0, "stage": "scoring", "method": "Lasso, Z", "error": "RuntimeError: scheduler went away"},
        {"category": 7, "stage": "scoring", "method": "Lasso, SRAE, Z", "error": "RuntimeError: scheduler went away"},
    ]
    assert unscored_failures(jobs[3:6], RuntimeError("x")) == []


def test_flow_trains_a_shared_lasso_alpha_once_and_lists_scoring_failures(tiny_run, monkeypatch):
    """On the shared tiny cache: a new headline alpha 0.1, also in the sweep, and a scoring stage
    whose Dask client cannot start. Only the new Lasso explainers (and their heatmaps) are new."""
    import srae.baselines
    import srae.scoring
    from flows.pipeline import RunFailures, pipeline

    calls: list[tuple[int, tuple[float, ...]]] = []
    real_lasso = srae.baselines.train_lasso

    def counting_lasso(z, logits, design, alphas, **kw):
        calls.append((int(design.category), tuple(alphas)))
        return real_lasso(z, logits, design, alphas, **kw)

    def no_cluster(*args, **kwargs):
        raise RuntimeError("planted: no Dask cluster\nsecond line")

    monkeypatch.setattr(srae.baselines, "train_lasso", counting_lasso)
    monkeypatch.setattr(srae.scoring, "dask_client", no_cluster)
    base, cache = tiny_run["base"], Path(tiny_run["config"]["cache_dir"])
    before = len(read_work_log(cache))
    cfg = tiny_pipeline_config(base, **{"report.out_dir": str(base / "report-minor"), "report.figures": False,
                                        "explainer.lasso_alpha": 0.1, "explainer.lasso_alphas": [0.5, 0.1, 0.05]})
    with pytest.raises(RunFailures) as failure:  # planted scoring failures fail the run; the report is written
        pipeline(cfg)
    report = Path(failure.value.report)
    new = read_work_log(cache)[before:]

    # (c) trained once per category, reported both as headline and as sweep rows
    assert sorted(calls) == [(0, (0.1,)), (1, (0.1,))]
    assert Counter((r["method"], r["category"]) for r in new if r["stage"] == "explainers") == {
        ("Lasso", 0): 1, ("Lasso", 1): 1}
    df = R.read_metrics(report.parent / "metrics.parquet")
    f_cls = df[(df["method"] == "Lasso") & (df["metric"] == "F_cls") & (df["split"] == "test")]
    flags = Counter((int(c), R._hp(h)["alpha"], R._hp(h)["sweep"]) for c, h in zip(f_cls["category"], f_cls["hparams"]))
    assert flags == {(c, a, s): 1 for c in (0, 1) for a, s in ((0.1, False), (0.5, True), (0.1, True), (0.05, True))}

    # (b) the new Lasso heatmaps could not be scored: one failed row per category
    assert not any(r["stage"] == "scoring" for r in new)
    md = (report.parent / "report.md").read_text()
    section = md.split("## Failed categories\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(rows) == 2
    for c, line in zip((1, 2), rows):  # the class by name (scoring rows carry it), never a 0-based index
        assert re.fullmatch(rf"- class 00{c}\.\S+; stage scoring; method Lasso; "
                            r"error RuntimeError: planted: no Dask cluster", line), line
    html = report.read_text()
    assert "RuntimeError: planted: no Dask cluster" in html and "None: every category completed." not in html
    assert "scoring failed" not in html  # a failed-category row, not a note


def test_unset_l2_axes_leave_the_explainer_settings_as_they_were():
    """The per-term lambdas are new grid axes: unset, a method's settings (and so its cache
    directory) are what they were before they existed; set, they key the methods they matter to."""
    from srae.config import ExplainerConfig

    x = ExplainerConfig()
    (srae,) = method_settings(x, "SRAE")
    assert set(srae["grid"]) == {"beta", "eta", "q", "lr", "weight_decay"}
    x2 = ExplainerConfig.model_validate({"grid": {"lambda2": [0.01]}})
    assert method_settings(x2, "SRAE")[0]["grid"]["lambda2"] == [0.01]
    assert "lambda2" not in method_settings(x2, "NN")[0]["grid"]  # NN has no decoder
    assert method_settings(x2, "NN") == method_settings(x, "NN")


def test_cv_rule_keys_the_explainers_only_when_not_the_default():
    from srae.config import ExplainerConfig

    assert "cv_rule" not in method_settings(ExplainerConfig(), "SRAE")[0]
    assert method_settings(ExplainerConfig(cv_rule="one_se"), "SRAE")[0]["cv_rule"] == "one_se"
    # likewise the predictor bias, which reaches the trainer's settings
    from tasks.explainers import _train_neural

    assert "predictor_bias" not in method_settings(ExplainerConfig(), "SRAE")[0]
    on = method_settings(ExplainerConfig(predictor_bias=True, n=2, hidden=[4], n_pos=10, n_neg=20, n_test_neg=10,
                                         folds=1, max_epochs=2), "NN")[0]
    assert on["predictor_bias"] is True
    import numpy as np

    g = np.random.default_rng(0)
    z, logits = g.uniform(0, 1, (80, 6)).astype(np.float32), g.normal(size=(80, 2)).astype(np.float32) + 9
    expl, failed = _train_neural("NN", [0], on, z, logits, logits.argmax(1), np.arange(80), None, None, "cpu")
    assert not failed and expl[0].meta["settings"]["predictor_bias"] is True and expl[0].bias != 0.0
    # and revival of dead x-features can be switched off the same way (keyed only when off)
    assert "revive" not in method_settings(ExplainerConfig(), "SRAE")[0] and "revive" not in expl[0].meta["settings"]
    off = dict(on, revive=False)
    assert method_settings(ExplainerConfig(revive=False), "SRAE")[0]["revive"] is False
    expl, failed = _train_neural("NN", [0], off, z, logits, logits.argmax(1), np.arange(80), None, None, "cpu")
    assert not failed and expl[0].meta["settings"]["revive"] is False and expl[0].meta["revivals"] == 0


def test_a_null_faithfulness_value_becomes_a_nan_row(tmp_path):
    """meta.json stores NaN as null (strict JSON); the report must still see the category as
    not computable (a NaN row, counted as "n/a"), not leave it out without a word."""
    import json

    from tasks.report import faithfulness_rows

    d = tmp_path / "cat0000"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"hparams": {"lr": 0.01}, "n_features": 5, "F_reg_train": 0.5,
                                             "F_reg_test": None, "dead_features": [1]}))
    rows = faithfulness_rows("e", [{"method": "NN", "settings": {}, "explainers": {"0": str(d)}}])
    got = {(r["metric"], r["split"]): r["value"] for r in rows}
    assert got[("F_reg", "train")] == 0.5 and got[("dead_x", "train")] == 1.0
    assert math.isnan(got[("F_reg", "test")]) and ("F_cls", "test") not in got


def test_lasso_selection_and_convergence_problems_become_report_notes():
    """Both were only logged during training: the report showed an unexplained x6 column."""
    from tasks.report import explainer_notes

    notes = explainer_notes([("Lasso", 0, {"n_features": 6, "max_features": 5, "converged": True}),
                             ("Lasso", 3, {"n_features": 7, "max_features": 5, "converged": False}),
                             ("Lasso", 2, {"n_features": 5, "max_features": 5, "converged": False}),
                             ("Lasso", 1, {"n_features": 9, "max_features": None, "converged": True}),  # fixed alpha
                             ("SRAE", 1, {"n_features": 5, "converged": False})])
    assert notes == [
        "Lasso selected more than 5 dims of Z in class(es) 1 (6), 4 (7): no alpha in explainer.lasso_alphas is "
        "large enough there (add larger ones); its O1/O2 there are over more maps than the other methods'.",
        "Lasso stopped at max_iter without converging in class(es) 3, 4: its selection there may be rough."]
    assert explainer_notes([("Lasso", 0, {"n_features": 3, "max_features": 5, "converged": True})]) == []


def test_a_work_log_line_cut_by_a_killed_run_is_skipped(tmp_path):
    from tasks.common import WORK_LOG, record_work

    record_work(tmp_path, "dataset", "a", 1.0)
    with (tmp_path / WORK_LOG).open("a") as fh:
        fh.write('{"stage": "explain')  # killed mid-line; the next run appends after it
    record_work(tmp_path, "features", "b", 2.0)
    record_work(tmp_path, "heatmaps", "c", 3.0)
    assert [r["stage"] for r in read_work_log(tmp_path)] == ["dataset", "heatmaps"]


def test_a_second_run_waits_for_the_first_ones_scoring_and_reuses_it(tmp_path):
    """Two overlapping runs scored the same heatmap groups twice, and a redraw in one could drop
    scores the other was computing from the old maps; scoring now holds the groups' writer locks."""
    import threading
    import time

    import pandas as pd

    from srae.stores import writer_lock
    from tasks.common import claimed_groups

    jobs = [{"heatmaps": str(tmp_path / f"g{i}.zarr"), "category": i, "method": "SRAE"} for i in range(3)]
    scored = lambda j: scores_path(j["heatmaps"]).is_file()  # noqa: E731
    scores_path(jobs[2]["heatmaps"]).write_bytes(b"")  # already scored: neither locked nor returned
    held = threading.Event()

    def other_run() -> None:
        with writer_lock(Path(jobs[0]["heatmaps"]), what="heatmaps to score"):
            held.set()
            time.sleep(0.5)
            pd.DataFrame({"x": [1]}).to_parquet(scores_path(jobs[0]["heatmaps"]))

    t = threading.Thread(target=other_run)
    t.start()
    assert held.wait(5)
    from srae.errors import SraeError

    with pytest.raises(SraeError, match=r"heatmaps to score .*g0\.zarr: another writer"):
        with claimed_groups(jobs, scored, wait=0, what="heatmaps to score"):  # no waiting: one clear error
            pass
    with claimed_groups(jobs, scored, wait=30) as todo:
        assert [j["category"] for j in todo] == [1]  # group 0 was scored by the other run meanwhile
    t.join()


def test_a_places_folder_without_its_categories_file_is_not_present(tmp_path, monkeypatch):
    """A failed Places365 download left the folder behind; the next run saw it as present,
    never retried, and failed on the missing categories file."""
    import tasks.download as td
    from srae.config import DatasetConfig

    monkeypatch.setattr(td, "find_dataset_dir", lambda kind, root: Path(root))  # the ADE20K part is there
    places = tmp_path / "places365"
    places.mkdir()
    ds = DatasetConfig(kind="places", root=tmp_path / "ade", places_root=places)
    assert not td._present(ds, tmp_path / "ade")
    (places / "categories_places365.txt").write_text("/a/airfield 0\n")
    assert td._present(ds, tmp_path / "ade")
