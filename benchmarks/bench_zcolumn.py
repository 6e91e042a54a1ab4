"""The Z column over many Z dims: scored as drawn (streamed) vs drawn into a store and scored.

- streamed: :func:`srae.unit_locality.score_units`, one forward per image batch, the dims
  ``unit_chunk`` at a time, each chunk's maps turned into part probabilities on the device
  and dropped.
- stored: :func:`srae.heatmaps.compute_heatmaps` into a Zarr group, then
  :func:`srae.scoring.score_serial` reads it back (what a sampled ``z_dims`` does).

Same dims, images and annotations for both; their locality agrees (checked here too). CPU:
the demo CNN's 256 dims at 64 px (readout pool2). CUDA (``full``): torchvision VGG19 at 224
(readout pool3): the same comparison on 256 of its 4096 dims, then every dim streamed at
several chunk sizes (time per image, peak GPU memory) and what CUB's 200 categories would
take at that rate.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from srae.datasets.common import DatasetIndex
from srae.heatmaps import HeatmapJob, compute_heatmaps
from srae.scoring import ScoreJob, score_serial
from srae.unit_locality import score_units

TITLE = "Z column: every dim scored as drawn vs drawn into a store and scored"
log = logging.getLogger(__name__)
CUB_IMAGES = 200 * 9  # CUB: 200 categories x about 9 positive test images


def _index(rng: np.random.Generator, m: int, side: int) -> DatasetIndex:
    """CUB-like annotations: 15 parts (~80% visible) and a box, one class."""
    rows = []
    for k in range(m):
        parts = np.column_stack([rng.uniform(0, side, 15), rng.uniform(0, side, 15), rng.random(15) < 0.8])
        x0, y0 = rng.uniform(0, side / 3, 2)
        rows.append({"image_id": k, "path": f"{k}.jpg", "label": 0, "split": "test", "width": float(side),
                     "height": float(side), "bbox": (x0, y0, side / 2, side / 2), "parts": parts, "mask_path": None})
    return DatasetIndex("bench", Path("."), ["bird"], pd.DataFrame(rows), part_names=[f"p{i}" for i in range(15)])


def _demo() -> tuple[nn.Sequential, nn.Sequential, int, int]:
    """The demo CNN's layout split below fc6: (trunk, [fc6, ReLU], readout pool2, input size)."""
    from benchmarks.bench_excitation import demo_chain

    trunk, _, readout, size = demo_chain()
    return nn.Sequential(*trunk[:-2]).eval(), nn.Sequential(*trunk[-2:]).eval(), readout, size


def _vgg19() -> tuple[nn.Sequential, nn.Sequential, int, int]:
    import torchvision

    vgg = torchvision.models.vgg19(weights=None, num_classes=200).eval()
    return nn.Sequential(*vgg.features, vgg.avgpool, nn.Flatten()), nn.Sequential(*vgg.classifier[:2]), 18, 224


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _batches(x: torch.Tensor, batch: int):
    ids = np.arange(len(x))
    for s in range(0, len(x), batch):
        yield x[s:s + batch], ids[s:s + batch]


def _side_by_side(trunk, head, units, x, index, readout, size, device, chunk, batch, rounds: int = 3):
    """Best-of-rounds seconds of (streamed, stored) and the bytes the store took."""
    job = ScoreJob("Z-bench", 0, "Z", class_index=0, metrics=("locality",), feature_rows=False)
    ids = np.arange(len(x))
    best = {"streamed": float("inf"), "stored": float("inf")}
    nbytes, values = 0, {}
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        res = score_units(trunk, head, units, _batches(x, batch), job, index, ids, readout=readout,
                          output_size=size, unit_chunk=chunk)
        _sync(device)
        best["streamed"] = min(best["streamed"], time.perf_counter() - t0)
        values["streamed"] = float(res.metrics["value"].iloc[0])
        tmp = Path(tempfile.mkdtemp(prefix="zbench-"))
        try:
            t0 = time.perf_counter()
            store = tmp / "Z.zarr"
            compute_heatmaps(trunk, [HeatmapJob(store, head, units, {"method": "Z"})], _batches(x, batch), ids,
                             readout=readout, output_size=size)
            res = score_serial([ScoreJob(str(store), 0, "Z", class_index=0, metrics=("locality",),
                                         feature_rows=False)], index)
            best["stored"] = min(best["stored"], time.perf_counter() - t0)
            values["stored"] = float(res.metrics["value"].iloc[0])
            nbytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return best, nbytes, values


def run(device: str = "cpu", full: bool = False) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cuda = device.startswith("cuda")
    trunk, head, readout, size = _vgg19() if cuda else _demo()
    trunk, head = trunk.to(device), head.to(device)
    m = 4 if cuda else 16
    x = torch.randn(m, 3, size, size, device=device)
    index = _index(rng, m, size)
    units = list(range(256))
    best, nbytes, values = _side_by_side(trunk, head, units, x, index, readout, size, device, chunk=256,
                                         batch=4 if cuda else 8)
    gap = abs(values["streamed"] - values["stored"]) / max(abs(values["stored"]), 1e-12)
    rows = [{"name": f"streamed, {len(units)} dims x {m} images", "value": best["streamed"], "unit": "s"},
            {"name": f"stored + scored, {len(units)} dims x {m} images", "value": best["stored"], "unit": "s"},
            {"name": "store written by the stored path", "value": nbytes / 2**20, "unit": "MiB"},
            {"name": "locality gap streamed vs stored", "value": gap, "unit": "relative"}]
    ratios = [{"name": "stored time / streamed time (same dims)", "value": best["stored"] / best["streamed"],
               "target": 1.0}]
    notes = (f"{'VGG19 at 224, readout pool3' if cuda else 'demo CNN at 64 px, readout pool2'}; "
             f"random weights and images, CUB-like parts; best of 3 rounds each, alternating. A store of every "
             f"VGG dim would hold 4096 x 224 x 224 float32 = {4096 * 224 * 224 * 4 / 2**20:.0f} MiB per image "
             "before compression.")
    if cuda and full:
        head_units = list(range(head[0].out_features))
        for chunk in (128, 256, 512):
            torch.cuda.reset_peak_memory_stats()
            job = ScoreJob("Zall-bench", 0, "Z", class_index=0, metrics=("locality",), feature_rows=False)
            _sync(device)
            t0 = time.perf_counter()
            # 4 images per pass, as the pipeline draws them (tasks.heatmaps.Z_ALL_BATCH)
            score_units(trunk, head, head_units, _batches(x, 4), job, index, np.arange(m), readout=readout,
                        output_size=size, unit_chunk=chunk)
            _sync(device)
            per_image = (time.perf_counter() - t0) / m
            rows += [{"name": f"all {len(head_units)} dims, chunk {chunk}: per image", "value": per_image, "unit": "s"},
                     {"name": f"all dims, chunk {chunk}: peak GPU memory",
                      "value": torch.cuda.max_memory_allocated() / 2**20, "unit": "MiB"},
                     {"name": f"all dims, chunk {chunk}: CUB estimate ({CUB_IMAGES} images)",
                      "value": per_image * CUB_IMAGES / 3600, "unit": "h"}]
    return {"rows": rows, "ratios": ratios, "notes": notes}


if __name__ == "__main__":  # pragma: no cover
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2))
