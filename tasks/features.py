"""Stage 3: extract the Z layer (and logits) of every image into the Zarr feature store.

:func:`srae.features.extract_features` names the store by its fingerprint, resumes an
incomplete one and returns a complete one untouched. This task records, per set of inputs,
which store answered (``<cache>/features/by_inputs/<key>.json``), so the cache policy can
check that store's ``complete`` marker before trusting a cached result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from srae.config import stable_hash
from tasks.backbone import load_fitted_backbone
from tasks.common import WAIT_FOR_OTHER_RUN_S, retry_unless_user_error, TASK_DEFAULTS, atomic_write_text, record_work, resolve_device, run_logger, stage_cache, timed
from tasks.download import load_index


def store_complete(path: str | Path) -> bool:
    """Whether a feature store finished (its ``complete`` attribute)."""
    from srae.features import is_complete

    return is_complete(path)


def _key(dataset: dict[str, Any], backbone: dict[str, Any], features: dict[str, Any]) -> str:
    """Every input of the store's fingerprint that is known without loading the dataset index
    or the backbone (srae.features.fingerprint_inputs): a pointer must not outlive a change of
    any of them. input_size: with fit.epochs 0 the weights (sha256) stay the same when only it
    changes; name: the preprocessing (mean/std) is the backbone's; the package version: the
    fingerprint has it, so a new version extracts anew (the old store is not reused)."""
    from srae import __version__

    return stable_hash({"dataset": dataset["fingerprint"], "backbone": backbone["sha256"],
                        "name": backbone.get("name"), "input_size": backbone.get("input_size"),
                        "layer": features["layer"], "package_version": __version__})


def _pointer(cache_dir: str, key: str) -> Path:
    return Path(cache_dir) / "features" / "by_inputs" / f"{key}.json"


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    ptr = _pointer(inputs["cache_dir"], _key(inputs["dataset"], inputs["backbone"], inputs["features"]))
    if not ptr.is_file():
        return [(str(ptr), False)]
    path = json.loads(ptr.read_text())["path"]
    return [(path, store_complete(path))]


@task(name="features", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def extract_features_task(dataset: dict[str, Any], backbone: dict[str, Any], features: dict[str, Any],
                          cache_dir: str, device: str = "auto") -> dict[str, Any]:
    """Fill (or reuse) the feature store; return its path, fingerprint and shape."""
    from srae.features import extract_features, open_features

    logger = run_logger()
    key = _key(dataset, backbone, features)
    ptr = _pointer(cache_dir, key)
    if ptr.is_file():
        known = json.loads(ptr.read_text())
        if store_complete(known["path"]):
            logger.info("features: reusing %s", known["path"])
            return known
    index = load_index(dataset)
    dev = resolve_device(features.get("device", "auto") if device == "auto" else device)
    bb = load_fitted_backbone(backbone, dataset["num_classes"], "cpu")
    store_root = Path(cache_dir) / "features"
    batches: list[int] = []  # none when the store was done already, or another run filled it meanwhile
    with timed() as t:
        path = extract_features(index, bb, store_root, checkpoint_sha256=backbone["sha256"], layer=features["layer"],
                                device=dev, batch_size=int(features["batch_size"]),
                                num_workers=int(features["num_workers"]), progress=False,
                                wait_for_writer=WAIT_FOR_OTHER_RUN_S, on_batch=batches.append)
        seconds = t()
    fs = open_features(path)
    out = {"path": str(path), "fingerprint": str(fs.attrs["fingerprint"]), "n": int(len(fs.labels)),
           "d": int(fs.z.shape[1]), "layer": features["layer"],
           "bad_inputs": [{k: str(v) for k, v in b.items()} for b in fs.attrs.get("bad_inputs", [])]}
    if batches:
        record_work(cache_dir, "features", out["fingerprint"], seconds)
    atomic_write_text(ptr, json.dumps(out))
    logger.info("features: %d x %d in %s (%.1fs)", out["n"], out["d"], path, seconds)
    return out
