"""Streamed locality of many units (the Z column over all dims) against per-image references
and against scoring the same units' stored maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError
from srae.excitation import excitation_maps
from srae.heatmaps import HeatmapJob, compute_heatmaps
from srae.metrics.concepts import concept_recovery, evidence_columns
from srae.metrics.locality import entropy, object_probabilities, part_probabilities
from srae.scoring import ScoreJob, score_serial
from srae.unit_locality import score_units
from tests import conftest

H, W = 12, 16  # map grid (not square: a swapped axis shows)
PARTS = conftest.PART_NAMES


def chain() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    head = nn.Sequential(nn.Linear(5 * 4 * 4, 9), nn.ReLU())  # 9 "Z dims"
    for m in [*trunk, *head]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.4)
            nn.init.normal_(m.bias, std=0.1)
    return trunk, head


def cub_like(rng: np.random.Generator, m: int) -> DatasetIndex:
    return conftest.cub_like(rng, m, first_id=50, label=lambda k: k % 3 == 2, no_bbox=1)


def batches(x: torch.Tensor, ids: np.ndarray, size: int):
    for s in range(0, len(ids), size):
        yield x[s:s + size], ids[s:s + size]


def value(frame: pd.DataFrame, metric: str) -> float:
    hit = frame[frame["metric"] == metric]
    assert len(hit) == 1, (metric, frame)
    return float(hit["value"].iloc[0])


def test_parts_match_algorithm_1_per_image_and_stored_maps(tmp_path, rng) -> None:
    trunk, head = chain()
    index = cub_like(rng, 7)
    ids = index.images["image_id"].to_numpy()[::-1].copy()
    x = torch.randn(len(ids), 3, 16, 16)
    units = [8, 0, 3, 1, 5, 2, 7, 4, 6]
    job = ScoreJob(str(tmp_path / "Zall.zarr"), 0, "Z", class_index=0, hparams={"z_dims": "all"},
                   metrics=("locality", "concept_recovery"), feature_rows=False)
    res = score_units(trunk, head, units, batches(x, ids, 3), job, index, ids, readout=1, output_size=(H, W),
                      unit_chunk=4)

    # reference: every unit's map in one pass, Algorithm 1 per positive image with the
    # annotations scaled by hand, mean histogram, entropy per unit
    maps = excitation_maps(nn.Sequential(*trunk, *head), x, units, readout=1, output_size=(H, W)).double().numpy()
    frame = index.images.set_index("image_id")
    hists = []
    for m, iid in enumerate(ids):
        row = frame.loc[int(iid)]
        if row["label"] != 0:
            continue
        sx, sy = W / row["width"], H / row["height"]
        parts = row["parts"] * np.array([sx, sy, 1.0])
        bbox = None if row["bbox"] is None else np.array(row["bbox"]) * np.array([sx, sy, sx, sy])
        hists.append(part_probabilities(maps[m], parts, bbox))
    hist = np.mean(hists, axis=0)
    loc = entropy(hist)
    rows = res.metrics
    assert value(rows, "locality") == pytest.approx(loc.mean(), rel=1e-6)
    ev = evidence_columns(PARTS + ["context"], ["beak", "wing"])
    assert value(rows, "concept_recovery") == pytest.approx(concept_recovery(hist, ev), rel=1e-6)
    assert list(rows["metric"]) == ["locality", "concept_recovery"]  # no locality_x rows
    assert rows["n_features"].unique().tolist() == [9]
    np.testing.assert_allclose(res.histograms[0][1], hist, rtol=1e-6, atol=1e-12)

    # the same units drawn into a store and scored: equal rows (one pass: the very same maps)
    store = tmp_path / "Zstored.zarr"
    compute_heatmaps(trunk, [HeatmapJob(store, head, units, {"method": "Z"})], batches(x, ids, 3), ids,
                     readout=1, output_size=(H, W))
    stored = score_serial([ScoreJob(str(store), 0, "Z", class_index=0, hparams={"z_dims": "all"},
                                    metrics=("locality", "concept_recovery"), feature_rows=False)],
                          index, chunk_size=len(ids))
    whole = score_units(trunk, head, units, batches(x, ids, 3), job, index, ids, readout=1, output_size=(H, W),
                        unit_chunk=len(units))
    a, b = stored.metrics.drop(columns="value"), whole.metrics.drop(columns="value")
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_allclose(whole.metrics["value"], stored.metrics["value"], rtol=1e-12)


def test_an_interrupted_run_resumes_from_its_sums_and_ignores_anothers(tmp_path, rng, monkeypatch) -> None:
    import dataclasses

    import srae.unit_locality as U

    trunk, head = chain()
    index = cub_like(rng, 9)
    ids = index.images["image_id"].to_numpy()
    x = torch.randn(len(ids), 3, 16, 16)
    units = list(range(9))
    job = ScoreJob(str(tmp_path / "Zall.zarr"), 0, "Z", class_index=0, metrics=("locality",), feature_rows=False)
    kw = {"readout": 1, "output_size": (H, W), "unit_chunk": 4}
    whole = score_units(trunk, head, units, batches(x, ids, 2), job, index, ids, **kw)

    partial = tmp_path / "Zall.partial.npz"

    def cut(after: int):  # the batches of a run stopped (e.g. Ctrl-C) after ``after`` batches
        for k, b in enumerate(batches(x, ids, 2)):
            if k == after:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        score_units(trunk, head, units, cut(3), job, index, ids, resume=partial, **kw)
    assert partial.is_file()
    drawn = []  # images that went through the network on the rerun
    real = U.excitation_maps_chunked
    monkeypatch.setattr(U, "excitation_maps_chunked", lambda t, h, u, xb, **k: drawn.append(len(xb)) or real(t, h, u, xb, **k))
    again = score_units(trunk, head, units, batches(x, ids, 2), job, index, ids, resume=partial, **kw)
    monkeypatch.undo()
    positives = set(ids[index.images["label"].to_numpy() == 0].tolist())
    first_six = positives & set(ids[:6].tolist())
    assert sum(drawn) == len(positives - first_six) > 0  # only what the stopped run had not scored
    pd.testing.assert_frame_equal(again.metrics, whole.metrics)  # same sums in the same order: equal

    # sums made for other units are not mixed in: a fresh run, the same result as without resume
    rows = dataclasses.replace(job, feature_rows=True)  # per-unit rows show any mix-up
    other = score_units(trunk, head, units[::-1], batches(x, ids, 2), rows, index, ids, resume=partial, **kw)
    fresh = score_units(trunk, head, units[::-1], batches(x, ids, 2), rows, index, ids, **kw)
    pd.testing.assert_frame_equal(other.metrics, fresh.metrics)
    partial.write_bytes(b"PK\x03\x04 cut short")  # a damaged file: start over, no error
    pd.testing.assert_frame_equal(score_units(trunk, head, units, batches(x, ids, 2), job, index, ids,
                                              resume=partial, **kw).metrics, whole.metrics)


def test_out_of_memory_retries_with_fewer_units_per_pass(tmp_path, rng, monkeypatch, caplog) -> None:
    import weakref

    import srae.unit_locality as U

    trunk, head = chain()
    index = cub_like(rng, 6)
    ids = index.images["image_id"].to_numpy()
    x = torch.randn(len(ids), 3, 16, 16)
    job = ScoreJob(str(tmp_path / "Zall.zarr"), 0, "Z", class_index=0, metrics=("locality",))
    kw = {"readout": 1, "output_size": (H, W)}
    whole = score_units(trunk, head, range(9), batches(x, ids, 2), job, index, ids, unit_chunk=8, **kw)
    real, chunks = U.excitation_maps_chunked, []

    held = []  # weak references to what each failed pass allocated

    def tight(t, h, u, xb, *, chunk, **k):  # a device that holds at most 2 units per pass
        chunks.append(chunk)
        assert all(r() is None for r in held)  # the failed pass's tensors are freed before a retry
        if chunk > 2:
            big = torch.empty(1000)
            held.append(weakref.ref(big))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.6 GiB")
        return real(t, h, u, xb, chunk=chunk, **k)

    monkeypatch.setattr(U, "excitation_maps_chunked", tight)
    with caplog.at_level("WARNING", logger="srae.unit_locality"):
        small = score_units(trunk, head, range(9), batches(x, ids, 2), job, index, ids, unit_chunk=8, **kw)
    batches_with_positives = 3
    assert chunks == [8, 4, 2] + [2] * (batches_with_positives - 1)  # the smaller pass is kept
    assert "retrying with 4" in caplog.text and "retrying with 2" in caplog.text
    pd.testing.assert_frame_equal(small.metrics.drop(columns="value"), whole.metrics.drop(columns="value"))
    np.testing.assert_allclose(small.metrics["value"], whole.metrics["value"], rtol=1e-6)  # float32 maps

    def broken(*a, **k):  # any other failure is not retried
        chunks.append(k["chunk"])
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    chunks.clear()
    monkeypatch.setattr(U, "excitation_maps_chunked", broken)
    with pytest.raises(RuntimeError, match="CUDNN"):
        score_units(trunk, head, range(9), batches(x, ids, 2), job, index, ids, unit_chunk=8, **kw)
    assert chunks == [8]


def test_objects_match_object_probabilities_and_unlabeled_is_left_out(tmp_path, rng) -> None:
    trunk, head = chain()
    def no_pillows_in_image_2(k: int, labels: np.ndarray) -> None:  # its columns differ from the others'
        if k == 2:
            labels[labels == 300] = 7

    index, fine = conftest.ade_like(tmp_path, rng, 4, (2 * H, 2 * W), split="test", edit=no_pillows_in_image_2)
    ids = np.arange(4)
    x = torch.randn(4, 3, 16, 16)
    units = list(range(9))
    job = ScoreJob(str(tmp_path / "Zall.zarr"), "kitchen", "Z", class_index=0, metrics=("locality",))
    res = score_units(trunk, head, units, batches(x, ids, 2), job, index, ids, readout=1, output_size=(H, W),
                      unit_chunk=5)
    maps = excitation_maps(nn.Sequential(*trunk, *head), x, units, readout=1, output_size=(H, W)).double().numpy()
    hist = np.mean([object_probabilities(maps[k], fine[k], 301) for k in range(4)], axis=0)
    loc = entropy(hist[:, [3, 7, 300]])  # unlabeled (0) is not an object
    assert value(res.metrics, "locality") == pytest.approx(loc.mean(), rel=1e-6)
    for i in range(9):  # feature rows are on by default
        assert value(res.metrics, f"locality_x{i}") == pytest.approx(loc[i], rel=1e-6)
    assert res.histograms[0][0] == ["unlabeled", "bed", "lamp", "pillow"]


def test_bad_requests_are_one_line_errors(tmp_path, rng) -> None:
    trunk, head = chain()
    index = cub_like(rng, 4)
    ids = index.images["image_id"].to_numpy()
    x = torch.randn(4, 3, 16, 16)
    job = ScoreJob(str(tmp_path / "Z.zarr"), 0, "Z", class_index=0, metrics=("locality",))
    kw = {"readout": 1, "output_size": (H, W), "unit_chunk": 4}
    with pytest.raises(SraeError, match="never came in the batches"):
        score_units(trunk, head, [0, 1], batches(x[:1], ids[:1], 1), job, index, ids, **kw)
    with pytest.raises(InputError, match="not in image_ids"):
        score_units(trunk, head, [0, 1], batches(x, ids + 1000, 2), job, index, ids, **kw)
    with pytest.raises(InputError, match="O1/O2 need stored maps"):
        score_units(trunk, head, [0], batches(x, ids, 2), ScoreJob("z", 0, "Z", class_index=0), index, ids, **kw)
    with pytest.raises(InputError, match="uint8 images need mean and std"):
        score_units(trunk, head, [0], batches(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), ids, 2), job, index,
                    ids, **kw)
    with pytest.raises(InputError, match="no images to score"):
        score_units(trunk, head, [0], batches(x, ids, 2), ScoreJob("z", 0, "Z", class_index=1, metrics=("locality",)),
                    index, ids[:2], **kw)


def test_the_z_column_defaults_to_every_dim_on_a_gpu_and_64_sampled_on_a_cpu(tmp_path, monkeypatch) -> None:
    import tasks.heatmaps as TH
    from srae.config import ExperimentConfig, HeatmapsConfig

    def z_jobs(cfg: ExperimentConfig, device: str) -> list[dict]:
        monkeypatch.setattr(TH, "resolve_device", lambda _: device)
        ((_, jobs),) = TH.heatmap_jobs([], [[0]], {"fingerprint": "f" * 64}, {"sha256": "0" * 64}, cfg,
                                      str(tmp_path), dataset={"annotations": "ab" * 8})
        return [j for j in jobs if j["method"] == "Z"]

    cfg = ExperimentConfig()
    assert cfg.heatmaps.z_dims is None
    (gpu,) = z_jobs(cfg, "cuda:0")
    assert gpu["stream"] and gpu["hparams"] == {"z_dims": "all"} and gpu["metrics"] == ["locality"]
    assert Path(gpu["heatmaps"]).name == "Zall-test.zarr" and "every dimension" in TH.z_column_note(cfg)
    (cpu,) = z_jobs(cfg, "cpu")
    assert not cpu.get("stream") and cpu["hparams"] == {"z_dims": 64} and Path(cpu["heatmaps"]).name == "Z64-test.zarr"
    assert "64 sampled dimensions" in TH.z_column_note(cfg)
    (mps,) = z_jobs(cfg, "mps")  # not CUDA: sampled too (no float64 there, and slower)
    assert mps["hparams"] == {"z_dims": 64}
    # heatmaps.images: all adds negatives to the stores, not to the streamed Z column (positives
    # only): its expensive scores keep their place; a sampled Z store moves with the others
    everything = cfg.model_copy(update={"heatmaps": HeatmapsConfig(images="all")})
    assert z_jobs(everything, "cuda:0")[0]["heatmaps"] == gpu["heatmaps"]
    assert z_jobs(everything, "cpu")[0]["heatmaps"] != cpu["heatmaps"]
    for z, device, want in ((8, "cuda:0", {"z_dims": 8}), ("all", "cpu", {"z_dims": "all"})):  # explicit wins
        (job,) = z_jobs(cfg.model_copy(update={"heatmaps": HeatmapsConfig(z_dims=z)}), device)
        assert job["hparams"] == want
    none = cfg.model_copy(update={"heatmaps": HeatmapsConfig(z_dims=0)})
    assert z_jobs(none, "cuda:0") == [] and "not computed" in TH.z_column_note(none)
    for bad in (-1, "ALL", 2.5):
        with pytest.raises(ValueError):
            HeatmapsConfig(z_dims=bad)
