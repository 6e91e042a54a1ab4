"""Stage 6: Dask-parallel locality / orthogonality / concept-recovery scoring of heatmap groups.

One task scores every heatmap group that has no scores yet: the chunks run on a
``dask.distributed`` client (an existing cluster at ``scoring.dask_address``, else a local
one) via :func:`srae.scoring.score`. Each group's rows go to ``<group>.scores.parquet``
(written atomically), the completion marker of its scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tasks.common import (TASK_DEFAULTS, atomic_write_parquet, claimed_groups, record_work, run_logger, short_error,
                          stage_cache, timed)
from tasks.download import load_index


def _derived(heatmap_group: str, annotations: str | None, kind: str) -> Path:
    p = Path(heatmap_group)
    tag = f".a{annotations}" if annotations else ""
    return p.with_name(f"{p.name}{tag}.{kind}.parquet")


def scores_path(heatmap_group: str, annotations: str | None = None) -> Path:
    """Metric rows of one scored group, named by the annotations they were computed from (a
    job's ``annotations``: the head of the dataset's annotation hash), so an edited box, part
    or mask gives new scores while the heatmaps are reused."""
    return _derived(heatmap_group, annotations, "scores")


def concepts_path(heatmap_group: str, annotations: str | None = None) -> Path:
    """Per-x-feature "part it lands on most" table of one scored group (synthetic data only)."""
    return _derived(heatmap_group, annotations, "concepts")


def histogram_path(heatmap_group: str, annotations: str | None = None) -> Path:
    """Each x-feature's mean located mass over the annotation columns (parts or objects) of one
    scored group: rows are x-features, columns the part/object names. Concept coverage and
    purity against the causal ground truth are computed from it at report time."""
    return _derived(heatmap_group, annotations, "hist")


def histogram_of(scores_file: str | Path) -> Path:
    """The histogram written beside a scores file (:func:`histogram_path` of the same group)."""
    p = Path(scores_file)
    return p.with_name(p.name.removesuffix(".scores.parquet") + ".hist.parquet")


def concepts_of(scores_file: str | Path) -> Path:
    """The concept table written beside a scores file (:func:`concepts_path` of the same group)."""
    p = Path(scores_file)
    return p.with_name(p.name.removesuffix(".scores.parquet") + ".concepts.parquet")


def _scores(j: dict[str, Any]) -> Path:
    return scores_path(j["heatmaps"], j.get("annotations"))


def _scored(j: dict[str, Any]) -> bool:
    """A group is scored when its scores exist, and (but for the Z column, whose streamed
    scores have no store to read again) the histogram concept scores are computed from."""
    hist = histogram_path(j["heatmaps"], j.get("annotations"))
    return _scores(j).is_file() and (j["method"] == "Z" or hist.is_file())


def unscored_failures(jobs: list[dict[str, Any]], exc: BaseException) -> list[dict[str, Any]]:
    """Failed-category rows for the ``jobs`` a crashed scoring task left without scores.

    One row per category (stage "scoring", its unscored methods, the one-line reason), like
    the rows of a crashed explainer or heatmap task; categories already scored are not listed."""
    unscored: dict[int, set[str]] = {}
    for j in jobs:
        if not _scores(j).is_file():
            unscored.setdefault(int(j["category"]), set()).add(str(j["method"]))
    reason = short_error(exc)
    return [{"category": c, "stage": "scoring", "method": ", ".join(sorted(m)), "error": reason}
            for c, m in sorted(unscored.items())]


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(str(_scores(j)), _scored(j)) for j in inputs["jobs"]]


@task(name="scoring", cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def score_heatmaps(jobs: list[dict[str, Any]], dataset: dict[str, Any], scoring: dict[str, Any],
                   experiment: str, cache_dir: str) -> dict[str, Any]:
    """Score the not-yet-scored ``jobs`` (dicts of :class:`srae.scoring.ScoreJob` fields).

    Returns ``{"scores": [parquet paths], "failed": [{category, method, error}], "notes": [str]}``
    (notes: e.g. concept rows left out for an evidence name the dataset does not know)."""
    logger = run_logger()
    failed: list[dict[str, Any]] = []
    notes: list[str] = []
    # Another run scoring (or redrawing) the same groups is waited for and its scores reused:
    # scored twice before, and a redraw could drop scores computed from the old maps.
    with claimed_groups(jobs, _scored, what="heatmaps to score") as todo:
        if todo:
            _score_and_save(todo, jobs, dataset, scoring, experiment, cache_dir, failed, notes, logger)
    return {"scores": [str(_scores(j)) for j in jobs if _scores(j).is_file()],
            "failed": failed, "notes": notes}


def _score_and_save(todo: list[dict[str, Any]], jobs: list[dict[str, Any]], dataset: dict[str, Any],
                    scoring: dict[str, Any], experiment: str, cache_dir: str, failed: list[dict[str, Any]],
                    notes: list[str], logger) -> None:
    """Score ``todo`` on Dask and write each group's rows (and concept table) atomically."""
    from srae.scoring import ScoreJob

    index = load_index(dataset)
    specs = [ScoreJob(heatmaps=j["heatmaps"], category=int(j["category"]), method=j["method"],
                      split=j.get("split", "test"), class_index=int(j["category"]), experiment=experiment,
                      hparams=j.get("hparams", {}), metrics=tuple(j["metrics"])) for j in todo]
    with timed() as t:
        results = _score_each(specs, index, scoring, failed, logger, notes)
        seconds = t()
    for j, res in zip(todo, results):
        if res is None:
            continue
        rows, concepts, (names, hist) = res
        if not concepts.empty:
            atomic_write_parquet(concepts, concepts_path(j["heatmaps"], j.get("annotations")))
        atomic_write_parquet(pd.DataFrame(hist, columns=names), histogram_path(j["heatmaps"], j.get("annotations")))
        atomic_write_parquet(rows, _scores(j))  # last: the marker of a scored group
        record_work(cache_dir, "scoring", f"{j['method']}/{j['category']}", seconds / max(1, len(todo)),
                    method=j["method"], category=int(j["category"]))
    logger.info("scoring: %d groups scored, %d failed, %d reused", len(todo) - len(failed), len(failed),
                len(jobs) - len(todo))


def _score_each(specs, index, scoring, failed, logger, notes: list[str]) -> list[tuple | None]:
    """Score all jobs on Dask at once; if that fails, job by job so one bad group is isolated."""
    from srae.scoring import dask_client, score

    with dask_client(scoring.get("dask_address"), scoring.get("n_workers"), bool(scoring.get("processes")),
                     int(scoring.get("threads_per_worker", 1))) as client:
        try:
            res = score(specs, index, client=client)
            notes.extend(res.notes)
            return list(zip(rows_by_job(res.metrics, specs), rows_by_job(res.concepts, specs), res.histograms))
        except Exception as exc:
            logger.warning("scoring all groups together failed (%s); scoring one by one", exc)
        out: list[tuple | None] = []
        for s in specs:
            try:
                res = score([s], index, client=client)
                notes.extend(res.notes)
                out.append((res.metrics, res.concepts, res.histograms[0]))
            except Exception as exc:
                failed.append({"category": s.category, "stage": "scoring", "method": s.method,
                               "error": short_error(exc)})
                out.append(None)
        return out


def rows_by_job(frame: pd.DataFrame, specs) -> list[pd.DataFrame]:
    """The rows of each job (jobs differ in method, category or split), in ``specs`` order:
    one grouping pass, so the bookkeeping stays linear in the number of jobs."""
    if frame.empty:
        return [frame] * len(specs)
    groups = {key: g.reset_index(drop=True) for key, g in frame.groupby(["method", "category", "split"], sort=False)}
    empty = frame.iloc[0:0].reset_index(drop=True)
    return [groups.get((s.method, s.category, s.split), empty) for s in specs]
