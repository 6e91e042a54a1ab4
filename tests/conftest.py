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


# ----------------------------------------------------------------- small annotated datasets
PART_NAMES = ["beak", "crown", "wing", "tail"]


def cub_like(rng: np.random.Generator, m: int, *, first_id: int, label, no_bbox: int):
    """A CUB-style index of ``m`` images ``first_id + k`` of random sizes, 4 random parts
    (~80% visible) and a box (none for image ``no_bbox``); ``label(k)`` is image k's class (of 2)."""
    from pathlib import Path

    import pandas as pd

    from srae.datasets.common import DatasetIndex

    rows = []
    for k in range(m):
        width, height = float(rng.integers(30, 60)), float(rng.integers(20, 50))
        parts = np.column_stack([rng.uniform(0, width, 4), rng.uniform(0, height, 4), rng.random(4) < 0.8])
        bbox = (rng.uniform(0, width / 3), rng.uniform(0, height / 3), width / 2, height / 2)
        rows.append({"image_id": first_id + k, "path": f"im{k}.jpg", "label": int(label(k)), "split": "test",
                     "width": width, "height": height, "bbox": None if k == no_bbox else bbox,
                     "parts": parts.astype(float), "mask_path": None})
    return DatasetIndex("cubish", Path("."), ["a", "b"], pd.DataFrame(rows), part_names=PART_NAMES,
                        evidence={0: ["beak", "wing"]})


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


def write_seg(path, labels: np.ndarray) -> None:
    """An ADE20K-style ``*_seg.png``: class = R / 10 * 256 + G."""
    from PIL import Image

    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = (labels // 256) * 10
    rgb[..., 1] = labels % 256
    Image.fromarray(rgb).save(path)


def ade_like(root, rng: np.random.Generator, m: int, size: tuple[int, int], *, split: str, edit=None):
    """An ADE20K-style index of ``m`` kitchen images (64 x 48) whose masks (``size``) hold
    random labels from {0 (unlabeled), 3 bed, 7 lamp, 300 pillow}; ``edit(k, labels)`` may
    change image k's labels in place. Returns (index, the label arrays)."""
    import pandas as pd

    from srae.datasets.common import DatasetIndex

    rows, fine = [], []
    for k in range(m):
        labels = rng.choice([0, 3, 7, 300], size=size)
        if edit is not None:
            edit(k, labels)
        write_seg(root / f"m{k}_seg.png", labels)
        fine.append(labels)
        rows.append({"image_id": k, "path": f"m{k}.jpg", "label": 0, "split": split, "width": 64.0,
                     "height": 48.0, "bbox": None, "parts": None, "mask_path": f"m{k}_seg.png"})
    index = DatasetIndex("ade", root, ["kitchen"], pd.DataFrame(rows),
                         object_names={3: "bed", 7: "lamp", 300: "pillow"}, evidence={0: ["bed", "pillow"]})
    return index, fine


def tar_bytes(members: list, mode: str = "w:gz") -> bytes:
    """A tar archive in memory: each member a ``tarfile.TarInfo`` (links, folders) or a
    ``(name, bytes)`` file."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()
