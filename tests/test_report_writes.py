"""Report files are written atomically, and a report with failures keeps the last clean one.

A report used to be written file by file in place: a crash or a full disk half-way through
left a truncated report.html or metrics.parquet (and a set mixing two runs). Now every file
goes to a temporary beside it first, and all are moved into place only once all are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from srae import report as R
from srae.report_html import ReportInputs, build_report

FAILED = [{"category": 2, "stage": "scoring", "method": "SRAE", "error": "SraeError: dask scheduler: cannot connect"}]


def _metrics(value: float) -> pd.DataFrame:
    rows = [R.metric_row("exp", c, m, metric, split, value + c / 10, 3, {})
            for c in (0, 1) for m in ("SRAE", "NN") for metric in ("F_reg", "F_cls") for split in ("train", "test")]
    rows += [R.metric_row("exp", c, "ExcitationBP", "locality", "test", 2.0 + value, 1, {}) for c in (0, 1)]
    return pd.DataFrame(rows)


def _build(out: Path, value: float = 0.5, failed: list | None = None) -> Path:
    return build_report(ReportInputs("exp", _metrics(value), out, class_names=["a", "b", "c"],
                                     failed=list(failed or [])))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _partial_text(monkeypatch, name: str) -> None:
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if not self.name.startswith(name):
            return real(self, data, *args, **kwargs)
        real(self, data[: len(data) // 2], *args, **kwargs)  # half the page, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def _partial_parquet_table(monkeypatch, name: str) -> None:
    real = pq.write_table

    def write_table(table, where, *args, **kwargs):
        if not Path(str(where)).name.startswith(name):
            return real(table, where, *args, **kwargs)
        Path(str(where)).write_bytes(b"PAR1" + b"\0" * 100)  # a header and no footer
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write_table)


def _partial_to_parquet(monkeypatch, name: str) -> None:
    real = pd.DataFrame.to_parquet

    def to_parquet(self, path, *args, **kwargs):
        if not Path(str(path)).name.startswith(name):
            return real(self, path, *args, **kwargs)
        Path(str(path)).write_bytes(b"PAR1" + b"\1" * 50)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)


@pytest.mark.parametrize(("patch", "name"), [(_partial_text, "report.html"), (_partial_text, "table_main.md"),
                                             (_partial_parquet_table, "metrics.parquet"),
                                             (_partial_to_parquet, "table_masking.parquet")])
def test_a_write_failing_midway_leaves_the_previous_report_and_no_temporaries(tmp_path, monkeypatch, patch, name):
    out = tmp_path / "rep"
    _build(out, 0.5)
    before = _snapshot(out)
    assert {"report.html", "report.md", "metrics.parquet", "table_main.parquet", "table_main.md",
            "status.json"} <= set(before)
    patch(monkeypatch, name)
    with pytest.raises(OSError, match="No space left"):
        _build(out, 0.9)  # other numbers: every file would change
    monkeypatch.undo()
    assert _snapshot(out) == before  # the file that failed and every other one: the old report, whole
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name] == []
    assert R.read_metrics(out / "metrics.parquet")["value"].min() == pytest.approx(0.5)
    _build(out, 0.9)  # and the next write goes through
    assert R.read_metrics(out / "metrics.parquet")["value"].min() == pytest.approx(0.9)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_write_metrics_and_the_single_file_writers_are_atomic(tmp_path, monkeypatch):
    from srae.report_html import write_parquet_atomic, write_text_atomic

    path = tmp_path / "metrics.parquet"
    R.write_metrics(_metrics(0.5), path)
    good = path.read_bytes()
    _partial_parquet_table(monkeypatch, "metrics.parquet")
    with pytest.raises(OSError):
        R.write_metrics(_metrics(0.9), path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]

    text = write_text_atomic(tmp_path / "a.md", "old text")
    _partial_text(monkeypatch, "a.md")
    with pytest.raises(OSError):
        write_text_atomic(text, "new text, longer")
    monkeypatch.undo()
    assert text.read_text() == "old text"
    table = write_parquet_atomic(pd.DataFrame({"x": [1, 2]}), tmp_path / "t.parquet")
    _partial_to_parquet(monkeypatch, "t.parquet")
    with pytest.raises(OSError):
        write_parquet_atomic(pd.DataFrame({"x": [3]}), table)
    monkeypatch.undo()
    assert list(pd.read_parquet(table)["x"]) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "metrics.parquet", "t.parquet"]


def test_tasks_atomic_writers_leave_no_temporary_on_failure(tmp_path, monkeypatch):
    from tasks.common import atomic_write_parquet, atomic_write_text

    atomic_write_text(tmp_path / "x.json", "{}")
    _partial_text(monkeypatch, "x.json")
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "x.json", '{"a": 1}')
    monkeypatch.undo()
    atomic_write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "s.parquet")
    _partial_to_parquet(monkeypatch, "s.parquet")
    with pytest.raises(OSError):
        atomic_write_parquet(pd.DataFrame({"x": [2]}), tmp_path / "s.parquet")
    monkeypatch.undo()
    assert (tmp_path / "x.json").read_text() == "{}" and list(pd.read_parquet(tmp_path / "s.parquet")["x"]) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet", "x.json"]


def test_a_report_with_failures_keeps_the_last_clean_report_in_previous(tmp_path):
    out = tmp_path / "rep"
    _build(out, 0.5)
    clean = _snapshot(out)
    assert json.loads(clean["status.json"])["failures"] == 0 and not (out / "previous").exists()

    page = _build(out, 0.7, FAILED).read_text()  # the latest run failed: its report is the main one
    assert "dask scheduler: cannot connect" in page and "previous/report.html" in page
    status = json.loads((out / "status.json").read_text())
    assert status["failures"] == 1 and status["failed_categories"] == [3]
    assert status["previous"] == "previous/report.html"
    assert _snapshot(out / "previous") == clean  # the clean report, every file, as it was

    _build(out, 0.8, [dict(FAILED[0], error="another failure")])  # a second failing night
    assert _snapshot(out / "previous") == clean  # still the last clean one, not the failed one
    assert "another failure" in (out / "report.html").read_text()
    assert "previous/report.html" in (out / "report.html").read_text()

    _build(out, 0.9)  # clean again: the main report is the last clean one; previous/ goes
    assert not (out / "previous").exists()
    assert json.loads((out / "status.json").read_text())["previous"] is None
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_report_from_before_status_json_counts_as_clean_by_its_page(tmp_path):
    out = tmp_path / "rep"
    _build(out, 0.5)
    (out / "status.json").unlink()
    old_page = (out / "report.html").read_bytes()
    _build(out, 0.6, FAILED)
    assert (out / "previous" / "report.html").read_bytes() == old_page

    fresh = tmp_path / "fresh"  # nothing before: nothing to keep, and the page says nothing of it
    page = _build(fresh, 0.6, FAILED).read_text()
    assert not (fresh / "previous").exists() and "previous/report.html" not in page
