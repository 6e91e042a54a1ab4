"""Reports: the long metrics table and the paper-style tables derived from it.

Everything here starts from one long frame (docs/design.md, "Data contracts") with the columns
``experiment, category, method, metric, split, value, n_features, hparams``. The wide
tables are *derived* from it, never computed separately:

- :func:`table_main` - Table 1 / 3: rows = metric x split, columns = methods
  (SRAE, NN, SAE, Lasso, CAE, Z, ExcitationBP); values averaged per category, then over
  categories.
- :func:`table_lasso_sweep` - Table 2a / 5: Num_x and F_reg per Lasso alpha.
- :func:`table_masking` - Table 2b / 4: accuracy per gamma on original / masked images.
- :func:`table_concepts` - concept recovery on synthetic data (category x method).
- :func:`table_part_effects` - which parts the CNN uses per class (counterfactual drops).
- :func:`table_degeneracy` - top_share, n_eff, concept coverage / purity, dead_x per method.
- :func:`qualitative_findings` - whether the paper's qualitative claims hold, with k of N
  categories and bootstrap intervals when given the long frame (plus one claim beyond it).

The HTML page lives in :mod:`srae.report_html`, the figures in :mod:`srae.report_figures`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from srae.errors import InputError

log = logging.getLogger(__name__)

METRIC_COLUMNS: tuple[str, ...] = (
    "experiment", "category", "method", "metric", "split", "value", "n_features", "hparams",
)
TABLE_METHODS: tuple[str, ...] = ("SRAE", "NN", "SAE", "Lasso", "CAE", "Z", "ExcitationBP")
# Heatmap methods beyond the paper's: a Table 1 column only when scored.
EXTRA_METHODS: tuple[str, ...] = ("Grad-CAM",)
MAIN_ROWS: tuple[tuple[str, str], ...] = (
    ("F_reg", "train"), ("F_reg", "test"), ("F_cls", "train"), ("F_cls", "test"),
)
# Rows after the paper's: x-features per category that fire on no training image.
EXTRA_ROWS: tuple[tuple[str, str], ...] = (("dead_x", "train"),)
HEATMAP_METRICS: tuple[str, ...] = ("O1", "O2", "locality")
ORIGINAL_METRICS: tuple[str, ...] = ("mask_acc@original", "acc_original")  # accuracy on unmasked images
PERCENT_METRICS: tuple[str, ...] = ("F_cls",)  # shown as percentages
METRICS_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("category", pa.int64()), ("method", pa.string()),
    ("metric", pa.string()), ("split", pa.string()), ("value", pa.float64()),
    ("n_features", pa.int64()), ("hparams", pa.string()),
])


# ---------------------------------------------------------------------- the long table
def metric_row(
    experiment: str, category: int, method: str, metric: str, split: str, value: float,
    n_features: int | None = None, hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the long table (hparams serialised as canonical JSON)."""
    return {
        "experiment": experiment, "category": int(category), "method": method, "metric": metric,
        "split": split, "value": float(value),
        "n_features": None if n_features is None else int(n_features),
        "hparams": json.dumps(hparams or {}, sort_keys=True, default=str),
    }


def validate_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Check the long table's columns and types; returns a normalised copy."""
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"metrics table: missing columns {missing}")
    out = df.loc[:, list(METRIC_COLUMNS)].copy()
    for col in ("experiment", "method", "metric", "split", "hparams"):
        if out[col].isna().any():
            raise InputError(f"metrics table: column {col!r} has empty values")
        out[col] = out[col].astype(str)
    try:
        cat = pd.to_numeric(out["category"])
        if cat.isna().any() or (cat != cat.round()).any():
            raise ValueError(f"category {cat[cat.isna() | (cat != cat.round())].iloc[0]} is not a class index")
        out["category"] = cat.astype("int64")
        out["value"] = out["value"].astype("float64")
        out["n_features"] = out["n_features"].astype("Int64")
    except (TypeError, ValueError) as exc:
        raise InputError(f"metrics table: bad numeric column ({exc})") from None
    bad_split = sorted(set(out["split"]) - {"train", "test"})
    if bad_split:
        raise InputError(f"metrics table: split must be train/test, got {bad_split}")
    return out.reset_index(drop=True)


def write_metrics(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the long table as Parquet with the fixed schema of docs/design.md, "Data contracts".

    Atomically: to a temporary file beside ``path``, then ``os.replace``; a write that fails
    leaves the previous ``path`` as it was and removes the temporary file."""
    import os

    from srae.stores import temp_beside

    df = validate_metrics(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=METRICS_SCHEMA, preserve_index=False)
    tmp = temp_beside(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing there after the replace
    return path


def read_metrics(path: str | Path) -> pd.DataFrame:
    """Read ``metrics.parquet`` back into the normalised long frame."""
    return validate_metrics(pq.read_table(Path(path)).to_pandas())


def _hp(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError:
        return {}
    return v if isinstance(v, dict) else {}


def _is_sweep(df: pd.DataFrame) -> pd.Series:
    return df["hparams"].map(lambda s: bool(_hp(s).get("sweep", False))).astype(bool)


def _headline(df: pd.DataFrame, lasso_alpha: float | None) -> pd.DataFrame:
    """Rows that make the headline tables: no sweep rows; Lasso at the headline alpha."""
    df = df[~_is_sweep(df)]
    if lasso_alpha is not None:
        alpha = df["hparams"].map(lambda s: _hp(s).get("alpha"))
        is_lasso = df["method"] == "Lasso"
        keep = ~is_lasso | alpha.isna() | alpha.map(
            lambda a: a is not None and not _isnan(a) and math.isclose(float(a), lasso_alpha, rel_tol=1e-9))
        df = df[keep.astype(bool)]
    return df


def _isnan(a: Any) -> bool:
    try:
        return math.isnan(float(a))
    except (TypeError, ValueError):
        return True


def _category_mean(df: pd.DataFrame, keys: list[str], infinite: list[dict[str, Any]] | None = None) -> pd.Series:
    """Mean per category first (duplicates averaged), then over categories.

    Categories whose value is infinite (O2 of a singular correlation matrix, inf by design)
    are left out of the mean, so one such category does not turn the whole cell into inf; a
    cell whose categories are all infinite stays inf. With ``infinite`` given, one record per
    cell with infinite categories is appended: the ``keys`` values, ``infinite`` (how many)
    and ``categories`` (out of how many)."""
    per_cat = df.groupby(keys + ["category"], sort=False)["value"].mean()
    levels = list(range(len(keys)))
    is_inf = pd.Series(np.isinf(per_cat.to_numpy(dtype=np.float64)), index=per_cat.index)
    means = per_cat.mask(is_inf).groupby(level=levels, sort=False).mean()
    n_inf = is_inf.groupby(level=levels, sort=False).sum()
    only_inf = means.isna() & (n_inf > 0)
    if only_inf.any():
        means[only_inf] = per_cat.groupby(level=levels, sort=False).mean()[only_inf]
    if infinite is not None:
        total = per_cat.groupby(level=levels, sort=False).size()
        # NaN (not computable, e.g. F_reg of an empty test set) is skipped by the mean too: say so
        n_nan = per_cat.isna().groupby(level=levels, sort=False).sum()
        for kind, counts in (("infinite", n_inf), ("missing", n_nan)):
            for key, k in counts[counts > 0].items():
                vals = key if isinstance(key, tuple) else (key,)
                infinite.append({**{c: str(v) for c, v in zip(keys, vals)}, kind: int(k),
                                 "categories": int(total[key])})
    return means


def _left_out(t: pd.DataFrame, kind: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    recs = t.attrs.get("infinite_categories", []) if hasattr(t, "attrs") else []
    return {(r["metric"], r["split"], r["method"]): (int(r[kind]), int(r["categories"])) for r in recs if kind in r}


def infinite_categories(t: pd.DataFrame) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``{(metric, split, method): (infinite, categories)}`` of a :func:`table_main` frame:
    the cells whose mean left out categories with an infinite value (kept in ``t.attrs``)."""
    return _left_out(t, "infinite")


def missing_categories(t: pd.DataFrame) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``{(metric, split, method): (missing, categories)}``: the cells of a :func:`table_main`
    frame whose mean skipped categories with a NaN value."""
    return _left_out(t, "missing")


# ---------------------------------------------------------------------- wide tables
def table_main(df: pd.DataFrame, lasso_alpha: float | None = None) -> pd.DataFrame:
    """Table 1 / 3. Index ``(metric, split)``, columns :data:`TABLE_METHODS` (NaN = not scored),
    then those of :data:`EXTRA_METHODS` that were scored.

    Means leave out categories with an infinite value (O2); which cells did, and for how many
    categories, is in ``attrs["infinite_categories"]`` (see :func:`infinite_categories`)."""
    df = _headline(validate_metrics(df), lasso_alpha)
    splits = [s for s in ("test", "train") if ((df["metric"].isin(HEATMAP_METRICS)) & (df["split"] == s)).any()]
    rows = (list(MAIN_ROWS) + [(m, s) for m in HEATMAP_METRICS for s in (splits or ["test"])]
            + list(EXTRA_ROWS))
    infinite: list[dict[str, Any]] = []
    means = _category_mean(df, ["metric", "split", "method"], infinite)
    index = pd.MultiIndex.from_tuples(rows, names=["metric", "split"])
    extra = [m for m in EXTRA_METHODS if m in set(df["method"])]
    out = pd.DataFrame(np.nan, index=index, columns=[*TABLE_METHODS, *extra], dtype="float64")
    for (metric, split, method), value in means.items():
        if (metric, split) in index and method in out.columns:
            out.loc[(metric, split), method] = value
    out.attrs["infinite_categories"] = [r for r in infinite if (r["metric"], r["split"]) in index
                                        and r["method"] in out.columns]
    out.attrs["lasso_alpha"] = lasso_alpha  # for qualitative_findings' per-category rows
    return out


def main_display(t: pd.DataFrame) -> pd.DataFrame:
    """:func:`table_main` for reading: a cell that left out infinite categories reads
    ``"2.5000 (1 of 4 inf)"``, one that skipped NaN categories ``"0.5000 (1 of 3 n/a)"``
    (F_cls as a percentage, like the cells beside it); the other cells keep their numbers."""
    out = t.astype(object)
    notes: dict[tuple[str, str, str], list[str]] = {}
    for cell, (k, n) in infinite_categories(t).items():
        notes.setdefault(cell, []).append(f"{k} of {n} inf")
    for cell, (k, n) in missing_categories(t).items():
        notes.setdefault(cell, []).append(f"{k} of {n} n/a")
    for (metric, split, method), parts in notes.items():
        v = float(t.loc[(metric, split), method])
        number = percent(v) if metric in PERCENT_METRICS else f"{v:.4f}"
        shown = "inf" if math.isinf(v) else "n/a" if math.isnan(v) else number
        out.loc[(metric, split), method] = f"{shown} ({', '.join(parts)})"
    return out


def table_lasso_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2a / 5: columns = alpha (descending); rows Num_x, F_reg/F_cls train/test.

    Uses the Lasso rows marked ``"sweep": true`` in hparams (all Lasso rows with an
    ``alpha`` when there are none)."""
    df = validate_metrics(df)
    df = df[df["method"] == "Lasso"].copy()
    df["alpha"] = df["hparams"].map(lambda s: _hp(s).get("alpha"))
    df = df[df["alpha"].map(lambda a: a is not None and not _isnan(a)).astype(bool)]
    sweep = _is_sweep(df)
    if sweep.any():
        df = df[sweep]
    if df.empty:
        return pd.DataFrame(index=pd.Index([], name="row"), dtype="float64")
    df["alpha"] = df["alpha"].astype(float)
    alphas = sorted(df["alpha"].unique(), reverse=True)
    rows: dict[str, dict[float, float]] = {"Num_x": {}}
    nfeat = df.dropna(subset=["n_features"])
    if not nfeat.empty:
        per_cat = nfeat.groupby(["alpha", "category"])["n_features"].mean()
        rows["Num_x"] = per_cat.groupby(level=0).mean().to_dict()
    for metric in ("F_reg", "F_cls"):
        for split in ("train", "test"):
            sub = df[(df["metric"] == metric) & (df["split"] == split)]
            if not sub.empty:
                rows[f"{metric} {split}"] = _category_mean(sub, ["alpha"]).to_dict()
    out = pd.DataFrame({a: {r: v.get(a, np.nan) for r, v in rows.items()} for a in alphas})
    out.index.name = "row"
    out.columns = pd.Index(alphas, name="alpha")
    return out.astype("float64")


def gamma_metric(gamma: float) -> str:
    """Metric name of masking accuracy at threshold ``gamma`` (e.g. ``mask_acc@0.05``)."""
    return f"mask_acc@{gamma:g}"


def table_masking(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2b / 4: index gamma; columns "Original Image", "Mask by <method>", then (where
    recorded) "Kept area, <method>": the mean share of pixels each method's mask keeps.

    Source rows: metric ``mask_acc@<gamma>`` and ``mask_area@<gamma>`` per method, and
    ``mask_acc@original`` (any method)."""
    df = validate_metrics(df)
    is_orig = df["metric"].isin(ORIGINAL_METRICS)
    masked = _by_gamma(df[df["metric"].str.startswith("mask_acc@") & ~is_orig], "mask_acc@")
    if masked.empty:
        return pd.DataFrame(index=pd.Index([], name="gamma"), dtype="float64")
    order = [m for m in TABLE_METHODS if m in set(masked["method"])]
    order += sorted(set(masked["method"]) - set(order))
    gammas = sorted(masked["gamma"].unique())
    out = pd.DataFrame(index=pd.Index(gammas, name="gamma"), dtype="float64")
    orig = df[is_orig]
    out["Original Image"] = orig.groupby("category")["value"].mean().mean() if not orig.empty else np.nan
    area = _by_gamma(df[df["metric"].str.startswith("mask_area@")], "mask_area@")
    for rows, prefix in ((masked, "Mask by"), (area, "Kept area,")):
        if rows.empty:
            continue
        means = _category_mean(rows, ["gamma", "method"])
        for method in order:
            label = f"{prefix} x-features" if method == "SRAE" else f"{prefix} {method}"
            out[label] = [means.get((g, method), np.nan) for g in gammas]
    return out


def _by_gamma(rows: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """``rows`` of metrics ``<prefix><gamma>`` with a numeric ``gamma`` column; a metric whose
    suffix is not a number is a one-line error."""
    rows = rows.copy()
    rows["gamma"] = pd.to_numeric(rows["metric"].str.slice(len(prefix)), errors="coerce")
    bad = rows.loc[rows["gamma"].isna(), "metric"]
    if len(bad):
        raise InputError(f"metrics table: masking metric {bad.iloc[0]!r} is not {prefix}<gamma> or "
                         "mask_acc@original")
    return rows


def table_concepts(df: pd.DataFrame, class_names: list[str] | None = None) -> pd.DataFrame:
    """Concept recovery on synthetic data: rows = category (+ "mean"), columns = methods."""
    df = validate_metrics(df)
    sub = df[(df["metric"] == "concept_recovery") & ~_is_sweep(df)]
    if sub.empty:
        return pd.DataFrame(dtype="float64")
    wide = sub.groupby(["category", "method"])["value"].mean().unstack("method")
    cols = [m for m in TABLE_METHODS if m in wide.columns] + sorted(set(wide.columns) - set(TABLE_METHODS))
    wide = wide[cols]
    wide.loc["mean"] = wide.mean(axis=0)
    names = class_names or []  # always strings: a mixed int / "mean" index cannot be written to Parquet
    wide.index = [names[i] if isinstance(i, (int, np.integer)) and 0 <= i < len(names) else str(i)
                  for i in wide.index]
    wide.index.name = "category"
    wide.columns.name = None
    return wide


def table_top_parts(top: pd.DataFrame, class_names: list[str] | None = None) -> pd.DataFrame:
    """Per category and method, the part (or object) each x-feature lands on most.

    ``top`` holds :func:`srae.metrics.concepts.top_part_table` rows with ``category`` and
    ``method`` columns; cells read ``"crown (0.41)*"``: the part, its share of the feature's
    mass, and ``*`` when it is one of the class's evidence parts; ``"(dead)"`` follows an
    x-feature that fires on no training image (an optional boolean ``dead`` column).
    """
    need = {"category", "method", "feature", "top_part", "top_mass", "on_evidence"}
    if top is None or top.empty or not need <= set(top.columns):
        return pd.DataFrame(dtype="object")
    dead = top["dead"].fillna(False).astype(bool) if "dead" in top.columns else pd.Series(False, index=top.index)
    cell = [(f"{p} ({m:.2f}){'*' if ev else ''}" if p else "-") + (" (dead)" if d else "")
            for p, m, ev, d in zip(top["top_part"], top["top_mass"], top["on_evidence"], dead)]
    frame = top.assign(cell=cell, feature=[f"x{int(f) + 1}" for f in top["feature"]])
    wide = frame.pivot_table(index=["category", "method"], columns="feature", values="cell", aggfunc="first")
    order = [m for m in TABLE_METHODS if m in set(frame["method"])] + sorted(set(frame["method"]) - set(TABLE_METHODS))
    wide = wide.reset_index()
    wide["method"] = pd.Categorical(wide["method"], categories=order, ordered=True)
    wide = wide.sort_values(["category", "method"])
    if class_names:
        wide["category"] = [class_names[int(c)] if 0 <= int(c) < len(class_names) else str(c) for c in wide["category"]]
    wide["method"] = wide["method"].astype(str)
    wide.columns.name = None
    return wide.set_index(["category", "method"])


def table_per_category(df: pd.DataFrame, metric: str = "F_cls", split: str = "test",
                       lasso_alpha: float | None = None, class_names: list[str] | None = None) -> pd.DataFrame:
    """One metric per category (rows, the 0-based ``category`` as in metrics.parquet) and method
    (columns): for spotting bad categories. Rendered (Markdown, HTML) with the rows named as the
    CLI and logs name classes, 1-based id and name (``"3: 003.Blue_bird"``): ``attrs``
    ``index_labels`` and ``index_title``."""
    df = _headline(validate_metrics(df), lasso_alpha)
    sub = df[(df["metric"] == metric) & (df["split"] == split)]
    if sub.empty:
        return pd.DataFrame(dtype="float64")
    wide = sub.groupby(["category", "method"])["value"].mean().unstack("method")
    cols = [m for m in TABLE_METHODS if m in wide.columns]
    names = class_names or []
    wide.columns.name = None
    wide = wide[cols]
    wide.attrs["percent"] = metric in PERCENT_METRICS
    wide.attrs["index_labels"] = {int(c): f"{int(c) + 1}: {names[int(c)]}" if 0 <= int(c) < len(names)
                                  else str(int(c) + 1) for c in wide.index}
    wide.attrs["index_title"] = f"class ({metric} {split})"
    return wide


# ---------------------------------------------------------------------- degeneracy, part effects
# Beyond the paper: does an explanation collapse onto one x-feature, and do its x-features
# separate the parts the CNN uses? (rows from srae.metrics.degeneracy, split "test")
DEGENERACY_ROWS: tuple[tuple[str, str], ...] = (
    ("top_share", "test"), ("n_eff", "test"), ("concept_coverage", "test"), ("concept_purity", "test"),
)
PART_EFFECT_METRIC = "part_effect"


def _row_keys(df: pd.DataFrame) -> pd.Series:
    return df["metric"] + "\x00" + df["split"]


def table_degeneracy(df: pd.DataFrame, lasso_alpha: float | None = None) -> pd.DataFrame:
    """Degeneracy and concept separation per method (beyond the paper).

    Index ``metric``: those of :data:`DEGENERACY_ROWS` that were recorded, then ``dead_x``
    (train) where recorded; columns = methods (Table 1's order, then the others); cells = the
    mean over categories (a category's duplicates averaged first, NaN skipped). Empty when none
    of the :data:`DEGENERACY_ROWS` metrics was recorded."""
    df = _headline(validate_metrics(df), lasso_alpha)
    keys = _row_keys(df)
    if not keys.isin([f"{m}\x00{s}" for m, s in DEGENERACY_ROWS]).any():
        return pd.DataFrame(index=pd.Index([], name="metric"), dtype="float64")
    rows = [r for r in (*DEGENERACY_ROWS, *EXTRA_ROWS) if (keys == f"{r[0]}\x00{r[1]}").any()]
    sub = df[keys.isin([f"{m}\x00{s}" for m, s in rows])]
    means = _category_mean(sub, ["metric", "method"])
    present = set(sub["method"])
    methods = [m for m in (*TABLE_METHODS, *EXTRA_METHODS) if m in present]
    methods += sorted(present - set(methods))
    out = pd.DataFrame(np.nan, index=pd.Index([m for m, _ in rows], name="metric"), columns=methods,
                       dtype="float64")
    for (metric, method), value in means.items():
        out.loc[metric, method] = value
    out.columns.name = None
    return out


def _part_effect_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The CNN's part-effect rows: category, part, value (mean drop), used, evidence."""
    df = validate_metrics(df)
    sub = df[(df["metric"] == PART_EFFECT_METRIC) & (df["split"] == "test") & (df["method"] == "CNN")]
    hp = sub["hparams"].map(_hp)
    part = hp.map(lambda h: h.get("part"))
    out = pd.DataFrame({"category": sub["category"].to_numpy(), "part": part.to_numpy(),
                        "value": sub["value"].to_numpy(),
                        "used": hp.map(lambda h: bool(h.get("used", False))).to_numpy(dtype=bool),
                        "evidence": hp.map(lambda h: bool(h.get("evidence", False))).to_numpy(dtype=bool)})
    out = out[np.array([p is not None and str(p) != "" for p in out["part"]], dtype=bool)]
    return out.assign(part=out["part"].astype(str)).reset_index(drop=True)


def evidence_parts_used(df: pd.DataFrame) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` classes with part-effect rows for at least one evidence part,
    the ``k`` whose evidence parts the CNN uses, every one of them (hparams ``evidence`` and
    ``used`` of the ``part_effect`` rows)."""
    rows = _part_effect_rows(df)
    ev = rows[rows["evidence"]]
    if ev.empty:
        return 0, 0
    per_class = ev.groupby(["category", "part"])["used"].all().groupby(level=0).all()
    return int(per_class.sum()), int(per_class.size)


def table_part_effects(df: pd.DataFrame, class_names: list[str] | None = None) -> pd.DataFrame:
    """Which parts the CNN uses, per class: rows = class (name, or the 0-based index as a
    string), columns = parts (in the order first recorded), cells = the mean drop of y-hat when
    the part is swapped for a nuisance colour, ``"5.32*"`` with ``*`` when the part counts as
    used. From the ``CNN`` ``part_effect`` rows; duplicates are averaged (used only if every
    duplicate says so). ``attrs["evidence_parts_used"]`` holds :func:`evidence_parts_used`."""
    rows = _part_effect_rows(df)
    if rows.empty:
        return pd.DataFrame(index=pd.Index([], name="class"), dtype="object")
    agg = rows.groupby(["category", "part"], sort=False).agg(value=("value", "mean"), used=("used", "all"))
    parts = list(dict.fromkeys(rows["part"]))
    cats = sorted(set(int(c) for c in rows["category"]))
    names = class_names or []
    labels = {c: names[c] if 0 <= c < len(names) else str(c) for c in cats}
    out = pd.DataFrame(np.nan, index=pd.Index([labels[c] for c in cats], name="class"), columns=parts,
                       dtype="object")
    for (c, p), r in agg.iterrows():
        v = float(r["value"])
        out.loc[labels[int(c)], p] = ("n/a" if math.isnan(v) else f"{v:.2f}") + ("*" if bool(r["used"]) else "")
    out.columns.name = None
    out.attrs["evidence_parts_used"] = list(evidence_parts_used(df))
    return out


# ---------------------------------------------------------------------- findings
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Finding:
    """One qualitative claim of the paper and whether it holds here (None: not evaluable).

    ``k_of_n``: in how many categories the rule, applied to that category alone, holds, of
    the categories with every value it needs (None: not computed, e.g. without the long
    frame). ``intervals``: ``(what, mean, low, high)`` per difference that drives the rule,
    the mean over categories with a percentile bootstrap 95% interval (categories resampled).
    ``beyond_paper``: a statement this implementation adds, not one of the paper's."""

    claim: str
    holds: bool | None
    evidence: str
    rule: str = ""  # what decides the verdict, in words
    k_of_n: tuple[int, int] | None = None
    intervals: tuple[tuple[str, float, float, float], ...] = ()
    beyond_paper: bool = False

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "does NOT hold", None: "not evaluated"}[self.holds]


def bootstrap_ci(values: Any, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per category): ``n_boot``
    resamples of the categories with replacement from ``numpy.random.default_rng(seed)``, so
    deterministic. Non-finite values are left out; ``(nan, nan)`` when none is left; exactly
    ``(v, v)`` when every value is ``v``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _get(t: pd.DataFrame, metric: str, split: str, method: str) -> float:
    try:
        v = float(t.loc[(metric, split), method])
    except KeyError:
        return float("nan")
    return v


def _heat_split(t: pd.DataFrame) -> str:
    splits = [s for (m, s) in t.index if m == "locality"]
    return "test" if "test" in splits or not splits else splits[0]


def _per_category(d: pd.DataFrame | None, need: dict[str, tuple[str, str, str]]) -> pd.DataFrame:
    """One column per name in ``need`` (``(metric, split, method)``), one row per category (its
    rows averaged), only the categories that have every value (infinite values are kept)."""
    if d is None or not need:
        return pd.DataFrame(columns=list(need), dtype="float64")
    cols: dict[str, pd.Series] = {}
    for name, (metric, split, method) in need.items():
        sub = d[(d["metric"] == metric) & (d["split"] == split) & (d["method"] == method)]
        cols[name] = sub.groupby("category")["value"].mean().astype("float64")
    frame = pd.DataFrame(cols)
    return frame.dropna(how="any")


class _Strength:
    """k of N and the bootstrap intervals of one finding, and their words."""

    def __init__(self, n_boot: int, seed: int) -> None:
        self.n_boot, self.seed = n_boot, seed
        self.k_of_n: tuple[int, int] | None = None
        self.intervals: list[tuple[str, float, float, float]] = []
        self.words: list[str] = []

    def count(self, ok: pd.Series) -> None:
        self.k_of_n = (int(ok.astype(bool).sum()), int(len(ok)))

    def interval(self, label: str, diffs: pd.Series, points: bool = False) -> None:
        d = np.asarray(diffs, dtype=np.float64)
        finite = d[np.isfinite(d)]
        if finite.size == 0:
            return
        mean = float(finite[0]) if np.all(finite == finite[0]) else float(finite.mean())
        lo, hi = bootstrap_ci(finite, self.n_boot, self.seed)
        self.intervals.append((label, mean, lo, hi))
        fmt = (lambda x: f"{100 * x:+.2f}") if points else (lambda x: f"{x:+.4g}")
        unit = " points" if points else ""
        over = "" if finite.size == d.size else f", over the {finite.size} categories with finite values"
        self.words.append(f"mean {label} {fmt(mean)}{unit} (95% bootstrap interval {fmt(lo)} to {fmt(hi)}{unit}"
                          f"{over})")

    def apply(self, f: Finding) -> Finding:
        if self.k_of_n is None:
            return f
        k, n = self.k_of_n
        head = (f"per category: holds in {k} of {n} categories" if n else
                "per category: no category has every value the rule needs")
        text = "; ".join([head, *self.words])
        return dataclasses.replace(f, evidence=f"{f.evidence}. {text[0].upper()}{text[1:]}",
                                   k_of_n=self.k_of_n, intervals=tuple(self.intervals))


def qualitative_findings(t: pd.DataFrame, df: pd.DataFrame | None = None, faithful_cls: float = 0.95,
                         margin: float = 0.02, unfaithful_ratio: float = 2.0, coverage_min: float = 0.5, *,
                         lasso_alpha: float | None = None, n_boot: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> list[Finding]:
    """Evaluate the paper's four qualitative claims on a :func:`table_main` frame ``t``, and,
    with the long frame ``df``, a fifth one beyond the paper.

    Rules (fixed here, not tuned to the data): (1) SRAE test F_cls >= ``faithful_cls`` and
    within ``margin`` of the lower of NN/SAE, and its test F_reg under ``unfaithful_ratio``
    times the better of NN/SAE (the yardstick rule 4 calls unfaithful); (2) SRAE locality <
    ExcitationBP locality; (3) SRAE O1 and O2 below both NN and SAE; (4) CAE and Lasso each
    unfaithful: test F_cls at least ``margin`` below SRAE's, or test F_reg at least
    ``unfaithful_ratio`` times SRAE's; (5, only with ``df``) SRAE's mean concept_coverage above
    ExcitationBP's and above ``coverage_min`` (None without coverage rows). Means are over
    categories with finite values; the evidence says in how many categories O2 was infinite.
    Each finding states its rule.

    The verdicts are those of the means in ``t``. With ``df`` (the long frame ``t`` came from;
    its headline rows at ``lasso_alpha``, by default ``t.attrs["lasso_alpha"]``) each finding
    also says in how many categories its rule holds applied to that category alone (k of N;
    N counts the categories with every value the rule needs) and gives a bootstrap 95% interval
    (``n_boot`` resamples of the categories, seeded) of the mean per-category difference that
    drives it; finding 3 also gives O1/O2 without the categories with dead x-features."""
    if df is not None and not isinstance(df, pd.DataFrame):
        raise TypeError(f"qualitative_findings: df must be the long metrics frame, got {type(df).__name__}")
    alpha = lasso_alpha if lasso_alpha is not None else t.attrs.get("lasso_alpha")
    d = _headline(validate_metrics(df), alpha) if df is not None else None
    g = lambda *a: _get(t, *a)  # noqa: E731
    isnan = math.isnan
    hs = _heat_split(t)
    out: list[Finding] = []

    def strength() -> _Strength:
        return _Strength(n_boot, seed)

    # (1) faithfulness of SRAE ------------------------------------------------------------
    s, nn, sae = g("F_cls", "test", "SRAE"), g("F_cls", "test", "NN"), g("F_cls", "test", "SAE")
    rs, rnn, rsae = g("F_reg", "test", "SRAE"), g("F_reg", "test", "NN"), g("F_reg", "test", "SAE")
    ref = np.nanmin([nn, sae]) if not (isnan(nn) and isnan(sae)) else float("nan")
    ref_reg = np.nanmin([rnn, rsae]) if not (isnan(rnn) and isnan(rsae)) else float("nan")
    holds = (None if any(isnan(v) for v in (s, ref, rs, ref_reg))
             else bool(s >= faithful_cls and s >= ref - margin and rs < unfaithful_ratio * ref_reg))
    f = Finding("SRAE is as faithful as NN and SAE", holds,
                f"test F_cls: SRAE {_pct(s)}, NN {_pct(nn)}, SAE {_pct(sae)}; test F_reg: SRAE "
                f"{_f(rs)}, NN {_f(rnn)}, SAE {_f(rsae)}",
                f"SRAE's test F_cls at least {_pct(faithful_cls)} and at most {100 * margin:g} points below "
                f"the lower of NN and SAE, and its test F_reg under {unfaithful_ratio:g}x the lower of theirs")
    if d is not None:
        st = strength()
        refs = [m for m, v in (("NN", nn), ("SAE", sae)) if not isnan(v)]
        refs_reg = [m for m, v in (("NN", rnn), ("SAE", rsae)) if not isnan(v)]
        need = {"s": ("F_cls", "test", "SRAE"), "rs": ("F_reg", "test", "SRAE"),
                **{f"c{m}": ("F_cls", "test", m) for m in refs}, **{f"r{m}": ("F_reg", "test", m) for m in refs_reg}}
        c = _per_category(d, need) if refs and refs_reg else _per_category(None, need)
        if refs and refs_reg:
            ref_c = c[[f"c{m}" for m in refs]].min(axis=1)
            ref_reg_c = c[[f"r{m}" for m in refs_reg]].min(axis=1)
            st.count((c["s"] >= faithful_cls) & (c["s"] >= ref_c - margin) & (c["rs"] < unfaithful_ratio * ref_reg_c))
            st.interval(f"SRAE - {_lower_of(refs)} test F_cls", c["s"] - ref_c, points=True)
        else:
            st.count(pd.Series([], dtype=bool))
        f = st.apply(f)
    out.append(f)

    # (2) locality ---------------------------------------------------------------------------
    ls, le = g("locality", hs, "SRAE"), g("locality", hs, "ExcitationBP")
    holds = None if isnan(ls) or isnan(le) else bool(ls < le)
    f = Finding("x-features are more local than ExcitationBP on y-hat", holds,
                f"locality (entropy, lower = more local): SRAE {_f(ls)}, ExcitationBP {_f(le)}, "
                f"Z {_f(g('locality', hs, 'Z'))}",
                f"SRAE's mean locality on {hs} positives below ExcitationBP's")
    if d is not None:
        st = strength()
        c = _per_category(d, {"s": ("locality", hs, "SRAE"), "e": ("locality", hs, "ExcitationBP")})
        st.count(c["s"] < c["e"])
        st.interval("SRAE - ExcitationBP locality", c["s"] - c["e"])
        f = st.apply(f)
    out.append(f)

    # (3) orthogonality ----------------------------------------------------------------------
    trio = ("SRAE", "NN", "SAE")
    vals = {(o, m): g(o, hs, m) for o in ("O1", "O2") for m in trio}
    inf = infinite_categories(t)

    def o2_key(m: str) -> tuple[int, float]:
        # A category with O2 = inf (linearly dependent maps) is the worst O2 there is, and the
        # table's means leave such categories out: compare their count first, then the means.
        return inf.get(("O2", hs, m), (0, 0))[0], vals[("O2", m)]

    if any(isnan(v) for v in vals.values()):
        holds = None
    else:
        holds = bool(vals[("O1", "SRAE")] < min(vals[("O1", "NN")], vals[("O1", "SAE")])
                     and o2_key("SRAE") < o2_key("NN") and o2_key("SRAE") < o2_key("SAE"))
    inf_notes = [f"{m} {inf[('O2', hs, m)][0]} of {inf[('O2', hs, m)][1]}"
                 for m in trio if ("O2", hs, m) in inf]
    evidence = ("; ".join(f"{o}: SRAE {_f(vals[(o, 'SRAE')])}, NN {_f(vals[(o, 'NN')])}, "
                          f"SAE {_f(vals[(o, 'SAE')])}" for o in ("O1", "O2"))
                + (f" (O2 means over finite categories; O2 = inf, a singular correlation, in "
                   f"{', '.join(inf_notes)} categories, which counts against a method before "
                   f"its mean{_dead_note(t)})" if inf_notes else ""))
    f = Finding("x-features are more orthogonal than NN and SAE", holds,
                evidence if d is None else f"all categories: {evidence}; {_without_dead(d, hs)}",
                "SRAE's O1 and O2 both below NN's and SAE's (fewer categories with O2 = inf first); "
                "judged on all categories, dead x-features included")
    if d is not None:
        st = strength()
        c = _per_category(d, {f"{o}{m}": (o, hs, m) for o in ("O1", "O2") for m in trio})
        with np.errstate(invalid="ignore"):
            st.count((c["O1SRAE"] < c[["O1NN", "O1SAE"]].min(axis=1))
                     & (c["O2SRAE"] < c["O2NN"]) & (c["O2SRAE"] < c["O2SAE"]))
            st.interval("SRAE - min(NN, SAE) O1", c["O1SRAE"] - c[["O1NN", "O1SAE"]].min(axis=1))
            st.interval("SRAE - min(NN, SAE) O2", c["O2SRAE"] - c[["O2NN", "O2SAE"]].min(axis=1))
        f = st.apply(f)
    out.append(f)

    # (4) CAE and Lasso unfaithful -----------------------------------------------------------
    fs, fsc = g("F_reg", "test", "SRAE"), g("F_cls", "test", "SRAE")
    verdicts: list[bool | None] = []
    conds: dict[str, list[str]] = {}
    words: list[str] = []
    for m in ("CAE", "Lasso"):
        mc, mr = g("F_cls", "test", m), g("F_reg", "test", m)
        cls_ok = None if isnan(fsc) or isnan(mc) else bool(fsc - mc >= margin - 1e-12)
        reg_ok = None if isnan(fs) or isnan(mr) else bool(mr >= unfaithful_ratio * fs)
        conds[m] = [k for k, v in (("cls", cls_ok), ("reg", reg_ok)) if v is not None]
        known = [v for v in (cls_ok, reg_ok) if v is not None]
        verdicts.append(None if not known else any(known))
        yes = {True: "yes", False: "no"}
        cls_w = ("F_cls n/a" if cls_ok is None else
                 f"F_cls {100 * (fsc - mc):.2f} points below SRAE's (at least {100 * margin:g}: {yes[cls_ok]})")
        ratio = (mr / fs if fs > 0 else math.inf) if reg_ok is not None else float("nan")
        reg_w = ("F_reg n/a" if reg_ok is None else
                 f"F_reg {_f(ratio)}x SRAE's (at least {unfaithful_ratio:g}x: {yes[reg_ok]})")
        alone = (" (judged on F_reg alone)" if conds[m] == ["reg"] else
                 " (judged on F_cls alone)" if conds[m] == ["cls"] else "")
        words.append(f"{m}: {cls_w}, {reg_w}{alone}")
    holds = None if any(v is None for v in verdicts) else all(verdicts)
    f = Finding("CAE and Lasso are unfaithful", holds,
                f"test F_reg: SRAE {_f(fs)}, CAE {_f(g('F_reg', 'test', 'CAE'))}, Lasso "
                f"{_f(g('F_reg', 'test', 'Lasso'))}; test F_cls: SRAE {_pct(fsc)}, CAE "
                f"{_pct(g('F_cls', 'test', 'CAE'))}, Lasso {_pct(g('F_cls', 'test', 'Lasso'))}; " + "; ".join(words),
                f"as the paper reads Table 1, CAE and Lasso are unfaithful because their y-bar, put in place of "
                f"y-hat, changes the classification (F_cls falls) and lies far from y-hat (large F_reg): each of "
                f"CAE and Lasso counts as unfaithful when its test F_cls is at least {100 * margin:g} points below "
                f"SRAE's or its test F_reg at least {unfaithful_ratio:g}x SRAE's (either suffices; both are "
                f"reported, and a condition whose values are missing is left out)")
    if d is not None:
        st = strength()
        if all(conds[m] for m in ("CAE", "Lasso")):
            need: dict[str, tuple[str, str, str]] = {}
            for m in ("CAE", "Lasso"):
                for k in conds[m]:
                    metric = "F_cls" if k == "cls" else "F_reg"
                    need[f"{k}SRAE"] = (metric, "test", "SRAE")
                    need[f"{k}{m}"] = (metric, "test", m)
            c = _per_category(d, need)
            ok = pd.Series(True, index=c.index)
            for m in ("CAE", "Lasso"):
                ok_m = pd.Series(False, index=c.index)
                if "cls" in conds[m]:
                    ok_m |= c["clsSRAE"] - c[f"cls{m}"] >= margin - 1e-12
                if "reg" in conds[m]:
                    ok_m |= c[f"reg{m}"] >= unfaithful_ratio * c["regSRAE"]
                ok &= ok_m
            st.count(ok)
            for m in ("CAE", "Lasso"):
                if "cls" in conds[m]:
                    st.interval(f"SRAE - {m} test F_cls", c["clsSRAE"] - c[f"cls{m}"], points=True)
                if "reg" in conds[m]:
                    st.interval(f"{m} - SRAE test F_reg", c[f"reg{m}"] - c["regSRAE"])
        else:
            st.count(pd.Series([], dtype=bool))
        f = st.apply(f)
    out.append(f)

    # (5) beyond the paper: concept separation ------------------------------------------------
    if d is not None:
        out.append(_coverage_finding(d, coverage_min, strength()))
    return out


def _lower_of(methods: list[str]) -> str:
    return methods[0] if len(methods) == 1 else f"min({', '.join(methods)})"


def _without_dead(d: pd.DataFrame, hs: str) -> str:
    """O1 / O2 means of SRAE, NN and SAE without the categories where any of them has a dead
    x-feature (``dead_x`` train rows > 0), for the orthogonality evidence."""
    trio = ("SRAE", "NN", "SAE")
    orth = d[d["metric"].isin(["O1", "O2"]) & (d["split"] == hs) & d["method"].isin(trio)]
    dead_rows = d[(d["metric"] == "dead_x") & (d["split"] == "train") & d["method"].isin(trio)]
    if orth.empty:
        return "no O1/O2 rows, so none without dead x-features either"
    if dead_rows.empty:
        return "dead x-features not recorded (no dead_x rows): no means without them"
    per_cat = dead_rows.groupby(["category", "method"])["value"].mean()
    dead_cats = {int(c) for (c, _m), v in per_cat.items() if v > 0}
    scope = sorted(set(int(c) for c in orth["category"]))
    excluded = [c for c in scope if c in dead_cats]
    unrecorded = [m for m in trio if m not in set(dead_rows["method"])]
    note = f" (no dead_x rows for {', '.join(unrecorded)})" if unrecorded else ""
    if not excluded:
        return (f"no category has a dead x-feature in SRAE, NN or SAE{note}, so the means without such "
                "categories are the same")
    kept = orth[~orth["category"].isin(excluded)]
    left = len(scope) - len(excluded)
    head = (f"excluding the {len(excluded)} of {len(scope)} categories with dead x-features (firing on no "
            f"training image) in SRAE, NN or SAE{note}")
    if kept.empty:
        return f"{head}: no category is left"
    infinite: list[dict[str, Any]] = []
    means = _category_mean(kept, ["metric", "method"], infinite)
    n_inf = {(r["metric"], r["method"]): (r["infinite"], r["categories"]) for r in infinite if "infinite" in r}

    def cell(o: str, m: str) -> str:
        v = _f(float(means.get((o, m), float("nan"))))
        return v + (f" ({n_inf[(o, m)][0]} of {n_inf[(o, m)][1]} inf)" if (o, m) in n_inf else "")

    return f"{head}, {left} left: " + "; ".join(
        f"{o}: " + ", ".join(f"{m} {cell(o, m)}" for m in trio) for o in ("O1", "O2"))


def _coverage_finding(d: pd.DataFrame, coverage_min: float, st: _Strength) -> Finding:
    """Beyond the paper: do SRAE's x-features separate the parts the CNN uses?"""
    cov = d[(d["metric"] == "concept_coverage") & (d["split"] == "test")]
    means = _category_mean(cov, ["method"]) if not cov.empty else pd.Series(dtype="float64")
    sc, ec = float(means.get("SRAE", float("nan"))), float(means.get("ExcitationBP", float("nan")))
    holds = None if math.isnan(sc) or math.isnan(ec) else bool(sc > ec and sc > coverage_min)
    shown = [m for m in (*TABLE_METHODS, *EXTRA_METHODS) if m in means.index and m not in ("SRAE", "ExcitationBP")]
    evidence = ("no concept_coverage rows" if cov.empty else
                "mean concept_coverage (share of the parts the CNN causally uses that are the top part of a "
                f"distinct x-feature): SRAE {_f(sc)}, ExcitationBP {_f(ec)}"
                + "".join(f", {m} {_f(float(means[m]))}" for m in shown))
    f = Finding("x-features separate the concepts the CNN uses", holds, evidence,
                f"SRAE's mean concept_coverage above ExcitationBP's (the single-map baseline, which covers at most "
                f"one part) and above {coverage_min:g}; not evaluated without coverage rows", beyond_paper=True)
    if cov.empty:
        return f
    c = _per_category(d, {"s": ("concept_coverage", "test", "SRAE"), "e": ("concept_coverage", "test", "ExcitationBP")})
    st.count((c["s"] > c["e"]) & (c["s"] > coverage_min))
    st.interval("SRAE - ExcitationBP concept_coverage", c["s"] - c["e"])
    return st.apply(f)


def _dead_note(t: pd.DataFrame) -> str:
    """Dead x-features per category, for the orthogonality evidence: an x-feature whose maps
    are all zero on the scored images has no correlation, which makes O2 infinite."""
    dead = {m: _get(t, "dead_x", "train", m) for m in ("SRAE", "NN", "SAE")}
    if not any(v > 0 for v in dead.values()):
        return ""
    return ("; dead x-features (firing on no training image) per category: "
            + ", ".join(f"{m} {_f(v)}" for m, v in dead.items()))


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def percent(v: float) -> str:
    """A fraction as the report shows it (``0.9952`` -> ``"99.52%"``)."""
    return f"{100 * v:.2f}%"


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else percent(v)
