"""O1 / O2 against constructed correlation matrices and a numpy corrcoef reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from srae.errors import InputError

from srae.metrics.orthogonality import OrthogonalityStats, orthogonality


def maps_with_correlation(target: np.ndarray, m: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Maps (m, n, h, w) whose normalised, concatenated vectors have correlation ``target``.

    Each normalised map is ``1/(hw) + eps * t`` with ``t`` zero-sum per image; the columns of
    ``t`` are ``L q`` for orthonormal zero-mean ``q`` and ``L L^T = target``. Each map is then
    multiplied by a random positive factor, which normalisation must undo.
    """
    n = target.shape[0]
    raw = rng.standard_normal((m * h * w, n))
    seg = raw.reshape(m, h * w, n)
    seg -= seg.mean(axis=1, keepdims=True)  # zero sum inside every image
    q, _ = np.linalg.qr(seg.reshape(m * h * w, n))
    t = q @ np.linalg.cholesky(target).T
    eps = 0.5 / (h * w) / np.abs(t).max()
    norm = 1.0 / (h * w) + eps * t  # (m*h*w, n), positive, each image segment sums to 1
    maps = norm.reshape(m, h, w, n).transpose(0, 3, 1, 2)
    return maps * rng.uniform(0.5, 5.0, (m, n, 1, 1))


def o_values(p: np.ndarray) -> tuple[float, float]:
    return float(np.sqrt((p**2).sum()) - math.sqrt(p.shape[0])), float(-math.log(np.linalg.det(p)))


def test_known_correlation_matrix(rng) -> None:
    target = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.3], [-0.2, 0.3, 1.0]])
    maps = maps_with_correlation(target, m=3, h=5, w=4, rng=rng)
    o1, o2 = orthogonality(maps)
    want1, want2 = o_values(target)
    assert o1 == pytest.approx(want1, abs=1e-9)
    assert o2 == pytest.approx(want2, abs=1e-9)


def test_uncorrelated_features_are_optimal(rng) -> None:
    maps = maps_with_correlation(np.eye(4), m=2, h=6, w=6, rng=rng)
    o1, o2 = orthogonality(maps)
    assert o1 == pytest.approx(0.0, abs=1e-9) and o2 == pytest.approx(0.0, abs=1e-9)


def test_random_maps_match_corrcoef(rng) -> None:
    maps = rng.random((4, 3, 7, 5)) ** 2
    vec = (maps / maps.sum(axis=(2, 3), keepdims=True)).transpose(1, 0, 2, 3).reshape(3, -1)
    o1, o2 = orthogonality(torch.from_numpy(maps))
    want1, want2 = o_values(np.corrcoef(vec))
    assert o1 == pytest.approx(want1, abs=1e-9) and o2 == pytest.approx(want2, abs=1e-9)


def test_identical_and_dependent_maps_give_infinite_o2(rng) -> None:
    one = rng.random((3, 1, 6, 6))
    o1, o2 = orthogonality(np.concatenate([one, 2.0 * one, one], axis=1))
    assert o2 == math.inf
    assert o1 == pytest.approx(3 - math.sqrt(3), abs=1e-9)  # P is all ones
    a, b = rng.random((2, 3, 1, 6, 6))
    a, b = a / a.sum(axis=(2, 3), keepdims=True), b / b.sum(axis=(2, 3), keepdims=True)
    assert orthogonality(np.concatenate([a, b, (a + b) / 2], axis=1))[1] == math.inf


def test_zero_feature_gives_inf_not_nan(rng) -> None:
    maps = rng.random((3, 3, 4, 4))
    maps[:, 2] = 0.0  # a dead x-feature
    o1, o2 = orthogonality(maps)
    vec = (maps[:, :2] / maps[:, :2].sum(axis=(2, 3), keepdims=True)).transpose(1, 0, 2, 3).reshape(2, -1)
    r = np.corrcoef(vec)[0, 1]
    assert o2 == math.inf
    assert o1 == pytest.approx(math.sqrt(3 + 2 * r * r) - math.sqrt(3), abs=1e-9)


def test_streaming_merge_matches_one_shot(rng) -> None:
    maps = rng.random((6, 4, 5, 5)) ** 4
    whole = orthogonality(maps)
    left = OrthogonalityStats(n=4, pixels=25).add(maps[:2])
    right = OrthogonalityStats(n=4, pixels=25).add(maps[2:])
    merged = left.merge(right).result()
    np.testing.assert_allclose(merged, whole, rtol=1e-12, atol=1e-12)


def test_no_x_features_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="at least one x-feature, got n=0"):
        orthogonality(np.zeros((3, 0, 4, 4)))
    with pytest.raises(InputError, match="n=0"):
        OrthogonalityStats(n=0, pixels=16)


def test_maps_at_extreme_scales_give_the_same_values(rng) -> None:
    # Each map is normalised to sum 1, so scaling a map by any positive factor changes nothing;
    # at 1e+-300 the raw products would overflow or underflow float64 (NaN / LinAlgError before).
    target = np.array([[1.0, 0.4, 0.1], [0.4, 1.0, -0.3], [0.1, -0.3, 1.0]])
    maps = maps_with_correlation(target, m=3, h=5, w=4, rng=rng)
    want1, want2 = o_values(target)
    for factor in (1e300, 1e-300, 10.0 ** rng.uniform(-300, 300, (3, 3, 1, 1))):
        o1, o2 = orthogonality(maps * factor)
        assert o1 == pytest.approx(want1, abs=1e-9) and o2 == pytest.approx(want2, abs=1e-9)
