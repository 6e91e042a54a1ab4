"""The ``benchmark-report`` deployment: run the performance harness and publish its results.

Runs ``benchmarks/run.py`` (every ``benchmarks/bench_*.py``, ratios measured side by side)
from the project root, which writes ``benchmarks/results[_cuda].md`` + ``.json``, and
publishes the Markdown as a Prefect artifact.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from prefect import flow

from srae.errors import SraeError
from tasks.common import run_logger


@flow(name="srae-benchmark-report", log_prints=False)
def benchmark_report(device: str | None = None, full: bool = False, only: list[str] | None = None,
                     out: str = "benchmarks") -> str:
    """Run the benchmarks (``device`` default: cuda if available); return the results.md path."""
    logger = run_logger()
    try:
        harness = importlib.import_module("benchmarks.run")
    except ImportError as exc:
        raise SraeError(f"benchmarks/run.py is not importable from {Path.cwd()} ({exc}); "
                        "run from the project root") from None
    argv = ["--out", out] + (["--device", device] if device else []) + (["--full"] if full else [])
    if only:
        argv += ["--only", *only]
    harness.main(argv)
    dev = device or ("cuda" if _cuda() else "cpu")
    md = Path(out) / ("results.md" if dev == "cpu" else f"results_{dev.split(':')[0]}.md")
    text = md.read_text() if md.is_file() else "(no results written)"
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key="srae-benchmarks", description="performance harness results")
    except Exception as exc:
        logger.warning("benchmark artifact not created: %s", exc)
    logger.info("benchmark results: %s", md)
    return str(md)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
