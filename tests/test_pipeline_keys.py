"""Stage identities of the pipeline: the backbone fit directory is keyed by what fit compares,
an epochs-0 checkpoint is identified by its bytes, an edited dataset index re-runs the
dataset stage, and ``srae run`` refuses a missing accelerator before Prefect starts.

Task bodies are called through ``.fn`` (no Prefect server, no flow run)."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

import srae.fit as F
from srae import cli, run_cli
from srae.backbones import build_backbone, file_sha256, save_backbone
from srae.config import ExperimentConfig
from srae.errors import InputError, SraeError
from tasks import backbone as TB
from tasks import download as TD
from tasks.common import read_work_log

DATASET = {"kind": "synthbirds", "classes": 3, "per_class": 8, "size": 32, "seed": 0, "download": True}
FIT = {"epochs": 1, "lr": 0.003, "batch_size": 8, "augment": False, "seed": 0}


def _backbone(**fit) -> dict:
    return {"name": "demo_cnn", "input_size": 32, "fit": {**FIT, **fit}}


def _checkpoint(path: Path, seed: int) -> Path:
    """A demo_cnn safetensors checkpoint for 3 classes whose weights depend on ``seed``."""
    save_backbone(build_backbone("demo_cnn", 3, input_size=32, seed=seed), path)
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> dict:
    """The dataset stage's result for a tiny generated synthbirds set (3 classes x 8 images)."""
    base = tmp_path_factory.mktemp("keys")
    return TD.prepare_dataset.fn({**DATASET, "root": str(base / "data")}, str(base / "cache"))


# ---------------------------------------------------------------------- backbone fit directory
def test_backbone_dir_is_keyed_by_the_settings_fit_compares(tmp_path: Path, monkeypatch) -> None:
    ds = {"fingerprint": "f" * 64, "num_classes": 3}
    ckpt = _checkpoint(tmp_path / "start.safetensors", seed=1)
    bb = {**_backbone(), "checkpoint": str(ckpt)}
    d0 = TB.backbone_dir(tmp_path, bb, ds)
    assert d0 == TB.backbone_dir(tmp_path, bb, ds)  # identical inputs: same directory
    assert d0.parent == tmp_path / "backbones" and d0.name.startswith("demo_cnn-")
    # checking the key builds no network (VGG: seconds and a GB of memory per check)
    import srae.backbones

    def no_build(*a, **k):
        raise AssertionError("backbone_dir built a backbone")

    monkeypatch.setattr(srae.backbones, "build_backbone", no_build)
    assert TB.backbone_dir(tmp_path, bb, ds) == d0
    assert TB._outputs({"backbone": {**bb, "fit": {**bb["fit"], "epochs": 0}}, "dataset": ds, "cache_dir": str(tmp_path)})
    monkeypatch.undo()
    # the device a fit runs on is no part of its identity
    assert TB.backbone_dir(tmp_path, {**bb, "fit": {**bb["fit"], "device": "cpu"}}, ds) == d0
    # other bytes at the same path: another directory
    _checkpoint(ckpt, seed=2)
    d1 = TB.backbone_dir(tmp_path, bb, ds)
    assert d1 != d0
    # another package version, dataset, or fit setting: another directory
    monkeypatch.setattr(F, "__version__", "999.0")
    d2 = TB.backbone_dir(tmp_path, bb, ds)
    assert d2 != d1
    monkeypatch.undo()
    assert TB.backbone_dir(tmp_path, bb, ds) == d1
    assert TB.backbone_dir(tmp_path, bb, {**ds, "fingerprint": "e" * 64}) != d1
    assert TB.backbone_dir(tmp_path, {**bb, "fit": {**bb["fit"], "lr": 0.002}}, ds) != d1


def test_fit_key_is_the_hash_of_the_canonical_config() -> None:
    import hashlib

    cfg = F.fit_config(backbone="demo_cnn", num_classes=3, input_size=32, dataset="d", init="i", epochs=2,
                       lr=0.5, batch_size=4, weight_decay=0.0, seed=1, augment=True)
    assert cfg["version"] == F.__version__ and cfg["lr"] == 0.5 and cfg["epochs"] == 2
    text = json.dumps(dict(sorted(cfg.items())), separators=(",", ":"))
    assert F.fit_key(cfg) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert F.fit_key({**cfg, "init": "j"}) != F.fit_key(cfg)


def test_fit_from_an_older_version_is_never_refused(tiny_dataset: dict, tmp_path: Path, monkeypatch) -> None:
    cache = str(tmp_path / "cache")
    bb = _backbone()
    monkeypatch.setattr(F, "__version__", "0.0.1-old")
    old = TB.prepare_backbone.fn(bb, tiny_dataset, cache, "cpu")
    old_dir = Path(old["checkpoint"]).parent
    summary = json.loads((old_dir / F.SUMMARY_FILE).read_text())
    assert summary["config"]["version"] == "0.0.1-old"
    monkeypatch.undo()
    # fitting the same settings into that directory under the new version is what used to be refused
    index = TD.load_index(tiny_dataset)
    with pytest.raises(InputError, match="other settings"):
        F.fit(index, old_dir, num_workers=0, progress=False, input_size=32, **{**FIT, "device": "cpu"})
    new = TB.prepare_backbone.fn(bb, tiny_dataset, cache, "cpu")  # the stage goes elsewhere: no refusal
    new_dir = Path(new["checkpoint"]).parent
    assert new_dir != old_dir and new_dir.parent == old_dir.parent
    assert json.loads((new_dir / F.SUMMARY_FILE).read_text())["config"]["version"] == F.__version__
    assert new["sha256"] == file_sha256(new["checkpoint"])
    again = TB.prepare_backbone.fn(bb, tiny_dataset, cache, "cpu")  # same version again: reused
    assert again == new
    assert [r["key"] for r in read_work_log(cache) if r["stage"] == "backbone"] == [str(old_dir), str(new_dir)]
    assert TB._outputs({"backbone": bb, "dataset": tiny_dataset, "cache_dir": cache}) == [(str(new_dir), True)]


def test_epochs_zero_identity_follows_the_checkpoint_bytes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "given.safetensors", seed=3)
    bb = {**_backbone(epochs=0), "checkpoint": str(ckpt)}
    ds = {"fingerprint": "f" * 64, "num_classes": 3}
    inputs = {"backbone": bb, "dataset": ds, "cache_dir": str(tmp_path)}
    first = TB._outputs(inputs)
    assert first[0] == (str(ckpt), True) and first[1][0].startswith("weights:")
    res = TB.prepare_backbone.fn(bb, ds, str(tmp_path), "cpu")
    assert res["sha256"] == file_sha256(ckpt) and res["checkpoint"] == str(ckpt)
    _checkpoint(ckpt, seed=4)  # overwritten in place: same path, other weights
    second = TB._outputs(inputs)
    assert second[0] == first[0] and second[1] != first[1]
    assert TB.prepare_backbone.fn(bb, ds, str(tmp_path), "cpu")["sha256"] == file_sha256(ckpt) != res["sha256"]
    ckpt.unlink()
    with pytest.raises(SraeError, match="not found"):
        TB.prepare_backbone.fn(bb, ds, str(tmp_path), "cpu")


# ---------------------------------------------------------------------- dataset edited in place
def _edit_line(path: Path, lineno: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_edited_cub_annotations_change_the_dataset_identity(tiny_dataset: dict, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "cub"
    shutil.copytree(tiny_dataset["root"], root / "CUB_200_2011")
    ds_cfg = {"kind": "cub", "root": str(root), "download": False}
    cache = str(tmp_path / "cache")
    inputs = {"dataset": ds_cfg, "cache_dir": cache}
    base = root / "CUB_200_2011"
    files = TD.index_files("cub", root)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
                 "classes.txt", "parts/parts.txt", "parts/part_locs.txt"):
        assert base / name in files
    k0 = TD._dataset_outputs(inputs)
    assert k0[0] == (str(root), True) and len(k0) == 2
    assert TD._dataset_outputs(inputs) == k0  # nothing changed: same identity
    r0 = TD.prepare_dataset.fn(ds_cfg, cache)

    # a bounding box edited: new identity; new annotations hash; same manifest fingerprint
    boxes = base / "bounding_boxes.txt"
    first = boxes.read_text().splitlines()[0].split()
    _edit_line(boxes, 1, " ".join([first[0], "1.0", "1.0", "2.0", "2.0"]))
    k1 = TD._dataset_outputs(inputs)
    assert k1[0] == k0[0] and k1[1] != k0[1]
    r1 = TD.prepare_dataset.fn(ds_cfg, cache)
    assert r1["annotations"] != r0["annotations"] and r1["fingerprint"] == r0["fingerprint"]
    image_id = int(first[0])
    bbox = TD.load_index(r1).images.set_index("image_id").loc[image_id, "bbox"]
    assert tuple(bbox) == (1.0, 1.0, 2.0, 2.0)  # the in-process index memo saw the edit

    # only touched (same bytes, later mtime): new stage identity, same result
    st = boxes.stat()
    os.utime(boxes, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert TD._dataset_outputs(inputs)[1] != k1[1]
    assert TD.prepare_dataset.fn(ds_cfg, cache) == r1
    # score files are named by the annotations (the box edit gives new names, the touch does
    # not); the heatmaps themselves keep their names and are reused
    from tasks.heatmaps import heatmap_jobs
    from tasks.scoring import scores_path

    cfg, bb = ExperimentConfig(), {"sha256": "0" * 64}

    def the_job(ds: dict) -> dict:
        (job,), = [jobs for _, jobs in heatmap_jobs([], [[0]], {"fingerprint": "f" * 64}, bb,
                                                   cfg.model_copy(update={"heatmaps": cfg.heatmaps.model_copy(update={"z_dims": 0, "gradcam": False})}),
                                                   str(tmp_path / "heat"), dataset=ds)]
        return job

    def score_file(ds: dict) -> Path:
        job = the_job(ds)
        return scores_path(job["heatmaps"], job["annotations"])

    assert the_job(r1)["heatmaps"] == the_job(r0)["heatmaps"]
    assert score_file(r1) != score_file(r0)
    assert score_file(r1).name.startswith("ExcitationBP-test.zarr.a")
    assert score_file(TD.prepare_dataset.fn(ds_cfg, cache)) == score_file(r1)

    # a label edited: the manifest fingerprint (what features are keyed by) changes too
    labels = base / "image_class_labels.txt"
    img, cid = labels.read_text().splitlines()[0].split()
    _edit_line(labels, 1, f"{img} {1 if cid != '1' else 2}")
    k2 = TD._dataset_outputs(inputs)
    assert k2[1] not in (k0[1], k1[1])
    r2 = TD.prepare_dataset.fn(ds_cfg, cache)
    assert r2["fingerprint"] != r1["fingerprint"]
    # an optional file appearing (evidence.json removed, then back) counts as well
    ev = base / "evidence.json"
    text = ev.read_text()
    ev.unlink()
    k3 = TD._dataset_outputs(inputs)
    assert k3[1] != k2[1]
    ev.write_text(text)


def test_ade_and_places_index_files_are_watched(tmp_path: Path) -> None:
    ade = tmp_path / "ade" / "ADE20K_2021_17_01"
    ade.mkdir(parents=True)
    (ade / "index_ade20k.pkl").write_bytes(b"x" * 10)
    places = tmp_path / "places"
    places.mkdir()
    for n in ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt"):
        (places / n).write_text("a 0\n")
    files = TD.index_files("places", tmp_path / "ade", {"places_root": str(places)})
    for f in (ade / "index_ade20k.pkl", places / "categories_places365.txt",
              places / "places365_train_standard.txt", places / "places365_val.txt"):
        assert f in files
    assert all(f.parent in (ade, places) for f in files)
    assert ade / "index_ade20k.pkl" in TD.index_files("synthrooms", tmp_path / "ade")
    assert TD.index_files("places", tmp_path / "nothing-here") == []
    s0 = TD.index_stamp(files)
    assert (str(ade / "index_ade20k.pkl"), 10, (ade / "index_ade20k.pkl").stat().st_mtime_ns) in s0
    (places / "places365_val.txt").write_text("a 0\nb 1\n")
    s1 = TD.index_stamp(files)
    assert s1 != s0 and (str(places / "places365_val.txt"), 8, (places / "places365_val.txt").stat().st_mtime_ns) in s1
    (places / "val_256").mkdir()  # an image folder appearing decides which list entries are used
    assert TD.index_stamp(files) != s1


# ---------------------------------------------------------------------- srae run --device cuda
def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def no_pipeline(name: str):  # the flow module (and so Prefect) must not be reached
        raise AssertionError(f"imported {name} before the device check")

    monkeypatch.setattr(run_cli, "importlib", types.SimpleNamespace(import_module=no_pipeline))


@pytest.mark.parametrize("yaml_text, argv, field", [
    ("name: t\n", ["--device", "cuda"], "device"),
    ("name: t\nbackbone:\n  fit:\n    device: cuda\n", [], "backbone.fit.device"),
    ("name: t\nheatmaps:\n  device: 'cuda:0'\n", [], "heatmaps.device"),
])
def test_run_without_cuda_fails_in_one_line(tmp_path: Path, monkeypatch, capsys, yaml_text, argv, field) -> None:
    _no_cuda(monkeypatch)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    rc = cli.main(["run", str(cfg), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"srae run: error: {field}: ") and "CUDA is not available" in err[0]


def test_device_check_respects_the_global_override(monkeypatch) -> None:
    _no_cuda(monkeypatch)
    staged = {"backbone": {"fit": {"device": "cuda"}}, "features": {"device": "cuda:1"}}
    assert run_cli.requested_devices(ExperimentConfig.model_validate(staged)) == {
        "backbone.fit.device": "cuda", "features.device": "cuda:1"}
    # --device cpu replaces every stage's device: nothing to check
    run_cli.check_devices(ExperimentConfig.model_validate({**staged, "device": "cpu"}))
    run_cli.check_devices(ExperimentConfig())  # all auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SraeError, match=r"features.device: 'cuda:1' requested but this machine has 1 CUDA"):
        run_cli.check_devices(ExperimentConfig.model_validate(staged))
    run_cli.check_devices(ExperimentConfig.model_validate({"device": "cuda:0"}))


def test_feature_pointer_follows_every_fingerprint_input_known_up_front(monkeypatch) -> None:
    """The by_inputs pointer is keyed like the store's fingerprint (minus what needs the index or
    the backbone loaded): a new package version or another backbone never reuses an old store."""
    import srae
    from tasks import features as TF

    ds, bb, ft = {"fingerprint": "d1"}, {"sha256": "s1", "name": "demo_cnn", "input_size": 64}, {"layer": "fc6"}
    base = TF._key(ds, bb, ft)
    assert TF._key(dict(ds), dict(bb), dict(ft)) == base
    for changed in ({**bb, "sha256": "s2"}, {**bb, "name": "vgg19"}, {**bb, "input_size": 96}):
        assert TF._key(ds, changed, ft) != base
    assert TF._key({"fingerprint": "d2"}, bb, ft) != base
    assert TF._key(ds, bb, {"layer": "fc7"}) != base
    monkeypatch.setattr(srae, "__version__", "999.0")
    assert TF._key(ds, bb, ft) != base
