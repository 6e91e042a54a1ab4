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

from srae.config import ExperimentConfig, apply_overrides, default_config, load_config, parse_categories
from srae.errors import SraeError
from srae.scoring import check_dask_address

log = logging.getLogger(__name__)

DEMO_CONFIG = Path("configs/demo.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run an experiment config end to end (dataset -> report)",
        description="Run the pipeline for CONFIG as a Prefect flow and print the report path. "
                    "Reruns reuse everything already computed.")
    p.add_argument("config", nargs="?", default=None, type=Path,
                   help=f"experiment YAML (default: {DEMO_CONFIG} if present, else the same demo built in)")
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
    """Validate, run the flow, print the report's path; 0 when every category completed.

    A run in which categories failed still writes its report, then fails (the flow run ends
    Failed): one line ``srae run: error: N category failure(s) in categories ...; report: PATH``
    and exit status 1. A bad config or option is exit status 2, before anything runs."""
    if args.config is None and not DEMO_CONFIG.is_file():
        # outside the project checkout: the built-in demo (configs/demo.yaml's contents), with
        # its relative paths (data/, reports/) under the current directory
        log.info("no %s here: running the built-in demo experiment", DEMO_CONFIG)
        cfg = default_config()
    else:
        cfg = load_config(args.config if args.config is not None else DEMO_CONFIG)
    cats = parse_categories(args.categories) if args.categories is not None else None
    cfg = apply_overrides(cfg, categories=cats, dask_address=args.dask_address, device=args.device)
    check_readout(cfg)
    if args.check:
        from srae.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    check_devices(cfg)
    check_paths(cfg)
    if cfg.scoring.dask_address:  # before Prefect starts; the flow checks again for deployment runs
        check_dask_address(cfg.scoring.dask_address)
    quiet_third_party_logs()
    # The ephemeral API server needs no telemetry (and this machine may be offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # distributed sets its loggers to INFO from its own config when first imported (after the
    # levels above), and its worker processes do the same: about 40 lines per run otherwise.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        pipeline_mod = importlib.import_module("flows.pipeline")
        server_mod = importlib.import_module("flows.server")
    except ImportError as exc:
        raise SraeError(f"the pipeline is not importable ({exc}); run from the project root or pip install -e .") from None
    if not getattr(args, "verbose", False):
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(_drop_tracebacks)
        logging.getLogger("prefect.flow_runs").addFilter(_drop_flow_failure_echo)
    try:
        with server_mod.run_api():
            report = pipeline_mod.pipeline(cfg.model_dump(mode="json"))
    except SraeError:  # incl. the flow's RunFailures: categories failed, the report names them
        raise           # (its message ends with the report's path; exit status 1)
    except Exception as exc:  # one readable line; `srae run -v` shows the tracebacks
        raise SraeError(f"{type(exc).__name__}: {exc} (rerun with -v for details)") from None
    print(report)
    return 0


def requested_devices(cfg: ExperimentConfig) -> dict[str, str]:
    """{config field: device} of the devices a run may use that are not ``auto``/``cpu``.

    An explicit global ``device`` (``--device``) other than ``auto`` replaces every stage's;
    otherwise each stage's own ``device`` field (``backbone.fit.device``, ...) counts."""
    if cfg.device not in (None, "auto"):
        return {"device": cfg.device}
    found: dict[str, str] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif path.rsplit(".", 1)[-1] == "device" and isinstance(node, str) and node not in ("auto", "cpu"):
            found[path] = node

    walk(cfg.model_dump(mode="json"), "")
    return found


def check_devices(cfg: ExperimentConfig) -> None:
    """Fail in one line, before Prefect starts, when the config asks for an accelerator this
    machine lacks (``cuda``, ``cuda:N`` beyond the GPUs present, ``mps``)."""
    from srae.devices import device_unavailable

    for field, device in requested_devices(cfg).items():
        reason = device_unavailable(device)
        if reason:
            raise SraeError(f"{field}: {device!r} requested but {reason} (use --device cpu or auto)")


def check_readout(cfg: ExperimentConfig) -> None:
    """A ``heatmaps.readout`` the backbone does not have fails here, in one line, instead of
    after the backbone fit and explainer training (every category then failed at heatmaps)."""
    if cfg.heatmaps.readout is None:
        return
    import torch

    from srae.backbones import build_backbone

    with torch.device("meta"):  # the layer names only: no memory, no weights
        bb = build_backbone(cfg.backbone.name, 2, pretrained=False, input_size=cfg.backbone.input_size)
    bb.check_readout(cfg.heatmaps.readout)


def check_paths(cfg: ExperimentConfig) -> None:
    """Fail in one line, before Prefect starts, when a directory the run writes cannot be one
    (a file is in the way, or the nearest existing parent is not writable), the given
    backbone checkpoint is missing, or a real dataset is absent with download off; otherwise
    such a run fails only late, after the work (or after starting Prefect)."""
    dirs = {"cache_dir": cfg.cache_dir, "report.out_dir": cfg.report.out_dir, "dataset.root": cfg.dataset.root}
    for field, path in dirs.items():
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SraeError(f"{field}: {path} is a file, not a directory")
        parent = next(q for q in (path, *path.parents) if q.exists())
        if not parent.is_dir():
            raise SraeError(f"{field}: {path} cannot be created: {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SraeError(f"{field}: {parent} is not writable")
    ckpt = cfg.backbone.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise SraeError(f"backbone.checkpoint: {ckpt} is not a file")
    ds = cfg.dataset
    if not ds.kind.startswith("synth") and not ds.download:  # nothing will fetch it: it must be there
        from srae.datasets.common import find_dataset_dir

        try:
            find_dataset_dir(ds.kind, ds.root)
        except SraeError:
            raise SraeError(f"dataset.root: no {ds.kind} dataset under {ds.root} and dataset.download "
                            "is false") from None
        if ds.places_root is not None and not Path(ds.places_root).exists():
            raise SraeError(f"dataset.places_root: {ds.places_root} does not exist and dataset.download is false")


def _drop_flow_failure_echo(record: logging.LogRecord) -> bool:
    """Logging filter: the flow run's two lines repeating the error that ended it (the failed
    task already logged it, and ``srae run: error:`` ends the output with it)."""
    text = record.getMessage()
    return not (text.startswith("Encountered exception during execution")
                or text.startswith("Finished in state Failed("))


def _drop_tracebacks(record: logging.LogRecord) -> bool:
    """Logging filter: keep Prefect's run messages but not their traceback walls."""
    record.exc_info = None
    record.exc_text = None
    return True
