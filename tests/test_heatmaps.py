"""Heatmap store (srae.heatmaps): contents equal direct computation; resume; rebuild."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from srae.errors import InputError, SraeError
from srae.excitation import excitation_maps
from srae.gradcam import gradcam_maps
from srae.heatmaps import HeatmapJob, compute_heatmaps, is_complete, open_heatmaps, pending_image_ids

IDS = np.array([11, 5, 7, 20, 3, 9])


def _models():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU()).eval()
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    enc = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU()).eval()
    return trunk, head, enc


def _images() -> torch.Tensor:
    return torch.rand(len(IDS), 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _batches(x: torch.Tensor, ids: np.ndarray, size: int = 2, fail_after: int | None = None):
    for k, s in enumerate(range(0, len(ids), size)):
        if fail_after is not None and k == fail_after:
            raise RuntimeError("interrupted")
        yield x[s:s + size], torch.zeros(len(ids[s:s + size])), torch.from_numpy(ids[s:s + size])


def _jobs(tmp_path, head, enc, units=(0, 1)):
    return [HeatmapJob(tmp_path / "srae.zarr", enc, list(units), {"method": "SRAE", "category": 2}),
            HeatmapJob(tmp_path / "ebp.zarr", head, [2], {"method": "ExcitationBP", "category": 2})]


def test_store_matches_direct_maps_and_resumes(tmp_path) -> None:
    trunk, head, enc = _models()
    x = _images()
    jobs = _jobs(tmp_path, head, enc)
    with pytest.raises(RuntimeError, match="interrupted"):
        compute_heatmaps(trunk, jobs, _batches(x, IDS, fail_after=1), IDS, readout=2, output_size=16)
    assert not is_complete(jobs[0].store)
    np.testing.assert_array_equal(pending_image_ids(jobs[0].store, IDS), IDS[2:])
    pend = pending_image_ids(jobs[1].store, IDS)
    sel = np.isin(IDS, pend)
    compute_heatmaps(trunk, jobs, _batches(x[torch.from_numpy(sel)], pend, size=3), IDS, readout=2,
                     output_size=16)
    assert is_complete(jobs[0].store) and is_complete(jobs[1].store)
    for job in jobs:
        hs = open_heatmaps(job.store)
        np.testing.assert_array_equal(hs.image_id, IDS)
        assert hs.attrs["complete"] is True and hs.attrs["readout"] == 2
        assert hs.attrs["method"] == job.attrs["method"] and hs.attrs["heatmap"] == "c-MWP"
        direct = excitation_maps(nn.Sequential(*trunk, *job.head), x, job.units, readout=2, output_size=16)
        assert hs.maps.shape == (6, len(job.units), 16, 16)
        np.testing.assert_allclose(hs.maps[:], direct.numpy(), rtol=1e-5, atol=1e-7)
        assert float(np.abs(hs.maps[:]).sum()) > 0

    def untouchable():
        raise AssertionError("a complete store must not read images")
        yield  # pragma: no cover

    compute_heatmaps(trunk, jobs, untouchable(), IDS, readout=2, output_size=16)


def test_changed_request_rebuilds_and_missing_images_fail(tmp_path) -> None:
    trunk, head, enc = _models()
    x = _images()
    compute_heatmaps(trunk, _jobs(tmp_path, head, enc), _batches(x, IDS), IDS, readout=2, output_size=8)
    jobs = _jobs(tmp_path, head, enc, units=(1,))
    np.testing.assert_array_equal(pending_image_ids(jobs[0].store, IDS[:3]), IDS[:3])
    compute_heatmaps(trunk, jobs[:1], _batches(x, IDS), IDS, readout=2, output_size=8)
    hs = open_heatmaps(jobs[0].store)
    assert hs.maps.shape == (6, 1, 8, 8) and hs.attrs["units"] == [1]
    direct = excitation_maps(nn.Sequential(*trunk, *enc), x, [1], readout=2, output_size=8)
    np.testing.assert_allclose(hs.maps[:], direct.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(SraeError, match="2 planned images never came"):
        compute_heatmaps(trunk, jobs[:1], _batches(x[:4], IDS[:4]), IDS, readout=5, output_size=8)
    with pytest.raises(InputError, match="not in image_ids"):
        compute_heatmaps(trunk, jobs[:1], _batches(x, IDS + 100), IDS, readout=5, output_size=8)


def test_gradcam_and_uint8_inputs(tmp_path) -> None:
    trunk, head, enc = _models()
    raw = torch.randint(0, 256, (len(IDS), 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    job = HeatmapJob(tmp_path / "cam.zarr", head, [0, 2], {"method": "ExcitationBP"})
    compute_heatmaps(trunk, [job], _batches(raw, IDS, size=4), IDS, readout=5, output_size=16,
                     kind="Grad-CAM", mean=mean, std=std)
    x = (raw.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    direct = gradcam_maps(nn.Sequential(*trunk, *head), x, [0, 2], readout=5, output_size=16)
    hs = open_heatmaps(job.store)
    assert hs.attrs["heatmap"] == "Grad-CAM"
    np.testing.assert_allclose(hs.maps[:], direct.numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="need mean and std"):
        compute_heatmaps(trunk, [HeatmapJob(tmp_path / "u.zarr", head, [0])], _batches(raw, IDS), IDS,
                         readout=5, output_size=16)
