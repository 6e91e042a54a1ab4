"""tasks.heatmaps: a Lasso heatmap store drawn before Lasso x-features became Z units is redrawn."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from srae.heatmaps import HeatmapJob, compute_heatmaps
from tasks.heatmaps import _explainer_sha, job_done


def test_old_lasso_store_is_not_done(tmp_path) -> None:
    expl = tmp_path / "expl"
    expl.mkdir()
    (expl / "meta.json").write_text('{"method": "Lasso", "selected_dims": [1]}')
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 4), nn.ReLU())
    x = torch.rand(2, 3, 8, 8)
    ids = np.array([3, 4])
    stores = {}
    for name, extra in (("old", {}), ("new", {"x_units": "Z"})):
        attrs = {"method": "Lasso", "explainer_sha256": _explainer_sha(str(expl)), **extra}
        job = HeatmapJob(tmp_path / f"{name}.zarr", nn.Sequential(*list(trunk)[3:]), [1], attrs)
        compute_heatmaps(nn.Sequential(*list(trunk)[:3]), [job], [(x, ids)], ids, readout=0, output_size=8)
        stores[name] = str(job.store)

    def job(method: str, store: str) -> dict:
        return {"method": method, "heatmaps": store, "explainer": str(expl)}

    assert not job_done(job("Lasso", stores["old"]))  # drawn through the selection layer: redraw
    assert job_done(job("Lasso", stores["new"]))
    assert job_done(job("SRAE", stores["old"]))  # neural explainers are unaffected
    (expl / "meta.json").write_text('{"method": "Lasso", "selected_dims": [2]}')  # retrained
    assert not job_done(job("Lasso", stores["new"]))
