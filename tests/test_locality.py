"""Locality metrics against a brute-force per-pixel reading of Algorithm 1 (docs/design.md, "Math contracts")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from srae.errors import InputError
from srae.metrics.locality import entropy, object_probabilities, part_probabilities, resize_labels_nearest


def brute_part_probabilities(maps: np.ndarray, parts: np.ndarray, bbox) -> np.ndarray:
    """Algorithm 1 pixel by pixel in float64, straight from docs/design.md, "Data contracts"/§3 conventions."""
    n, h, w = maps.shape
    num_parts = parts.shape[0]
    bx, by, bw, bh = (0.0, 0.0, float(w), float(h)) if bbox is None else bbox
    cell: dict[tuple[int, int], object] = {}
    dist: dict[tuple[int, int], float] = {}
    for i in range(h):
        for j in range(w):
            cx, cy = j + 0.5, i + 0.5
            if not (bx <= cx <= bx + bw and by <= cy <= by + bh):
                cell[i, j] = "context"
                continue
            best, best_d = None, math.inf
            for p in range(num_parts):
                if parts[p, 2] > 0:
                    d = math.sqrt((cx - parts[p, 0]) ** 2 + (cy - parts[p, 1]) ** 2)
                    if d < best_d:  # strict: ties keep the lower index
                        best, best_d = p, d
            cell[i, j] = best
            dist[i, j] = best_d
    dmax = [0.0] * num_parts
    for key, c in cell.items():
        if isinstance(c, int):
            dmax[c] = max(dmax[c], dist[key])
    out = np.zeros((n, num_parts + 1))
    for k in range(n):
        total = float(sum(float(maps[k, i, j]) for i in range(h) for j in range(w)))
        if total == 0:
            continue
        for (i, j), c in cell.items():
            s = float(maps[k, i, j]) / total
            if c == "context":
                out[k, num_parts] += s
            elif c is not None:
                dbar = dist[i, j] / dmax[c] if dmax[c] > 0 else 0.0
                out[k, c] += (1.0 - dbar) * s
    return out


def random_case(rng: np.random.Generator, h: int, w: int, n: int, num_parts: int):
    maps = rng.random((n, h, w)) ** 3
    maps[:, rng.random((h, w)) < 0.2] = 0.0
    parts = np.column_stack([rng.uniform(-2, w + 2, num_parts), rng.uniform(-2, h + 2, num_parts),
                             (rng.random(num_parts) < 0.7).astype(float)])
    x0, y0 = rng.uniform(-1, w / 2), rng.uniform(-1, h / 2)
    bbox = (x0, y0, rng.uniform(1, w - x0 + 1), rng.uniform(1, h - y0 + 1))
    return maps, parts, bbox


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(6, 14)), int(rng.integers(6, 14))
    maps, parts, bbox = random_case(rng, h, w, n=3, num_parts=int(rng.integers(1, 16)))
    got = part_probabilities(maps.astype(np.float32), parts, bbox)
    want = brute_part_probabilities(maps.astype(np.float32).astype(np.float64), parts, bbox)
    assert got.shape == (3, parts.shape[0] + 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all(got[:, :-1][:, parts[:, 2] == 0] == 0)  # invisible parts get nothing


def test_bbox_whole_map_has_no_context(rng) -> None:
    maps, parts, _ = random_case(rng, 9, 11, n=2, num_parts=15)
    parts[:, 2] = 1
    for bbox in [(0.0, 0.0, 11.0, 9.0), None]:
        got = part_probabilities(maps, parts, bbox)
        np.testing.assert_allclose(got, brute_part_probabilities(maps, parts, (0.0, 0.0, 11.0, 9.0)), atol=1e-9)
        assert got[:, -1].max() == 0.0


def test_all_parts_invisible_keeps_only_context(rng) -> None:
    maps, parts, bbox = random_case(rng, 10, 8, n=2, num_parts=6)
    parts[:, 2] = 0
    got = part_probabilities(maps, parts, bbox)
    want = brute_part_probabilities(maps, parts, bbox)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert np.all(got[:, :-1] == 0) and np.all(got[:, -1] > 0)


def test_all_zero_map_gives_zero_row(rng) -> None:
    maps, parts, bbox = random_case(rng, 7, 7, n=3, num_parts=5)
    maps[1] = 0.0
    got = part_probabilities(maps, parts, bbox)
    np.testing.assert_allclose(got, brute_part_probabilities(maps, parts, bbox), atol=1e-9)
    assert np.all(got[1] == 0) and got[0].sum() > 0


def test_hand_computed_ties_closed_bbox_and_single_pixel_cell() -> None:
    # 1 x 4 map, pixel centres x = 0.5, 1.5, 2.5, 3.5. Parts 0 and 1 both at x=2 (tie -> part 0),
    # part 2 exactly on the centre of pixel 3. Bbox [1.5, 3.5] is closed: pixels 1, 2, 3 inside.
    maps = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    parts = np.array([[2.0, 0.5, 1], [2.0, 0.5, 1], [3.5, 0.5, 1]])
    got = part_probabilities(maps, parts, (1.5, 0.0, 2.0, 1.0))
    # pixel 1 (d=.5) and pixel 2 (d=.5; tie with part 2? no: part 2 is 1.0 away) -> part 0,
    # dmax = .5 so both weigh 0; pixel 3 sits on part 2: its one-pixel cell has max d = 0 -> weight 1.
    np.testing.assert_allclose(got, [[0.0, 0.0, 0.4, 0.1]], atol=1e-12)
    # 3 x 3 uniform map, parts on the centres of pixels (0, 0) and (0, 2): the middle column is
    # equidistant from both and goes to part 0, so part 0's cell has distances
    # {0, 1, 1, sqrt2, 2, sqrt5} (max sqrt5) and part 1's {0, 1, 2} (max 2).
    got = part_probabilities(np.ones((1, 3, 3)), np.array([[0.5, 0.5, 1], [2.5, 0.5, 1]]), None)
    r5 = math.sqrt(5)
    col0 = (6 - (0 + 1 + 1 + math.sqrt(2) + 2 + r5) / r5) / 9
    np.testing.assert_allclose(got, [[col0, 1.5 / 9, 0.0]], atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_integer_parts_with_many_ties_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    maps = rng.random((2, 9, 10))
    # Parts on pixel centres or corners: many pixels are exactly equidistant from two parts.
    parts = np.column_stack([rng.integers(0, 20, 8) / 2, rng.integers(0, 18, 8) / 2, rng.random(8) < 0.8])
    parts[3] = parts[1]  # a duplicated part: the higher index gets nothing
    parts[1, 2] = parts[3, 2] = 1
    bbox = (0.5, 1.0, 8.0, 7.5)
    got = part_probabilities(maps, parts, bbox)
    np.testing.assert_allclose(got, brute_part_probabilities(maps, parts, bbox), rtol=0, atol=1e-9)
    assert np.all(got[:, 3] == 0)


def test_accepts_torch_and_rejects_bad_input(rng) -> None:
    maps, parts, bbox = random_case(rng, 6, 6, n=2, num_parts=4)
    got = part_probabilities(torch.from_numpy(maps), torch.from_numpy(parts), bbox)
    np.testing.assert_allclose(got, part_probabilities(maps, parts, bbox), atol=0)
    with pytest.raises(InputError, match="NaN"):
        part_probabilities(np.full((1, 3, 3), np.nan), parts, bbox)
    with pytest.raises(InputError, match="negative"):
        part_probabilities(-np.ones((1, 3, 3)), parts, bbox)
    with pytest.raises(InputError, match="parts"):
        part_probabilities(maps, parts[:, :2], bbox)
    with pytest.raises(InputError, match="maps"):
        part_probabilities(maps[0], parts, bbox)


def test_extreme_scales_bfloat16_and_empty_label_maps(rng) -> None:
    """Maps are normalised to sum 1, so a map near float64's limit (whose sum overflows) gives
    the same probabilities as at scale 1, not NaN rows; bfloat16 tensors are read; an empty
    label map is named."""
    import warnings

    maps, parts, bbox = random_case(rng, 9, 7, n=3, num_parts=4)
    ref = brute_part_probabilities(maps, parts, bbox)
    labels = rng.integers(0, 5, (9, 7))
    obj = object_probabilities(maps, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        big = maps * 1e308
        big[1] = maps[1]  # one map at an ordinary scale beside them
        np.testing.assert_allclose(part_probabilities(big, parts, bbox), ref, atol=1e-12)
        np.testing.assert_allclose(object_probabilities(big, labels), obj, atol=1e-12)
    half = torch.from_numpy(maps).bfloat16()
    np.testing.assert_allclose(part_probabilities(half, parts, bbox),
                               brute_part_probabilities(half.float().numpy().astype(np.float64), parts, bbox),
                               atol=1e-9)
    with pytest.raises(InputError, match=r"label_map: is empty \(shape \(0, 7\)\)"):
        object_probabilities(maps, np.zeros((0, 7), dtype=np.int64))


def test_entropy_hand_values() -> None:
    got = entropy(np.array([[1.0, 1.0, 0.0], [0.0, 5.0, 0.0], [1.0, 2.0, 1.0], [0.0, 0.0, 0.0]]))
    assert got[0] == pytest.approx(math.log(2), abs=1e-12)
    assert got[1] == 0.0
    assert got[2] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-12)
    assert math.isnan(got[3])


def test_map_in_one_cell_inside_bbox_has_locality_zero(rng) -> None:
    h, w = 12, 12
    parts = np.array([[2.0, 2.0, 1], [9.0, 3.0, 1], [6.0, 9.5, 1], [1.0, 1.0, 0]])
    bbox = (0.5, 0.5, 11.0, 11.0)
    maps = np.zeros((2, h, w))
    # Feature 0: a blob around part 1 (x=9, y=3), well inside its Voronoi cell and the bbox.
    maps[0, 1:5, 7:11] = rng.random((4, 4)) + 0.1
    maps[1, 10, 5:8] = 1.0  # feature 1: near part 2
    hist = part_probabilities(maps, parts, bbox)
    assert np.count_nonzero(hist[0]) == 1 and hist[0, 1] > 0
    np.testing.assert_allclose(entropy(hist), [0.0, 0.0], atol=0)


def brute_object_probabilities(maps: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    n, h, w = maps.shape
    out = np.zeros((n, k))
    for f in range(n):
        total = maps[f].sum()
        for i in range(h):
            for j in range(w):
                if total > 0:
                    out[f, labels[i, j]] += maps[f, i, j] / total
    return out


def test_object_probabilities_same_and_downsampled_resolution(rng) -> None:
    maps = rng.random((3, 5, 6))
    maps[2] = 0
    labels = rng.integers(0, 4, (5, 6))
    np.testing.assert_allclose(object_probabilities(maps, labels, 7), brute_object_probabilities(maps, labels, 7),
                               atol=1e-12)
    # A 2x finer mask: map pixel (i, j) reads source pixel (2i + 1, 2j + 1) under its centre.
    fine = rng.integers(0, 9, (10, 12))
    small = fine[1::2, 1::2]
    np.testing.assert_array_equal(resize_labels_nearest(fine, 5, 6), small)
    got = object_probabilities(maps, fine)
    assert got.shape == (3, int(small.max()) + 1)
    np.testing.assert_allclose(got, brute_object_probabilities(maps, small, got.shape[1]), atol=1e-12)
    np.testing.assert_allclose(got[:2].sum(axis=1), 1.0)
    with pytest.raises(InputError, match="num_labels"):
        object_probabilities(maps, labels, 2)


def test_zero_maps_give_an_empty_histogram():
    """n = 0 maps (an explainer with no x-features) is an empty result, not a reshape error."""
    from srae.metrics.locality import object_probabilities

    assert part_probabilities(np.zeros((0, 4, 4)), np.array([[1.0, 1.0, 1.0]]), None).shape == (0, 2)
    assert object_probabilities(np.zeros((0, 4, 4)), np.zeros((4, 4), dtype=int)).shape[0] == 0
