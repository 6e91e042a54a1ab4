"""Stage: the causal ground truth (which parts the CNN uses), on synthetic data.

For up to ``causal.max_images`` test positives per category, every swappable part is swapped
in a counterfactual render and the fitted backbone's y-hat is read (:mod:`srae.causal`). The
per-image drops go to ``<cache>/causal/<key>.parquet``, named by everything that changes them
(the dataset's manifest, the backbone's weights and input size, the renderer's version, the
image count), so a rerun reuses them and a new category adds only its own images. Real
datasets have no renderer: the stage then returns no file. A failure here is recorded per
category and never stops the run: the measurement only scores the explanations.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from srae.causal import EFFECT_COLUMNS, draw_numbers, measure_part_effects, model_input_settings
from srae.datasets.counterfactual import RENDER_VERSION, synth_params
from srae.errors import SraeError
from tasks.common import atomic_write_parquet, record_work, resolve_device, run_logger, short_error, timed
from tasks.download import generated_root, load_index

STAGE = "causal"


def synth_dir(dataset: dict[str, Any]) -> Path | None:
    """The generated dataset's directory (the one holding ``synth.json``), or None on real data."""
    return generated_root(Path(dataset["root"]))


def effects_path(cache_dir: str, dataset: dict[str, Any], backbone: dict[str, Any], category: int,
                 max_images: int | None) -> Path:
    """One category's per-image drops, named by what changes them."""
    key = json.dumps({"dataset": dataset["fingerprint"], "weights": backbone.get("sha256"),
                      "input_size": backbone.get("input_size"), "renderer": RENDER_VERSION,
                      "model_input": model_input_settings(), "max_images": max_images, "category": category},
                     sort_keys=True)
    return Path(cache_dir) / "causal" / f"c{category:04d}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"


def _draws(index, category: int, max_images: int | None, per_class: int) -> list[tuple[int, int, int]]:
    j = draw_numbers(index.images, per_class)
    test = index.images[(index.images["split"] == "test") & (index.images["label"] == category)]
    test = test.sort_values("image_id")
    if max_images is not None:
        test = test.head(max_images)
    return [(int(i), category, int(j[int(i)])) for i in test["image_id"]]


def _measure(todo: list[int], paths: dict[int, Path], found: Path, dataset: dict[str, Any],
             backbone: dict[str, Any], max_images: int | None, cache_dir: str, device: str,
             failed: list[dict[str, Any]], logger) -> None:
    from srae.masking import backbone_classifier  # torch-heavy
    from tasks.backbone import load_fitted_backbone

    try:
        dev = resolve_device(device)
        bb = load_fitted_backbone(backbone, dataset["num_classes"], dev)
        index = load_index(dataset)
        params = synth_params(found)
    except Exception as exc:  # no measurement, but the explanations still get trained and drawn
        logger.warning("part effects not measured: %s", exc)
        failed.extend({"category": c, "stage": STAGE, "method": "CNN", "error": short_error(exc)} for c in todo)
        return
    classify = backbone_classifier(bb.model, bb.mean, bb.std, device=dev)
    for c in todo:
        try:
            with timed() as t:
                draws = _draws(index, c, max_images, int(params["per_class"]))
                if len(draws) < 2:
                    raise SraeError(f"class {c + 1}: {len(draws)} test positive(s); part effects need 2")
                df = measure_part_effects(classify, params, draws, bb.input_size)
                atomic_write_parquet(df, paths[c])
            record_work(cache_dir, STAGE, str(c), t(), category=c)
        except Exception as exc:  # one category's failure must not stop the others
            logger.warning("part effects of class %d failed: %s", c + 1, exc)
            failed.append({"category": c, "stage": STAGE, "method": "CNN", "error": short_error(exc)})


@task(name="causal", cache_policy=NO_CACHE)
def part_effects_task(dataset: dict[str, Any], backbone: dict[str, Any], causal: dict[str, Any],
                      categories: list[int], cache_dir: str, device: str = "auto") -> dict[str, Any]:
    """Measure (or reuse) each category's part effects; ``{"files": [...], "failed": [...]}``."""
    logger = run_logger()
    found = synth_dir(dataset) if causal.get("enabled", True) else None
    if found is None:
        return {"files": [], "failed": []}
    max_images = causal.get("max_images")
    paths = {c: effects_path(cache_dir, dataset, backbone, c, max_images) for c in categories}
    todo = [c for c, p in paths.items() if not p.is_file()]
    failed: list[dict[str, Any]] = []
    if todo:
        _measure(todo, paths, found, dataset, backbone, max_images, cache_dir, device, failed, logger)
        logger.info("part effects: %d categories measured, %d reused", len(todo) - len(failed),
                    len(categories) - len(todo))
    return {"files": [str(p) for p in paths.values() if p.is_file()], "failed": failed}


def read_effects(files: list[str]) -> pd.DataFrame:
    """All per-image drops of ``files`` in one frame (empty when there are none)."""
    frames = [pd.read_parquet(f) for f in files if Path(f).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EFFECT_COLUMNS)
