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
    """The tiny synthetic experiment (:func:`srae.tiny.tiny_experiment`) under ``base``;
    ``changes`` are dotted paths, e.g. ``{"explainer.grid.eta": [0.5]}``."""
    from srae.tiny import tiny_experiment

    return tiny_experiment(base, **changes)


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
