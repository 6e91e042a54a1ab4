"""A run with failed categories is a failed run: the flow run ends Failed and `srae run` exits
non-zero, after writing the report that names the failures; the last clean report is kept.

It used to end Completed with exit status 0 (a dead --dask-address failed every category and
replaced the last good report with "Not evaluated"), so nightly monitoring saw green.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from srae.cli import main
from srae.tiny import tiny_experiment
from tests.conftest import tiny_pipeline_config


def _fake_run(monkeypatch, outcome):
    """`srae run` with the flow replaced by ``outcome(config)`` and no temporary API server."""
    import flows.pipeline
    import flows.server

    monkeypatch.setattr(flows.server, "run_api", contextlib.nullcontext)
    monkeypatch.setattr(flows.pipeline, "pipeline", outcome)


def test_srae_run_exits_1_with_one_line_naming_the_report_when_categories_failed(tmp_path, monkeypatch, capsys):
    from flows.pipeline import run_failures

    report = str(tmp_path / "report" / "report.html")
    failed = [{"category": c, "stage": "scoring", "method": "SRAE", "error": "SraeError: dask scheduler"}
              for c in (0, 1)]

    def failing(config):
        raise run_failures(failed, report)

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_experiment(tmp_path)))
    _fake_run(monkeypatch, failing)
    assert main(["run", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"srae run: error: 2 category failure(s) in categories 1, 2 (stages: scoring); report: {report}"]

    _fake_run(monkeypatch, lambda config: report)  # every category completed: the path, status 0
    assert main(["run", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == report

    def interrupted(config):
        raise KeyboardInterrupt

    _fake_run(monkeypatch, interrupted)  # Ctrl-C is still Ctrl-C
    assert main(["run", str(cfg)]) == 130
    assert capsys.readouterr().err.strip() == "srae run: interrupted"


def test_categories_parameter_accepts_one_id_as_deployment_runs_pass_it(tmp_path):
    """`prefect deployment run ... -p categories=3` passes the int 3: the flow's parameter
    validation rejected it (only a string or a list was allowed)."""
    from flows.pipeline import pipeline, resolve_config

    for value in (3, "3", "1-3", [3, 1]):
        assert pipeline.validate_parameters({"config": "configs/demo.yaml", "categories": value})["categories"] == value
    base = tiny_pipeline_config(tmp_path)
    assert resolve_config(base, categories=3).categories == [3]
    assert resolve_config(base, categories="1-3").categories == [1, 2, 3]
    assert resolve_config(dict(base, categories=2)).categories == [2]  # in the config itself
    assert resolve_config(dict(base, categories="2-3")).categories == [2, 3]


def test_a_run_with_failed_categories_ends_failed_writes_its_report_and_keeps_the_clean_one(tiny_run, monkeypatch):
    """On the shared tiny cache: a new Lasso alpha (new heatmaps to score) and a Dask scheduler
    that cannot be reached, as with a dead --dask-address: every new group fails at scoring.
    The report directory held the clean report of the first run."""
    import srae.scoring
    from flows.pipeline import RunFailures, pipeline
    from srae.errors import SraeError

    def dead_scheduler(address=None, *args, **kwargs):
        raise SraeError(f"dask scheduler {address}: cannot connect (planted)")

    monkeypatch.setattr(srae.scoring, "dask_client", dead_scheduler)
    # a scheduler that answered the up-front check and is gone by the time scoring runs
    import flows.pipeline

    monkeypatch.setattr(flows.pipeline, "check_dask_address", lambda address: None)
    base = tiny_run["base"]
    out = base / "report-exit"
    shutil.copytree(Path(tiny_run["report"]).parent, out)
    clean = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert json.loads(clean["status.json"])["failures"] == 0
    cfg = tiny_pipeline_config(base, **{"report.out_dir": str(out), "report.figures": False,
                                        "masking.enabled": False, "explainer.lasso_alpha": 0.2,
                                        "scoring.dask_address": "tcp://127.0.0.1:9"})
    state = pipeline(cfg, categories=2, return_state=True)  # one id, as `-p categories=2` passes it
    assert state.is_failed(), state
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, RunFailures) and exc.exit_status == 1, exc
    assert str(exc).startswith("1 category failure(s) in category 2 (stages: scoring); report: ")
    report = Path(exc.report)
    assert report == out / "report.html" and str(exc).endswith(str(report))
    html = report.read_text()
    assert "dask scheduler tcp://127.0.0.1:9: cannot connect (planted)" in html
    assert "previous/report.html" in html
    status = json.loads((out / "status.json").read_text())
    assert status["failures"] == 1 and status["failed_categories"] == [2]
    kept = {p.name: p.read_bytes() for p in (out / "previous").iterdir()}
    assert kept == clean  # the last clean report, every file, beside the failed run's
    with pytest.raises(RunFailures):  # called plainly, the flow raises (srae run's one line)
        pipeline(cfg, categories=2)
    assert (out / "previous" / "report.html").read_bytes() == clean["report.html"]
