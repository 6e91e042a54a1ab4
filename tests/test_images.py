"""Image loading and preprocessing: resize without crop, normalisation, the Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from srae.datasets.common import DatasetIndex
from srae.errors import InputError
from srae.images import (
    BAD_LABEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    load_image,
    normalize,
    preprocess,
    resize_uint8,
)


def make_tiny_index(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (40, 30),
                    seed: int = 0, test_every: int = 4) -> DatasetIndex:
    """PNG images of class ``c``: dark noise plus a bright square in colour channel ``c``
    (easy to learn); every ``test_every``-th image of a class is in the test split."""
    rng = np.random.default_rng(seed)
    w, h = size
    rows = []
    for c in range(classes):
        for k in range(per_class):
            a = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            y0, x0 = rng.integers(0, h - 12), rng.integers(0, w - 12)
            a[y0:y0 + 12, x0:x0 + 12, c % 3] = 230
            rel = f"images/{c:02d}/{k:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / rel)
            rows.append({"image_id": 100 + len(rows), "path": rel, "label": c,
                         "split": "test" if k % test_every == 0 else "train", "width": w, "height": h,
                         "bbox": None, "parts": None, "mask_path": None})
    return DatasetIndex(name="tiny", root=root, class_names=[f"c{c}" for c in range(classes)],
                        images=pd.DataFrame(rows))


def test_preprocess_matches_float64_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, 50, 3)).astype(np.uint8)
    img = Image.fromarray(pixels)
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    resized = np.asarray(img.resize((16, 16), Image.BILINEAR)).astype(np.float64)
    expect = np.empty((3, 16, 16))
    for ch in range(3):
        for i in range(16):
            for j in range(16):
                expect[ch, i, j] = (resized[i, j, ch] / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
    np.testing.assert_allclose(x.numpy(), expect, atol=1e-5)


def test_resize_keeps_the_whole_frame() -> None:
    # A wide image with a different colour in each vertical third: a centre crop would
    # lose the outer thirds; a plain resize keeps all three, in order.
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:40, 1] = 255
    pixels[:, 40:, 2] = 255
    x = resize_uint8(Image.fromarray(pixels), 12)
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8
    assert x[0, :, 0].min() == 255 and x[1, :, 0].max() == 0
    assert x[1, :, 6].min() == 255 and x[0, :, 6].max() == 0
    assert x[2, :, 11].min() == 255 and x[0, :, 11].max() == 0


def test_grayscale_becomes_three_channels(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(tmp_path / "g.png")
    x = resize_uint8(load_image(tmp_path / "g.png"), 8)
    assert x.shape == (3, 8, 8) and bool((x == 128).all())


def test_dataset_order_split_and_uint8_mode(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path)
    ds = ImageDataset(index, "test", 16)
    test_rows = index.images[index.images["split"] == "test"]
    assert len(ds) == len(test_rows) == 6
    for i in range(len(ds)):
        x, label, image_id = ds[i]
        assert image_id == test_rows["image_id"].iloc[i] and label == test_rows["label"].iloc[i]
        ref = preprocess(Image.open(tmp_path / test_rows["path"].iloc[i]), 16)
        assert torch.equal(x, ref)
    raw = ImageDataset(index, None, 16, normalize=False)
    assert len(raw) == len(index.images)
    x8, _, _ = raw[3]
    assert x8.dtype == torch.uint8
    assert torch.equal(normalize(x8, IMAGENET_MEAN, IMAGENET_STD), ImageDataset(index, None, 16)[3][0])


def test_unreadable_image_is_reported_not_fatal(tmp_path: Path) -> None:
    index = make_tiny_index(tmp_path, classes=2, per_class=4)
    broken = index.images["path"].iloc[2]
    (tmp_path / broken).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageDataset(index, None, 16)
    loader = DataLoader(ds, batch_size=4, num_workers=1)
    xs, labels, ids = zip(*loader, strict=True)
    labels = torch.cat(labels)
    assert labels[2] == BAD_LABEL and (labels[[0, 1, 3]] >= 0).all()
    assert float(torch.cat(xs)[2].abs().sum()) == 0.0
    assert torch.cat(ids).tolist() == index.images["image_id"].tolist()
    reason = ds.failure_reason(2)
    assert reason is not None and broken in reason
    assert ds.failure_reason(0) is None


def test_bad_arguments_raise_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    index = make_tiny_index(tmp_path, classes=2, per_class=2)
    with pytest.raises(InputError, match="split"):
        ImageDataset(index, "val", 16)
