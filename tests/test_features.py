"""Feature store: values, layout, fingerprint, reuse, resume after a crash, one writer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_images import make_tiny_index

from srae import __version__
from srae.backbones import build_backbone, save_backbone
from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError
from srae.features import extract_features, feature_fingerprint, is_complete, open_features, writer_lock
from srae.images import load_image, preprocess

ARRAYS = ("z", "logits", "labels", "image_id", "split", "valid")
OPTS = {"batch_size": 4, "chunk_rows": 4, "num_workers": 0, "progress": False, "device": "cpu"}


class Interrupt(RuntimeError):
    pass


@pytest.fixture
def tiny(tmp_path: Path):
    index = make_tiny_index(tmp_path / "data", classes=3, per_class=6)  # 18 images
    bb = build_backbone("demo_cnn", 3, input_size=32, seed=0)
    return index, bb


def _stop_after(batches: int):
    calls = []

    def on_batch(rows: int) -> None:
        calls.append(rows)
        if len(calls) == batches:
            raise Interrupt(f"simulated crash after {rows} rows")
    return on_batch


def _assert_same_store(a: Path, b: Path) -> None:
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        x, y = ra[name][:], rb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name  # bit for bit
    assert dict(ra.attrs) == dict(rb.attrs)


def test_store_values_layout_and_attrs(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    path = extract_features(index, bb, tmp_path / "feat", **OPTS)
    prep = {"size": 32, "resize": "PIL bilinear, no crop", "mean": list(bb.mean), "std": list(bb.std),
            "precision": "fp32"}
    expect_fp = hashlib.sha256(json.dumps(
        {"dataset_fingerprint": index.manifest_fingerprint(), "checkpoint_sha256": bb.checkpoint_sha256,
         "layer": "fc6", "preprocessing": prep, "package_version": __version__}, sort_keys=True).encode()).hexdigest()
    assert path == tmp_path / "feat" / f"{expect_fp}.zarr" and is_complete(path)
    fs = open_features(path)
    assert fs.attrs["complete"] is True and fs.fingerprint == expect_fp
    assert fs.attrs["checkpoint_sha256"] == bb.checkpoint_sha256 and fs.attrs["layer"] == "fc6"
    assert fs.attrs["package_version"] == __version__ and fs.attrs["preprocessing"] == prep
    assert fs.z.shape == (18, 256) and fs.z.dtype == np.float32 and fs.logits.shape == (18, 3)
    assert fs.labels.tolist() == index.images["label"].tolist()
    assert fs.image_id.tolist() == index.images["image_id"].tolist()
    assert fs.split.tolist() == index.images["split"].tolist()
    # independent reference: one image at a time through the torch modules
    with torch.no_grad():
        for i, rel in enumerate(index.images["path"]):
            x = preprocess(load_image(index.abspath(rel)), 32)[None]
            z = bb.trunk(x)
            np.testing.assert_allclose(fs.z[i], z[0].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(fs.logits[i], bb.head(z)[0].numpy(), rtol=1e-5, atol=1e-5)
    assert (fs.z >= 0).all()
    root = zarr.open_group(str(path), mode="r")
    assert root["z"].chunks == (4, 256) and root["logits"].chunks == (4, 3)  # whole rows per chunk
    rows = np.array([5, 0, 17])
    part = open_features(path, rows=rows)
    assert np.array_equal(part.z, fs.z[rows]) and part.image_id.tolist() == fs.image_id[rows].tolist()


def test_interrupted_extraction_resumes_bit_for_bit(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    whole = extract_features(index, bb, tmp_path / "whole", **OPTS)
    with pytest.raises(Interrupt):
        extract_features(index, bb, tmp_path / "cut", on_batch=_stop_after(3), **OPTS)
    cut = tmp_path / "cut" / whole.name
    assert cut.exists() and not is_complete(cut)
    assert zarr.open_group(str(cut), mode="r").attrs["rows_done"] == 12
    with pytest.raises(InputError, match="incomplete"):
        open_features(cut)
    seen: list[int] = []
    resumed = extract_features(index, bb, tmp_path / "cut", on_batch=seen.append, **OPTS)
    assert resumed == cut and seen == [16, 18]  # only the missing rows were computed
    _assert_same_store(whole, cut)


KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
torch.set_num_threads(1)
from test_images import make_tiny_index
from srae.backbones import load_backbone
from srae.features import extract_features
index = make_tiny_index(__import__("pathlib").Path({data!r}), classes=3, per_class=6)
bb = load_backbone({ckpt!r})
def on_batch(rows):
    if rows >= 12:
        os.kill(os.getpid(), signal.SIGKILL)
extract_features(index, bb, {root!r}, on_batch=on_batch, batch_size=4, chunk_rows=4,
                 num_workers=1, progress=False, device="cpu")
"""


def test_killed_extraction_resumes_bit_for_bit(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    ckpt = tmp_path / "bb.safetensors"
    save_backbone(bb, ckpt)
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), repo=str(Path(__file__).parents[1]), data=str(index.root),
        ckpt=str(ckpt), root=str(tmp_path / "killed"))))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    whole = extract_features(index, bb, tmp_path / "whole", **OPTS)
    killed = tmp_path / "killed" / whole.name
    assert killed.exists() and not is_complete(killed)
    done = zarr.open_group(str(killed), mode="r").attrs["rows_done"]
    assert 4 <= done <= 12  # the kill left finished chunks behind (chunk 1 at least)
    seen: list[int] = []
    assert extract_features(index, bb, tmp_path / "killed", on_batch=seen.append, **OPTS) == killed
    assert seen[0] == done + 4  # resumed after the last finished chunk, not from zero
    _assert_same_store(whole, killed)


def test_finished_store_is_reused_and_inputs_change_the_store(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    first = extract_features(index, bb, tmp_path / "feat", **OPTS)
    calls: list[int] = []
    assert extract_features(index, bb, tmp_path / "feat", on_batch=calls.append, **OPTS) == first
    assert calls == []  # nothing recomputed
    other_weights = build_backbone("demo_cnn", 3, input_size=32, seed=1)
    assert extract_features(index, other_weights, tmp_path / "feat", **OPTS) != first
    assert extract_features(index, bb, tmp_path / "feat", checkpoint_sha256="ab" * 32, **OPTS) != first
    bb.mean = (0.5, 0.5, 0.5)
    assert extract_features(index, bb, tmp_path / "feat", **OPTS) != first
    fewer = DatasetIndex(name=index.name, root=index.root, class_names=index.class_names,
                         images=index.images.iloc[:-1].reset_index(drop=True))
    assert extract_features(fewer, bb, tmp_path / "feat", **OPTS) != first
    base = ("d" * 64, "c" * 64, "fc6", {"size": 32})
    assert feature_fingerprint(*base) != feature_fingerprint("d" * 64, "c" * 64, "fc7", {"size": 32})
    assert feature_fingerprint(*base) != feature_fingerprint(*base, package_version="0.0.0")
    with pytest.raises(InputError, match="fc7"):
        extract_features(index, bb, tmp_path / "feat", layer="fc7", **OPTS)


def test_a_store_with_a_missing_chunk_file_is_rebuilt_not_read_as_zeros(tiny, tmp_path: Path) -> None:
    """zarr reads a missing chunk as its fill value (0): a "complete" store that lost a chunk
    file used to feed zeros to training. Every chunk is now stored (also all-zero ones, e.g. a
    chunk of label 0 or split "train"), so a missing file means damage: not complete, rebuilt."""
    import shutil

    from srae import stores

    index, bb = tiny
    path = extract_features(index, bb, tmp_path / "feat", **OPTS)
    ref = tmp_path / "ref.zarr"
    shutil.copytree(path, ref)
    assert stores.missing_chunks(path) == [] and is_complete(path)
    assert not zarr.open_group(str(path), mode="r")["labels"][:4].any()  # a chunk equal to the fill, yet stored
    chunk = next((path / "z" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    chunk.with_name(chunk.name + ".partial").write_bytes(b"x")  # zarr's leftover temp file is no chunk
    assert stores.missing_chunks(path) == ["z: 1 of 5 chunk files missing"]  # 18 rows, 4 per chunk
    assert not is_complete(path)
    with pytest.raises(InputError, match=r"damaged \(z: 1 of 5 chunk files missing\); rerun"):
        open_features(path)
    calls: list[int] = []
    assert extract_features(index, bb, tmp_path / "feat", on_batch=calls.append, **OPTS) == path
    assert calls and is_complete(path)  # recomputed
    _assert_same_store(path, ref)


def test_a_store_with_a_truncated_chunk_file_is_rebuilt(tiny, tmp_path: Path) -> None:
    """A chunk file cut short after ``complete`` was written is damage too (its size was recorded)."""
    import shutil

    index, bb = tiny
    path = extract_features(index, bb, tmp_path / "feat", **OPTS)
    ref = tmp_path / "ref.zarr"
    shutil.copytree(path, ref)
    chunk = path / "logits" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    assert not is_complete(path)
    with pytest.raises(InputError, match=r"damaged \(logits: 1 of 5 chunk files changed size since the store "
                                         r"was finished\); rerun"):
        open_features(path)
    assert extract_features(index, bb, tmp_path / "feat", **OPTS) == path and is_complete(path)
    _assert_same_store(path, ref)


def test_second_writer_gets_a_clear_error(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    with pytest.raises(Interrupt):
        extract_features(index, bb, tmp_path / "feat", on_batch=_stop_after(1), **OPTS)
    (store,) = (tmp_path / "feat").glob("*.zarr")
    with writer_lock(store):
        with pytest.raises(SraeError, match=f"another writer \\(pid {os.getpid()}"):
            extract_features(index, bb, tmp_path / "feat", **OPTS)
    assert extract_features(index, bb, tmp_path / "feat", **OPTS) == store  # lock released


def test_a_second_run_can_wait_for_the_writer_and_reuse_its_store(tiny, tmp_path: Path) -> None:
    """Two scheduled runs on one cache: the second waits for the first's extraction (it used
    to fail the whole run with "another writer holds ...") and then reuses the finished store."""
    import threading

    index, bb = tiny
    with pytest.raises(Interrupt):
        extract_features(index, bb, tmp_path / "feat", on_batch=_stop_after(1), **OPTS)
    (store,) = (tmp_path / "feat").glob("*.zarr")
    held, order = threading.Event(), []

    def first_run() -> None:
        with writer_lock(store):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=first_run)
    t.start()
    held.wait(5)
    with pytest.raises(SraeError, match="another writer"):
        extract_features(index, bb, tmp_path / "feat", wait_for_writer=0.1, **OPTS)
    got = extract_features(index, bb, tmp_path / "feat", wait_for_writer=30, on_batch=lambda r: order.append(r),
                           **OPTS)
    t.join()
    assert got == store and is_complete(store) and order[0] == "first done"


def test_unreadable_image_is_marked_invalid(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    broken = index.images["path"].iloc[4]
    (index.root / broken).write_bytes(b"\xff\xd8\xff truncated jpeg")
    path = extract_features(index, bb, tmp_path / "feat", **OPTS)
    fs = open_features(path)
    assert len(fs) == 17 and index.images["image_id"].iloc[4] not in fs.image_id
    bad = fs.attrs["bad_inputs"]
    assert len(bad) == 1 and bad[0]["path"] == broken and broken in bad[0]["reason"]
    full = open_features(path, include_invalid=True)
    assert len(full) == 18 and not full.z[4].any() and not full.logits[4].any()
    np.testing.assert_array_equal(np.delete(full.z, 4, axis=0), fs.z)


def test_bad_arguments(tiny, tmp_path: Path) -> None:
    index, bb = tiny
    with pytest.raises(InputError, match="multiple"):
        extract_features(index, bb, tmp_path / "feat", **{**OPTS, "chunk_rows": 6})
    with pytest.raises(InputError, match="precision"):
        extract_features(index, bb, tmp_path / "feat", precision="fp8", **{k: v for k, v in OPTS.items()})
    with pytest.raises(InputError, match="not found"):
        open_features(tmp_path / "nothing.zarr")
    # a backbone for another number of classes: its logits would be cut (or not fit) silently
    for classes in (2, 5):
        with pytest.raises(InputError, match=f"demo_cnn has {classes} classes, dataset .* has 3"):
            extract_features(index, build_backbone("demo_cnn", classes, input_size=32, seed=0), tmp_path / "f", **OPTS)


def test_rows_are_positions_or_a_boolean_mask(tiny, tmp_path: Path) -> None:
    """numpy reads a boolean array as rows 1/0 and truncates floats: both were silently wrong."""
    index, bb = tiny
    path = extract_features(index, bb, tmp_path / "feat", **OPTS)
    full = open_features(path)
    mask = np.zeros(len(full.image_id), dtype=bool)
    mask[[1, 7]] = True
    assert list(open_features(path, rows=mask).image_id) == list(full.image_id[[1, 7]])
    assert list(open_features(path, rows=[7, 1]).image_id) == list(full.image_id[[7, 1]])
    for bad, what in ((np.array([0.5]), "integer positions"), (mask[:3], "needs 18 entries"),
                      ([18], "out of range")):
        with pytest.raises(InputError, match=what):
            open_features(path, rows=bad)


def test_features_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    import yaml

    from srae.datasets.cub import read_cub
    from srae.datasets.synthetic import make_synthbirds
    from srae.features_cli import register

    root = make_synthbirds(tmp_path / "birds", classes=2, per_class=4, size=32, seed=0)
    bb = build_backbone("demo_cnn", 2, input_size=32, seed=0)
    save_backbone(bb, tmp_path / "bb.safetensors")
    config = {"cache_dir": str(tmp_path / "cache"), "dataset": {"kind": "synthbirds", "root": str(root)},
              "backbone": {"name": "demo_cnn", "checkpoint": str(tmp_path / "bb.safetensors"), "fit": {"epochs": 0}},
              "features": {"batch_size": 4, "num_workers": 0, "device": "cpu"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["features", str(tmp_path / "c.yaml"), "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    direct = extract_features(read_cub(root, name="synthbirds"), bb, tmp_path / "cache" / "features", **OPTS)
    assert printed.startswith(str(direct)) and "8 images" in printed  # same inputs, same store
    config["backbone"]["fit"]["epochs"] = 3  # the checkpoint is now where `srae run` starts fitting from
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(InputError, match="no fitted demo_cnn .* run `srae run CONFIG` first, pass --checkpoint"):
        args.func(parser.parse_args(["features", str(tmp_path / "c.yaml")]))


def test_the_lock_of_a_store_whose_folder_is_not_made_yet(tmp_path: Path) -> None:
    """The streamed Z job locks a store that is never created, in a category folder that only
    the stored heatmaps made: when those failed first, the lock failed too."""
    store = tmp_path / "baselines" / "k" / "cat0001" / "Zall-test.zarr"
    with writer_lock(store) as fd:
        assert fd >= 0 and store.with_name("Zall-test.zarr.lock").is_file()
    assert not store.exists()


def test_a_stopped_or_failed_wait_for_the_lock_leaves_no_descriptor_open(tmp_path: Path) -> None:
    import threading

    from srae import cancel

    store = tmp_path / "s.zarr"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with writer_lock(store):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(20):
            with pytest.raises(SraeError, match="another writer"):
                with writer_lock(store, wait=0.01):
                    pass
        cancel.request_stop()
        for _ in range(20):
            with pytest.raises(cancel.Stopped, match="waiting for feature store"):
                with writer_lock(store, wait=30):
                    pass
    finally:
        cancel.reset()
        release.set()
        t.join()
    assert len(os.listdir("/proc/self/fd")) <= fds
