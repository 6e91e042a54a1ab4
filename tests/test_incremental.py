"""Incremental reruns, checked from the work log (one line per unit of heavy work done)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np

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
    assert {r["stage"] for r in new} <= {"causal", "explainers", "heatmaps", "scoring", "masking"}
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


def _z_rows(tiny_run, tag: str):
    import json

    from srae import report as R

    df = R.read_metrics(tiny_run["base"] / f"report-{tag}" / "metrics.parquet")
    z = df[(df["method"] == "Z") & (df["metric"] == "locality")].sort_values("category")
    return z, [json.loads(h) for h in z["hparams"]]


def test_z_column_over_all_dims_is_scored_as_drawn_and_equals_stored_maps(tiny_run):
    """``heatmaps.z_dims: all`` scores every Z dim while drawing it (no store; no scoring-stage
    work); drawing all 256 dims into stores and scoring them gives the same locality."""
    new = _run(tiny_run, "zall", **{"heatmaps.z_dims": "all"})
    assert {r["stage"] for r in new} == {"heatmaps"}
    assert sorted((r["category"], tuple(r["methods"])) for r in new) == [(0, ("Z",)), (1, ("Z",))]
    cache = Path(tiny_run["config"]["cache_dir"])
    assert not list(cache.glob("heatmaps/**/Zall-test.zarr"))  # nothing stored but the scores
    assert len(list(cache.glob("heatmaps/**/Zall-test.zarr.a*.scores.parquet"))) == 2
    assert not list(cache.glob("heatmaps/**/*.partial.npz"))  # resume sums go once the scores are written
    streamed, hps = _z_rows(tiny_run, "zall")
    assert hps == [{"z_dims": "all"}] * 2 and list(streamed["n_features"]) == [256, 256]

    stored_run = _run(tiny_run, "z256", **{"heatmaps.z_dims": 256})  # 256 of 256 dims: every one
    assert {r["stage"] for r in stored_run} == {"heatmaps", "scoring"}
    stored, _ = _z_rows(tiny_run, "z256")
    np.testing.assert_allclose(streamed["value"].to_numpy(), stored["value"].to_numpy(), rtol=1e-6)
    assert list(stored["category"]) == list(streamed["category"]) == [0, 1]

    assert _run(tiny_run, "zall-again", **{"heatmaps.z_dims": "all"}) == []  # scores reused


def test_heatmaps_of_all_design_images_score_like_the_positives_alone(tiny_run):
    """``heatmaps.images: all`` stores the design's test negatives beside the positives (new
    stores); locality, orthogonality, concept recovery, the masking test and the figures
    still use the positives only, so every number equals the positives-only run's."""
    import json

    import zarr

    from flows.pipeline import pipeline
    from srae import report as R
    from tasks.download import load_index

    base, cache = tiny_run["base"], Path(tiny_run["config"]["cache_dir"])
    before = len(read_work_log(cache))
    cfg = tiny_pipeline_config(base, **{"report.out_dir": str(base / "report-all"), "heatmaps.images": "all"})
    page = Path(pipeline(cfg)).read_text()
    new = read_work_log(cache)[before:]
    assert {r["stage"] for r in new} == {"heatmaps", "scoring", "masking"}  # new stores; no retraining

    from srae.config import config_from_dict
    from srae.datasets.common import dataset_dir

    index = load_index({"kind": "synthbirds", "root": str(dataset_dir(config_from_dict(cfg).dataset))})
    label = dict(zip(index.images["image_id"].astype(int), index.images["label"].astype(int)))
    stores = [p for p in cache.glob("heatmaps/**/*-test.zarr") if json.loads((p / "zarr.json").read_text())
              ["attributes"].get("category") == 0 and (p / "zarr.json").is_file()]
    held = {p: [label[int(i)] for i in zarr.open_group(str(p), mode="r")["image_id"][:]] for p in stores}
    with_negatives = [p for p, labs in held.items() if any(lab != 0 for lab in labs)]
    assert with_negatives and all(sum(lab == 0 for lab in held[p]) <= 4 for p in with_negatives)
    assert all(sum(lab != 0 for lab in held[p]) == cfg["explainer"]["n_test_neg"] for p in with_negatives)

    def rows(report_dir: Path):
        df = R.read_metrics(report_dir / "metrics.parquet")
        keep = df["metric"].str.match(r"^(locality|O1|O2|concept_|mask_)")
        return df[keep].sort_values(["category", "method", "metric", "hparams"]).reset_index(drop=True)

    mine, positives_only = rows(base / "report-all"), rows(Path(tiny_run["report"]).parent)
    assert len(mine) == len(positives_only) > 40
    assert (mine[["category", "method", "metric"]].to_numpy() == positives_only[["category", "method", "metric"]]
            .to_numpy()).all()
    np.testing.assert_allclose(mine["value"].to_numpy(), positives_only["value"].to_numpy(), rtol=1e-5, atol=1e-7)
    assert page.count("data:image/png;base64,") == Path(tiny_run["report"]).read_text().count("data:image/png;base64,")
