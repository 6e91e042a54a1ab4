"""synthbirds / synthrooms: determinism, exact formats, geometry of the annotations, evidence."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srae.datasets import synthbirds as sb
from srae.datasets.ade20k import read_object_mask, read_places_ade20k, read_places_categories
from srae.datasets.cub import CUB_PART_NAMES, read_cub
from srae.datasets.synthetic import make_synthbirds, make_synthrooms
from srae.datasets.synthrooms import OBJECT_NAMES, ROOM_OBJECTS
from srae.errors import InputError

SIZE = 64


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthbirds_is_deterministic_and_seed_dependent(tmp_path):
    a = make_synthbirds(tmp_path / "a", classes=3, per_class=4, size=48, seed=5)
    b = make_synthbirds(tmp_path / "b", classes=3, per_class=4, size=48, seed=5)
    c = make_synthbirds(tmp_path / "c", classes=3, per_class=4, size=48, seed=6)
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert ta == tb and len(ta) == 12 + 9  # 12 images, 7 annotation files, evidence.json, synth.json
    assert ta["parts/part_locs.txt"] != tc["parts/part_locs.txt"]


def test_synthbirds_reads_back_with_the_cub_reader(tmp_path):
    root = make_synthbirds(tmp_path, classes=4, per_class=6, size=SIZE, seed=1)
    assert root == tmp_path / "CUB_200_2011"
    idx = read_cub(tmp_path)
    pairs = sb.design_classes(4, 1)
    assert idx.class_names == [sb.class_name(c, p) for c, p in enumerate(pairs)]
    assert idx.part_names == list(CUB_PART_NAMES) and idx.bad_inputs == [] and idx.name == "synthbirds"
    assert idx.images["label"].value_counts().sort_index().tolist() == [6, 6, 6, 6]
    assert idx.split("train")["label"].value_counts().tolist() == [3, 3, 3, 3]
    assert (idx.images["width"] == SIZE).all() and (idx.images["height"] == SIZE).all()
    assert idx.evidence == {c: sb.evidence_parts(p) for c, p in enumerate(pairs)}
    # The crown trait names crown + forehead; every class has two evidence slots.
    for c, pair in enumerate(pairs):
        slots = {t.slot for t in pair}
        assert len(slots) == 2 and set(idx.evidence[c]) == {p for s in slots for p in sb.SLOTS[s]}
    for _, row in idx.images.iterrows():
        x, y, w, h = row["bbox"]
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w > 5 and h > 5
        vis = row["parts"][row["parts"][:, 2] == 1]
        assert len(vis) >= 4
        # Visible keypoints sit inside the tight box (pixel centres, so within half a pixel).
        assert np.all((vis[:, 0] >= x) & (vis[:, 0] <= x + w) & (vis[:, 1] >= y) & (vis[:, 1] <= y + h))


def test_unique_design_classes_are_distinct_and_use_distinct_colour_pairs():
    pairs = sb.design_classes(15, 0, "unique")
    assert len(set(pairs)) == 15
    colour_pairs = [frozenset((a.colour, b.colour)) for a, b in pairs]
    assert len(set(colour_pairs)) == 15  # up to C(6, 2) classes are told apart by colours alone
    assert all(a.slot != b.slot for a, b in pairs)
    with pytest.raises(InputError, match="at most"):
        sb.design_classes(10_000, 0, "unique")
    with pytest.raises(InputError, match="unknown class design"):
        sb.design_classes(4, 0, "latin")


def _plain_look(rng: np.random.Generator, pair: tuple[sb.Trait, sb.Trait]) -> sb.BirdLook:
    look = sb.sample_look(rng, pair, occlusion=0.0)
    return dataclasses.replace(look, branch=None, wing_pattern="solid", occluder=None)


def test_bbox_is_tight_around_the_bird_pixels():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pose = sb.sample_pose(rng, SIZE)
        look = _plain_look(rng, sb.design_classes(2, 0)[0])
        black = sb.render_bird(SIZE, pose, look, np.zeros((SIZE, SIZE, 3)))
        white = sb.render_bird(SIZE, pose, look, np.full((SIZE, SIZE, 3), 255.0))
        # image = a * colour + (1 - a) * background, so white - black = (1 - a) * 255.
        covered = (white.image - black.image).max(axis=2) < 127.5
        rows, cols = np.nonzero(covered)
        expected = (cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min())
        bbox, _ = sb.annotate(black)
        assert bbox == tuple(float(v) for v in expected)


def test_keypoints_land_on_their_parts_colour():
    rng = np.random.default_rng(11)
    pair = (sb.Trait("crown", "red"), sb.Trait("tail", "blue"))
    checked = 0
    for _ in range(6):
        pose = dataclasses.replace(sb.sample_pose(rng, 96), k=96 * 0.6)
        look = _plain_look(rng, pair)
        render = sb.render_bird(96, pose, look, np.zeros((96, 96, 3)))
        _, parts = sb.annotate(render)
        near = "left" if pose.flip else "right"
        for name, colour in (("crown", look.crown), ("tail", look.tail), ("beak", look.beak),
                             ("breast", look.breast), (f"{near} wing", look.wing)):
            x, y, vis = parts[CUB_PART_NAMES.index(name)]
            if not vis:
                continue
            pixel = render.image[int(y), int(x)]
            assert np.abs(pixel - colour).max() < 1.0, (name, pixel, colour)
            checked += 1
    assert checked >= 20


def test_flip_mirrors_the_image_and_swaps_left_right():
    rng = np.random.default_rng(8)
    pair = sb.design_classes(3, 0)[2]
    look = _plain_look(rng, pair)
    look.far_wing = True
    pose = sb.BirdPose(cx=40.0, cy=34.0, theta=12.0, k=36.0, flip=False)
    mirror = sb.BirdPose(cx=SIZE - 40.0, cy=34.0, theta=-12.0, k=36.0, flip=True)
    bg = np.full((SIZE, SIZE, 3), 90.0)
    a, b = sb.render_bird(SIZE, pose, look, bg), sb.render_bird(SIZE, mirror, look, bg)
    np.testing.assert_allclose(b.image, a.image[:, ::-1], atol=1e-6)
    _, pa = sb.annotate(a)
    _, pb = sb.annotate(b)
    swap = {n: n.replace("left", "@").replace("right", "left").replace("@", "right") for n in CUB_PART_NAMES}
    for k, name in enumerate(CUB_PART_NAMES):
        j = CUB_PART_NAMES.index(swap[name])
        assert pb[j, 2] == pa[k, 2], name
        if pa[k, 2]:
            assert abs(pb[j, 0] - (SIZE - pa[k, 0])) < 0.11 and abs(pb[j, 1] - pa[k, 1]) < 0.11, name
    # Facing right the bird shows its right side: right eye visible, left eye hidden.
    assert pa[CUB_PART_NAMES.index("right eye"), 2] == 1 and pa[CUB_PART_NAMES.index("left eye"), 2] == 0
    assert pb[CUB_PART_NAMES.index("left eye"), 2] == 1 and pb[CUB_PART_NAMES.index("right eye"), 2] == 0


def test_occluder_makes_covered_parts_invisible():
    rng = np.random.default_rng(2)
    look = _plain_look(rng, sb.design_classes(2, 0)[0])
    pose = sb.BirdPose(cx=34.0, cy=34.0, theta=0.0, k=36.0, flip=False)
    clear = sb.annotate(sb.render_bird(SIZE, pose, look, np.zeros((SIZE, SIZE, 3))))[1]
    look.occluder = (sb.HEAD, 0.3, 0.3, 0.0, np.array([60.0, 90.0, 50.0]))
    render = sb.render_bird(SIZE, pose, look, np.zeros((SIZE, SIZE, 3)))
    hidden = sb.annotate(render)[1]
    for name in ("crown", "forehead", "right eye", "beak"):
        k = CUB_PART_NAMES.index(name)
        assert clear[k, 2] == 1 and hidden[k, 2] == 0, name
    k = CUB_PART_NAMES.index("tail")
    assert clear[k, 2] == hidden[k, 2] == 1
    assert (render.labels_unoccluded > 0).sum() > (render.labels > 0).sum()


def test_evidence_parts_carry_the_vivid_colours(tmp_path):
    make_synthbirds(tmp_path, classes=3, per_class=4, size=SIZE, seed=0, occlusion=0.0)
    idx = read_cub(tmp_path)
    traits = json.loads((idx.root / "synth.json").read_text())["traits"]
    seen = {True: 0, False: 0}
    for _, row in idx.images.iterrows():
        img = np.asarray(Image.open(idx.abspath(row["path"])).convert("HSV"))
        evidence_slots = {t["slot"] for t in traits[idx.class_names[row["label"]]]}
        # Only the near eye is ever drawn, so it tells which wing is the near (fully shown) one.
        eyes = [side for side in ("left", "right") if row["parts"][CUB_PART_NAMES.index(f"{side} eye"), 2]]
        assert len(eyes) <= 1
        wings = tuple(f"{side} wing" for side in eyes)
        slot_parts = {"crown": ("crown",), "wing": wings, "breast": ("breast",), "tail": ("tail",)}
        for slot, names in slot_parts.items():
            for name in names:
                x, y, vis = row["parts"][CUB_PART_NAMES.index(name)]
                if not vis:
                    continue
                saturation = img[int(y), int(x), 1]
                if slot in evidence_slots:
                    assert saturation > 150, (row["path"], name, saturation)  # a vivid trait colour
                else:
                    assert saturation < 130, (row["path"], name, saturation)  # dull nuisance colour
                seen[slot in evidence_slots] += 1
    assert seen[True] >= 20 and seen[False] >= 20


def test_same_parameters_do_not_regenerate_and_real_data_is_never_overwritten(tmp_path):
    root = make_synthbirds(tmp_path, classes=2, per_class=3, size=40, seed=0)
    stamp = (root / "synth.json").stat().st_mtime_ns
    assert make_synthbirds(tmp_path, classes=2, per_class=3, size=40, seed=0) == root
    assert (root / "synth.json").stat().st_mtime_ns == stamp
    make_synthbirds(tmp_path, classes=2, per_class=4, size=40, seed=0)
    assert len(read_cub(tmp_path).images) == 8
    real = tmp_path / "real" / "CUB_200_2011"
    real.mkdir(parents=True)
    (real / "images.txt").write_text("1 a.jpg\n")
    with pytest.raises(InputError, match="not a synthetic dataset"):
        make_synthbirds(tmp_path / "real", classes=2, per_class=3, size=40)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": 1}, "at least 2 classes"), ({"per_class": 1}, "at least 2 images"), ({"size": 16}, "at least 32"),
])
def test_bad_sizes_are_input_errors(tmp_path, kwargs, message):
    args = {"classes": 2, "per_class": 3, "size": 40, **kwargs}
    with pytest.raises(InputError, match=message):
        make_synthbirds(tmp_path, **args)


def test_synthrooms_reads_back_with_ade_and_places_readers(tmp_path):
    root = make_synthrooms(tmp_path, classes=3, per_class=5, size=48, seed=2, design="unique")
    assert root == tmp_path / "ADE20K_2021_17_01"
    cats = read_places_categories(tmp_path / "places365" / "categories_places365.txt")
    assert cats == ["/b/bathroom", "/b/bedroom", "/c/conference_room"]
    idx = read_places_ade20k(tmp_path, places_root=tmp_path / "places365")
    assert idx.class_names == ["bathroom", "bedroom", "conference room"] and idx.bad_inputs == []
    assert idx.name == "synthrooms"
    assert idx.images["label"].value_counts().sort_index().tolist() == [5, 5, 5]
    assert sorted(idx.images["split"].value_counts().tolist()) == [6, 9]
    assert idx.evidence == {0: ["toilet", "bathtub"], 1: ["bed", "pillow"],
                            2: ["conference table", "projection screen"]}
    name_to_id = {v: k for k, v in idx.object_names.items()}
    assert [idx.object_names[k] for k in sorted(idx.object_names)] == list(OBJECT_NAMES)
    for _, row in idx.images.iterrows():
        mask = read_object_mask(idx.abspath(row["mask_path"]))
        assert mask.shape == (48, 48) and mask.min() >= 1  # every pixel is wall, floor, ceiling or an object
        present = {idx.object_names[k] for k in np.unique(mask)}
        assert {"wall", "floor"} <= present
        own = set(ROOM_OBJECTS[idx.class_names[row["label"]]])
        others = {o for r, pair in ROOM_OBJECTS.items() for o in pair} - own
        assert present & own and not present & others
        assert all(name_to_id[o] in np.unique(mask) for o in present)


def test_synthrooms_deterministic_and_limited_to_ten_rooms(tmp_path):
    a = _tree(make_synthrooms(tmp_path / "a", classes=2, per_class=3, size=40, seed=1, design="unique"))
    b = _tree(make_synthrooms(tmp_path / "b", classes=2, per_class=3, size=40, seed=1, design="unique"))
    assert a == b
    with pytest.raises(InputError, match="at most 10 room classes"):
        make_synthrooms(tmp_path / "c", classes=11, per_class=3, size=40)


def test_cli_synth_writes_and_prints_the_root(tmp_path, capsys):
    from srae.datasets.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "birds", "--out", str(tmp_path), "--classes", "2", "--per-class", "3",
                              "--size", "40", "--seed", "4"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "CUB_200_2011")
    assert len(read_cub(tmp_path).images) == 6


def _hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_generation_removes_its_temporary_directory(tmp_path, monkeypatch, error):
    calls = {"n": 0}
    real = sb.draw_sample

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(sb, "draw_sample", flaky)
    with pytest.raises(type(error)):
        make_synthbirds(tmp_path, classes=2, per_class=2, size=32)
    assert calls["n"] == 3 and list(tmp_path.iterdir()) == []


def test_a_failed_synthrooms_generation_removes_its_temporary_directory(tmp_path, monkeypatch):
    from srae.datasets import synthrooms

    def broken(*_args, **_kwargs):
        raise RuntimeError("no paint")

    monkeypatch.setattr(synthrooms, "draw_room", broken)
    with pytest.raises(RuntimeError, match="no paint"):
        make_synthrooms(tmp_path, classes=2, per_class=2, size=32, design="unique")
    assert _hidden(tmp_path) == []


def test_temporary_directories_of_dead_runs_are_cleaned_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a process that has exited
    live = os.getppid()  # pytest's parent: running
    for name in (f".CUB_200_2011.tmp-{dead}", f".CUB_200_2011.old-{dead}", f".CUB_200_2011.tmp-{live}",
                 ".other.tmp-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk.jpg").write_bytes(b"x")
    root = make_synthbirds(tmp_path, classes=2, per_class=2, size=32)
    assert _hidden(tmp_path) == sorted([f".CUB_200_2011.tmp-{live}", ".other.tmp-1"])
    assert len(read_cub(root).images) == 4


def test_sizes_must_be_integers(tmp_path):
    from srae.errors import InputError

    with pytest.raises(InputError, match="per_class must be an integer, got 2.5"):
        make_synthbirds(tmp_path / "b", classes=2, per_class=2.5, size=32)
