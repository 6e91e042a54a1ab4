"""Reports: the long metrics table and the paper-style tables derived from it.

Everything here starts from one long frame (DESIGN §2) with the columns
``experiment, category, method, metric, split, value, n_features, hparams``. The wide
tables are *derived* from it, never computed separately:

- :func:`table_main` - Table 1 / 3: rows = metric x split, columns = methods
  (SRAE, NN, SAE, Lasso, CAE, Z, ExcitationBP); values averaged per category, then over
  categories.
- :func:`table_lasso_sweep` - Table 2a / 5: Num_x and F_reg per Lasso alpha.
- :func:`table_masking` - Table 2b / 4: accuracy per gamma on original / masked images.
- :func:`table_concepts` - concept recovery on synthetic data (category x method).
- :func:`qualitative_findings` - whether the paper's qualitative claims hold.

The HTML page lives in :mod:`srae.report_html`, the figures in :mod:`srae.report_figures`.
"""

from __future__ import annotations

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
    """Write the long table as Parquet with the fixed schema of DESIGN §2."""
    df = validate_metrics(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=METRICS_SCHEMA, preserve_index=False)
    pq.write_table(table, path)
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


# ---------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One qualitative claim of the paper and whether it holds here (None: not evaluable)."""

    claim: str
    holds: bool | None
    evidence: str
    rule: str = ""  # what decides the verdict, in words

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "does NOT hold", None: "not evaluated"}[self.holds]


def _get(t: pd.DataFrame, metric: str, split: str, method: str) -> float:
    try:
        v = float(t.loc[(metric, split), method])
    except KeyError:
        return float("nan")
    return v


def _heat_split(t: pd.DataFrame) -> str:
    splits = [s for (m, s) in t.index if m == "locality"]
    return "test" if "test" in splits or not splits else splits[0]


def qualitative_findings(t: pd.DataFrame, faithful_cls: float = 0.95, margin: float = 0.02,
                         unfaithful_ratio: float = 2.0) -> list[Finding]:
    """Evaluate the paper's four qualitative claims on a :func:`table_main` frame.

    Rules (fixed here, not tuned to the data): (1) SRAE test F_cls >= ``faithful_cls`` and
    within ``margin`` of the lower of NN/SAE, and its test F_reg under ``unfaithful_ratio``
    times the better of NN/SAE (the yardstick rule 4 calls unfaithful); (2) SRAE locality <
    ExcitationBP locality; (3) SRAE O1 and O2 below both NN and SAE; (4) CAE and Lasso test
    F_reg at least ``unfaithful_ratio`` times SRAE's. Means are over categories with finite
    values; the evidence says in how many categories O2 was infinite. Each finding states its
    rule."""
    g = lambda *a: _get(t, *a)  # noqa: E731
    hs = _heat_split(t)
    out: list[Finding] = []

    s, nn, sae = g("F_cls", "test", "SRAE"), g("F_cls", "test", "NN"), g("F_cls", "test", "SAE")
    rs, rnn, rsae = g("F_reg", "test", "SRAE"), g("F_reg", "test", "NN"), g("F_reg", "test", "SAE")
    ref = np.nanmin([nn, sae]) if not (math.isnan(nn) and math.isnan(sae)) else float("nan")
    ref_reg = np.nanmin([rnn, rsae]) if not (math.isnan(rnn) and math.isnan(rsae)) else float("nan")
    holds = (None if any(math.isnan(v) for v in (s, ref, rs, ref_reg))
             else bool(s >= faithful_cls and s >= ref - margin and rs < unfaithful_ratio * ref_reg))
    out.append(Finding("SRAE is as faithful as NN and SAE", holds,
                       f"test F_cls: SRAE {_pct(s)}, NN {_pct(nn)}, SAE {_pct(sae)}; test F_reg: SRAE "
                       f"{_f(rs)}, NN {_f(rnn)}, SAE {_f(rsae)}",
                       f"SRAE's test F_cls at least {_pct(faithful_cls)} and at most {100 * margin:g} points below "
                       f"the lower of NN and SAE, and its test F_reg under {unfaithful_ratio:g}x the lower of theirs"))

    ls, le = g("locality", hs, "SRAE"), g("locality", hs, "ExcitationBP")
    holds = None if math.isnan(ls) or math.isnan(le) else bool(ls < le)
    out.append(Finding("x-features are more local than ExcitationBP on y-hat", holds,
                       f"locality (entropy, lower = more local): SRAE {_f(ls)}, ExcitationBP {_f(le)}, "
                       f"Z {_f(g('locality', hs, 'Z'))}",
                       f"SRAE's mean locality on {hs} positives below ExcitationBP's"))

    vals = {(o, m): g(o, hs, m) for o in ("O1", "O2") for m in ("SRAE", "NN", "SAE")}
    inf = infinite_categories(t)

    def o2_key(m: str) -> tuple[int, float]:
        # A category with O2 = inf (linearly dependent maps) is the worst O2 there is, and the
        # table's means leave such categories out: compare their count first, then the means.
        return inf.get(("O2", hs, m), (0, 0))[0], vals[("O2", m)]

    if any(math.isnan(v) for v in vals.values()):
        holds = None
    else:
        holds = bool(vals[("O1", "SRAE")] < min(vals[("O1", "NN")], vals[("O1", "SAE")])
                     and o2_key("SRAE") < o2_key("NN") and o2_key("SRAE") < o2_key("SAE"))
    inf_notes = [f"{m} {inf[('O2', hs, m)][0]} of {inf[('O2', hs, m)][1]}"
                 for m in ("SRAE", "NN", "SAE") if ("O2", hs, m) in inf]
    out.append(Finding("x-features are more orthogonal than NN and SAE", holds,
                       "; ".join(f"{o}: SRAE {_f(vals[(o, 'SRAE')])}, NN {_f(vals[(o, 'NN')])}, "
                                 f"SAE {_f(vals[(o, 'SAE')])}" for o in ("O1", "O2"))
                       + (f" (O2 means over finite categories; O2 = inf, a singular correlation, in "
                          f"{', '.join(inf_notes)} categories, which counts against a method before "
                          f"its mean{_dead_note(t)})" if inf_notes else ""),
                       "SRAE's O1 and O2 both below NN's and SAE's (fewer categories with O2 = inf first)"))

    fs, fc, fl = g("F_reg", "test", "SRAE"), g("F_reg", "test", "CAE"), g("F_reg", "test", "Lasso")
    if any(math.isnan(v) for v in (fs, fc, fl)):
        holds = None
    else:
        holds = bool(fc >= unfaithful_ratio * fs and fl >= unfaithful_ratio * fs)
    out.append(Finding("CAE and Lasso are unfaithful", holds,
                       f"test F_reg: SRAE {_f(fs)}, CAE {_f(fc)}, Lasso {_f(fl)}; test F_cls: CAE "
                       f"{_pct(g('F_cls', 'test', 'CAE'))}, Lasso {_pct(g('F_cls', 'test', 'Lasso'))}",
                       f"CAE's and Lasso's test F_reg each at least {unfaithful_ratio:g}x SRAE's"))
    return out


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
