"""Concept atlas (srae.atlas): top images per x-feature (hand-checked), labels, the figure."""

from __future__ import annotations

import numpy as np
import pytest

from srae.atlas import atlas_labels, concept_atlas, top_images
from srae.errors import InputError

# 5 images x 3 x-features: x1 has a tie (rows 1 and 3), x2 fires on one image, x3 never fires
E = np.array([[0.5, 0.0, 0.0],
              [2.0, 0.0, 0.0],
              [1.0, 3.0, 0.0],
              [2.0, 0.0, 0.0],
              [0.0, 0.0, 0.0]])


def test_top_images_hand_checked() -> None:
    np.testing.assert_array_equal(top_images(E, 3), [[1, 3, 2],  # 2.0 (row 1 before row 3), then 1.0
                                                     [2, -1, -1],  # fires once: one image
                                                     [-1, -1, -1]])  # never fires: none
    np.testing.assert_array_equal(top_images(E, 1), [[1], [2], [-1]])
    np.testing.assert_array_equal(top_images(E, 9)[0], [1, 3, 2, 0, -1, -1, -1, -1, -1])  # row 4: E=0
    assert top_images(np.zeros((0, 2)), 2).tolist() == [[-1, -1], [-1, -1]]
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InputError, match="top"):
            top_images(E, bad)
    with pytest.raises(InputError, match="NaN"):
        top_images(E * np.nan, 2)
    with pytest.raises(InputError, match=r"\(M, n\)"):
        top_images(E[0], 2)


def test_labels_say_mean_contribution_and_dead() -> None:
    v = np.array([2.0, -1.0, 5.0])
    labels = atlas_labels(E, v)  # v_i E_i: x1 mean 2 * 5.5 / 5 = 2.2, x2 -3 / 5 = -0.6
    assert labels == ["x1: mean v_i E_i = 2.20\nfires on 4/5", "x2: mean v_i E_i = -0.60\nfires on 1/5",
                      "x3: dead\nfires on 0/5"]
    assert atlas_labels(E, E * v, dead=[2])[2] == "x3: dead\nfires on 0/5\n(dead on training)"
    with pytest.raises(InputError, match="contributions"):
        atlas_labels(E, np.ones(4))


def _atlas_inputs(m=5, n=3, s=20):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (m, s, s, 3), dtype=np.uint8)
    maps = rng.random((m, n, s // 2, s // 2))  # other resolution: resized to the image
    return images, maps


def test_atlas_draws_the_top_images_of_each_x_feature() -> None:
    images, maps = _atlas_inputs()
    ids = np.array([10, 11, 12, 13, 14])
    fig = concept_atlas(images, maps, E, np.array([2.0, -1.0, 5.0]), ids=ids, top=3, title="Concept atlas: cat")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["#11  E=2.00", "#13  E=2.00", "#12  E=1.00", "#12  E=3.00"]  # x3: no images
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts[0].startswith("x1: mean v_i E_i = 2.20") and texts[2].startswith("x3: dead")
    assert "Concept atlas: cat" in fig.get_suptitle()


def test_atlas_reads_only_the_rows_it_draws() -> None:
    """The report passes a dict of the needed rows only (images load from disk)."""
    images, maps = _atlas_inputs()
    need = sorted({int(k) for k in top_images(E, 2).ravel() if k >= 0})
    assert need == [1, 2, 3]
    fig = concept_atlas({k: images[k] for k in need}, {k: maps[k] for k in need}, E, E, top=2)
    full = concept_atlas(images, maps, E, E, top=2)
    for a, b in zip([ax for ax in fig.axes if ax.images], [ax for ax in full.axes if ax.images]):
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
    with pytest.raises(InputError, match="no row 3"):
        concept_atlas({1: images[1], 2: images[2]}, maps, E, E, top=2)
    with pytest.raises(InputError, match=r"maps: row 1 should be \(3, h, w\)"):
        concept_atlas(images, maps[:, :2], E, E, top=2)
    with pytest.raises(InputError, match="ids"):
        concept_atlas(images, maps, E, E, ids=[1, 2])


def test_atlas_png(tmp_path) -> None:
    import io

    from PIL import Image

    from srae.report_figures import figure_png

    images, maps = _atlas_inputs()
    png = figure_png(concept_atlas(images, maps, E, E, top=4))
    with Image.open(io.BytesIO(png)) as img:
        arr = np.asarray(img.convert("RGB"))
    assert img.format == "PNG" and arr.shape[0] > 200 and arr.reshape(-1, 3).std(axis=0).min() > 10


def test_report_adds_an_atlas_after_each_grid(monkeypatch) -> None:
    """tasks.report._figures: per spec the Fig. 4 grid, then "Concept atlas: <class>" from the
    same stores (all the category's test positives; E from the explainer on their features).
    A failing atlas is logged and skipped; the grid stays."""
    import logging

    import torch

    import srae.explainers
    import srae.heatmaps
    import tasks.explainers
    import tasks.report as T
    from srae.explainers import Explainer
    from srae.heatmaps import HeatmapSet

    rng = np.random.default_rng(0)
    n, d, s = 3, 4, 16
    store_ids = np.array([7, 8, 9, 30, 31])  # 30, 31: negatives (heatmaps.images: all)
    all_ids = np.array([30, 9, 8, 7, 31])
    labels = np.array([0, 1, 1, 1, 0])
    z = rng.random((5, d))
    maps = {"x": HeatmapSet(rng.random((5, n, s, s)), store_ids, {}),
            "ebp": HeatmapSet(rng.random((5, 1, s, s)), store_ids, {})}
    expl = Explainer("SRAE", 1, [torch.eye(n, d, dtype=torch.float64)], [torch.tensor([0.0, 0.0, -5.0])],
                     torch.tensor([1.0, 2.0, 3.0]), meta={"dead_features": [2]})
    loaded: list[int] = []

    def image(dataset, image_id, size):
        loaded.append(image_id)
        return np.full((size, size, 3), image_id, dtype=np.uint8)

    monkeypatch.setattr(srae.heatmaps, "open_heatmaps", lambda p: maps[p])
    monkeypatch.setattr(tasks.explainers, "load_feature_arrays", lambda p: (z, rng.random((5, 2)), labels, all_ids))
    monkeypatch.setattr(srae.explainers, "load_explainer", lambda p: expl)
    monkeypatch.setattr(T, "_load_image", image)
    spec = {"title": "bird: ExcitationBP on y-hat and SRAE x-features (v_i E_i)", "heatmaps": "x", "ebp": "ebp",
            "dataset": {"class_names": ["dog", "bird"]}, "category": 1, "explainer": "e", "features": "f",
            "rows": 2, "scale": "row"}
    out = T._figures([spec], logging.getLogger("test"))
    assert [t for t, _ in out] == [spec["title"], "Concept atlas: bird"]
    assert all(png.startswith(b"\x89PNG") for _, png in out)
    assert loaded[:2] == [7, 8] and sorted(loaded[2:]) == [7, 8, 9]  # grid: 2 rows; atlas: 3 positives

    def broken(*a, **k):
        raise ValueError("planted")

    monkeypatch.setattr("srae.atlas.concept_atlas", broken)
    records: list[str] = []
    log = logging.getLogger("test-atlas")
    monkeypatch.setattr(log, "warning", lambda msg, *args: records.append(msg % args))
    out = T._figures([spec], log)
    assert [t for t, _ in out] == [spec["title"]]
    assert records == ["figure Concept atlas: bird skipped: planted"]
