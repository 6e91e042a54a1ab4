"""Shared pytest setup: deterministic, small-thread torch; a temporary PREFECT_HOME."""

from __future__ import annotations

import os
import tempfile

# Prefect reads its settings at import time: point it at a throwaway home first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="srae-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Small models: one thread avoids spin-wait slowdowns when the 2 cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


# --------------------------------------------------------------------------- Prefect (pipeline tests)
def tiny_pipeline_config(base, **changes) -> dict:
    """A tiny synthetic experiment (3 classes of 32 px birds) that runs the whole flow fast.

    ``changes`` are dotted paths, e.g. ``{"explainer.grid.eta": [0.5]}``."""
    from pathlib import Path

    base = Path(base)
    cfg = {
        "name": "tiny", "cache_dir": str(base / "cache"), "categories": [1, 2], "device": "cpu",
        "dataset": {"kind": "synthbirds", "root": str(base / "data"), "classes": 3, "per_class": 24, "size": 32},
        "backbone": {"name": "demo_cnn", "input_size": 32,
                     "fit": {"epochs": 4, "lr": 0.003, "batch_size": 16, "augment": False}},
        "features": {"batch_size": 32},
        "explainer": {"n": 3, "hidden": [16], "n_pos": 16, "n_neg": 32, "n_test_neg": 16, "folds": 1,
                      "grid": {"beta": [0.1], "eta": [0.1], "q": [10.0], "lr": [0.01], "weight_decay": [0.0001]},
                      "max_epochs": 60, "patience": 10, "batch_size": 32, "lasso_alphas": [0.5, 0.05],
                      "group_size": 2},
        "heatmaps": {"max_images": 4, "z_dims": 3, "batch_size": 8},
        "scoring": {"n_workers": 1, "processes": False},
        "masking": {"gammas": [0.05, 0.3], "max_images": 4},
        "report": {"out_dir": str(base / "report"), "max_figure_categories": 1},
    }
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API (SQLite, local server subprocess) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_run(prefect_api, tmp_path_factory) -> dict:
    """One real run of the pipeline flow on the tiny config (categories 1-2), shared by the
    flow and incremental tests: {"base", "config", "report"}."""
    from flows.pipeline import pipeline

    base = tmp_path_factory.mktemp("tiny")
    cfg = tiny_pipeline_config(base)
    report = pipeline(cfg)
    return {"base": base, "config": cfg, "report": report}
