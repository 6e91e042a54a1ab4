"""Backbone training: learns, checkpoints each epoch, resumes to identical weights, reuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_images import make_tiny_index

from srae.backbones import fit as fit_reexport
from srae.errors import InputError
from srae.fit import MODEL_FILE, STATE_FILE, SUMMARY_FILE, fit
from srae.images import load_image, preprocess

SETTINGS = {"input_size": 32, "epochs": 5, "batch_size": 4, "lr": 3e-3, "seed": 0, "progress": False}


class Interrupt(RuntimeError):
    pass


def _accuracy_by_hand(bb, index) -> float:
    rows = index.split("test")
    hits = 0
    with torch.no_grad():
        for path, label in zip(rows["path"], rows["label"], strict=True):
            x = preprocess(load_image(index.abspath(path)), bb.input_size)[None]
            hits += int(bb.net(x).argmax(1).item() == label)
    return hits / len(rows)


def test_fit_learns_and_reports_test_accuracy(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path / "data", per_class=12)
    res = fit_reexport(index, tmp_path / "run", num_workers=0, **SETTINGS)
    assert res.checkpoint == tmp_path / "run" / MODEL_FILE and res.checkpoint.is_file()
    assert len(res.history) == 5 and res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.test_accuracy == pytest.approx(_accuracy_by_hand(res.backbone, index))
    assert res.test_accuracy >= 0.8
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary["checkpoint_sha256"] == res.checkpoint_sha256 == res.backbone.checkpoint_sha256
    assert not (tmp_path / "run" / STATE_FILE).exists()
    again = fit(index, tmp_path / "run", num_workers=0, **SETTINGS)
    assert again.reused and again.checkpoint_sha256 == res.checkpoint_sha256
    assert again.test_accuracy == res.test_accuracy
    with pytest.raises(InputError, match="other settings"):
        fit(index, tmp_path / "run", num_workers=0, **{**SETTINGS, "lr": 1e-3})


def test_interrupted_fit_resumes_to_identical_weights(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path / "data", per_class=8)
    settings = {**SETTINGS, "epochs": 3}
    whole = fit(index, tmp_path / "whole", num_workers=0, **settings)

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        fit(index, tmp_path / "cut", num_workers=0, on_epoch=stop_after_two, **settings)
    state = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)
    assert state["epoch"] == 2 and not (tmp_path / "cut" / MODEL_FILE).exists()
    seen: list[int] = []
    resumed = fit(index, tmp_path / "cut", num_workers=1, on_epoch=lambda r: seen.append(r["epoch"]),
                  **settings)
    assert seen == [3]  # only the missing epoch ran
    assert resumed.checkpoint_sha256 == whole.checkpoint_sha256
    assert (tmp_path / "cut" / MODEL_FILE).read_bytes() == (tmp_path / "whole" / MODEL_FILE).read_bytes()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_unreadable_training_image_is_skipped(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path / "data", classes=2, per_class=5)
    train_path = index.split("train")["path"].iloc[0]
    (tmp_path / "data" / train_path).write_bytes(b"garbage")
    res = fit(index, tmp_path / "run", num_workers=0, **{**SETTINGS, "epochs": 1})
    assert res.history[0]["epoch"] == 1 and res.checkpoint.is_file()


def test_bad_settings(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path / "data", classes=2, per_class=2)
    with pytest.raises(InputError, match="epochs"):
        fit(index, tmp_path / "run", **{**SETTINGS, "epochs": 0})


def test_augment_batch_flips_and_shifts_each_image() -> None:
    import numpy as np

    from srae.fit import augment_batch

    x = torch.randint(0, 256, (12, 3, 9, 7), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.dtype == x.dtype and out.shape == x.shape
    flips = 0
    for img, aug in zip(x.numpy(), out.numpy(), strict=True):
        matches = []
        for flip in (False, True):
            src = img[:, :, ::-1] if flip else img
            padded = np.pad(src, ((0, 0), (2, 2), (2, 2)), mode="edge")
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if np.array_equal(padded[:, 2 + dy: 11 + dy, 2 + dx: 9 + dx], aug):
                        matches.append(flip)
        assert matches, "output is not a flipped/shifted copy of its input"
        flips += matches[0]
    assert 0 < flips < 12  # both outcomes occur
    again = augment_batch(x, torch.Generator().manual_seed(0), max_shift=2)
    assert torch.equal(out, again)
