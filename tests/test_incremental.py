"""Incremental reruns, checked from the work log (one line per unit of heavy work done)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from tasks.common import read_work_log
from tests.conftest import tiny_pipeline_config


def _run(tiny_run, tag: str, **changes) -> list[dict]:
    """Run the flow on the shared tiny cache; return the work-log records it added."""
    from flows.pipeline import pipeline

    base = tiny_run["base"]
    cache = Path(tiny_run["config"]["cache_dir"])
    before = len(read_work_log(cache))
    cfg = tiny_pipeline_config(base, **{"report.out_dir": str(base / f"report-{tag}"), "report.figures": False},
                               **changes)
    report = Path(pipeline(cfg))
    assert report.is_file()
    return read_work_log(cache)[before:]


def test_first_run_did_every_stage(tiny_run):
    stages = Counter(r["stage"] for r in read_work_log(tiny_run["config"]["cache_dir"]))
    assert {"dataset", "backbone", "features", "explainers", "heatmaps", "scoring", "masking"} <= set(stages)


def test_rerun_does_no_heavy_work_and_a_deleted_store_is_recomputed(tiny_run):
    # report.include_config changes only the page (a report to publish without this machine's paths)
    assert _run(tiny_run, "same", **{"report.include_config": False}) == []
    page = (tiny_run["base"] / "report-same" / "report.html").read_text()
    assert "<h2>Configuration</h2>" not in page and str(tiny_run["base"]) not in page
    # The rerun left cached task results for this exact config; deleting one explainer's
    # store must still make exactly that explainer be trained again (markers beat the cache).
    cache = Path(tiny_run["config"]["cache_dir"])
    (victim,) = sorted(cache.glob("explainers/*/NN/*/cat0000"))
    shutil.rmtree(victim)
    new = _run(tiny_run, "deleted")
    assert "<h2>Configuration</h2>" in (tiny_run["base"] / "report-deleted" / "report.html").read_text()  # default
    assert [(r["method"], r["category"]) for r in new if r["stage"] == "explainers"] == [("NN", 0)]
    # downstream work, if the retrained explainer differs at all, concerns NN / category 0 only
    assert all(r["category"] == 0 and r.get("method", "NN") == "NN" and r.get("methods", ["NN"]) == ["NN"]
               for r in new)
    assert (victim / "meta.json").is_file()


def test_adding_a_category_computes_only_it_on_a_given_dask_cluster(tiny_run):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0") as cluster:
        new = _run(tiny_run, "added", categories=[1, 2, 3], **{"scoring.dask_address": cluster.scheduler_address})
        assert "score_chunk" in cluster.scheduler.task_prefixes  # scoring ran on this cluster
    assert new, "the new category must be computed"
    assert {r["stage"] for r in new} <= {"explainers", "heatmaps", "scoring", "masking"}
    assert {r["category"] for r in new} == {2}
    # every method was trained for it (Lasso: headline + the two sweep alphas)
    trained = Counter(r["method"] for r in new if r["stage"] == "explainers")
    assert trained == {"SRAE": 1, "NN": 1, "SAE": 1, "CAE": 1, "Lasso": 3}


def test_changing_one_hyperparameter_recomputes_only_its_dependants(tiny_run):
    new = _run(tiny_run, "eta", **{"explainer.grid.eta": [0.5]})
    assert new
    by_stage = {s: [r for r in new if r["stage"] == s] for s in {r["stage"] for r in new}}
    assert set(by_stage) == {"explainers", "heatmaps", "scoring", "masking"}
    # eta matters to SRAE only (pull-away term): NN, SAE, CAE, Lasso, ExcitationBP, Z untouched
    assert {r["method"] for r in by_stage["explainers"]} == {"SRAE"}
    assert {r["method"] for r in by_stage["scoring"]} == {"SRAE"}
    assert {r["method"] for r in by_stage["masking"]} == {"SRAE"}
    assert all(r["methods"] == ["SRAE"] for r in by_stage["heatmaps"])
    assert sorted(r["category"] for r in by_stage["explainers"]) == [0, 1]
