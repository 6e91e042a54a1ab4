"""Stage 7: the masking test (paper Table 2b / 4) per category group.

For every category with SRAE and ExcitationBP heatmaps of the test split: keep only the
pixels at or above ``gamma`` times each heatmap's peak, inpaint the rest, reclassify with the
backbone and record the accuracy (:mod:`srae.masking`). Rows (``mask_acc@<gamma>`` and the share
of pixels kept, ``mask_area@<gamma>``, per method, and ``mask_acc@original``) go to
``<heatmap group>.masking2-....parquet``, the stage's marker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from srae import report as R
from srae.errors import SraeError
from tasks.common import (TASK_DEFAULTS, atomic_write_parquet, claimed_groups, record_work, resolve_device,
                          run_logger, short_error, stage_cache, timed)
from tasks.heatmaps import group_complete

MASK_METHODS = ("SRAE", "ExcitationBP")


def masking_path(heatmap_group: str, gammas: list[float], max_images: int | None = None) -> Path:
    """Result file of one group's masking test; named by everything that changes its numbers."""
    p = Path(heatmap_group)
    tag = "-".join(f"{g:g}" for g in gammas)
    # "masking2": since the kept-area rows; files without them are redone once
    return p.with_name(p.name + f".masking2-{tag}-m{max_images if max_images else 'all'}.parquet")


def _mask_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [j for j in jobs if j["method"] in MASK_METHODS and j["split"] == "test"]


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    g, m = inputs["masking"]["gammas"], inputs["masking"].get("max_images")
    paths = [masking_path(j["heatmaps"], g, m) for j in _mask_jobs(inputs["jobs"])]
    return [(str(p), p.is_file()) for p in paths]


def _accuracy_rows(j, bb, index, gammas, max_images, experiment, dev) -> pd.DataFrame:
    import zarr

    from srae.images import load_image, resize_uint8
    from srae.masking import backbone_classifier, masking_report

    from srae.heatmaps import positive_rows

    g = zarr.open_group(j["heatmaps"], mode="r")
    frame = index.images.set_index("image_id")
    all_ids = np.asarray(g["image_id"][:])
    rows = positive_rows(all_ids, frame["label"], j["category"], max_images)  # the store may hold negatives
    if rows.size == 0:
        raise SraeError(f"{j['heatmaps']}: holds no image of category {int(j['category']) + 1}")
    if (np.diff(rows) == 1).all():  # a store of positives: one read
        maps = np.asarray(g["maps"][int(rows[0]):int(rows[-1]) + 1])
    else:
        maps = np.stack([np.asarray(g["maps"][int(r)]) for r in rows])
    ids = all_ids[rows]
    images = np.stack([resize_uint8(load_image(index.abspath(frame.loc[int(i), "path"])), bb.input_size)
                       .permute(1, 2, 0).numpy() for i in ids])
    labels = np.array([int(frame.loc[int(i), "label"]) for i in ids])
    classify = backbone_classifier(bb.model, bb.mean, bb.std, device=dev)
    label = f"category {int(j['category']) + 1} {j['method']}"
    res = masking_report(classify, images, labels, {label: maps}, gammas)[label]
    rows = [R.metric_row(experiment, j["category"], j["method"], metric, "test", value, maps.shape[1],
                         j.get("hparams")) for metric, value in res.items()]
    return pd.DataFrame(rows)


@task(name="masking", cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def masking_group(jobs: list[dict[str, Any]], dataset: dict[str, Any], backbone: dict[str, Any],
                  masking: dict[str, Any], cache_dir: str, experiment: str = "") -> dict[str, Any]:
    """Run the masking test for the not-yet-done heatmap groups among ``jobs`` (another run
    testing or redrawing the same groups is waited for, and its results reused)."""
    logger = run_logger()
    gammas, max_images = [float(g) for g in masking["gammas"]], masking.get("max_images")
    mine = [j for j in _mask_jobs(jobs) if group_complete(j["heatmaps"])]
    failed: list[dict[str, Any]] = []
    with claimed_groups(mine, lambda j: masking_path(j["heatmaps"], gammas, max_images).is_file(),
                        what="heatmaps for the masking test") as todo:
        _mask_and_save(todo, dataset, backbone, masking, gammas, max_images, cache_dir, experiment, failed, logger)
    paths = [masking_path(j["heatmaps"], gammas, max_images) for j in mine]
    files = [str(p) for p in paths if p.is_file()]
    return {"files": files, "failed": failed}


def _mask_and_save(todo: list[dict[str, Any]], dataset: dict[str, Any], backbone: dict[str, Any],
                   masking: dict[str, Any], gammas: list[float], max_images: int | None, cache_dir: str,
                   experiment: str, failed: list[dict[str, Any]], logger) -> None:
    """Run the masking test of ``todo`` and write each group's rows atomically."""
    from tasks.backbone import load_fitted_backbone
    from tasks.download import load_index

    if todo:
        dev = resolve_device(masking.get("device", "auto"))
        bb = load_fitted_backbone(backbone, dataset["num_classes"], dev)
        index = load_index(dataset)
        for j in todo:
            try:
                with timed() as t:
                    rows = _accuracy_rows(j, bb, index, gammas, max_images, experiment, dev)
                    atomic_write_parquet(rows, masking_path(j["heatmaps"], gammas, max_images))
                record_work(cache_dir, "masking", f"{j['method']}/{j['category']}", t(),
                            method=j["method"], category=int(j["category"]))
            except Exception as exc:  # one category's failure must not stop the others
                logger.warning("masking %s/%d failed: %s", j["method"], j["category"], exc)
                failed.append({"category": j["category"], "stage": "masking", "method": j["method"],
                               "error": short_error(exc)})
