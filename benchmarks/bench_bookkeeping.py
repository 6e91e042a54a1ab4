"""Scoring bookkeeping per category: splitting the scored rows back into one frame per job.

After one Dask pass over every heatmap group, the scoring task hands each job its own rows.
Filtering the whole frame once per job grows with jobs x rows (quadratic in the categories);
:func:`tasks.scoring.rows_by_job` groups once. Timed on synthetic metric frames shaped like a
run's (8 map groups per category, ~10 rows each) at 25 and 200 categories, side by side with
the per-job filter (the old way, written out here as the baseline).

Ratios: time per job at 25 categories / at 200 (target >= 0.67: flat within 1.5x), and the
per-job filter / grouping at 200 categories (target >= 1).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd

from tasks.scoring import rows_by_job

TITLE = "Scoring bookkeeping per category"
METHODS = ("SRAE", "NN", "SAE", "CAE", "Lasso", "ExcitationBP", "Grad-CAM", "Z")


def frame_and_jobs(categories: int, rows_per_job: int = 10) -> tuple[pd.DataFrame, list]:
    jobs = [SimpleNamespace(method=m, category=c, split="test") for c in range(categories) for m in METHODS]
    n = len(jobs) * rows_per_job
    frame = pd.DataFrame({"method": np.repeat([j.method for j in jobs], rows_per_job),
                          "category": np.repeat([j.category for j in jobs], rows_per_job),
                          "split": "test", "metric": "locality", "value": np.arange(n, dtype=float)})
    return frame, jobs


def per_job_filter(frame: pd.DataFrame, jobs: list) -> list[pd.DataFrame]:
    """The baseline: one boolean filter of the whole frame per job."""
    return [frame[(frame["method"] == j.method) & (frame["category"] == j.category)
                  & (frame["split"] == j.split)].reset_index(drop=True) for j in jobs]


def _best_of(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def run(device: str = "cpu", full: bool = False) -> dict:
    rows, per_job = [], {}
    for cats in (25, 200):
        frame, jobs = frame_and_jobs(cats)
        grouped = _best_of(rows_by_job, frame, jobs)
        per_job[cats] = grouped / len(jobs)
        rows.append({"name": f"grouped, {cats} categories ({len(jobs)} jobs)", "value": grouped, "unit": "s"})
        if cats == 200:
            old = _best_of(per_job_filter, frame, jobs, repeats=1)
            rows.append({"name": f"per-job filter, {cats} categories", "value": old, "unit": "s"})
            assert all(a.equals(b) for a, b in zip(rows_by_job(frame, jobs), per_job_filter(frame, jobs)))
    ratios = [{"name": "time per job, 25 / 200 categories (flat = 1)", "value": per_job[25] / per_job[200],
               "target": 0.67},
              {"name": "per-job filter / grouped, 200 categories", "value": old / grouped, "target": 1.0}]
    return {"rows": rows, "ratios": ratios,
            "notes": "Both give the same frames (checked). Synthetic frames: 8 map groups per category."}


if __name__ == "__main__":
    print(run())
