"""The whole experiment as one Prefect flow (docs/design.md, "Layering").

dataset -> backbone -> features -> explainers (every method, mapped over category groups)
-> heatmaps (mapped over category groups) -> Dask scoring -> masking test -> report.

Every stage task is cached on its inputs + source and checks its stores' completion markers
before doing work, so a rerun of an unchanged config does no heavy work, added categories
are the only ones computed, and a changed hyperparameter recomputes only what depends on it.
A category that fails in any stage is listed in the report; the others go on. Such a run
still ends **Failed** (after its report is written; see :func:`pipeline`), so that schedules
and monitoring see it.

Run it with ``srae run CONFIG`` (no server needed) or through the deployments of
``prefect.yaml``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from srae.config import (ExperimentConfig, apply_overrides, config_from_dict, dump_config, load_config,
                         normalize_categories)
from srae.errors import SraeError
from srae.scoring import check_dask_address
from tasks.backbone import prepare_backbone
from tasks.causal import part_effects_task
from tasks.common import Progress, artifact_key, run_logger, short_error
from tasks.download import prepare_dataset
from tasks.explainers import SAMPLE_KEYS, method_settings, shared_variants, train_explainer_group
from tasks.features import extract_features_task
from tasks.heatmaps import heatmap_group, heatmap_jobs, z_column_note
from tasks.masking import masking_group
from tasks.report import build_report_task
from tasks.scoring import score_heatmaps, unscored_failures

log = logging.getLogger(__name__)

STAGES = ("dataset", "backbone", "features", "causal", "explainers", "heatmaps", "scoring", "masking", "report")


def resolve_config(config: str | Path | dict[str, Any] | ExperimentConfig,
                   categories: int | str | list[int] | None = None,
                   dask_address: str | None = None, device: str | None = None) -> ExperimentConfig:
    """A validated config from a YAML path, a dict or a model, with the run's overrides applied.

    ``categories``: one 1-based id (``3``), a string (``"1-20,35"``) or a list of ids."""
    if isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config, "config")
    else:
        cfg = load_config(config)
    cats = normalize_categories(categories, "categories")
    return apply_overrides(cfg, categories=cats, dask_address=dask_address, device=device)


def category_groups(labels: list[int], group_size: int) -> list[list[int]]:
    """Fixed buckets ``label // group_size``: adding a category changes only its own bucket."""
    buckets: dict[int, list[int]] = {}
    for c in sorted(labels):
        buckets.setdefault(c // group_size, []).append(c)
    return [buckets[k] for k in sorted(buckets)]


class _Stages:
    """Wall time per stage and the progress artifact."""

    def __init__(self, experiment: str) -> None:
        self.times: dict[str, float] = {}
        self.progress = Progress(artifact_key(f"srae-{experiment}-progress"), len(STAGES),
                                 f"{experiment}: pipeline progress")
        self._t0 = time.perf_counter()
        self._name: str | None = None

    def start(self, name: str) -> None:
        self._name, self._t0 = name, time.perf_counter()

    def done(self, fraction: float = 1.0) -> None:
        assert self._name is not None
        self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._t0
        self.progress.advance(fraction, f"{self._name} done")


def _collect(futures: list[tuple[Any, Any]], on_failure: Callable[[Any, BaseException], None],
             stages: _Stages, share: float) -> list[tuple[Any, Any]]:
    """Wait for mapped futures; return (meta, result) of the successful ones, report the rest."""
    out = []
    step = share / max(1, len(futures))
    for meta, fut in futures:
        try:
            out.append((meta, fut.result()))
        except Exception as exc:
            on_failure(meta, exc)
        stages.progress.advance(step)
    return out


@flow(name="srae-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)
def pipeline(config: str | dict[str, Any] = "configs/demo.yaml", categories: int | str | list[int] | None = None,
             dask_address: str | None = None, device: str | None = None) -> str:
    """Run the experiment in ``config`` end to end; return the path of report.html.

    ``categories`` (one 1-based class id, "1-20,35" or a list of ids), ``dask_address`` and
    ``device`` override the config.

    A category that fails in any stage does not stop the others, and the report is always
    written, listing the failures. But such a run is not a success: once the report is
    written the flow raises :class:`RunFailures` (the flow run ends **Failed**, ``srae run``
    exits with status 1 and names the report), so a scheduler or nightly monitor sees it.
    The report directory keeps the last clean run's report (report.html, report.md,
    metrics.parquet, tables) in ``<report.out_dir>/previous/`` while the latest run has
    failures (:func:`srae.report_html.build_report`); ``status.json`` beside report.html
    says how many failures the latest report has."""
    logger = run_logger()
    cfg = resolve_config(config, categories, dask_address, device)
    if cfg.scoring.dask_address:  # before any work: scoring comes late, and on a warm cache last
        check_dask_address(cfg.scoring.dask_address)
    cache = str(cfg.cache_dir)
    store = Path(cache) / "prefect-results"

    def opt(t):  # every task persists its (small, JSON) result next to the stores
        return t.with_options(result_storage=store)

    dev = cfg.device or "auto"
    st = _Stages(cfg.name)
    failed: list[dict[str, Any]] = []
    notes: list[str] = []

    st.start("dataset")
    ds = opt(prepare_dataset)(cfg.dataset.model_dump(mode="json"), cache)
    notes.extend(ds.get("notes", []))
    st.done()
    st.start("backbone")
    bb = opt(prepare_backbone)(cfg.backbone.model_dump(mode="json"), ds, cache, dev)
    if bb.get("test_accuracy") is not None:
        notes.append(f"backbone {bb['name']}: test accuracy {bb['test_accuracy']:.4f}")
    from srae.backbones import default_readout

    notes.append(f"heatmaps (c-MWP) read out at {cfg.heatmaps.readout or default_readout(bb['name'])} of "
                 f"{bb['name']}")
    st.done()
    st.start("features")
    ft = opt(extract_features_task)(ds, bb, cfg.features.model_dump(mode="json"), cache, dev)
    st.done()

    labels = cfg.label_ids(ds["num_classes"])
    groups = category_groups(labels, cfg.explainer.group_size)

    # ---- causal ground truth (synthetic data): which parts the CNN uses
    st.start("causal")
    causal = opt(part_effects_task)(ds, bb, cfg.causal.model_dump(mode="json"), labels, cache,
                                    cfg.stage_device(cfg.heatmaps.device))
    failed.extend(causal["failed"])
    st.done()
    explainer_root = str(Path(cache) / "explainers")
    logger.info("%d categories in %d groups, methods %s", len(labels), len(groups), cfg.explainer.methods)

    # ---- explainers: every method x variant x category group, as parallel tasks; a variant
    # with the same explainers as an earlier one (a headline Lasso alpha that is also a sweep
    # alpha) is trained once and its result reported under both settings
    st.start("explainers")
    futs = []
    also_as: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for method in cfg.explainer.methods:
        variants = method_settings(cfg.explainer, method)
        shared = shared_variants(variants)
        for i, j in shared.items():
            also_as.setdefault((method, j), []).append(variants[i])
        for i, settings in enumerate(variants):
            if i in shared:
                continue  # trained as variant shared[i]
            for g in groups:
                fut = opt(train_explainer_group).submit(method, g, settings, ft, ds, explainer_root, cache,
                                                        cfg.stage_device(cfg.explainer.device),
                                                        cfg.explainer.stack_categories)
                futs.append(((method, i, g), fut))

    def expl_failed(meta, exc):
        method, _, g = meta
        failed.extend({"category": c, "stage": "explainers", "method": method, "error": short_error(exc)} for c in g)

    expl_results = []
    for (method, i, _), r in _collect(futs, expl_failed, st, 0.9):
        expl_results += [r] + [dict(r, settings=s, failed={}) for s in also_as.get((method, i), [])]
    for r in expl_results:
        failed.extend({"category": int(c), "stage": "explainers", "method": r["method"], "error": msg}
                      for c, msg in r["failed"].items())
    st.done(0.1)

    # ---- heatmaps: per category group, for the headline explainers + ExcitationBP + Z
    st.start("heatmaps")
    hcfg = cfg.heatmaps.model_dump(mode="json")
    hcfg["device"] = cfg.stage_device(cfg.heatmaps.device)
    heat_root = str(Path(cache) / "heatmaps")
    jobs_by_group = heatmap_jobs(expl_results, groups, ft, bb, cfg, heat_root, dataset=ds)
    notes.append(z_column_note(cfg))
    samples = {k: getattr(cfg.explainer, k) for k in SAMPLE_KEYS}
    hfuts = [(g, opt(heatmap_group).submit(jobs, ds, bb, ft, hcfg, cache, samples))
             for g, jobs in jobs_by_group if jobs]

    def heat_failed(g, exc):
        failed.extend({"category": c, "stage": "heatmaps", "method": None, "error": short_error(exc)} for c in g)

    heat_results = [r for _, r in _collect(hfuts, heat_failed, st, 0.9)]
    done_jobs = [j for r in heat_results for j in r["done"]]
    failed.extend(f for r in heat_results for f in r["failed"])
    st.done(0.1)

    # ---- scoring on Dask
    st.start("scoring")
    score_files: list[str] = []
    if done_jobs:
        try:
            sres = opt(score_heatmaps)(done_jobs, ds, cfg.scoring.model_dump(mode="json"), cfg.name, cache)
            score_files, failed_scores = sres["scores"], sres["failed"]
            notes.extend(sres.get("notes", []))
            failed.extend(failed_scores)
        except Exception as exc:  # the categories left unscored become failed-category rows
            unscored = unscored_failures(done_jobs, exc)
            failed.extend(unscored)
            if not unscored:
                notes.append(f"scoring failed: {short_error(exc)}")
    st.done()

    # ---- masking test (Table 2b / 4)
    st.start("masking")
    masking_files: list[str] = []
    if cfg.masking.enabled and "SRAE" in cfg.explainer.methods:
        mcfg = cfg.masking.model_dump(mode="json")
        mcfg["device"] = cfg.stage_device(cfg.heatmaps.device)
        mfuts = [(g, opt(masking_group).submit(jobs, ds, bb, mcfg, cache, cfg.name)) for g, jobs in jobs_by_group if jobs]

        def mask_failed(g, exc):
            failed.extend({"category": c, "stage": "masking", "method": None, "error": short_error(exc)} for c in g)

        for _, r in _collect(mfuts, mask_failed, st, 0.9):
            masking_files += r["files"]
            failed.extend(r["failed"])
        st.done(0.1)
    else:
        st.done()

    # ---- report
    st.start("report")
    figures = _figure_specs(done_jobs, ds, ft, cfg)
    names = ds["class_names"]
    for f in failed:
        c = f.get("category")
        if isinstance(c, int) and 0 <= c < len(names):
            f.setdefault("class", names[c])
    path = opt(build_report_task)(
        cfg.name, str(cfg.report.out_dir), expl_results, score_files, masking_files, class_names=names,
        causal_files=causal["files"], dataset=ds,
        lasso_alpha=None,  # headline Lasso rows are the non-sweep ones
        failed=failed, bad_inputs=ds["bad_inputs"] + ft.get("bad_inputs", []), timings=dict(st.times),
        config_yaml=dump_config(cfg, applicable_only=True) if cfg.report.include_config else None, figures=figures, notes=notes, title=cfg.report.title)
    st.done()
    logger.info("report: %s", path)
    if failed:  # every category ran as far as it could and the report lists them: now fail the run
        cats = sorted({f["category"] for f in failed if isinstance(f.get("category"), int)})
        logger.warning("%d failure(s) in categories %s (stages: %s); see the report's Failed categories",
                       len(failed), [c + 1 for c in cats], ", ".join(sorted({str(f.get("stage")) for f in failed})))
        raise run_failures(failed, path)
    return path


class RunFailures(SraeError):
    """The run finished and wrote its report, but categories failed (the flow run ends Failed).

    ``report``: the path of report.html (it lists the failures); ``failures``: how many
    failed-category rows; ``exit_status``: what ``srae run`` exits with (1: the run ran and
    reported; 2 is kept for a config or input that stopped it)."""

    exit_status = 1

    def __init__(self, message: str, report: str | None = None, failures: int = 0) -> None:
        super().__init__(message)
        self.report = report
        self.failures = failures


def run_failures(failed: list[dict[str, Any]], report: str) -> RunFailures:
    """The exception that fails a run whose ``failed`` rows (0-based categories) are listed in
    ``report``: one line naming the 1-based categories, the stages and the report."""
    cats = sorted({f["category"] for f in failed if isinstance(f.get("category"), int)})
    stages = sorted({str(f.get("stage")) for f in failed})
    where = f"categor{'y' if len(cats) == 1 else 'ies'} {', '.join(str(c + 1) for c in cats)}" if cats else "the run"
    return RunFailures(f"{len(failed)} category failure(s) in {where} (stages: {', '.join(stages)}); "
                       f"report: {report}", report=report, failures=len(failed))


def _figure_specs(done_jobs: list[dict[str, Any]], ds: dict[str, Any], ft: dict[str, Any],
                  cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Fig. 1/4 grids for the first few categories that have SRAE heatmaps."""
    if not cfg.report.figures:
        return []
    ebp = {(j["category"], j.get("split")): j["heatmaps"] for j in done_jobs if j["method"] == "ExcitationBP"}
    specs = []
    for j in done_jobs:
        if j["method"] != "SRAE" or len(specs) >= cfg.report.max_figure_categories:
            continue
        c = int(j["category"])
        if (c, j.get("split")) not in ebp:
            continue
        specs.append({"title": f"{ds['class_names'][c]}: ExcitationBP on y-hat and SRAE x-features (v_i E_i)",
                      "heatmaps": j["heatmaps"], "ebp": ebp[(c, j.get("split"))], "dataset": ds, "category": c,
                      "explainer": j.get("explainer"), "features": ft["path"], "rows": 4,
                      "scale": cfg.report.figure_scale})
    return specs


def run_pipeline(config: str | Path | dict[str, Any] | ExperimentConfig, **overrides: Any) -> str:
    """Validate first (one-line errors before any Prefect start-up), then run the flow."""
    cfg = resolve_config(config, **overrides)
    return pipeline(cfg.model_dump(mode="json"))
