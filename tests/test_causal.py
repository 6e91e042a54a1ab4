"""Part effects measured on a model: counterfactual swaps, the logit read, draw numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from srae.causal import EFFECT_COLUMNS, draw_numbers, measure_part_effects
from srae.datasets import synthbirds as sb
from srae.datasets.counterfactual import counterfactuals, jpeg_roundtrip, synth_params
from srae.errors import InputError
from srae.datasets.cub import read_cub
from srae.datasets.synthetic import make_synthbirds
from srae.metrics.degeneracy import used_parts

SIZE = 64


def _near(images: np.ndarray, rgb: tuple[int, int, int], tol: float = 60.0) -> np.ndarray:
    """(B,) fraction of pixels within ``tol`` of a vivid colour."""
    d = np.linalg.norm(images.astype(float) - np.array(rgb, dtype=float), axis=-1)
    return (d < tol).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    root = make_synthbirds(tmp_path_factory.mktemp("birds"), classes=4, per_class=6, size=SIZE, seed=3)
    return root, synth_params(root), read_cub(root.parent)


def _planted(params, weights: dict[str, float]):
    """A model whose class-c logit is sum over c's traits of weight[slot] x (share of pixels in
    the trait's colour): its part effects are known from the images alone."""
    pairs = sb.class_pairs(params)

    def classify(images: np.ndarray) -> np.ndarray:
        out = np.zeros((len(images), len(pairs)))
        for c, pair in enumerate(pairs):
            for t in pair:
                out[:, c] += weights[t.slot] * 100.0 * _near(images, sb.VIVID[t.colour])
        return out

    return classify, pairs


def test_part_effects_of_a_planted_model_are_its_known_effects(birds):
    root, params, idx = birds
    weights = {"wing": 1.0, "tail": 0.5, "crown": 0.7, "breast": 0.7}
    classify, pairs = _planted(params, weights)
    j = draw_numbers(idx.images, params["per_class"])
    test = idx.images[idx.images["split"] == "test"]
    draws = [(int(i), int(c), int(j[i])) for i, c in zip(test["image_id"], test["label"])]
    df = measure_part_effects(classify, params, draws, SIZE, batch=5)
    assert list(df.columns) == EFFECT_COLUMNS and len(df) == 4 * len(draws)
    for (image_id, c, _), rows in zip(draws, [df[df.image_id == d[0]] for d in draws]):
        saved = np.asarray(Image.open(idx.abspath(idx.images.set_index("image_id").loc[image_id, "path"])))
        for t in pairs[c]:  # the swap removes the trait's colour: the drop is its whole term
            expected = weights[t.slot] * 100.0 * _near(saved[None], sb.VIVID[t.colour])[0]
            got = rows.set_index("part").loc[t.slot]
            assert got["evidence"] and got["drop"] == pytest.approx(expected, abs=0.35)
        controls = rows[~rows["evidence"]]
        assert len(controls) == 2 and np.abs(controls["drop"]).max() < 0.35
        assert (rows["y"] == classify(saved[None])[0, c]).all()  # the original is the saved image
    summary = {c: {p: g.loc[g.part == p, "drop"].to_numpy() for p in sb.SLOTS} for c, g in df.groupby("category")}
    for c, drops in summary.items():
        assert used_parts(drops) == [s for s in sb.SLOTS if s in {t.slot for t in pairs[c]}]


def test_a_part_the_model_ignores_is_not_used(birds):
    root, params, idx = birds
    classify, pairs = _planted(params, {"wing": 1.0, "tail": 0.0, "crown": 0.0, "breast": 0.0})
    j = draw_numbers(idx.images, params["per_class"])
    draws = [(int(i), int(c), int(j[i])) for i, c in zip(idx.images["image_id"], idx.images["label"])]
    df = measure_part_effects(classify, params, draws, SIZE)
    for c, g in df.groupby("category"):
        drops = {p: g.loc[g.part == p, "drop"].to_numpy() for p in sb.SLOTS}
        assert used_parts(drops) == ["wing"]
        assert np.abs(drops["tail"]).max() < 0.35


def test_draw_numbers_come_from_the_ids_so_a_skipped_image_shifts_nothing():
    # 3 draws per class: ids 1-3 are class 0, 4-6 class 1; id 2 was unreadable (not in the index)
    images = pd.DataFrame({"image_id": [5, 1, 3, 6, 4], "label": [1, 0, 0, 1, 1]})
    j = draw_numbers(images, 3)
    assert j.to_dict() == {5: 1, 1: 0, 3: 2, 6: 2, 4: 0}
    with pytest.raises(InputError, match="image 7: not a draw of its class"):
        draw_numbers(pd.DataFrame({"image_id": [7], "label": [1]}), 3)


def test_every_saved_image_is_its_draw_even_with_one_unreadable(birds, tmp_path):
    root, params, idx = birds
    images = idx.images[idx.images["image_id"] != 2]  # as if the reader had skipped image 2
    j = draw_numbers(images, params["per_class"])
    for _, row in images.iterrows():
        c, jj = int(row["label"]), int(j[int(row["image_id"])])
        saved = np.asarray(Image.open(idx.abspath(row["path"])).convert("RGB"))
        assert np.array_equal(jpeg_roundtrip(counterfactuals(params, c, jj, [])["original"]), saved)


def test_slots_swapped_together_combine_the_single_swaps(birds):
    root, params, idx = birds
    r = counterfactuals(params, 1, 2, ["wing", "tail", "wing+tail"])
    wing = np.any(r["wing"] != r["original"], axis=2)
    tail = np.any(r["tail"] != r["original"], axis=2)
    both = r["wing+tail"]
    assert np.array_equal(both[wing & ~tail], r["wing"][wing & ~tail])
    assert np.array_equal(both[tail & ~wing], r["tail"][tail & ~wing])
    assert np.array_equal(both[~wing & ~tail], r["original"][~wing & ~tail])


def test_model_inputs_go_through_the_saved_jpeg(birds):
    root, params, idx = birds
    seen = []

    def classify(images):
        seen.append(images)
        return np.zeros((len(images), 4))

    row = idx.images.iloc[0]
    c, j = int(row["label"]), int(draw_numbers(idx.images, params["per_class"])[int(row["image_id"])])
    measure_part_effects(classify, params, [(int(row["image_id"]), c, j)], 32, parts=["tail"])
    saved = Image.open(idx.abspath(row["path"])).convert("RGB").resize((32, 32), Image.BILINEAR)
    assert seen[0].shape == (2, 32, 32, 3) and np.array_equal(seen[0][0], np.asarray(saved))
    assert jpeg_roundtrip(np.zeros((8, 8, 3), np.uint8)).shape == (8, 8, 3)
