"""Masking test (srae.masking): keep rule by hand, Telea inpainting, accuracy on a toy task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from srae.errors import InputError
from srae.excitation import resize_maps
from srae.masking import (
    UNMASKED,
    backbone_classifier,
    keep_mask,
    mask_and_inpaint,
    masking_accuracy,
    masking_report,
    metric_name,
)


def test_keep_mask_scales_each_map_by_its_own_max() -> None:
    maps = np.array([[[[1.0, 0.2, 0.0], [0.05, 0.0, 0.0]],
                      [[0.0, 0.0, 4.0], [0.0, 2.0, 0.1]]]])
    np.testing.assert_array_equal(keep_mask(maps, 0.05)[0], [[1, 1, 1], [1, 1, 0]])
    # with one shared max (4) the 1.0 of map 0 would be dropped at 30 %
    np.testing.assert_array_equal(keep_mask(maps, 0.3)[0], [[1, 0, 1], [0, 1, 0]])
    assert not keep_mask(np.zeros((2, 3, 4, 4)), 0.01).any()
    with pytest.raises(InputError, match="gamma"):
        keep_mask(maps, 1.5)
    with pytest.raises(InputError, match="NaN"):
        keep_mask(np.full((1, 1, 2, 2), np.nan), 0.1)


def test_inpaint_fills_from_kept_pixels_and_keeps_them() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    img[:] = (100, 150, 200)
    img[:, 10:] = (10, 240, 30)  # the dropped half has another colour
    keep = np.zeros((20, 20), bool)
    keep[:, :10] = True
    out = mask_and_inpaint(img, keep)
    np.testing.assert_array_equal(out[:, :10], img[:, :10])
    dev = np.abs(out[:, 10:].astype(int) - (100, 150, 200))
    assert dev.max() <= 6 and dev.mean() <= 2  # Telea carries the kept colour (not black, not the lost one)
    np.testing.assert_array_equal(mask_and_inpaint(img, np.ones((20, 20), bool)), img)


def _toy():
    """Class 1: a bright square top-left; class 0: black. The classifier reads that square."""
    images = np.zeros((6, 16, 16, 3), np.uint8)
    labels = np.array([1, 1, 1, 0, 0, 0])
    images[:3, :6, :6] = 255

    def classify(batch: np.ndarray) -> np.ndarray:
        s = batch[:, 1:5, 1:5].astype(float).mean(axis=(1, 2, 3)) / 255 - 0.5
        return np.stack([np.zeros_like(s), s], axis=1)

    maps = np.zeros((6, 1, 16, 16))
    maps[:, 0, 10:, 10:] = 1.0  # the peak is elsewhere ...
    maps[:, 0, :6, :6] = 0.2  # ... the square gets 20 % of it
    return images, labels, classify, maps


def test_masking_accuracy_on_toy_task() -> None:
    images, labels, classify, maps = _toy()
    acc = masking_accuracy(classify, images, labels, maps, gammas=(0.1, 0.3))
    assert acc == {UNMASKED: 1.0, "mask_acc@0.1": 1.0, "mask_acc@0.3": 0.5}
    good = np.zeros_like(maps)
    good[:, 0, :6, :6] = 1.0
    half = torch.nn.functional.avg_pool2d(torch.from_numpy(good), 2)  # 8x8 maps: resized to 16x16
    rep = masking_report(classify, images, labels, {"SRAE": np.concatenate([maps, good], 1),
                                                    "ExcitationBP": half}, gammas=(0.3,))
    # kept at 0.3: SRAE's first map keeps its 6x6 peak block, the second the 6x6 square (36 + 36 of
    # 256 pixels); ExcitationBP's resized map keeps the square and its bilinear rim
    assert rep["SRAE"] == {UNMASKED: 1.0, "mask_acc@0.3": 1.0, "mask_area@0.3": 72 / 256}
    assert rep["ExcitationBP"]["mask_acc@0.3"] == 1.0 and rep["ExcitationBP"][UNMASKED] == 1.0
    keep = keep_mask(resize_maps(half.float(), (16, 16)).numpy(), 0.3)
    assert rep["ExcitationBP"]["mask_area@0.3"] == keep.mean() and 36 / 256 <= keep.mean() < 72 / 256
    assert metric_name(0.05) == "mask_acc@0.05"
    with pytest.raises(InputError, match="heatmap sets"):
        masking_accuracy(classify, images, labels, maps[:2])


def test_backbone_classifier_normalises_and_uses_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(3 * 4 * 4, 3)).train()
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = backbone_classifier(model, mean, std, batch_size=2)(imgs)
    x = (imgs.astype(np.float64) / 255 - mean) / std
    ref = x.transpose(0, 3, 1, 2).reshape(5, -1) @ model[2].weight.detach().double().numpy().T
    np.testing.assert_allclose(got, ref + model[2].bias.detach().double().numpy(), atol=1e-5)
    assert model.training


def test_labels_outside_the_classifiers_classes_are_refused():
    """A label the classifier cannot output scored as a plain miss; it is a caller's mistake."""
    from srae.errors import InputError
    from srae.masking import masking_report

    imgs = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    classify = lambda im: np.tile(np.array([[0.0, 1.0, 0.0]]), (len(im), 1))  # noqa: E731
    with pytest.raises(InputError, match=r"labels: outside the classifier's classes 0..2"):
        masking_report(classify, imgs, np.array([1, 7]), {"m": np.ones((2, 1, 8, 8))}, [0.5])
