"""Do the explanations separate the concepts the CNN uses?  A measurement, not a speed bench.

Two modes, each running the real pipeline (one temporary Prefect API for all runs) on the
factorial synthbirds design at 96 px, and reading ``metrics.parquet``:

- ``methods``: the default settings for each ``--seeds`` (the seed draws the dataset, the CNN
  and the explainers): per method, the means over categories of concept_coverage,
  concept_purity, n_eff, top_share, test F_cls and dead_x, with k of N categories where
  coverage beats ExcitationBP's, and how many classes use both evidence parts.
- ``sweep``: SRAE alone at one setting per point (beta, eta, q, n, refit seeds, CV rule; one
  value per grid axis, so cross-validation has nothing to choose unless the point names a
  grid and a rule), on ``--seeds`` (the development seed; held-out seeds are run after the
  selection rule is fixed).

    python -m benchmarks.concept_sweep methods --classes 4 --seeds 0 1 2
    python -m benchmarks.concept_sweep sweep --classes 4 --seeds 0
    python -m benchmarks.concept_sweep rebuild --root DIR   # re-summarise the runs under DIR

Results go to ``benchmarks/concept_sweep.json`` (merged by mode, classes and seed) and
``benchmarks/concept_sweep.md``, which ``make bench`` copies into ``results.md``. The ground
truth (part effects) scores each point; no rule in the pipeline reads it. Choosing a point by
its score on the development seed (as ``n 8`` was, for the held-out rows) is a choice made with
the ground truth, and the rendered text says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
JSON = HERE / "concept_sweep.json"
MARKDOWN = HERE / "concept_sweep.md"
METHODS = ("SRAE", "NN", "SAE", "CAE", "Lasso", "ExcitationBP", "Grad-CAM")
MEASURES = ("concept_coverage", "concept_purity", "n_eff", "top_share", "F_cls", "dead_x")

# Sweep points: explainer settings changed from the demo's (one value per grid axis).
BASE_GRID = {"beta": [1.0], "eta": [0.1], "q": [10.0], "lr": [0.01], "weight_decay": [0.0001]}
POINTS: dict[str, dict[str, Any]] = {
    "default grid, cv best": {"grid": {**BASE_GRID, "beta": [0.1, 1.0]}, "cv_rule": "best"},
    "default grid, cv one_se": {"grid": {**BASE_GRID, "beta": [0.1, 1.0]}, "cv_rule": "one_se"},
    "beta 0.01": {"grid": {**BASE_GRID, "beta": [0.01]}},
    "beta 0.1": {"grid": {**BASE_GRID, "beta": [0.1]}},
    "beta 1": {"grid": BASE_GRID},
    "beta 10": {"grid": {**BASE_GRID, "beta": [10.0]}},
    "eta 0": {"grid": {**BASE_GRID, "eta": [0.0]}},
    "eta 1": {"grid": {**BASE_GRID, "eta": [1.0]}},
    "eta 10": {"grid": {**BASE_GRID, "eta": [10.0]}},
    "q 1": {"grid": {**BASE_GRID, "q": [1.0]}},
    "q 100": {"grid": {**BASE_GRID, "q": [100.0]}},
    "n 2": {"grid": BASE_GRID, "n": 2},
    "n 3": {"grid": BASE_GRID, "n": 3},
    "n 8": {"grid": BASE_GRID, "n": 8},
    "refit seeds 1": {"grid": BASE_GRID, "refit_seeds": 1},
    "refit seeds 5": {"grid": BASE_GRID, "refit_seeds": 5},
    "no revival": {"grid": BASE_GRID, "revive": False},
    "lambda3 0.1": {"grid": {**BASE_GRID, "lambda3": [0.1]}},
    "lambda3 1": {"grid": {**BASE_GRID, "lambda3": [1.0]}},
    "wide grid, cv best": {"grid": {**BASE_GRID, "beta": [0.1, 1.0, 10.0], "eta": [0.1, 1.0, 10.0]},
                           "cv_rule": "best"},
    "wide grid, cv spread": {"grid": {**BASE_GRID, "beta": [0.1, 1.0, 10.0], "eta": [0.1, 1.0, 10.0]},
                             "cv_rule": "spread"},
}


def base_config(root: Path, classes: int, seed: int, name: str) -> dict[str, Any]:
    """The demo experiment on ``classes`` classes and ``seed``, with its data, cache and report
    under ``root`` (dataset, CNN and features are shared by every point of one seed)."""
    return {"name": name, "seed": seed, "cache_dir": str(root / "cache"),
            "dataset": {"root": str(root / f"data-{classes}-{seed}"), "classes": classes},
            "heatmaps": {"z_dims": 16}, "masking": {"enabled": False},
            "report": {"out_dir": str(root / "reports" / name), "figures": False}}


def summarise(metrics: pd.DataFrame) -> dict[str, Any]:
    """Per method, the mean over categories of each measure (test split; dead_x on train), the
    number of categories, and in how many SRAE's coverage beats ExcitationBP's."""
    df = metrics[~metrics["hparams"].str.contains('"sweep": true')]
    out: dict[str, Any] = {"methods": {}}
    for method in METHODS:
        rows = {}
        for m in MEASURES:
            sel = df[(df["method"] == method) & (df["metric"] == m) & (df["split"] == ("train" if m == "dead_x" else "test"))]
            vals = sel["value"].to_numpy(float)
            if len(vals):
                rows[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        if rows:
            out["methods"][method] = rows
    cov = df[df["metric"] == "concept_coverage"].pivot_table(index="category", columns="method", values="value")
    if {"SRAE", "ExcitationBP"} <= set(cov.columns):
        both = cov[["SRAE", "ExcitationBP"]].dropna()
        out["srae_beats_ebp"] = [int((both["SRAE"] > both["ExcitationBP"]).sum()), int(len(both))]
    from srae import report as R

    findings = R.qualitative_findings(R.table_main(metrics), metrics)
    out["findings"] = [{"claim": f.claim, "holds": f.holds, "k_of_n": list(f.k_of_n) if f.k_of_n else None}
                       for f in findings]
    eff = df[(df["metric"] == "part_effect")]
    if len(eff):
        hp = eff["hparams"].map(json.loads)
        ev = eff[hp.map(lambda h: bool(h.get("evidence")))]
        share = ev["hparams"].map(lambda s: json.loads(s).get("share") or 0.0)
        per_class = share.groupby(ev["category"]).min()
        out["classes_both_parts_20pct"] = [int((per_class >= 0.2).sum()), int(len(per_class))]
    return out


def run_name(mode: str, classes: int, seed: int, point: str) -> str:
    """The report folder name of one run."""
    return f"{mode}-{classes}-{seed}-{point.replace(' ', '_').replace(',', '')}"


def rebuild(root: Path) -> list[dict[str, Any]]:
    """Summarise every run already under ``root/reports`` again (nothing is rerun)."""
    names = {run_name(mode, c, s, p): (mode, c, s, p) for mode, pts in (("methods", ["default"]), ("sweep", POINTS))
             for p in pts for c in range(2, 201) for s in range(0, 10)}
    out = []
    for folder in sorted((root / "reports").iterdir()):
        key = names.get(folder.name)
        if key is None or not (folder / "metrics.parquet").is_file():
            continue
        metrics = pd.read_parquet(folder / "metrics.parquet")
        mode, classes, seed, point = key
        res = {"mode": mode, "classes": classes, "seed": seed, "point": point, **summarise(metrics)}
        if mode == "sweep":
            res["chosen"] = sorted(set(metrics[(metrics["method"] == "SRAE") & (metrics["metric"] == "F_cls")]["hparams"]))
        out.append(res)
    return out


def run_points(mode: str, classes: int, seeds: list[int], points: list[str], root: Path) -> list[dict[str, Any]]:
    from flows.pipeline import RunFailures, run_pipeline

    results = []
    for seed in seeds:
        for point in points:
            name = run_name(mode, classes, seed, point)
            cfg = base_config(root, classes, seed, name)
            if mode == "sweep":
                cfg["explainer"] = {"methods": ["SRAE"], "lasso_alpha": None, **POINTS[point]}
                cfg["heatmaps"]["gradcam"] = False
            try:
                path = Path(run_pipeline(cfg))
            except RunFailures as exc:  # some categories failed: their rows are missing, the report is there
                logging.getLogger("benchmarks").warning("%s: %s", name, exc)
                path = Path(exc.report)
            metrics = pd.read_parquet(path.parent / "metrics.parquet")
            res = {"mode": mode, "classes": classes, "seed": seed, "point": point, **summarise(metrics)}
            if mode == "sweep":
                chosen = metrics[(metrics["method"] == "SRAE") & (metrics["metric"] == "F_cls")]["hparams"]
                res["chosen"] = sorted(set(chosen))
            logging.getLogger("benchmarks").warning("%s: %s", name, json.dumps(res["methods"].get("SRAE", {})))
            results.append(res)
    return results


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def render(results: list[dict[str, Any]]) -> str:
    """The Markdown tables of every recorded run."""
    lines = ["# Concept separation (benchmarks/concept_sweep.py)", "",
             "Factorial synthbirds at 96 px (every trait shared by two classes). Means over categories. "
             "concept_coverage: share of the parts the CNN causally uses that are the top part of a distinct "
             "x-feature carrying >= 10% of y-hat; a single map (ExcitationBP, Grad-CAM) covers at most one. "
             "The part effects only score the runs; nothing is selected with them.", ""]
    methods = [r for r in results if r["mode"] == "methods"]
    if methods:
        lines += ["## Methods at their default settings", "",
                  "| classes | seed | method | coverage | purity | n_eff | top_share | F_cls test | dead_x |",
                  "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(methods, key=lambda r: (r["classes"], r["seed"])):
            for m, v in r["methods"].items():
                lines.append(f"| {r['classes']} | {r['seed']} | {m} | " + " | ".join(_fmt(v.get(k)) for k in MEASURES)
                             + " |")
        lines += ["", "| classes | seed | SRAE coverage > ExcitationBP's (k of N) | classes using both evidence "
                      "parts, each >= 20% of the summed effect |", "| ---: | ---: | ---: | ---: |"]
        for r in sorted(methods, key=lambda r: (r["classes"], r["seed"])):
            k = r.get("srae_beats_ebp", [None, None])
            b = r.get("classes_both_parts_20pct", [None, None])
            lines.append(f"| {r['classes']} | {r['seed']} | {k[0]} of {k[1]} | {b[0]} of {b[1]} |")
        lines += ["", "Findings (verdict, categories where the rule holds):", "",
                  "| classes | seed | " + " | ".join(f"F{i + 1}" for i in range(5)) + " |",
                  "| ---: | ---: |" + " :-: |" * 5]
        for r in sorted(methods, key=lambda r: (r["classes"], r["seed"])):
            cells = [(({True: "holds", False: "no", None: "n/a"}[f["holds"]])
                      + (f" ({f['k_of_n'][0]}/{f['k_of_n'][1]})" if f.get("k_of_n") else ""))
                     for f in r.get("findings", [])]
            lines.append(f"| {r['classes']} | {r['seed']} | " + " | ".join(cells) + " |")
        claims = next((r["findings"] for r in methods if r.get("findings")), [])
        lines += [""] + [f"F{i + 1}: {f['claim']}." for i, f in enumerate(claims)]
        lines.append("")
    sweep = [r for r in results if r["mode"] == "sweep"]
    if sweep:
        lines += ["## SRAE sweep (one setting per row, others as the demo)", "",
                  "4 classes, seed 0 is the development seed: every point ran there first. The other rows were "
                  "run afterwards with points fixed beforehand (n 8 was picked for them from the development "
                  "seed's coverage, so those rows test that pick). The spread rule's refit step was changed "
                  "(keep the refit by spread too) after the earlier rule's held-out rows had been seen, so its "
                  "rows are not a clean held-out test; neither version beats the default. SRAE at the default "
                  "settings on the same seeds is in the methods table above.", "",
                  "| classes | seed | point | coverage | purity | n_eff | top_share | F_cls test | dead_x | ExcitationBP coverage |",
                  "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(sweep, key=lambda r: (r["classes"], r["seed"], list(POINTS).index(r["point"])
                                              if r["point"] in POINTS else 99)):
            s = r["methods"].get("SRAE", {})
            e = r["methods"].get("ExcitationBP", {})
            lines.append(f"| {r['classes']} | {r['seed']} | {r['point']} | " + " | ".join(_fmt(s.get(k)) for k in MEASURES)
                         + f" | {_fmt(e.get('concept_coverage'))} |")
        lines.append("")
    return "\n".join(lines)


def merge(new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded runs with ``new`` replacing the same (mode, classes, seed, point)."""
    old = json.loads(JSON.read_text()) if JSON.is_file() else []
    key = lambda r: (r["mode"], r["classes"], r["seed"], r["point"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure how well each method separates the concepts the CNN uses.")
    ap.add_argument("mode", choices=["methods", "sweep", "rebuild"],
                    help="rebuild: summarise the runs already under --root again, without running anything")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--points", nargs="+", default=None, help=f"sweep points (default all: {', '.join(POINTS)})")
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    points = ["default"] if args.mode == "methods" else (args.points or list(POINTS))
    unknown = [p for p in points if args.mode == "sweep" and p not in POINTS]
    if unknown:
        ap.error(f"unknown sweep point(s) {unknown}")
    if args.mode == "rebuild":
        if args.root is None:
            ap.error("rebuild needs --root")
        results = merge(rebuild(args.root))
        JSON.write_text(json.dumps(results, indent=1))
        MARKDOWN.write_text(render(results))
        print(MARKDOWN)
        return 0
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        root = args.root or Path(tmp)
        results = merge(run_points(args.mode, args.classes, args.seeds, points, root))
    JSON.write_text(json.dumps(results, indent=1))
    MARKDOWN.write_text(render(results))
    print(MARKDOWN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
