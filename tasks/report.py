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
from srae.report_html import ReportInputs, build_report
from tasks.common import artifact_key, run_logger
from tasks.explainers import row_hparams
from tasks.scoring import concepts_of

log = logging.getLogger(__name__)


def faithfulness_rows(experiment: str, explainer_results: list[dict[str, Any]],
                      dead: dict[tuple[int, str], set[int]] | None = None,
                      notes: list[str] | None = None) -> list[dict[str, Any]]:
    """F_reg / F_cls train+test rows, and the dead x-feature count, from every explainer's meta.json.
    ``dead`` (if given) receives the dead x-features (0-based) of each headline (category, method);
    ``notes`` what the report should say about them (:func:`explainer_notes`)."""
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


def assemble_metrics(experiment: str, explainer_results: list[dict[str, Any]], score_files: list[str],
                     masking_files: list[str], dead: dict[tuple[int, str], set[int]] | None = None,
                     notes: list[str] | None = None) -> pd.DataFrame:
    """The long metrics table of this run (``dead``, ``notes``: see :func:`faithfulness_rows`)."""
    parts = [pd.DataFrame(faithfulness_rows(experiment, explainer_results, dead, notes),
                          columns=list(R.METRIC_COLUMNS)),
             _read_parquets(score_files), _read_parquets(masking_files)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=list(R.METRIC_COLUMNS))
    df = pd.concat(parts, ignore_index=True)
    df["experiment"] = experiment
    df["n_features"] = df["n_features"].astype("Int64")
    return R.validate_metrics(df)


def _figures(fig_specs: list[dict[str, Any]], logger) -> list[tuple[str, bytes]]:
    """Fig. 1/4 grids: image, ExcitationBP on y-hat, the x-features sorted by v_i E_i."""
    out: list[tuple[str, bytes]] = []
    for spec in fig_specs:
        try:
            out.append((spec["title"], _figure(spec)))
        except Exception as exc:  # a figure must never sink the report
            logger.warning("figure %s skipped: %s", spec.get("title"), exc)
    return out


def _figure(spec: dict[str, Any]) -> bytes:
    from srae.explainers import load_explainer
    from srae.figures import excitation_grid
    from srae.heatmaps import open_heatmaps, positive_rows
    from srae.report_figures import figure_png
    from tasks.explainers import load_feature_arrays

    xs = open_heatmaps(spec["heatmaps"])
    eb = open_heatmaps(spec["ebp"])
    z, logits, labels, all_ids = load_feature_arrays(spec["features"])
    pos = {int(i): k for k, i in enumerate(all_ids)}
    # the category's own images: a store may hold negatives too (heatmaps.images: all)
    keep = positive_rows(xs.image_id, {i: labels[k] for i, k in pos.items()}, spec["category"], spec.get("rows", 4))
    ids = xs.image_id[keep]
    e_row = {int(i): k for k, i in enumerate(eb.image_id)}
    xmaps = np.stack([np.asarray(xs.maps[int(r)]) for r in keep])
    ebp = np.stack([np.asarray(eb.maps[e_row[int(i)]]) for i in ids])
    images = np.stack([_load_image(spec["dataset"], int(i), xmaps.shape[-1]) for i in ids])
    sel = [pos[int(i)] for i in ids]
    expl = load_explainer(spec["explainer"])
    fig = excitation_grid(images, ebp, xmaps, expl.contributions(z[sel]), predictions=logits[sel, spec["category"]],
                          scale=spec.get("scale", "row"),
                          title=spec["title"], dead=expl.meta.get("dead_features", ()))
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
                      notes: list[str], title: str | None = None) -> str:
    """Write the report; return the path of report.html."""
    logger = run_logger()
    dead: dict[tuple[int, str], set[int]] = {}
    notes = list(notes)
    metrics = assemble_metrics(experiment, explainer_results, score_files, masking_files, dead, notes)
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
    _artifacts(experiment, main, path, summary_line(R.qualitative_findings(main)), logger)
    logger.info("report: %s", path)
    return str(path)
