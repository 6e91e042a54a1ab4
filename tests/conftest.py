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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
