"""Heatmap store (srae.heatmaps): contents equal direct computation; resume; rebuild."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from srae.errors import InputError, SraeError
from srae.excitation import excitation_maps
from srae.gradcam import gradcam_maps
from srae.heatmaps import (
    HeatmapJob,
    compute_heatmaps,
    explainer_head,
    is_complete,
    open_heatmaps,
    pending_image_ids,
    selected_z_dims,
)

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
    np.testing.assert_array_equal(pending_image_ids(jobs[0], IDS, readout=2, output_size=16), IDS[2:])
    pend = pending_image_ids(jobs[1], IDS, readout=2, output_size=16)
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


def test_a_store_that_lost_a_chunk_file_is_redrawn(tmp_path) -> None:
    """A missing chunk of a "complete" store was read as zero maps and scored silently."""
    import threading

    import zarr

    from srae import stores

    trunk, head, enc = _models()
    x = _images()
    jobs = _jobs(tmp_path, head, enc)
    compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8)
    ref = np.asarray(open_heatmaps(jobs[0].store).maps[:])
    (jobs[0].store / "maps" / "c" / "3" / "0" / "0" / "0").unlink()
    assert stores.missing_chunks(jobs[0].store) == ["maps: 1 of 6 chunk files missing"]
    assert not is_complete(jobs[0].store) and is_complete(jobs[1].store)
    with pytest.raises(SraeError, match="no complete heatmap store"):
        open_heatmaps(jobs[0].store)
    np.testing.assert_array_equal(pending_image_ids(jobs[0], IDS, readout=2, output_size=8), IDS)
    compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8)
    assert is_complete(jobs[0].store)
    np.testing.assert_array_equal(open_heatmaps(jobs[0].store).maps[:], ref)
    # the zarr setting that stores all-fill chunks is process-wide and overlapping writers share it
    assert zarr.config.get("array.write_empty_chunks") is False
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with stores.every_chunk_written():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=writer)
    t.start()
    inside.wait(5)
    with stores.every_chunk_written():
        pass  # ends first: must not switch the setting off under the other writer
    assert zarr.config.get("array.write_empty_chunks") is True
    release.set()
    t.join()
    assert zarr.config.get("array.write_empty_chunks") is False


def test_a_store_with_a_truncated_chunk_file_is_redrawn(tmp_path) -> None:
    """A chunk file cut short after the store was finished (a full disk, a partial copy of the
    cache) used to pass as complete and fail later, in the middle of scoring, asking the user to
    delete the store. Its size no longer matches the one recorded with ``complete``."""
    from srae import stores

    trunk, head, enc = _models()
    x = _images()
    jobs = _jobs(tmp_path, head, enc)
    compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8)
    ref = np.asarray(open_heatmaps(jobs[0].store).maps[:])
    recorded = stores.root_attrs(jobs[0].store)[stores.CHUNK_BYTES]
    chunk = jobs[0].store / "maps" / "c" / "2" / "0" / "0" / "0"
    assert recorded["maps/c/2/0/0/0"] == chunk.stat().st_size > 8 and len(recorded) == 6 + 1 + 1
    chunk.write_bytes(chunk.read_bytes()[:-8])
    assert stores.damage(jobs[0].store, stores.root_attrs(jobs[0].store)) == [
        "maps: 1 of 6 chunk files changed size since the store was finished"]
    assert not is_complete(jobs[0].store) and is_complete(jobs[1].store)
    compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8)
    assert is_complete(jobs[0].store)
    np.testing.assert_array_equal(open_heatmaps(jobs[0].store).maps[:], ref)


def test_two_runs_on_one_store_take_turns(tmp_path) -> None:
    """Two runs drawing the same heatmap group used to rebuild it under each other (failed
    categories with "'image_id'" errors); the second now waits, then reuses the maps."""
    import threading
    import time

    from srae import stores

    trunk, head, enc = _models()
    x = _images()
    jobs = _jobs(tmp_path, head, enc)
    jobs[0].store.parent.mkdir(parents=True, exist_ok=True)
    held = threading.Event()

    def other_run() -> None:
        with stores.writer_lock(jobs[1].store, what="heatmaps"):
            held.set()
            compute_heatmaps(trunk, jobs[:1], _batches(x, IDS), IDS, readout=2, output_size=8)
            time.sleep(0.3)

    t = threading.Thread(target=other_run)
    t.start()
    held.wait(5)
    with pytest.raises(SraeError, match=r"heatmaps .*ebp\.zarr: another writer \(pid"):
        compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8)
    compute_heatmaps(trunk, jobs, _batches(x, IDS), IDS, readout=2, output_size=8, wait_for_writer=30)
    t.join()
    assert is_complete(jobs[0].store) and is_complete(jobs[1].store)
    direct = excitation_maps(nn.Sequential(*trunk, *enc), x, [0, 1], readout=2, output_size=8)
    np.testing.assert_allclose(open_heatmaps(jobs[0].store).maps[:], direct.numpy(), rtol=1e-5, atol=1e-7)


def test_changed_request_rebuilds_and_missing_images_fail(tmp_path) -> None:
    trunk, head, enc = _models()
    x = _images()
    compute_heatmaps(trunk, _jobs(tmp_path, head, enc), _batches(x, IDS), IDS, readout=2, output_size=8)
    scores = tmp_path / "srae.zarr.scores.parquet"  # a result derived from the maps
    scores.write_bytes(b"derived")
    compute_heatmaps(trunk, _jobs(tmp_path, head, enc), _batches(x, IDS), IDS, readout=2, output_size=8)
    assert scores.is_file()  # unchanged maps: their results stay
    jobs = _jobs(tmp_path, head, enc, units=(1,))
    np.testing.assert_array_equal(pending_image_ids(jobs[0], IDS[:3], readout=2, output_size=8), IDS[:3])
    compute_heatmaps(trunk, jobs[:1], _batches(x, IDS), IDS, readout=2, output_size=8)
    assert not scores.exists()  # redrawn: results of the old maps are dropped
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


def test_pending_compares_the_whole_request(tmp_path) -> None:
    trunk, head, enc = _models()
    x = _images()
    jobs = _jobs(tmp_path, head, enc)
    compute_heatmaps(trunk, jobs[:1], _batches(x, IDS), IDS, readout=2, output_size=8)
    job = jobs[0]
    assert pending_image_ids(job, IDS, readout=2, output_size=8).size == 0
    # same images (same image-ids hash), but another request: every image is pending
    other_attrs = HeatmapJob(job.store, enc, [0, 1], {**job.attrs, "explainer_sha256": "new"})
    for j, kw in ((HeatmapJob(job.store, enc, [1], job.attrs), {}), (other_attrs, {}), (job, {"readout": 5}),
                  (job, {"kind": "MWP"}), (job, {"output_size": 16})):
        args = {"readout": 2, "output_size": 8} | kw
        np.testing.assert_array_equal(pending_image_ids(j, IDS, **args), IDS)


def _lasso(dims: list[int], d: int = 16):
    """A Lasso explainer selecting ``dims`` of a ``d``-dim Z (srae.baselines.lasso_explainer)."""
    from srae.baselines import lasso_explainer

    coef = np.zeros(d)
    coef[dims] = np.linspace(0.5, 2.0, len(dims))
    return lasso_explainer(SimpleNamespace(coef_=coef, intercept_=0.25), 2, {})


def test_lasso_x_features_are_drawn_as_z_units(tmp_path) -> None:
    trunk, _, enc = _models()
    x = _images()
    base, tail = nn.Sequential(*list(trunk)[:7]), list(trunk)[7:]  # Z = fc6 after its ReLU
    with torch.no_grad():
        z = trunk(x).numpy()
    dead = int(np.flatnonzero(z[0] == 0)[0])  # a dim that is 0 on image 0
    live = [int(d) for d in np.flatnonzero(z.min(axis=0) > 0)[:2]]
    dims = sorted({dead, *live})
    expl = _lasso(dims)
    head, units, extra = explainer_head(expl, tail)
    assert units == dims and extra == {"x_units": "Z"} and selected_z_dims(expl) == dims
    job = HeatmapJob(tmp_path / "lasso.zarr", head, units, {"method": "Lasso", **extra})
    compute_heatmaps(base, [job], _batches(x, IDS), IDS, readout=2, output_size=16)
    got = open_heatmaps(job.store).maps[:]
    # the reference: c-MWP of the same Z units, contrasted at fc6 (the "Z" column)
    cmwp = excitation_maps(trunk, x, dims, readout=2, output_size=16).numpy()
    mwp = excitation_maps(trunk, x, dims, readout=2, output_size=16, contrastive=False).numpy()
    np.testing.assert_allclose(got, cmwp, rtol=1e-5, atol=1e-7)
    assert np.abs(cmwp - mwp).max() > 1e-3 * np.abs(mwp).max()
    assert got[0, dims.index(dead)].sum() > 0  # an inactive dim still has a map
    # a neural explainer keeps its encoder on top, x-features 0..n-1
    neural = SimpleNamespace(method="SRAE", meta={}, n_features=2, encoder=lambda: enc)
    n_head, n_units, n_extra = explainer_head(neural, tail)
    assert n_units == [0, 1] and n_extra == {} and len(n_head) == len(tail) + len(enc)


def test_selection_encoder_is_checked() -> None:
    expl = _lasso([1, 4])
    expl.meta["selected_dims"] = [1, 5]
    with pytest.raises(SraeError, match="disagree"):
        selected_z_dims(expl)
    expl = _lasso([1, 4])
    expl.weights[0][0, 2] = 0.5
    with pytest.raises(SraeError, match="not a one-hot selection"):
        selected_z_dims(expl)


def test_readout_by_name_is_stored_as_its_index(tmp_path) -> None:
    """compute_heatmaps takes a module name like excitation_maps does (it failed in int())."""
    trunk, head, enc = _models()
    from collections import OrderedDict

    named = nn.Sequential(OrderedDict(zip(["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flat", "fc6", "relu6"],
                                   trunk)))
    x = _images()
    a = compute_heatmaps(named, _jobs(tmp_path / "a", head, enc), _batches(x, IDS), IDS, readout="pool1", output_size=16)
    b = compute_heatmaps(trunk, _jobs(tmp_path / "b", head, enc), _batches(x, IDS), IDS, readout=2, output_size=16)
    for pa, pb in zip(a, b):
        ha, hb = open_heatmaps(pa), open_heatmaps(pb)
        assert ha.attrs["readout"] == 2
        np.testing.assert_array_equal(ha.maps[:], hb.maps[:])
    with pytest.raises(InputError, match="readout 'pool9'"):
        compute_heatmaps(named, _jobs(tmp_path / "c", head, enc), _batches(x, IDS), IDS, readout="pool9", output_size=16)


def test_positive_rows_pick_the_categorys_images_in_store_order() -> None:
    from srae.heatmaps import positive_rows

    label_of = {5: 1, 6: 0, 7: 1, 8: 1, 9: 2}
    assert positive_rows([5, 6, 7, 8, 9], label_of, 1).tolist() == [0, 2, 3]
    assert positive_rows(np.array([9, 8, 7, 6, 5]), label_of, 1, limit=2).tolist() == [1, 2]
    assert positive_rows([6, 9], label_of, 1).tolist() == []
