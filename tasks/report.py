"""Stage 8: the report (metrics.parquet, tables, HTML) and the Prefect artifacts.

The long table is assembled from the stores: faithfulness from each explainer's
``meta.json``, locality / orthogonality / concept recovery from the ``*.scores.parquet``
files, masking accuracy from the masking parquet files. The report is always rebuilt (it is
cheap and its footer shows this run's stage times), so it is not cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from srae import report as R
from srae.causal import concept_scores, summarise_effects
from srae.datasets.counterfactual import part_columns, synth_params
from srae.report_html import ReportInputs, build_report
from srae.scoring import UNLABELED
from tasks.causal import read_effects, synth_dir
from tasks.common import artifact_key, run_logger, short_error
from tasks.explainers import row_hparams
from tasks.scoring import concepts_of, histogram_of

log = logging.getLogger(__name__)


def faithfulness_rows(experiment: str, explainer_results: list[dict[str, Any]],
                      dead: dict[tuple[int, str], set[int]] | None = None,
                      notes: list[str] | None = None,
                      shares: dict[tuple[int, str], list[float]] | None = None) -> list[dict[str, Any]]:
    """F_reg / F_cls train+test rows, the dead x-feature count, and top_share / n_eff (test
    positives) from every explainer's meta.json. ``dead`` (if given) receives the dead
    x-features (0-based) of each headline (category, method); ``shares`` each headline
    x-feature's mean share of y-hat; ``notes`` what the report should say about them
    (:func:`explainer_notes`)."""
    from srae.explainers import META_FILE

    rows = []
    headline: list[tuple[str, int, dict]] = []
    for res in explainer_results:
        settings = res.get("settings", {})
        for cat, d in res.get("explainers", {}).items():
            meta = json.loads((Path(d) / META_FILE).read_text())
            if not settings.get("sweep"):
                headline.append((res["method"], int(cat), meta))
                if dead is not None:
                    dead[(int(cat), res["method"])] = {int(i) for i in meta.get("dead_features") or ()}
            hp = row_hparams(res["method"], settings, meta)
            for metric in ("F_reg", "F_cls"):
                for split in ("train", "test"):
                    key = f"{metric}_{split}"
                    if key in meta:  # null (strict JSON for NaN, e.g. an empty test set) -> a NaN row
                        v = float("nan") if meta[key] is None else meta[key]
                        rows.append(R.metric_row(experiment, int(cat), res["method"], metric, split, float(v),
                                                 int(meta.get("n_features", 0)), hp))
            if "dead_features" in meta:  # absent in explainers saved before it was recorded
                rows.append(R.metric_row(experiment, int(cat), res["method"], "dead_x", "train",
                                         float(len(meta["dead_features"])), int(meta.get("n_features", 0)), hp))
            for metric in ("top_share", "n_eff"):  # absent in explainers saved before they were recorded
                if f"{metric}_test" in meta:
                    v = meta[f"{metric}_test"]
                    rows.append(R.metric_row(experiment, int(cat), res["method"], metric, "test",
                                             float("nan") if v is None else float(v), int(meta.get("n_features", 0)),
                                             hp))
            if shares is not None and not settings.get("sweep") and meta.get("feature_shares_test") is not None:
                shares[(int(cat), res["method"])] = [float("nan") if v is None else float(v)
                                                     for v in meta["feature_shares_test"]]
    if notes is not None:
        notes.extend(explainer_notes(headline))
    return rows


def explainer_notes(headline: list[tuple[str, int, dict]]) -> list[str]:
    """Report notes on the headline explainers ((method, 0-based category, meta) each) that
    training only logged: Lasso selections larger than ``max_features`` (no alpha in the grid
    was large enough; Table 1 then compares O1/O2 over more maps) and Lasso fits that stopped
    at ``max_iter``."""
    wide = [(c, m["n_features"], m["max_features"]) for method, c, m in headline
            if method == "Lasso" and m.get("max_features") and m.get("n_features", 0) > m["max_features"]]
    rough = [c for method, c, m in headline if method == "Lasso" and m.get("converged") is False]
    ids = lambda cs: ", ".join(str(c + 1) for c in sorted(cs))  # noqa: E731  (1-based, as the CLI)
    out = []
    if wide:
        out.append(f"Lasso selected more than {wide[0][2]} dims of Z in class(es) "
                   + ", ".join(f"{c + 1} ({n})" for c, n, _ in sorted(wide))
                   + ": no alpha in explainer.lasso_alphas is large enough there (add larger ones); its "
                   "O1/O2 there are over more maps than the other methods'.")
    if rough:
        out.append(f"Lasso stopped at max_iter without converging in class(es) {ids(rough)}: its selection "
                   "there may be rough.")
    return out


def _read_parquets(paths: list[str]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths if Path(p).is_file()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(R.METRIC_COLUMNS))


def part_effect_rows(experiment: str, effects: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """``part_effect`` rows (method CNN, split test, the part and its verdict in hparams) and
    the parts each category uses (:func:`srae.causal.summarise_effects`)."""
    rows, used = [], {}
    for r in summarise_effects(effects).itertuples(index=False):
        hp = {"part": r.part, "evidence": bool(r.evidence), "used": bool(r.used),
              "share": None if pd.isna(r.share) else float(r.share), "se": None if pd.isna(r.se) else float(r.se),
              "count": int(r.count)}
        rows.append(R.metric_row(experiment, int(r.category), "CNN", "part_effect", "test", float(r.mean), None, hp))
        if r.used:
            used.setdefault(int(r.category), []).append(str(r.part))
    return rows, used


def concept_rows(experiment: str, score_files: list[str], used: dict[int, list[str]],
                 groups: dict[str, list[str]], shares: dict[tuple[int, str], list[float]]) -> list[dict[str, Any]]:
    """``concept_coverage``, ``concept_purity`` and ``concept_recovery`` of every scored map
    group with a histogram, against the parts its category uses (:func:`srae.causal.concept_scores`):
    an explainer's x-features weighted by their share of y-hat, ExcitationBP and Grad-CAM as one
    map of y-hat (share 1); the Z column is skipped."""
    rows = []
    for f in score_files:
        h = histogram_of(f)
        if not Path(f).is_file():
            continue
        if not h.is_file():
            log.warning("%s: no histogram beside it (scored before histograms were kept); no concept scores", f)
            continue
        first = pd.read_parquet(f).head(1)
        if first.empty or first["method"].iloc[0] == "Z":
            continue
        cat, method = int(first["category"].iloc[0]), str(first["method"].iloc[0])
        hist = pd.read_parquet(h)
        share = [1.0] * len(hist) if method in ("ExcitationBP", "Grad-CAM") else shares.get((cat, method))
        if share is None or len(share) != len(hist) or cat not in used:
            continue
        values = concept_scores(hist.to_numpy(float), list(hist.columns), groups, used[cat], share,
                                ignore=[UNLABELED])
        rows += [R.metric_row(experiment, cat, method, m, str(first["split"].iloc[0]), v, len(hist),
                              json.loads(first["hparams"].iloc[0])) for m, v in values.items() if not np.isnan(v)]
    return rows


def causal_metrics(experiment: str, causal_files: list[str], score_files: list[str], dataset: dict[str, Any] | None,
                   shares: dict[tuple[int, str], list[float]]) -> list[dict[str, Any]]:
    """The causal ground truth's rows: part effects, and concept coverage / purity against them."""
    effects = read_effects(causal_files)
    found = synth_dir(dataset) if dataset is not None else None
    if effects.empty or found is None:
        return []
    rows, used = part_effect_rows(experiment, effects)
    groups = part_columns(synth_params(found))
    return rows + concept_rows(experiment, score_files, used, groups, shares)


def assemble_metrics(experiment: str, explainer_results: list[dict[str, Any]], score_files: list[str],
                     masking_files: list[str], dead: dict[tuple[int, str], set[int]] | None = None,
                     notes: list[str] | None = None, causal_files: list[str] | None = None,
                     dataset: dict[str, Any] | None = None) -> pd.DataFrame:
    """The long metrics table of this run (``dead``, ``notes``: see :func:`faithfulness_rows`;
    ``causal_files`` and ``dataset``: the part effects of :mod:`tasks.causal` and the rows
    scored against them)."""
    shares: dict[tuple[int, str], list[float]] = {}
    faithful = faithfulness_rows(experiment, explainer_results, dead, notes, shares)
    try:
        causal = causal_metrics(experiment, causal_files or [], score_files, dataset, shares)
    except Exception as exc:  # a damaged effects file must not cost the report
        log.warning("part effects and concept scores left out: %s", exc)
        causal = []
        if notes is not None:
            notes.append(f"part effects and concept scores left out ({short_error(exc)})")
    parts = [pd.DataFrame(faithful, columns=list(R.METRIC_COLUMNS)),
             pd.DataFrame(causal, columns=list(R.METRIC_COLUMNS)),
             _read_parquets(score_files), _read_parquets(masking_files)]
    if len(parts[1]) and len(parts[2]):
        # with a causal truth, concept scores are against the parts the CNN uses, never against the
        # generator's intent: one definition per column (a pair without a causal score has none)
        scored = parts[2]
        parts[2] = scored[~scored["metric"].isin(["concept_recovery", "concept_coverage"])]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=list(R.METRIC_COLUMNS))
    df = pd.concat(parts, ignore_index=True)
    df["experiment"] = experiment
    df["n_features"] = df["n_features"].astype("Int64")
    return R.validate_metrics(df)


def _figures(fig_specs: list[dict[str, Any]], logger) -> list[tuple[str, bytes]]:
    """Fig. 1/4 grids: image, ExcitationBP on y-hat, the x-features sorted by v_i E_i; after
    each, the category's concept atlas (each x-feature's top test positives, its map on them)."""
    out: list[tuple[str, bytes]] = []
    for spec in fig_specs:
        names = spec.get("dataset", {}).get("class_names") or []
        c = spec.get("category")
        atlas = f"Concept atlas: {names[c] if isinstance(c, int) and 0 <= c < len(names) else c}"
        for kind, title in (("grid", spec.get("title")), ("atlas", atlas)):
            try:  # a figure must never sink the report
                out.append((title, _figure(spec, kind)))
            except Exception as exc:
                logger.warning("figure %s skipped: %s", title, exc)
    return out


def _figure(spec: dict[str, Any], kind: str = "grid") -> bytes:
    """PNG of the Fig. 4 grid (``kind="grid"``: the first ``spec["rows"]`` test positives) or
    the concept atlas (``"atlas"``: all test positives in the heatmap store); both read the
    same stores, E_i and v_i E_i from the explainer on those images' features."""
    from srae.explainers import load_explainer
    from srae.heatmaps import open_heatmaps, positive_rows
    from srae.report_figures import figure_png
    from tasks.explainers import load_feature_arrays

    xs = open_heatmaps(spec["heatmaps"])
    z, logits, labels, all_ids = load_feature_arrays(spec["features"])
    pos = {int(i): k for k, i in enumerate(all_ids)}
    # the category's own images: a store may hold negatives too (heatmaps.images: all)
    limit = spec.get("rows", 4) if kind == "grid" else None
    keep = positive_rows(xs.image_id, {i: labels[k] for i, k in pos.items()}, spec["category"], limit)
    ids = xs.image_id[keep]
    sel = [pos[int(i)] for i in ids]
    expl = load_explainer(spec["explainer"])
    dead = expl.meta.get("dead_features", ())
    size = xs.maps.shape[-1]
    if kind == "atlas":
        from srae.atlas import concept_atlas, top_images

        e = expl.features(z[sel])
        need = sorted({int(k) for k in top_images(e, 4).ravel() if k >= 0})  # only these are read
        fig = concept_atlas({k: _load_image(spec["dataset"], int(ids[k]), size) for k in need},
                            {k: np.asarray(xs.maps[int(keep[k])]) for k in need}, e, expl.contributions(z[sel]),
                            ids=ids, top=4, dead=dead)
        return figure_png(fig)
    from srae.figures import excitation_grid

    eb = open_heatmaps(spec["ebp"])
    e_row = {int(i): k for k, i in enumerate(eb.image_id)}
    xmaps = np.stack([np.asarray(xs.maps[int(r)]) for r in keep])
    ebp = np.stack([np.asarray(eb.maps[e_row[int(i)]]) for i in ids])
    images = np.stack([_load_image(spec["dataset"], int(i), size) for i in ids])
    fig = excitation_grid(images, ebp, xmaps, expl.contributions(z[sel]), predictions=logits[sel, spec["category"]],
                          scale=spec.get("scale", "row"), title=spec["title"], dead=dead)
    return figure_png(fig)


def _load_image(dataset: dict[str, Any], image_id: int, size: int) -> np.ndarray:
    from srae.images import load_image, resize_uint8
    from tasks.download import load_index

    index = load_index(dataset)
    row = index.images.set_index("image_id").loc[image_id]
    return resize_uint8(load_image(index.abspath(row["path"])), size).permute(1, 2, 0).numpy()


def _artifacts(experiment: str, main: pd.DataFrame, path: Path, summary: str, logger) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        table = []
        for (metric, split), row in main.iterrows():
            rec = {"metric": metric, "split": split}
            rec |= {m: (None if pd.isna(v) else round(float(v), 4)) for m, v in row.items()}
            table.append(rec)
        key = artifact_key(f"srae-{experiment}")
        create_table_artifact(table=table, key=f"{key}-metrics", description=f"{experiment}: Table 1/3 (mean over categories)")
        create_markdown_artifact(
            markdown=f"# SRAE report: {experiment}\n\n{summary}\n\nReport: [{path}](file://{path.resolve()})\n\n"
                     f"Tables and metrics.parquet: `{path.parent.resolve()}`\n",
            key=f"{key}-report", description="link to the HTML report")
    except Exception as exc:
        logger.warning("artifacts not created: %s", exc)


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def build_report_task(experiment: str, out_dir: str, explainer_results: list[dict[str, Any]],
                      score_files: list[str], masking_files: list[str], *, class_names: list[str],
                      lasso_alpha: float | None, failed: list[dict[str, Any]], bad_inputs: list[dict[str, Any]],
                      timings: dict[str, float], config_yaml: str | None, figures: list[dict[str, Any]],
                      notes: list[str], title: str | None = None, causal_files: list[str] | None = None,
                      dataset: dict[str, Any] | None = None) -> str:
    """Write the report; return the path of report.html."""
    logger = run_logger()
    dead: dict[tuple[int, str], set[int]] = {}
    notes = list(notes)
    metrics = assemble_metrics(experiment, explainer_results, score_files, masking_files, dead, notes,
                               causal_files, dataset)
    top_parts = _read_parquets([str(concepts_of(f)) for f in score_files])
    if {"category", "method", "feature"} <= set(top_parts.columns):
        top_parts["dead"] = [int(f) in dead.get((int(c), m), ()) for c, m, f in
                             zip(top_parts["category"], top_parts["method"], top_parts["feature"])]
    inp = ReportInputs(experiment=experiment, metrics=metrics, out_dir=Path(out_dir), class_names=class_names,
                       top_parts=top_parts,
                       lasso_alpha=lasso_alpha, failed=failed, bad_inputs=bad_inputs, timings=timings,
                       figures=_figures(figures, logger), config_yaml=config_yaml, notes=notes, title=title)
    path = build_report(inp)
    from srae.report_html import summary_line

    main = R.table_main(inp.metrics, lasso_alpha)
    _artifacts(experiment, main, path, summary_line(R.qualitative_findings(main, inp.metrics, lasso_alpha=lasso_alpha)),
               logger)
    logger.info("report: %s", path)
    return str(path)
