"""Dask-parallel scoring: plumbing against direct metric calls, Dask == serial exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from dask.distributed import Client, LocalCluster

from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError
from srae.metrics.concepts import concept_recovery, evidence_columns
from srae.metrics.locality import entropy, object_probabilities, part_probabilities
from srae.metrics.orthogonality import orthogonality
from srae.scoring import ScoreJob, score, score_serial
from tests import conftest

H, W = 12, 16
PART_NAMES = conftest.PART_NAMES


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def write_group(path: Path, maps: np.ndarray, ids: np.ndarray, chunk: int, **attrs) -> str:
    """A heatmap group in the srae.heatmaps layout: maps (M, n, H, W) float32, image_id (M,)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("maps", data=maps.astype(np.float32), chunks=(chunk, *maps.shape[1:]))
    group.create_array("image_id", data=ids.astype(np.int64))
    group.attrs.update({"method": "SRAE", "readout": "pool3", **attrs})
    return str(path)


def cub_like(rng: np.random.Generator, m: int) -> DatasetIndex:
    return conftest.cub_like(rng, m, first_id=100, label=lambda k: k % 2, no_bbox=3)


def expected_parts(index: DatasetIndex, maps: np.ndarray, ids: np.ndarray, cls: int):
    """Per-image Algorithm 1 with annotations scaled by hand; positives of ``cls`` only."""
    frame = index.images.set_index("image_id")
    hists, pos = [], []
    for m, iid in enumerate(ids):
        row = frame.loc[int(iid)]
        if row["label"] != cls:
            continue
        sx, sy = W / row["width"], H / row["height"]
        parts = row["parts"].copy()
        parts[:, 0] *= sx
        parts[:, 1] *= sy
        bbox = None if row["bbox"] is None else (row["bbox"][0] * sx, row["bbox"][1] * sy,
                                                   row["bbox"][2] * sx, row["bbox"][3] * sy)
        hists.append(part_probabilities(maps[m], parts, bbox))
        pos.append(m)
    return np.mean(hists, axis=0), maps[pos]


def value(frame: pd.DataFrame, method: str, metric: str) -> float:
    hit = frame[(frame["method"] == method) & (frame["metric"] == metric)]
    assert len(hit) == 1, (method, metric, frame)
    return float(hit["value"].iloc[0])


def test_parts_scoring_matches_direct_metrics_and_dask_equals_serial(tmp_path, rng, client) -> None:
    index = cub_like(rng, 10)
    ids = index.images["image_id"].to_numpy()[::-1].copy()
    maps_x = (rng.random((10, 3, H, W)) ** 3).astype(np.float32)
    maps_z = (rng.random((10, 5, H, W)) ** 3).astype(np.float32)
    maps_z[:, 4] = 0.0  # a dead Z dim: left out of locality, never NaN
    jobs = [
        ScoreJob(write_group(tmp_path / "x.zarr", maps_x, ids, 3), "a", "SRAE", class_index=0,
                 experiment="t", hparams={"beta": 1.0}),
        ScoreJob(write_group(tmp_path / "z.zarr", maps_z, ids, 2), "a", "Z", class_index=0, experiment="t",
                 metrics=("locality",)),
    ]
    serial = score_serial(jobs, index, chunk_size=4)
    hist, pos_maps = expected_parts(index, maps_x.astype(np.float64), ids, 0)
    loc = entropy(hist)
    rows = serial.metrics
    assert value(rows, "SRAE", "locality") == pytest.approx(loc.mean(), abs=1e-12)
    for i in range(3):
        assert value(rows, "SRAE", f"locality_x{i}") == pytest.approx(loc[i], abs=1e-12)
    o1, o2 = orthogonality(pos_maps)
    assert value(rows, "SRAE", "O1") == pytest.approx(o1, abs=1e-9)
    assert value(rows, "SRAE", "O2") == pytest.approx(o2, abs=1e-9)
    ev = evidence_columns(PART_NAMES + ["context"], ["beak", "wing"])
    assert value(rows, "SRAE", "concept_recovery") == pytest.approx(concept_recovery(hist, ev), abs=1e-12)
    hist_z, _ = expected_parts(index, maps_z.astype(np.float64), ids, 0)
    assert value(rows, "Z", "locality") == pytest.approx(entropy(hist_z[:4]).mean(), abs=1e-12)
    assert "locality_x4" not in set(rows[rows["method"] == "Z"]["metric"])
    assert not rows["value"].isna().any()
    assert set(rows[rows["method"] == "Z"]["metric"]) == {"locality"} | {f"locality_x{i}" for i in range(4)}
    srae_row = rows[rows["method"] == "SRAE"].iloc[0]
    assert (srae_row["n_features"], json.loads(srae_row["hparams"]), srae_row["split"]) == (3, {"beta": 1.0}, "test")
    assert len(serial.concepts) == 3 and set(serial.concepts["top_part"]) <= set(PART_NAMES + ["context"])

    dask = score(jobs, index, client=client, chunk_size=4)
    pd.testing.assert_frame_equal(dask.metrics, serial.metrics, check_exact=True)
    pd.testing.assert_frame_equal(dask.concepts, serial.concepts, check_exact=True)
    via_address = score(jobs, index, address=client.scheduler.address, chunk_size=4)
    pd.testing.assert_frame_equal(via_address.metrics, serial.metrics, check_exact=True)


write_seg = conftest.write_seg


def test_object_scoring_with_masks(tmp_path, rng, client) -> None:
    index, fine = conftest.ade_like(tmp_path, rng, 5, (2 * H, 2 * W), split="train")
    maps = (rng.random((5, 2, H, W)) ** 2).astype(np.float32)
    job = ScoreJob(write_group(tmp_path / "o.zarr", maps, np.arange(5), 2), "kitchen", "SRAE", split="train",
                   class_index=0)
    serial = score_serial([job], index)
    hist = np.mean([object_probabilities(maps[k].astype(np.float64), fine[k], 301) for k in range(5)], axis=0)
    loc = entropy(hist[:, [3, 7, 300]])  # unlabeled (0) is not an object
    assert value(serial.metrics, "SRAE", "locality") == pytest.approx(loc.mean(), abs=1e-12)
    # concept statistics leave unlabeled out too: bed and pillow among [bed, lamp, pillow]
    rec = concept_recovery(hist[:, [3, 7, 300]], [0, 2])
    assert value(serial.metrics, "SRAE", "concept_recovery") == pytest.approx(rec, abs=1e-12)
    q = hist[:, [3, 7, 300]]
    share = q[:, [0, 2]].sum(axis=1) / q.sum(axis=1)
    assert rec == pytest.approx(share.mean(), abs=1e-12) and rec < 1.0
    assert set(serial.concepts["top_part"]) <= {"bed", "lamp", "pillow"}
    np.testing.assert_allclose(serial.concepts["evidence_mass"], share, atol=1e-12)
    assert serial.histograms[0][0] == ["unlabeled", "bed", "lamp", "pillow"]
    dask = score([job], index, client=client)
    pd.testing.assert_frame_equal(dask.metrics, serial.metrics, check_exact=True)


def test_bad_inputs_name_the_problem(tmp_path, rng) -> None:
    index = cub_like(rng, 4)
    maps = rng.random((4, 2, H, W)).astype(np.float32)
    bad_ids = write_group(tmp_path / "bad.zarr", maps, np.array([100, 101, 102, 999]), 2)
    with pytest.raises(InputError, match="999"):
        score_serial([ScoreJob(bad_ids, "a", "SRAE")], index)
    partial = write_group(tmp_path / "partial.zarr", maps, np.arange(100, 104), 2, complete=False)
    with pytest.raises(SraeError, match="incomplete"):
        score_serial([ScoreJob(partial, "a", "SRAE")], index)
    good = write_group(tmp_path / "good.zarr", maps, np.arange(100, 104), 2)
    with pytest.raises(InputError, match="no images"):
        score_serial([ScoreJob(good, "c", "SRAE", class_index=5)], index)
    with pytest.raises(InputError, match="not a heatmap group"):
        score_serial([ScoreJob(str(tmp_path / "missing.zarr"), "a", "SRAE")], index)


def _rooms(tmp_path: Path, rng: np.random.Generator, evidence: list[str], root: Path | None = None):
    """Five images of objects 0 (unlabeled), 3 and 7; "pillow" (300) is a known object in none."""
    rows = []
    for k in range(5):
        write_seg(tmp_path / f"r{k}_seg.png", rng.choice([0, 3, 7], size=(H, W)))
        rows.append({"image_id": k, "path": f"r{k}.jpg", "label": 0, "split": "test", "width": 32.0,
                     "height": 24.0, "bbox": None, "parts": None, "mask_path": f"r{k}_seg.png"})
    return DatasetIndex("rooms", root or tmp_path, ["bedroom"], pd.DataFrame(rows),
                        object_names={3: "bed", 7: "lamp", 300: "pillow"}, evidence={0: evidence})


def test_absent_evidence_object_is_missed_and_unknown_drops_only_concepts(tmp_path, rng) -> None:
    maps = (rng.random((5, 3, H, W)) ** 2).astype(np.float32)
    group = write_group(tmp_path / "r.zarr", maps, np.arange(5), 2)
    job = ScoreJob(group, "bedroom", "SRAE", class_index=0)
    res = score_serial([job], _rooms(tmp_path, rng, ["bed", "pillow"]))
    names, mean = res.histograms[0]
    q = mean[:, [names.index("bed"), names.index("lamp")]]
    bed = q[:, 0] / q.sum(axis=1)
    assert value(res.metrics, "SRAE", "concept_recovery") == pytest.approx(bed.mean(), abs=1e-12)
    # coverage is scored against the parts the CNN uses, at report time: not here
    assert "concept_coverage" not in set(res.metrics["metric"])
    assert {"locality", "O1", "O2"} <= set(res.metrics["metric"]) and res.notes == []
    # a typo in the ground truth: locality and orthogonality are still scored, concepts dropped + noted
    bad = score_serial([job], _rooms(tmp_path, rng, ["bed", "pilow"]))
    assert {"locality", "O1", "O2"} <= set(bad.metrics["metric"])
    assert not bad.metrics["metric"].str.startswith("concept").any() and bad.concepts.empty
    assert len(bad.notes) == 1 and "pilow" in bad.notes[0]


def test_chunk_specs_carry_absolute_paths(tmp_path, rng, monkeypatch) -> None:
    from srae.scoring import plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    index = _rooms(tmp_path / "data", rng, ["bed"], root=Path("data"))  # a relative dataset root
    write_group(tmp_path / "h.zarr", rng.random((5, 2, H, W)).astype(np.float32), np.arange(5), 2)
    specs = plan([ScoreJob("h.zarr", "bedroom", "SRAE", class_index=0)], index)
    assert specs and all(Path(s.path).is_absolute() for s in specs)
    assert all(Path(s.path).samefile(tmp_path / "h.zarr") for s in specs)
    masks = [m for s in specs for m in s.mask_paths]
    assert len(masks) == 5 and all(Path(m).is_absolute() for m in masks)
    assert [Path(m).resolve() for m in masks] == [(tmp_path / "data" / f"r{k}_seg.png").resolve() for k in range(5)]


def test_local_clusters_keep_status_servers_on_loopback_and_free_ports():
    """Two scoring clusters at once (two runs, or a notebook's cluster on 8787) must not fight
    over port 8787, and an in-process cluster must not listen on the machine's network address."""
    import warnings

    from srae.scoring import dask_client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dask_client(n_workers=1, processes=False) as a, dask_client(n_workers=1, processes=False) as b:
            servers = [a.cluster.scheduler.http_server, b.cluster.scheduler.http_server]
            servers += [w.http_server for c in (a, b) for w in c.cluster.workers.values()]
            assert {s.address for s in servers} == {"127.0.0.1"}
            assert servers[0].port != servers[1].port
    assert not [w for w in caught if "already in use" in str(w.message)]


def test_a_damaged_chunk_is_one_error_naming_the_store_without_dask_dumps(tmp_path, rng, client, caplog) -> None:
    """A truncated chunk file failed inside a Dask task: each worker logged "Compute Failed"
    with the task's arguments and a traceback, and the error named no store."""
    index = cub_like(rng, 10)
    ids = index.images["image_id"].to_numpy()
    maps = (rng.random((10, 3, H, W)) ** 3).astype(np.float32)
    path = write_group(tmp_path / "x.zarr", maps, ids, 2)
    chunk = tmp_path / "x.zarr" / "maps" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    jobs = [ScoreJob(path, "a", "SRAE", class_index=0)]
    for run in (lambda: score_serial(jobs, index, chunk_size=4), lambda: score(jobs, index, client=client, chunk_size=4)):
        with caplog.at_level("WARNING"):
            with pytest.raises(SraeError, match=rf"heatmaps {path}: images 2..3 cannot be read \(.*\); delete the store"):
                run()
    assert "Compute Failed" not in caplog.text


def test_scoring_reports_progress_and_a_stop_cancels_the_rest(tmp_path, rng, client, monkeypatch, caplog) -> None:
    import functools
    import logging

    import srae.scoring
    from srae import cancel
    from srae.progress import ProgressLog

    index = cub_like(rng, 10)
    ids = index.images["image_id"].to_numpy()
    maps = (rng.random((10, 2, H, W)) ** 3).astype(np.float32)
    jobs = [ScoreJob(write_group(tmp_path / "x.zarr", maps, ids, 2), "a", "SRAE", class_index=0, experiment="t")]
    monkeypatch.setattr(srae.scoring, "ProgressLog", functools.partial(ProgressLog, every=0.0))
    with caplog.at_level(logging.INFO, logger="srae.scoring"):
        ref = score(jobs, index, client=client, chunk_size=2)
    lines = [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("scoring: ")]
    assert lines == [f"scoring: {k} of 5 chunks scored" for k in range(1, 5)]  # the last one is the end
    pd.testing.assert_frame_equal(ref.metrics, score_serial(jobs, index, chunk_size=2).metrics)
    cancel.request_stop()
    try:
        with pytest.raises(cancel.Stopped, match="scoring: stopped"):
            score(jobs, index, client=client, chunk_size=2)
    finally:
        cancel.reset()


def test_rows_by_job_equals_filtering_the_frame_per_job() -> None:
    from types import SimpleNamespace

    from tasks.scoring import rows_by_job

    frame = pd.DataFrame({"method": ["SRAE", "NN", "SRAE", "SRAE", "Z"], "category": [0, 0, 1, 0, 1],
                          "split": ["test"] * 4 + ["train"], "value": [1.0, 2.0, 3.0, 4.0, 5.0]})
    specs = [SimpleNamespace(method=m, category=c, split=s) for m, c, s in
             [("SRAE", 0, "test"), ("Z", 1, "train"), ("NN", 1, "test"), ("SRAE", 1, "test")]]
    got = rows_by_job(frame, specs)
    for spec, rows in zip(specs, got):
        want = frame[(frame["method"] == spec.method) & (frame["category"] == spec.category)
                     & (frame["split"] == spec.split)].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, want)
    assert got[0]["value"].tolist() == [1.0, 4.0] and got[2].empty
    assert all(r.empty for r in rows_by_job(frame.iloc[0:0], specs))


def test_a_dask_address_without_a_scheduler_fails_at_once_in_one_line() -> None:
    import socket

    from dask.distributed import LocalCluster

    from srae.scoring import check_dask_address

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0",
                      protocol="tcp://") as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        check_dask_address(cluster.scheduler_address)  # a live scheduler answers
    with socket.socket() as s:  # a port nothing listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SraeError, match=r"no Dask scheduler answers within 2 s") as exc:
        check_dask_address(dead, timeout=2)
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="expected tcp://host:port"):
        check_dask_address("http://x")
