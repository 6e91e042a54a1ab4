"""Write a report: metrics.parquet, the derived tables (Parquet + Markdown), one HTML page.

:func:`build_report` is the single entry point. The HTML page is self-contained (inline
CSS, figures as base64 PNG) and shows the qualitative findings, Tables 1/3, 2a/5, 2b/4,
concept recovery, the parts the CNN uses and degeneracy (synthetic data), figures, failed
categories, bad inputs, and a footer with the wall time of each pipeline stage.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srae import __version__
from srae import report as R
from srae import report_figures as F
from srae.stores import temp_beside

log = logging.getLogger(__name__)

PERCENT_METRICS = R.PERCENT_METRICS


@dataclass
class ReportInputs:
    """Everything a report shows. ``failed``: dicts with category, stage, method, error."""

    experiment: str
    metrics: pd.DataFrame
    out_dir: Path
    class_names: list[str] = field(default_factory=list)
    lasso_alpha: float | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    config_yaml: str | None = None
    notes: list[str] = field(default_factory=list)
    title: str | None = None
    top_parts: pd.DataFrame | None = None  # per x-feature: the part it lands on most (synthetic data)


# ---------------------------------------------------------------------- formatting
def _fmt(v: Any, percent: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "—"
    if isinstance(v, float):
        return R.percent(v) if percent else f"{v:.4f}"
    return str(v)


def _cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of a wide table (index flattened into leading columns)."""
    names = [n or "" for n in (df.index.names if df.index.nlevels > 1 else [df.index.name])]
    labels = df.attrs.get("index_labels") or {}  # e.g. 0-based category -> "1: name" for reading
    if labels and df.attrs.get("index_title"):
        names = [df.attrs["index_title"]]
    header = [str(n) for n in names] + [str(c) for c in df.columns]
    rows = []
    for idx, row in df.iterrows():
        keys = list(idx) if isinstance(idx, tuple) else [labels.get(idx, idx)]
        percent = bool(df.attrs.get("percent")) or any(str(k) in PERCENT_METRICS or str(k).startswith("F_cls")
                                                        for k in keys)
        rows.append([str(k) for k in keys] + [_fmt(v, percent) for v in row.tolist()])
    return header, rows


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table (no external dependency)."""
    if df.empty:
        return "_(no data)_\n"
    header, rows = _cells(df)
    nkeys = len(header) - len(df.columns)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * nkeys + ["---:"] * len(df.columns)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(no data)</em></p>"
    header, rows = _cells(df)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _records_table(records: list[dict[str, Any]], empty: str) -> str:
    if not records:
        return f"<p>{html.escape(empty)}</p>"
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]
    th = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in records)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def failed_records(failed: list[dict[str, Any]], class_names: list[str]) -> list[dict[str, Any]]:
    """Failed-category records for reading: the class as the CLI and logs name it (1-based id
    and name, e.g. ``"1: 001.Yellow_winged"``) instead of the 0-based index; no empty columns."""
    out = []
    for f in failed:
        rec = {k: v for k, v in f.items() if k != "category" and v not in (None, "")}
        c = f.get("category")
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            name = class_names[c] if 0 <= c < len(class_names) else ""
            rec = {"class": f"{int(c) + 1}: {name}" if name else str(int(c) + 1), **rec}
        elif c is not None:
            rec = {"class": str(c), **rec}
        out.append(rec)
    return out


def _flat_for_parquet(df: pd.DataFrame) -> pd.DataFrame:
    out = df.reset_index() if not df.empty else df.copy()
    out.columns = [str(c) for c in out.columns]
    return out


# ---------------------------------------------------------------------- the page
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;display:block;overflow-x:auto;max-width:100%}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right;font-size:13px}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.ok{color:#176c2b}.bad{color:#a31515}.na{color:#777}img{max-width:100%}footer{margin-top:3em;
font-size:12px;color:#555;border-top:1px solid #ccc}code{background:#f5f5f5}"""


MAIN_CAPTION = (
    "Mean over categories. F_reg: mean absolute error of y-bar against the logit y-hat (lower is better). "
    "F_cls: share of images whose predicted class stays the same with y-bar in place of y-hat (higher is "
    "better). O1, O2 (orthogonality) and locality (entropy in nats of each map's mass over parts or "
    "objects, log of roughly how many it covers) on positive images, lower is better; they include "
    "every x-feature's map, dead ones too. Z: ExcitationBP on dimensions of Z (all, or a sample: see Notes); "
    "ExcitationBP: on "
    "y-hat; Grad-CAM (beyond the paper, when drawn): on y-hat at the same readout. dead_x (not in the paper): x-features per category that fire on no training image; they add "
    "nothing to y-hat there, and the figures mark them.")


MASKING_CAPTION = (
    "Accuracy (share of test positives classified correctly, 0-1) after keeping only the pixels at or "
    "above gamma times a heatmap's peak and inpainting the rest. x-features keep a pixel if any of their "
    "n maps does, so at one gamma they keep more of the image than ExcitationBP's single map: the kept "
    "area columns (mean share of pixels kept) say how much; compare accuracies at similar areas.")
LASSO_CAPTION = ("Columns: Lasso's alpha. Num_x: dimensions of Z selected (mean over categories); F_reg "
                 "(lower is better) and F_cls (higher is better) as in Table 1.")
CONCEPTS_CAPTION = (
    "Per x-feature, the share (0-1, higher is better) of its map mass over parts or objects, averaged "
    "over test positives, that falls on the class's evidence parts (known on synthetic data); mean over "
    "the x-features with any mass. concept_coverage is in the degeneracy table where recorded.")
PART_EFFECTS_CAPTION = (
    "Which parts the CNN uses (beyond the paper): per class, the mean drop of y-hat on test positives when "
    "a part is swapped for a nuisance colour. A part is used (*) when its mean drop is positive, at least 2 "
    "standard errors above 0, and at least 10% of the class's summed positive drops.")
DEGENERACY_CAPTION = (
    "Degeneracy and concept separation (beyond the paper), mean over categories. top_share: mean share of "
    "the largest contribution v_i E_i in sum |v_i E_i| (1 = one x-feature carries everything). n_eff: "
    "exp(entropy) of the mean contribution shares (1..n). concept_coverage: share of the parts the CNN "
    "causally uses that are the top part of a distinct x-feature carrying at least 10% of y-hat (a single "
    "map such as ExcitationBP covers at most one part). concept_purity: mass of such an x-feature on its "
    "part. dead_x: x-features per category that fire on no training image.")


def evidence_parts_note(part_effects: pd.DataFrame) -> str:
    """The line under the part-effects table: classes using every evidence part, k of N
    ("" without part-effect rows)."""
    k_n = part_effects.attrs.get("evidence_parts_used") if not part_effects.empty else None
    if not k_n:
        return ""
    k, n = int(k_n[0]), int(k_n[1])
    return f"Classes using every evidence part: {k} of {n}." if n else "No class has a recorded evidence part."


def _findings_html(findings: list[R.Finding]) -> str:
    cls = {True: "ok", False: "bad", None: "na"}
    items = "".join(
        f'<li><b>{html.escape(f.claim)}</b>{" (beyond the paper)" if f.beyond_paper else ""}: '
        f'<span class="{cls[f.holds]}">{f.verdict}</span>'
        f"<br><small>{html.escape(f.evidence)}</small>"
        + (f"<br><small><i>Rule: {html.escape(f.rule)}.</i></small>" if f.rule else "") + "</li>" for f in findings)
    return f"<ul>{items}</ul>"


def infinite_note(main: pd.DataFrame) -> str:
    """The sentence under Table 1/3 when some categories had an infinite value ("" if none)."""
    def cells(counts: dict) -> str:
        return ", ".join(f"{metric} {split} {method}: {k} of {n}" for (metric, split, method), (k, n) in counts.items())

    inf, missing = R.infinite_categories(main), R.missing_categories(main)
    out = []
    if inf:
        out.append("O2 is infinite for a category whose x-feature maps are linearly dependent (singular correlation "
                   "matrix); such categories are left out of the mean and counted as \"(k of n inf)\" in the cell. "
                   f"Infinite categories: {cells(inf)}.")
    if missing:
        out.append("Categories whose value could not be computed (NaN) are left out of the mean and counted as "
                   f"\"(k of n n/a)\": {cells(missing)}.")
    return " ".join(out)


def _infinite_note_html(main: pd.DataFrame) -> str:
    note = infinite_note(main)
    return f"<p><small>{html.escape(note)}</small></p>" if note else ""


def summary_line(findings: list[R.Finding]) -> str:
    """One sentence on the findings: how many of the paper's hold, which do not or were not
    evaluated, then the verdict of each statement beyond the paper."""
    paper = [f for f in findings if not f.beyond_paper]
    held = [f.claim for f in paper if f.holds is True]
    failed = [f.claim for f in paper if f.holds is False]
    na = [f.claim for f in paper if f.holds is None]
    parts = [f"{len(held)} of {len(paper)} of the paper's qualitative findings hold on this data"]
    if failed:
        parts.append("Not holding: " + "; ".join(failed))
    if na:
        parts.append("Not evaluated: " + "; ".join(na))
    parts += [f'Beyond the paper, "{f.claim}": {f.verdict}' for f in findings if f.beyond_paper]
    return ". ".join(parts) + "."


def render_html(inp: ReportInputs, tables: dict[str, pd.DataFrame], findings: list[R.Finding],
                figures: list[tuple[str, bytes]]) -> str:
    title = inp.title or f"SRAE report: {inp.experiment}"
    cats = sorted(set(int(c) for c in inp.metrics["category"])) if not inp.metrics.empty else []
    s = [f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>",
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p>{len(cats)} categories scored, {len(inp.failed)} failed, {len(inp.bad_inputs)} bad inputs.</p>",
         "<h2>Do the paper's qualitative findings hold here?</h2>",
         f"<p><b>{html.escape(summary_line(findings))}</b></p>", _findings_html(findings),
         "<h2>Table 1/3: faithfulness, orthogonality, locality</h2>",
         f"<p>{html.escape(MAIN_CAPTION)}</p>",
         to_html_table(R.main_display(tables["main"])), _infinite_note_html(tables["main"]),
         "<h2>Table 2a/5: Lasso alpha sweep</h2>", f"<p>{html.escape(LASSO_CAPTION)}</p>",
         to_html_table(tables["lasso"]),
         "<h2>Table 2b/4: classification of masked + inpainted images</h2>",
         f"<p>{html.escape(MASKING_CAPTION)}</p>", to_html_table(tables["masking"])]
    if not tables["concepts"].empty:
        s += ["<h2>Concept recovery (synthetic ground truth)</h2>", f"<p>{html.escape(CONCEPTS_CAPTION)}</p>",
              to_html_table(tables["concepts"])]
    if not tables["top_parts"].empty:
        s += ["<h3>Where each x-feature lands</h3><p>The part or object with the largest share of each "
              "x-feature's mass on test positives; * marks one of the class's evidence parts, \"(dead)\" an "
              "x-feature that fires on no training image.</p>",
              to_html_table(tables["top_parts"])]
    if not tables["part_effects"].empty:
        note = evidence_parts_note(tables["part_effects"])
        s += ["<h2>Parts the CNN uses</h2>", f"<p>{html.escape(PART_EFFECTS_CAPTION)}</p>",
              to_html_table(tables["part_effects"])] + ([f"<p>{html.escape(note)}</p>"] if note else [])
    if not tables["degeneracy"].empty:
        s += ["<h2>Degeneracy and concept separation</h2>", f"<p>{html.escape(DEGENERACY_CAPTION)}</p>",
              to_html_table(tables["degeneracy"])]
    s += ["<h2>Per category: test F_cls</h2>", "<p>Per class (1-based id as in <code>--categories</code>), "
          "the share of test images whose predicted class stays the same with y-bar in place of y-hat "
          "(higher is better).</p>", to_html_table(tables["per_category"])]
    for caption, png in figures:
        b64 = base64.b64encode(png).decode()
        s.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>")
    s += ["<h2>Failed categories</h2>", _records_table(failed_records(inp.failed, inp.class_names),
                                                       "None: every category completed."),
          "<h2>Bad inputs</h2>", _records_table(inp.bad_inputs, "None: every input was readable.")]
    if inp.notes:
        s.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inp.notes) + "</ul>")
    if inp.config_yaml:
        s.append(f"<h2>Configuration</h2><pre><code>{html.escape(inp.config_yaml)}</code></pre>")
    s.append(_footer(inp))
    s.append("</body></html>")
    return "\n".join(s)


def _footer(inp: ReportInputs) -> str:
    total = sum(inp.timings.values())
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in inp.timings.items())
    timing = (f"<table><thead><tr><th>stage</th><th>wall time</th></tr></thead><tbody>{rows}"
              f"<tr><td><b>total</b></td><td><b>{total:.1f} s</b></td></tr></tbody></table>") if inp.timings else ""
    return (f"<footer><p>srae {__version__}, written {time.strftime('%Y-%m-%d %H:%M:%S')}. "
            f"Wall time per stage of this run (a stage already done shows only its checks and loading):</p>{timing}</footer>")


def render_markdown(inp: ReportInputs, tables: dict[str, pd.DataFrame], findings: list[R.Finding]) -> str:
    lines = [f"# {inp.title or 'SRAE report: ' + inp.experiment}", "", summary_line(findings), ""]
    lines += [f"- {f.claim}{' (beyond the paper)' if f.beyond_paper else ''}: **{f.verdict}** ({f.evidence})"
              + (f". Rule: {f.rule}." if f.rule else "") for f in findings] + [""]
    for key, caption in (("main", "Table 1/3"), ("lasso", "Table 2a/5 (Lasso sweep)"),
                         ("masking", "Table 2b/4 (masking)"), ("concepts", "Concept recovery"),
                         ("top_parts", "Where each x-feature lands (* = evidence part)"),
                         ("part_effects", "Parts the CNN uses (* = used)"),
                         ("degeneracy", "Degeneracy and concept separation")):
        if key in ("part_effects", "degeneracy") and tables[key].empty:
            continue
        note = {"main": MAIN_CAPTION, "lasso": LASSO_CAPTION, "masking": MASKING_CAPTION,
                "concepts": CONCEPTS_CAPTION, "part_effects": PART_EFFECTS_CAPTION,
                "degeneracy": DEGENERACY_CAPTION}.get(key)
        lines += [f"## {caption}", ""] + ([note, ""] if note else []) + [to_markdown(_readable(key, tables[key]))]
        if key == "main" and infinite_note(tables[key]):
            lines += [infinite_note(tables[key]), ""]
        if key == "part_effects" and evidence_parts_note(tables[key]):
            lines += [evidence_parts_note(tables[key]), ""]
    if inp.failed:
        lines += ["## Failed categories", ""] + [
            "- " + "; ".join(f"{k} {v}" for k, v in rec.items()) for rec in failed_records(inp.failed, inp.class_names)
        ] + [""]
    if inp.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in inp.notes] + [""]
    if inp.timings:
        lines += ["## Stage wall time", ""] + [f"- {k}: {v:.1f} s" for k, v in inp.timings.items()]
    return "\n".join(lines) + "\n"


def _readable(key: str, df: pd.DataFrame) -> pd.DataFrame:
    """The table as shown: Table 1/3 cells say how many categories had an infinite value."""
    return R.main_display(df) if key == "main" else df


def derive_tables(inp: ReportInputs) -> dict[str, pd.DataFrame]:
    """All wide tables of the report, derived from the long frame."""
    m = inp.metrics
    return {
        "main": R.table_main(m, inp.lasso_alpha),
        "lasso": R.table_lasso_sweep(m),
        "masking": R.table_masking(m),
        "concepts": R.table_concepts(m, inp.class_names or None),
        "per_category": R.table_per_category(m, lasso_alpha=inp.lasso_alpha, class_names=inp.class_names or None),
        "top_parts": R.table_top_parts(inp.top_parts, inp.class_names or None),
        "part_effects": R.table_part_effects(m, inp.class_names or None),
        "degeneracy": R.table_degeneracy(m, inp.lasso_alpha),
    }


def build_report(inp: ReportInputs) -> Path:
    """Write metrics.parquet, tables (Parquet + Markdown), report.md, report.html and
    status.json into ``inp.out_dir``. Returns the path of ``report.html``.

    **Atomic.** Every file is first written in full to a temporary file in the same folder;
    only when all of them are written are they moved into place (``os.replace``), report.html
    and then status.json last. A report that fails to render or write (a full disk, a crash)
    leaves the previous files as they were and no temporary files behind.

    **The last clean report is kept.** A report with failed categories (``inp.failed``) still
    replaces the one in ``out_dir`` (it is the truth about the latest run, and it names the
    failures), but when the report it replaces had no failures, that one is first copied to
    ``out_dir/previous/`` (report.html, report.md, metrics.parquet, tables, status.json), and
    the new page says where it is. Further failing runs leave ``previous/`` alone; the next
    report without failures removes it (``out_dir`` then holds the last clean report again).
    ``status.json`` says how many failures the report in its folder has (``failures``, the
    1-based ``failed_categories``) and where the kept clean report is (``previous``)."""
    out = Path(inp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = inp.metrics if len(inp.metrics.columns) else pd.DataFrame(columns=list(R.METRIC_COLUMNS))
    # a copy: the caller's inputs (metrics, notes) stay as they were
    inp = dataclasses.replace(inp, metrics=R.validate_metrics(metrics), notes=list(inp.notes))
    keep = bool(inp.failed) and (_is_clean_report(out) or (out / PREVIOUS_DIR / "report.html").is_file())
    if keep:
        inp.notes.insert(0, f"This run had {len(inp.failed)} failure(s) (see Failed categories). The last report "
                            f"without failures is kept in {PREVIOUS_DIR}/report.html beside this page.")
    tables = derive_tables(inp)
    names = {"main": "table_main", "lasso": "table_lasso_sweep", "masking": "table_masking",
             "concepts": "table_concepts", "per_category": "table_per_category", "top_parts": "table_top_parts",
             "part_effects": "table_part_effects", "degeneracy": "table_degeneracy"}
    path = out / "report.html"
    with staged_files() as stage:
        R.write_metrics(inp.metrics, stage.path(out / "metrics.parquet"))
        for key, df in tables.items():
            stage.parquet(_flat_for_parquet(df), out / f"{names[key]}.parquet")
            stage.text(out / f"{names[key]}.md", to_markdown(_readable(key, df)))
        findings = R.qualitative_findings(tables["main"], inp.metrics, lasso_alpha=inp.lasso_alpha)
        figures = list(inp.figures)
        try:
            if tables["main"].notna().any().any():
                figures.insert(0, ("Metrics per method", F.metric_charts(tables["main"])))
            if not tables["lasso"].empty:
                figures.insert(1, ("Lasso alpha sweep", F.lasso_chart(tables["lasso"])))
        except Exception as exc:  # a figure must never sink the report
            log.warning("report figures failed: %s", exc)
            inp.notes.append(f"metric figures failed: {exc}")
        stage.text(out / "report.md", render_markdown(inp, tables, findings))
        stage.text(path, render_html(inp, tables, findings, figures))
        stage.text(out / STATUS_FILE, json.dumps(_status(inp, keep), indent=2) + "\n")
        if keep and _is_clean_report(out):  # all written: only now set the clean one aside
            _copy_report(out, out / PREVIOUS_DIR)
    if not inp.failed:
        _remove_previous(out)
    log.info("report written to %s", path)
    return path


# ---------------------------------------------------------------------- writing files
STATUS_FILE = "status.json"
PREVIOUS_DIR = "previous"
_CLEAN_MARK = "None: every category completed."  # the Failed-categories section of a clean page


class _Stage:
    """Files written to temporaries beside their final paths, moved into place together."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, final: str | Path) -> Path:
        """A fresh temporary path for ``final`` (write it yourself)."""
        tmp = temp_beside(final)
        self.items.append((tmp, Path(final)))
        return tmp

    def text(self, final: str | Path, text: str) -> None:
        self.path(final).write_text(text, encoding="utf-8")

    def parquet(self, df: pd.DataFrame, final: str | Path) -> None:
        df.to_parquet(self.path(final), index=False)

    def commit(self) -> None:
        for tmp, final in self.items:
            os.replace(tmp, final)

    def discard(self) -> None:
        for tmp, _ in self.items:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_files() -> Iterator[_Stage]:
    """``with staged_files() as st: st.text(p, ...); st.parquet(df, q)``: every file goes to a
    temporary beside its final path; at the end of the block all are moved into place (in the
    order written, each with ``os.replace``, atomic on one file system). If the block raises
    (anything, Ctrl-C too) no final file is touched and the temporaries are removed."""
    stage = _Stage()
    try:
        yield stage
        stage.commit()
    finally:
        stage.discard()  # after a commit: nothing left to remove


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it + ``os.replace``:
    ``path`` is either its old content or the new one, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_files() as stage:
        stage.text(path, text)
    return path


def write_parquet_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """``df.to_parquet(path, index=False)`` through a temporary file beside it + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_files() as stage:
        stage.parquet(df, path)
    return path


def _status(inp: ReportInputs, kept: bool) -> dict[str, Any]:
    cats = sorted({int(f["category"]) + 1 for f in inp.failed
                   if isinstance(f.get("category"), (int, np.integer)) and not isinstance(f.get("category"), bool)})
    return {"experiment": inp.experiment, "failures": len(inp.failed), "failed_categories": cats,
            "previous": f"{PREVIOUS_DIR}/report.html" if kept else None,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "srae": __version__}


def _is_clean_report(out: Path) -> bool:
    """Whether ``out`` holds a report without failed categories: its status.json says so, or
    (a report from before status.json) its page says "None: every category completed."."""
    status = out / STATUS_FILE
    if status.is_file():
        try:
            return json.loads(status.read_text(encoding="utf-8")).get("failures") == 0
        except (OSError, ValueError, AttributeError):
            return False
    page = out / "report.html"
    try:
        return page.is_file() and _CLEAN_MARK in page.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _report_files(out: Path) -> list[Path]:
    fixed = [out / n for n in ("metrics.parquet", "report.md", "report.html", STATUS_FILE)]
    tables = sorted(p for p in out.glob("table_*") if p.suffix in (".parquet", ".md"))
    return [p for p in tables + fixed if p.is_file()]


def _copy_report(out: Path, dest: Path) -> None:
    """Copy the report in ``out`` to ``dest``, replacing what ``dest`` held as one step (a new
    folder is filled beside it, then swapped in)."""
    tmp = temp_beside(dest)
    old = temp_beside(dest)
    try:
        tmp.mkdir()
        for f in _report_files(out):
            shutil.copy2(f, tmp / f.name)
        if dest.is_dir():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_previous(out: Path) -> None:
    prev = out / PREVIOUS_DIR
    if prev.is_dir() and not prev.is_symlink():
        gone = temp_beside(prev)
        try:
            os.replace(prev, gone)
        except OSError as exc:
            log.warning("could not remove %s: %s", prev, exc)
            return
        shutil.rmtree(gone, ignore_errors=True)
