"""``srae run CONFIG``: run the whole pipeline (Prefect flow, no server needed).

The config is validated here first, so a bad file fails in well under a second with one
line naming the field, before Prefect starts. The flow itself lives in
``flows/pipeline.py`` and is imported only when the command runs (the library does not
depend on Prefect).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from pathlib import Path

from srae.config import apply_overrides, load_config, parse_categories
from srae.errors import SraeError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run an experiment config end to end (dataset -> report)",
        description="Run the pipeline for CONFIG as a Prefect flow and print the report path. "
                    "Reruns reuse everything already computed.")
    p.add_argument("config", nargs="?", default="configs/demo.yaml", type=Path,
                   help="experiment YAML (default: configs/demo.yaml)")
    p.add_argument("--categories", metavar="IDS", help="1-based class ids, e.g. 1-20,35 (default: the config's)")
    p.add_argument("--dask-address", metavar="URL", help="existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides every stage)")
    p.add_argument("--check", action="store_true", help="only validate the config and print it")
    p.set_defaults(func=run_command)


def quiet_third_party_logs() -> None:
    """Keep the console to the pipeline's own messages (HTTP and Dask chatter at WARNING)."""
    for name in ("httpx", "httpcore", "distributed", "asyncio", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    cats = parse_categories(args.categories) if args.categories else None
    cfg = apply_overrides(cfg, categories=cats, dask_address=args.dask_address, device=args.device)
    if args.check:
        from srae.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    quiet_third_party_logs()
    # The ephemeral API server needs no telemetry (and this machine may be offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        pipeline_mod = importlib.import_module("flows.pipeline")
    except ImportError as exc:
        raise SraeError(f"the pipeline is not importable ({exc}); run from the project root or pip install -e .") from None
    if not getattr(args, "verbose", False):
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(_drop_tracebacks)
    try:
        report = pipeline_mod.pipeline(cfg.model_dump(mode="json"))
    except SraeError:
        raise
    except Exception as exc:  # one readable line; `srae -v run` shows the tracebacks
        raise SraeError(f"{type(exc).__name__}: {exc} (rerun with -v for details)") from None
    print(report)
    return 0


def _drop_tracebacks(record: logging.LogRecord) -> bool:
    """Logging filter: keep Prefect's run messages but not their traceback walls."""
    record.exc_info = None
    record.exc_text = None
    return True
