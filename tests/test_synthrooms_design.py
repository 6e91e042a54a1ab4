"""synthrooms designs (which objects are evidence of which room) and counterfactual scenes."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from srae.datasets.ade20k import ADE_INDEX_FILE, EVIDENCE_FILE, PAPER_ROOMS
from srae.datasets.synthetic import STAMP, save_jpeg
from srae.datasets.synthrooms import (OBJECT_ID, ROOM_DESIGNS, ROOM_OBJECTS, design_rooms, draw_room, encode_seg,
                                      room_counterfactuals, room_evidence, sample_room, write_synthrooms)
from srae.errors import InputError

# sha256 of draw_room's (image, class map, instance map) bytes for rooms bathroom, kitchen and
# waiting room, draws j = 0..3 of rng [7, c, j, 1], size 48, computed with the drawing code as it
# was before designs existed: the drawing of design unique must not change.
UNIQUE_FINGERPRINT = "27028ea04849b82bfc5b341a83989a7fb7887b88e66a763fded1f81a226e4263"


def _params(root: Path) -> dict:
    return json.loads((root / STAMP).read_text())["params"]


@pytest.mark.parametrize("k", range(3, 11))
def test_factorial_design_shares_every_object_and_only_pairs_identify_rooms(k):
    rooms = list(PAPER_ROOMS[:k])
    pairs = design_rooms(rooms)  # factorial is the default
    assert len(pairs) == k and all(len(set(p)) == 2 for p in pairs)
    assert len({frozenset(p) for p in pairs}) == k  # every room's pair is its own
    for obj in {o for p in pairs for o in p}:
        holders = [r for r, p in zip(rooms, pairs) if obj in p]
        assert len(holders) == 2, (obj, holders)  # never identifies a room alone
    # the objects are the rooms' own first objects, in a cycle
    assert [p[0] for p in pairs] == [ROOM_OBJECTS[r][0] for r in rooms]
    assert [p[1] for p in pairs] == [ROOM_OBJECTS[r][0] for r in rooms[1:] + rooms[:1]]


def test_unique_design_is_the_rooms_own_objects():
    rooms = list(PAPER_ROOMS[:4])
    assert design_rooms(rooms, "unique") == [ROOM_OBJECTS[r] for r in rooms]
    assert design_rooms(rooms[:2], "unique") == [ROOM_OBJECTS[r] for r in rooms[:2]]
    assert ROOM_DESIGNS == ("factorial", "unique")


def test_factorial_with_two_rooms_and_unknown_designs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="factorial needs at least 3 room classes.*use design: unique") as e:
        design_rooms(["bathroom", "kitchen"], "factorial")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="valid designs: factorial, unique"):
        design_rooms(["bathroom", "kitchen", "office"], "latin")
    with pytest.raises(InputError, match="factorial needs at least 3"):
        write_synthrooms(tmp_path, 2, 3, 40, 0, 0.5)
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_unique_design_drawing_is_unchanged():
    h = hashlib.sha256()
    for c, room in enumerate(["bathroom", "kitchen", "waiting room"]):
        for j in range(4):
            img, cls, inst = draw_room(np.random.default_rng([7, c, j, 1]), room, 48)
            for a in (img, cls.astype(np.int32), inst.astype(np.int32)):
                h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == UNIQUE_FINGERPRINT


def test_write_synthrooms_unique_writes_the_unique_drawing(tmp_path):
    """The files of design unique are exactly the (fingerprinted) unique drawing, JPEG-encoded."""
    root = write_synthrooms(tmp_path / "u", 3, 3, 40, 5, 0.5, design="unique")
    params = _params(root)
    assert params["design"] == "unique"
    with open(root / ADE_INDEX_FILE, "rb") as fh:
        index = pickle.load(fh)
    for k, (folder, name) in enumerate(zip(index["folder"], index["filename"])):
        c, j = divmod(k, 3)
        pixels, cls, inst = draw_room(np.random.default_rng([5, c, j, 1]), PAPER_ROOMS[c], 40)
        path = root.parent / folder / name
        save_jpeg(tmp_path / "ref.jpg", pixels)
        assert path.read_bytes() == (tmp_path / "ref.jpg").read_bytes()
        seg = np.asarray(Image.open(path.with_name(name.replace(".jpg", "_seg.png"))))
        assert np.array_equal(seg, encode_seg(cls, inst))
        assert np.array_equal(room_counterfactuals(params, c, j, parts=[])["original"], pixels)
    evidence = json.loads((root / EVIDENCE_FILE).read_text())
    assert evidence == {r: list(ROOM_OBJECTS[r]) for r in PAPER_ROOMS[:3]}


@pytest.fixture(scope="module")
def factorial_rooms(tmp_path_factory) -> Path:
    return write_synthrooms(tmp_path_factory.mktemp("rooms"), 4, 6, 48, 3, 0.5)


def test_factorial_dataset_records_its_design(factorial_rooms):
    stamp = json.loads((factorial_rooms / STAMP).read_text())
    rooms = list(PAPER_ROOMS[:4])
    pairs = {r: list(p) for r, p in zip(rooms, design_rooms(rooms))}
    assert stamp["params"]["design"] == "factorial"
    assert stamp["traits"] == pairs
    assert json.loads((factorial_rooms / EVIDENCE_FILE).read_text()) == pairs
    assert [room_evidence(stamp["params"], c) for c in range(4)] == [pairs[r] for r in rooms]
    # both evidence objects are drawn in every image of the factorial design
    for c, j in itertools.product(range(4), range(6)):
        assert set(pairs[rooms[c]]) <= set(_scene(stamp["params"], c, j).names)


def _scene(params: dict, c: int, j: int):
    ev = room_evidence(params, c)
    return sample_room(np.random.default_rng([params["seed"], c, j, 1]), PAPER_ROOMS[c], params["size"],
                       evidence=None if params["design"] == "unique" else (ev[0], ev[1]))


def test_original_is_what_write_synthrooms_saved(factorial_rooms, tmp_path):
    params = _params(factorial_rooms)
    with open(factorial_rooms / ADE_INDEX_FILE, "rb") as fh:
        index = pickle.load(fh)
    for k, (folder, name) in enumerate(zip(index["folder"], index["filename"])):
        c, j = divmod(k, params["per_class"])
        assert folder.endswith(PAPER_ROOMS[c].replace(" ", "_"))
        original = room_counterfactuals(params, c, j, parts=[])["original"]
        saved = np.asarray(Image.open(factorial_rooms.parent / folder / name).convert("RGB"), dtype=np.float64)
        assert original.dtype == np.uint8 and original.shape == saved.shape
        # q92 JPEG loses part of the per-pixel noise (sd 3): about 3 grey levels on average;
        # another draw is about 30 away
        assert np.abs(saved - original).mean() < 4.0
        save_jpeg(tmp_path / "ref.jpg", original)
        assert (tmp_path / "ref.jpg").read_bytes() == (factorial_rooms.parent / folder / name).read_bytes()


@pytest.mark.parametrize("design", ["factorial", "unique"])
def test_counterfactual_changes_only_the_swapped_object(tmp_path, design):
    k, per_class, size, seed = 3, 8, 48, 11
    params = {"generator": "synthrooms", "classes": k, "per_class": per_class, "size": size, "seed": seed,
              "design": design}
    seen = 0
    for c, j in itertools.product(range(k), range(per_class)):
        cf = room_counterfactuals(params, c, j)
        evidence = room_evidence(params, c)
        assert list(cf) == ["original", *evidence, "control"]
        scene = _scene(params, c, j)
        rng_plain = np.random.default_rng([seed, c, j, 1])
        ev = None if design == "unique" else (evidence[0], evidence[1])
        original, cls, inst = draw_room(rng_plain, PAPER_ROOMS[c], size, evidence=ev)
        assert np.array_equal(original, cf["original"])
        for part in [*evidence, "control"]:
            rng_swapped = np.random.default_rng([seed, c, j, 1])
            swapped, cls2, inst2 = draw_room(rng_swapped, PAPER_ROOMS[c], size, evidence=ev, swap=part)
            # the swap colour comes from its own generator: the scene's stream (shapes, other
            # colours, the image noise) is drawn exactly as without it, and the maps are the same
            assert rng_swapped.bit_generator.state == rng_plain.bit_generator.state
            assert np.array_equal(cls, cls2) and np.array_equal(inst, inst2)
            assert np.array_equal(swapped, cf[part])
            name = scene.control() if part == "control" else part
            diff = np.abs(cf[part].astype(int) - original.astype(int)).max(axis=-1)
            if name not in scene.names:  # unique design: an evidence object left out of this draw
                assert design == "unique" and not diff.any()
                continue
            coverage = next(o.alpha for o in scene.objects if o.name == name) > 0
            assert not diff[~coverage].any()  # exactly unchanged wherever the object has no coverage
            visible = cls == OBJECT_ID[name]
            # from the maps alone: every changed pixel is on the object or on an object painted in
            # front of it (instance ids count in painting order; it shows through their
            # anti-aliased edges and thin parts), give or take a 2-pixel anti-aliasing border
            own = scene.names.index(name) + 1
            assert np.array_equal(visible, inst == own)
            assert not diff[~binary_dilation(inst >= own, iterations=2)].any()
            # mostly within 2 pixels of its own visible pixels
            assert (diff[~binary_dilation(visible, iterations=2)] > 0).mean() < 0.02
            if visible.any():
                seen += 1
                assert (diff[visible] > 0).mean() > 0.5
                if part != "control":  # a vivid evidence colour became a muted one
                    assert diff[visible].mean() > 20
    assert seen >= k * per_class  # most swapped objects are visible


def test_control_is_a_shared_furniture_object_and_bad_swaps_are_input_errors():
    rng = np.random.default_rng([1, 0, 0, 1])
    scene = sample_room(rng, "kitchen", 48, evidence=("stove", "bed"))
    control = scene.control()
    assert control not in {"wall", "floor", "ceiling", "stove", "bed"} and control in scene.names
    assert control not in {o for pair in ROOM_OBJECTS.values() for o in pair}
    with pytest.raises(InputError, match="cannot swap 'unicorn'"):
        draw_room(np.random.default_rng(0), "kitchen", 48, swap="unicorn")
    params = {"generator": "synthrooms", "classes": 3, "per_class": 2, "size": 40, "seed": 0}
    assert room_evidence(params, 1) == list(ROOM_OBJECTS["bedroom"])  # stamps without a design: unique
    with pytest.raises(InputError, match="draw 2 out of range"):
        room_counterfactuals(params, 0, 2)
    with pytest.raises(InputError, match="room class 3 out of range"):
        room_evidence(params, 3)
