"""The pipeline flow end to end through the real Prefect engine (temporary API), on tiny data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from srae import report as R
from srae.errors import InputError, SraeError
from tests.conftest import tiny_pipeline_config

FIVE = {"SRAE", "NN", "SAE", "CAE", "Lasso"}


def test_end_to_end_report_schema_methods_and_faithfulness(tiny_run):
    report = Path(tiny_run["report"])
    assert report.name == "report.html" and report.is_file()
    out = report.parent
    schema = pq.read_schema(out / "metrics.parquet")
    assert schema.names == list(R.METRIC_COLUMNS)
    assert [str(schema.field(c).type) for c in ("category", "value", "n_features")] == ["int64", "double", "int64"]
    df = R.read_metrics(out / "metrics.parquet")
    assert set(df["category"]) == {0, 1}
    assert FIVE | {"ExcitationBP", "Z"} <= set(df["method"])
    for method in FIVE:  # faithfulness of every method on both splits, every category
        sub = df[(df["method"] == method) & (df["metric"] == "F_cls") & ~R._is_sweep(df)]
        assert sorted(zip(sub["category"], sub["split"])) == [(0, "test"), (0, "train"), (1, "test"), (1, "train")]
    main = pd.read_parquet(out / "table_main.parquet").set_index(["metric", "split"])
    assert list(main.columns) == [*R.TABLE_METHODS, "Grad-CAM"]  # the second heatmap method, scored
    assert main.loc[("F_cls", "test"), "SRAE"] >= 0.95
    assert np.isfinite(main.loc[("locality", "test"), "ExcitationBP"])
    assert np.isfinite(main.loc[("locality", "test"), "Grad-CAM"])
    import zarr

    cams = sorted(Path(tiny_run["config"]["cache_dir"]).glob("heatmaps/**/GradCAM-test.zarr"))
    assert len(cams) == 2 and all(zarr.open_group(str(p), mode="r").attrs["heatmap"] == "Grad-CAM" for p in cams)
    assert np.isfinite(main.loc[("locality", "test"), "Z"])
    assert main.loc[[("F_reg", "test"), ("F_cls", "test")], list(FIVE)].notna().all().all()
    # the derived table equals the one recomputed from the long table
    again = R.table_main(df)
    assert again.loc[("F_cls", "test"), "SRAE"] == pytest.approx(main.loc[("F_cls", "test"), "SRAE"])
    # F_cls of SRAE equals the mean over categories of the explainers' own test F_cls
    # (only this run's explainers: the shared cache may also hold other tests' categories and etas)
    cats = {int(c) for c in df.loc[df["method"] == "SRAE", "category"]}
    etas = set(tiny_run["config"]["explainer"]["grid"]["eta"])
    metas = [m for m in (json.loads(p.read_text()) for p in
             sorted((Path(tiny_run["config"]["cache_dir"]) / "explainers").glob("*/SRAE/*/cat*/meta.json"))
             if int(p.parent.name[3:]) in cats) if m["hparams"]["eta"] in etas]
    assert len(metas) == len(cats)
    assert main.loc[("F_cls", "test"), "SRAE"] == pytest.approx(np.mean([m["F_cls_test"] for m in metas]))
    # dead x-features: counted per explainer from meta.json, averaged over categories
    assert main.loc[("dead_x", "train"), "SRAE"] == pytest.approx(np.mean([len(m["dead_features"]) for m in metas]))
    assert main.loc[("dead_x", "train"), list(FIVE)].notna().all()
    masking = pd.read_parquet(out / "table_masking.parquet")
    assert list(masking["gamma"]) == [0.05, 0.3]
    assert {"Original Image", "Mask by x-features", "Mask by ExcitationBP"} <= set(masking.columns)
    sweep = pd.read_parquet(out / "table_lasso_sweep.parquet")
    assert {"0.5", "0.05"} <= set(sweep.columns)
    html = report.read_text()
    assert "qualitative findings hold on this data" in html and "Failed categories" in html
    assert "None: every category completed." in html
    assert "ExcitationBP on y-hat and SRAE x-features" in html  # the Fig. 1/4 grid
    assert html.count("data:image/png;base64,") >= 3  # + metric charts and the Lasso sweep
    for stage in ("dataset", "backbone", "features", "explainers", "heatmaps", "scoring", "masking"):
        assert f"<td>{stage}</td>" in html  # per-stage wall time in the footer


def test_artifacts_are_published(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="srae-tiny%")))
    by_key = {a.key: a for a in arts}
    assert {"srae-tiny-metrics", "srae-tiny-report", "srae-tiny-progress"} <= set(by_key)
    assert by_key["srae-tiny-progress"].type == "progress"
    assert float(by_key["srae-tiny-progress"].data) == pytest.approx(100.0)
    table = by_key["srae-tiny-metrics"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"metric", "split", "SRAE", "ExcitationBP"} <= set(rows[0])
    assert "report.html" in by_key["srae-tiny-report"].data


def test_srae_features_finds_the_backbone_srae_run_fitted(tiny_run, tmp_path):
    """`srae features CONFIG` after `srae run CONFIG` extracts with the fitted weights: the
    same fingerprint (dataset + weights sha256) and the same Z as the pipeline's store. It used
    to take the starting weights (VGG: ImageNet trunk with a random head) without a word."""
    from srae.config import config_from_dict
    from srae.features import open_features
    from srae.features_cli import features_from_config

    cfg = config_from_dict(tiny_run["config"])
    assert cfg.backbone.fit.epochs > 0 and cfg.backbone.checkpoint is None
    path = features_from_config(cfg, store_root=tmp_path / "st", progress=False)
    pipeline_stores = sorted((Path(cfg.cache_dir) / "features").glob("*.zarr"))
    assert [p.name for p in pipeline_stores] == [path.name]
    mine, theirs = open_features(path), open_features(pipeline_stores[0])
    assert list(mine.image_id) == list(theirs.image_id)
    np.testing.assert_allclose(mine.z[:], theirs.z[:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine.logits[:], theirs.logits[:], rtol=1e-5, atol=1e-5)


def test_failed_category_is_reported_and_the_others_complete(tiny_run, monkeypatch, caplog):
    """Category id 3 (label 2) is made to fail: in the library (sample design raises) and as a
    crashing task (the neural trainer raises); categories 1-2 still get their full report."""
    import srae.cv
    import srae.sampling
    import tasks.explainers
    from flows.pipeline import RunFailures, pipeline

    real_design = srae.sampling.design_samples

    def design(labels, category, **kw):
        if int(category) == 2:
            raise InputError("planted failure: category 2 has no usable samples")
        return real_design(labels, category, **kw)

    real_neural = tasks.explainers._train_neural

    def neural(method, cats, *args, **kw):
        if 2 in cats:
            raise RuntimeError("planted crash in the trainer")
        return real_neural(method, cats, *args, **kw)

    monkeypatch.setattr(srae.sampling, "design_samples", design)
    monkeypatch.setattr(srae.cv, "design_samples", design)
    monkeypatch.setattr(tasks.explainers, "_train_neural", neural)
    base = tiny_run["base"]
    # A cache of its own: the shared one may already hold category 3 (the incremental tests add
    # it), and this run's stores must not show up in theirs. The tiny backbone refits in seconds.
    cfg = tiny_pipeline_config(base, categories=[1, 2, 3], **{"report.out_dir": str(base / "report-failed"),
                                                              "cache_dir": str(base / "cache-failed")})
    with caplog.at_level("WARNING"), pytest.raises(RunFailures) as failure:  # the flow run ends Failed
        pipeline(cfg)
    report = Path(failure.value.report)  # written all the same
    assert any("failure(s) in categories [3]" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    df = R.read_metrics(report.parent / "metrics.parquet")
    # the CNN's part effects are measured before the explainers, for every category
    assert set(df.loc[df["method"] != "CNN", "category"]) == {0, 1}
    assert set(df.loc[df["method"] == "CNN", "category"]) == {0, 1, 2}
    assert FIVE <= set(df["method"])
    html = report.read_text()
    assert "planted crash in the trainer" in html and "planted failure: category 2" in html
    # one failed row per method at least, the class by its name (003.*), never the 0-based index 2
    assert len(re.findall(r"<td>003\.[^<]+</td>", html)) >= len(FIVE) and "<td>2</td>" not in html


def test_the_run_measures_part_effects_and_scores_concepts_against_them(tiny_run):
    """The causal stage's part effects reach metrics.parquet with their verdicts, and coverage,
    purity and recovery are scored against the used parts for explainers and single maps."""
    from srae.causal import concept_scores
    from srae.datasets import synthbirds as sb
    from srae.metrics.degeneracy import used_parts
    from tasks.causal import read_effects
    from tasks.scoring import histogram_of

    out = Path(tiny_run["report"]).parent
    df = R.read_metrics(out / "metrics.parquet")
    eff = df[df["metric"] == "part_effect"]
    assert set(eff["method"]) == {"CNN"} and set(eff["split"]) == {"test"}
    hp = eff["hparams"].map(json.loads)
    assert sorted(zip(eff["category"], hp.map(lambda h: h["part"]))) == sorted(
        (c, p) for c in (0, 1) for p in sb.SLOTS)
    assert all(h["count"] == 4 for h in hp)  # causal.max_images test positives each
    cache = Path(tiny_run["config"]["cache_dir"])
    effects = read_effects([str(p) for p in sorted((cache / "causal").glob("*.parquet"))])
    for c in (0, 1):  # the rows' verdicts are the rule applied to the stored drops
        mine = effects[effects["category"] == c]
        used = used_parts({p: mine.loc[mine["part"] == p, "drop"].to_numpy() for p in sb.SLOTS})
        rows = hp[eff["category"] == c]
        assert sorted(h["part"] for h in rows if h["used"]) == sorted(used)
        value = eff.loc[(eff["category"] == c) & (hp.map(lambda h: h["part"]) == "wing"), "value"].iloc[0]
        assert value == pytest.approx(mine.loc[mine["part"] == "wing", "drop"].mean())
        cov = df[(df["metric"] == "concept_coverage") & (df["category"] == c)]
        if not used:
            assert cov.empty
            continue
        # single maps always have a share (1); an explainer's shares are undefined where the weak
        # tiny CNN's mean y-hat on the positives is not positive, and then it has no coverage row
        assert "ExcitationBP" in set(cov["method"]) and cov["value"].between(0, 1).all()
        ebp = [f for f in (cache / "heatmaps").glob("**/*.scores.parquet")
               if pd.read_parquet(f)["method"].iloc[0] == "ExcitationBP" and pd.read_parquet(f)["category"].iloc[0] == c]
        hist = pd.read_parquet(histogram_of(ebp[0]))
        want = concept_scores(hist.to_numpy(), list(hist.columns), {k: list(v) for k, v in sb.SLOTS.items()}, used, [1.0])
        got = cov.loc[cov["method"] == "ExcitationBP", "value"].iloc[0]
        assert got == pytest.approx(want["concept_coverage"]) and got <= 1.0 / len(used) + 1e-12
    for metric in ("top_share", "n_eff"):
        sub = df[(df["metric"] == metric) & (df["method"] == "SRAE")]
        assert sorted(sub["category"]) == [0, 1] and sub["value"].between(0, 3 + 1e-9).all()


def test_a_failing_grad_cam_leaves_the_c_mwp_maps_of_its_category_drawn(tiny_run, monkeypatch):
    """Grad-CAM is a second method: when it fails (here: planted), the category's c-MWP stores
    (x-features, ExcitationBP, Z) are still drawn and scored, and the report names the failure."""
    import srae.heatmaps
    from flows.pipeline import RunFailures, pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("planted Grad-CAM failure")

    monkeypatch.setattr(srae.heatmaps, "gradcam_maps", broken)
    base = tiny_run["base"]
    cfg = tiny_pipeline_config(base, **{"report.out_dir": str(base / "report-nocam"), "report.figures": False,
                                        "heatmaps.max_images": 3})  # new stores for every method
    with pytest.raises(RunFailures) as failure:  # a failed method fails the run; the report is written
        pipeline(cfg)
    report = Path(failure.value.report)
    df = R.read_metrics(report.parent / "metrics.parquet")
    loc = df[df["metric"] == "locality"]
    assert FIVE | {"ExcitationBP", "Z"} <= set(loc["method"]) and "Grad-CAM" not in set(loc["method"])
    assert sorted(set(loc.loc[loc["method"] == "SRAE", "category"])) == [0, 1]
    assert "planted Grad-CAM failure" in report.read_text()


def test_bad_config_is_one_line_before_any_run(tmp_path, capsys):
    from srae import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("explainer:\n  methods: [SRAE, PCA]\n")
    orig = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = tuple(dict.fromkeys(orig + ("srae.run_cli",)))
    try:
        assert cli.main(["run", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert err.startswith(f"srae run: error: {bad}: explainer.methods.1: Input should be")
        assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
        assert "config file not found" in capsys.readouterr().err
        assert cli.main(["run", str(bad), "--categories", "x"]) == 2
    finally:
        cli.COMMAND_MODULES = orig


def test_resolve_config_and_groups(tmp_path):
    from flows.pipeline import category_groups, resolve_config

    cfg = resolve_config(tiny_pipeline_config(tmp_path), categories="1-3", dask_address="tcp://h:1", device="cpu")
    assert cfg.categories == [1, 2, 3] and cfg.scoring.dask_address == "tcp://h:1"
    assert category_groups([0, 1, 2, 5, 9], 4) == [[0, 1, 2], [5], [9]]
    assert category_groups([9, 0], 1) == [[0], [9]]
    with pytest.raises(SraeError, match="categories"):
        resolve_config(tiny_pipeline_config(tmp_path), categories="0-2")


def test_prefect_yaml_deployments_point_at_real_flows_and_valid_parameters():
    import importlib
    import inspect

    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.schedules import Cron

    from flows.pipeline import resolve_config

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    deps = {d.name: d for d in model.deployments}
    assert set(deps) == {"demo-nightly", "cub-full", "places-full", "add-categories", "benchmark-report"}
    for name, d in deps.items():
        path, func = d.entrypoint.split(":")
        assert (root / path).is_file(), name
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        inspect.signature(fl.fn).bind(**d.parameters)  # every parameter is one the flow takes
        assert d.work_pool.name == "srae-process"
        if "config" in d.parameters:
            cfg = resolve_config(root / d.parameters["config"], d.parameters.get("categories"),
                                 device=d.parameters.get("device"))
            assert cfg.name in name or name == "add-categories"
    (nightly,) = raw["deployments"][0]["schedules"]
    Cron(nightly["cron"], timezone=nightly["timezone"])
    assert deps["demo-nightly"].schedules[0].cron == "0 3 * * *"
    assert deps["add-categories"].parameters["categories"] == "1-20"
