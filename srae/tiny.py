"""A tiny synthetic experiment that runs the whole pipeline in seconds on a CPU.

Three classes of 32 px synthetic birds, a 4-epoch demo CNN, one CV setting, few images per
stage: the config the pipeline tests and the pipeline benchmark run (and a quick smoke run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_experiment(base: str | Path, **changes: Any) -> dict[str, Any]:
    """The tiny experiment's config dict, with its data, cache and report under ``base``.

    ``changes`` are dotted paths into the config, e.g. ``{"explainer.grid.eta": [0.5]}`` or
    ``categories=[1, 2, 3]``."""
    base = Path(base)
    cfg: dict[str, Any] = {
        "name": "tiny", "cache_dir": str(base / "cache"), "categories": [1, 2], "device": "cpu",
        # design unique: a 4-epoch CNN at 32 px cannot learn classes told apart only by a
        # combination of traits, and these runs check the pipeline's mechanics
        "dataset": {"kind": "synthbirds", "root": str(base / "data"), "classes": 3, "per_class": 24, "size": 32,
                    "design": "unique"},
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
        "causal": {"max_images": 4},
        "report": {"out_dir": str(base / "report"), "max_figure_categories": 1},
    }
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg
