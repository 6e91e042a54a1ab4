"""synthbirds class designs (which traits make a class) and counterfactual renders."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from srae.datasets import synthbirds as sb
from srae.datasets.counterfactual import counterfactuals, evidence_of, jpeg_roundtrip, part_columns, synth_params
from srae.datasets.cub import read_cub
from srae.datasets.synthetic import make_synthbirds
from srae.errors import InputError


@pytest.mark.parametrize("k,seed", list(itertools.product([3, 4, 5, 6, 9, 12, 17, 30, 60, 200], [0, 1, 2])))
def test_factorial_design_shares_every_trait_and_only_pairs_identify_classes(k, seed):
    pairs = sb.design_classes(k, seed)
    assert len(pairs) == k and len(set(pairs)) == k  # distinct classes
    assert all(a.slot != b.slot for a, b in pairs)  # two evidence parts per class
    counts = Counter(t for p in pairs for t in p)
    assert min(counts.values()) >= 2  # no trait identifies a class on its own
    for (a, b), (c, d) in itertools.combinations(pairs, 2):
        assert {a, b} != {c, d}  # only the combination tells a class apart
    for a, b in pairs:  # negatives include the classes sharing one trait
        assert any(a in p and b not in p for p in pairs) and any(b in p and a not in p for p in pairs)


def test_factorial_four_classes_is_the_two_by_two_factorial():
    pairs = sb.design_classes(4, 0)
    wings = {t for p in pairs for t in p if t.slot == "wing"}
    tails = {t for p in pairs for t in p if t.slot == "tail"}
    assert len(wings) == 2 and len(tails) == 2
    assert {frozenset(p) for p in pairs} == {frozenset((w, t)) for w in wings for t in tails}
    assert len({t.colour for t in wings | tails}) == 4  # four distinct colours


def test_two_factorial_classes_share_one_trait():
    (a, b), (c, d) = sb.design_classes(2, 0)
    assert len({a, b} & {c, d}) == 1


def test_designs_are_seeded_and_named():
    assert sb.design_classes(6, 3) == sb.design_classes(6, 3)
    assert sb.design_classes(6, 3) != sb.design_classes(6, 4)
    with pytest.raises(InputError, match="unknown class design 'latin'"):
        sb.design_classes(4, 0, "latin")
    with pytest.raises(InputError, match="unknown class design"):
        make_synthbirds("/nonexistent-never-written", classes=4, per_class=4, size=32, design="latin")


def test_synth_json_lists_the_design_and_each_class_traits(tmp_path):
    root = make_synthbirds(tmp_path, classes=4, per_class=4, size=40, seed=0)
    stamp = json.loads((root / "synth.json").read_text())
    assert stamp["params"]["design"] == "factorial"
    pairs = sb.design_classes(4, 0)
    assert stamp["traits"] == {sb.class_name(c, p): [vars(t) for t in p] for c, p in enumerate(pairs)}
    unique = make_synthbirds(tmp_path / "u", classes=4, per_class=4, size=40, seed=0, design="unique")
    assert json.loads((unique / "synth.json").read_text())["params"]["design"] == "unique"
    assert read_cub(tmp_path / "u").class_names == [sb.class_name(c, p)
                                                    for c, p in enumerate(sb.design_classes(4, 0, "unique"))]


def _scene(params: dict, c: int, j: int):
    rng = np.random.default_rng([params["seed"], c, j])
    size = params["size"]
    bg = sb.background(rng, size)
    pose = sb.sample_pose(rng, size)
    look = sb.sample_look(rng, sb.class_pairs(params)[c], params["occlusion"])
    return size, pose, look, bg


def _slot_mask(params: dict, c: int, j: int, slot: str) -> np.ndarray:
    """Where the slot's parts are labelled visible in draw (c, j), redrawn step by step."""
    size, pose, look, bg = _scene(params, c, j)
    labels = sb.render_bird(size, pose, look, bg).labels
    return np.isin(labels, [sb.PART_ID[p] for p in sb.SLOTS[slot]])


def _footprint(params: dict, c: int, j: int, slot: str) -> np.ndarray:
    """Every pixel the slot's paint reaches, soft edges included: the same scene rendered with
    the slot black and white differs exactly there."""
    size, pose, look, bg = _scene(params, c, j)
    renders = []
    for value in (0.0, 255.0):
        setattr(look, slot, np.full(3, value))
        renders.append(sb.render_bird(size, pose, look, bg).image)
    return np.abs(renders[0] - renders[1]).max(axis=2) > 0


@pytest.mark.parametrize("size", [64, 96])
def test_a_counterfactual_equals_the_original_outside_the_swapped_slot(tmp_path, size):
    root = make_synthbirds(tmp_path, classes=4, per_class=6, size=size, seed=1)
    params = synth_params(root)
    changed_inside = 0
    for c, j in [(0, 0), (1, 3), (2, 5), (3, 1)]:
        renders = counterfactuals(params, c, j)
        assert set(renders) == {"original", *sb.SLOTS}
        original = renders.pop("original")
        for slot, img in renders.items():
            mask = _slot_mask(params, c, j, slot)
            diff = np.abs(img.astype(int) - original.astype(int)).max(axis=2) > 0
            # Soft shape edges let a slot's colour show through a neighbour's anti-aliased rim: a
            # changed pixel is always one the slot's paint reaches, and nearly always beside
            # the pixels labelled with the slot's parts (the far wing shows through the body's rim).
            assert not (diff & ~_footprint(params, c, j, slot)).any(), (c, j, slot)
            assert (diff & ~binary_dilation(mask, iterations=1)).sum() <= 0.15 * diff.sum(), (c, j, slot)
            if mask.sum() >= 4:
                changed_inside += np.abs(img.astype(float) - original)[mask].mean() > 5
    assert changed_inside >= 12


def test_the_original_render_is_the_saved_image_and_evidence_is_the_designs(tmp_path):
    root = make_synthbirds(tmp_path, classes=4, per_class=4, size=48, seed=2)
    params = synth_params(root)
    idx = read_cub(tmp_path)
    for _, row in idx.images.iterrows():
        c, j = int(row["label"]), (int(row["image_id"]) - 1) % 4
        saved = np.asarray(Image.open(idx.abspath(row["path"])).convert("RGB"))
        assert np.array_equal(jpeg_roundtrip(counterfactuals(params, c, j, [])["original"]), saved)
        assert evidence_of(params, c) == sb.class_slots(sb.class_pairs(params)[c])
        assert set(idx.evidence[c]) == {p for s in evidence_of(params, c) for p in sb.SLOTS[s]}
    assert part_columns(params)["wing"] == ["left wing", "right wing"]


def test_swaps_are_repeatable_and_unknown_slots_refused(tmp_path):
    params = synth_params(make_synthbirds(tmp_path, classes=3, per_class=2, size=40, seed=0))
    a, b = counterfactuals(params, 1, 1, ["tail"]), counterfactuals(params, 1, 1, ["tail"])
    assert np.array_equal(a["tail"], b["tail"]) and not np.array_equal(a["tail"], a["original"])
    with pytest.raises(InputError, match="cannot swap 'beak'"):
        counterfactuals(params, 0, 0, ["beak"])
    with pytest.raises(InputError, match="no image 5 of class 0"):
        counterfactuals(params, 0, 5)
