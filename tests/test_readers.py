"""CUB and ADE20K/Places365 readers on hand-written files in the real formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srae.datasets.ade20k import (
    read_object_mask,
    read_places_ade20k,
    read_places_categories,
    scene_key,
)
from srae.datasets.cub import CUB_PART_NAMES, read_cub
from srae.errors import InputError

CLASSES = "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n"
IMAGES = """1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
2 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg

3 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg
"""
LABELS = "1 1\n2 1\n3 2\n"
SPLIT = "1 0\n2 1\n3 1\n"
BOXES = "1 6.0 5.0 40.0 30.5\n2 0.0 0.0 60.0 45.0\n3 2.5 3.0 20.0 20.0\r\n"
SIZES = {1: (50, 40), 2: (60, 45), 3: (30, 30)}
# Visible parts per image (part id -> x, y); every other part is the invisible "0 0 0".
VISIBLE = {1: {2: (44.0, 12.0), 5: (30.5, 8.0), 7: (33.0, 11.0)}, 2: {14: (3.0, 40.0)}, 3: {1: (10.0, 10.0)}}


def _part_locs(visible: dict[int, dict[int, tuple[float, float]]]) -> str:
    lines = []
    for img in sorted(visible):
        for pid in range(1, 16):
            if pid in visible[img]:
                x, y = visible[img][pid]
                lines.append(f"{img} {pid} {x:.1f} {y:.1f} 1")
            else:
                lines.append(f"{img} {pid} 0.0 0.0 0")
    return "\n".join(lines) + "\n"


def make_cub(root: Path, **override: str) -> Path:
    base = root / "CUB_200_2011"
    files = {"classes.txt": CLASSES, "images.txt": IMAGES, "image_class_labels.txt": LABELS,
             "train_test_split.txt": SPLIT, "bounding_boxes.txt": BOXES,
             "parts/parts.txt": "".join(f"{k + 1} {n}\n" for k, n in enumerate(CUB_PART_NAMES)),
             "parts/part_locs.txt": _part_locs(VISIBLE)}
    files.update(override)
    for rel, text in files.items():
        if text is None:
            continue
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    for line in IMAGES.split("\n"):
        if line.strip():
            img_id, rel = line.split()
            path = base / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", SIZES[int(img_id)], (120, 80, 40)).save(path)
    return base


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return make_cub(tmp_path)


def test_cub_reader_reads_the_real_format(cub, tmp_path):
    idx = read_cub(tmp_path)  # the parent of CUB_200_2011 works as well as the directory itself
    assert idx.root == cub
    assert idx.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert idx.part_names[6] == "left eye" and idx.part_names[12] == "right wing" and len(idx.part_names) == 15
    im = idx.images.set_index("image_id")
    assert im.loc[1, "path"] == "images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert list(im["label"]) == [0, 0, 1] and list(im["split"]) == ["test", "train", "train"]
    assert (im.loc[2, "width"], im.loc[2, "height"]) == (60, 45)
    assert im.loc[1, "bbox"] == (6.0, 5.0, 40.0, 30.5) and im.loc[3, "bbox"] == (2.5, 3.0, 20.0, 20.0)
    parts = im.loc[1, "parts"]
    assert parts.shape == (15, 3)
    np.testing.assert_array_equal(parts[1], [44.0, 12.0, 1.0])  # beak
    np.testing.assert_array_equal(parts[6], [33.0, 11.0, 1.0])  # left eye
    np.testing.assert_array_equal(parts[0], [0.0, 0.0, 0.0])  # back: invisible
    assert parts[:, 2].sum() == 3 and im.loc[2, "parts"][13, 2] == 1.0
    assert idx.bad_inputs == [] and idx.evidence == {} and im["mask_path"].isna().all() and idx.name == "cub"


def test_cub_corrupt_truncated_and_missing_images_are_skipped(cub):
    (cub / "images/001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg").write_bytes(b"not a jpeg")
    good = cub / "images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:-200])  # truncated: header fine, data cut
    idx = read_cub(cub)
    assert list(idx.images["image_id"]) == [1]
    reasons = {b["image_id"]: b["reason"] for b in idx.bad_inputs}
    assert set(reasons) == {2, 3} and all("unreadable image" in r for r in reasons.values())
    (cub / "images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg").unlink()
    assert [b["image_id"] for b in read_cub(cub).bad_inputs] == [1, 2, 3]


def test_cub_part_outside_image_skips_that_image(tmp_path):
    vis = {**VISIBLE, 3: {1: (31.5, 10.0)}}  # image 3 is 30 px wide (1 px tolerance)
    idx = read_cub(make_cub(tmp_path, **{"parts/part_locs.txt": _part_locs(vis)}))
    assert list(idx.images["image_id"]) == [1, 2]
    assert "part 'back'" in idx.bad_inputs[0]["reason"] and idx.bad_inputs[0]["image_id"] == 3


@pytest.mark.parametrize(("rel", "text", "message"), [
    ("image_class_labels.txt", "1 1\n2\n3 2\n", r"image_class_labels.txt:2: expected 2 fields"),
    ("image_class_labels.txt", "1 1\n2 1\n3 7\n", r"image_class_labels.txt:3: class id 7 is not in classes.txt"),
    ("image_class_labels.txt", "1 1\n2 x\n3 2\n", r"image_class_labels.txt:2: class id 'x' is not an integer"),
    ("image_class_labels.txt", "1 1\n3 2\n", r"image_class_labels.txt: no entry for image id 2"),
    ("train_test_split.txt", "1 0\n2 1\n2 1\n3 1\n", r"train_test_split.txt:3: id 2 repeats line 2"),
    ("train_test_split.txt", "1 0\n2 3\n3 1\n", r"train_test_split.txt:2: expected 0 or 1"),
    ("bounding_boxes.txt", "1 6 5 40\n", r"bounding_boxes.txt:1: expected 5 fields"),
    ("bounding_boxes.txt", "1 6 5 40 30\n2 0 0 nan 45\n3 1 1 2 2\n", r"bounding_boxes.txt:2: bbox value is nan"),
    ("bounding_boxes.txt", "1 6 5 40 30\n9 0 0 1 1\n", r"bounding_boxes.txt:2: image id 9 is not listed"),
    ("parts/part_locs.txt", "1 1 0.0 0.0 0\n", r"part_locs.txt: no entry for image 1 part 2"),
    ("parts/part_locs.txt", _part_locs(VISIBLE).replace("1 2 44.0 12.0 1", "1 2 44.0 12.0 2"),
     r"part_locs.txt:2: visible must be 0 or 1"),
    ("parts/part_locs.txt", _part_locs(VISIBLE).replace("1 3 0.0 0.0 0", "1 16 0.0 0.0 0"),
     r"part_locs.txt:3: part id 16 is not listed"),
])
def test_cub_malformed_annotation_names_file_and_line(tmp_path, rel, text, message):
    with pytest.raises(InputError, match=message):
        read_cub(make_cub(tmp_path, **{rel: text}))


def test_cub_missing_annotation_file(tmp_path):
    base = make_cub(tmp_path)
    (base / "bounding_boxes.txt").unlink()
    with pytest.raises(InputError, match=r"annotation file .*bounding_boxes.txt is missing"):
        read_cub(base)
    with pytest.raises(InputError, match="no CUB-200-2011 dataset"):
        read_cub(tmp_path / "nowhere")


def test_cub_evidence_file(tmp_path):
    base = make_cub(tmp_path)
    (base / "evidence.json").write_text(json.dumps({"002.Laysan_Albatross": ["crown", "left wing"]}))
    assert read_cub(base).evidence == {1: ["crown", "left wing"]}
    (base / "evidence.json").write_text(json.dumps({"002.Laysan_Albatross": ["wingtip"]}))
    with pytest.raises(InputError, match="evidence.json: class '002.Laysan_Albatross'"):
        read_cub(base)
    (base / "evidence.json").write_text('{\n "002.Laysan_Albatross": [\n')
    with pytest.raises(InputError, match=r"evidence.json:3: invalid JSON"):
        read_cub(base)


# ---------------------------------------------------------------------------- ADE20K / Places
def _seg(cls: np.ndarray) -> np.ndarray:
    return np.stack([(cls // 256) * 10, cls % 256, np.ones_like(cls)], -1).astype(np.uint8)


def make_ade(root: Path) -> Path:
    ade = root / "ADE20K_2021_17_01"
    entries = [  # (split folder, scene dir, file, scene string in index)
        ("training", "home_or_hotel/bathroom", "ADE_train_00000001.jpg", "/bathroom"),
        ("validation", "home_or_hotel/kitchen", "ADE_val_00000001.jpg", "/kitchen"),
        ("training", "urban/street", "ADE_train_00000002.jpg", "/street"),
        ("training", "home_or_hotel/living_room", "ADE_train_00000003.jpg", "/living_room"),
        ("training", "home_or_hotel/kitchen", "ADE_train_00000004.jpg", "/kitchen"),
    ]
    index = {"filename": [], "folder": [], "scene": [],
             "objectnames": ["wall", "floor, flooring"] + [f"obj{k}" for k in range(3, 300)] + ["toilet, can"],
             "objectPresence": np.zeros((300, len(entries)), dtype=np.int64)}
    for i, (split, scene_dir, fname, scene) in enumerate(entries):
        folder = f"ADE20K_2021_17_01/images/ADE/{split}/{scene_dir}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (200, 200, 200)).save(root / folder / fname)
        cls = np.zeros((12, 16), dtype=np.int64)
        cls[:, :8], cls[:4, 8:] = 1, 300  # wall on the left, object 300 top right, rest unlabeled
        Image.fromarray(_seg(cls)).save(root / folder / fname.replace(".jpg", "_seg.png"))
        index["filename"].append(fname)
        index["folder"].append(folder)
        index["scene"].append(scene)
    with open(ade / "index_ade20k.pkl", "wb") as fh:
        pickle.dump(index, fh)
    return ade


def test_seg_png_object_classes(tmp_path):
    ade = make_ade(tmp_path)
    mask = read_object_mask(ade / "images/ADE/training/home_or_hotel/bathroom/ADE_train_00000001_seg.png")
    assert mask.dtype == np.int32 and mask[0, 0] == 1 and mask[0, 15] == 300 and mask[11, 15] == 0
    px = np.asarray(Image.open(ade / "images/ADE/training/home_or_hotel/bathroom/ADE_train_00000001_seg.png"))
    assert tuple(px[0, 15]) == (10, 44, 1)  # (300 // 256) * 10 = 10, 300 % 256 = 44


def test_ade_reader_defaults_to_the_paper_rooms_present(tmp_path):
    make_ade(tmp_path)
    idx = read_places_ade20k(tmp_path)
    assert idx.class_names == ["bathroom", "kitchen", "living room"]
    assert idx.root == tmp_path and idx.object_names[1] == "wall" and idx.object_names[300] == "toilet, can"
    im = idx.images
    assert list(im["image_id"]) == [1, 2, 4, 5]  # ids follow the index order; the street is not a room
    assert list(im["label"]) == [0, 1, 2, 1] and list(im["split"]) == ["train", "test", "train", "train"]
    assert im["path"].iloc[1] == "ADE20K_2021_17_01/images/ADE/validation/home_or_hotel/kitchen/ADE_val_00000001.jpg"
    assert im["mask_path"].iloc[1].endswith("ADE_val_00000001_seg.png")
    assert (im["width"] == 16).all() and (im["height"] == 12).all() and im["bbox"].isna().all()


def test_ade_reader_bad_mask_and_explicit_classes(tmp_path):
    ade = make_ade(tmp_path)
    (ade / "images/ADE/training/home_or_hotel/kitchen/ADE_train_00000004_seg.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (8, 8)).save(ade / "images/ADE/training/home_or_hotel/living_room/ADE_train_00000003_seg.png")
    idx = read_places_ade20k(ade, class_names=["Kitchen", "/l/living_room"])
    assert idx.class_names == ["kitchen", "living room"] and list(idx.images["image_id"]) == [2]
    reasons = {b["image_id"]: b["reason"] for b in idx.bad_inputs}
    assert set(reasons) == {4, 5}
    assert reasons[4].endswith("_seg.png is (8, 8), image is (16, 12) (width, height)")
    assert "ADE_train_00000004_seg.png: unreadable image" in reasons[5]
    assert {b["path"] for b in idx.bad_inputs} == {
        "ADE20K_2021_17_01/images/ADE/training/home_or_hotel/living_room/ADE_train_00000003.jpg",
        "ADE20K_2021_17_01/images/ADE/training/home_or_hotel/kitchen/ADE_train_00000004.jpg"}
    with pytest.raises(InputError, match="no images of scene 'office'"):
        read_places_ade20k(ade, class_names=["office"])


def test_places_categories_and_file_lists(tmp_path):
    make_ade(tmp_path)
    places = tmp_path / "places365"
    (places / "val_256").mkdir(parents=True)
    (places / "categories_places365.txt").write_text("/b/bathroom 0\n/k/kitchen 1\n/l/living_room 2\n/s/street 3\n")
    (places / "places365_train_standard.txt").write_text("/b/bathroom/00000001.jpg 0\n")
    (places / "places365_val.txt").write_text("Places365_val_00000001.jpg 1\nPlaces365_val_00000002.jpg 3\n")
    Image.new("RGB", (20, 10)).save(places / "val_256/Places365_val_00000001.jpg")
    assert read_places_categories(places / "categories_places365.txt")[2] == "/l/living_room"
    idx = read_places_ade20k(tmp_path, places_root=places)
    last = idx.images.iloc[-1]
    assert (last["path"], last["label"], last["split"], last["mask_path"]) == (
        "places365/val_256/Places365_val_00000001.jpg", 1, "test", None)
    assert (last["width"], last["height"]) == (20, 10) and len(idx.images) == 5
    from tasks.download import places_notes

    assert places_notes(idx, places) == [] and places_notes(read_places_ade20k(tmp_path), None) == []
    (places / "val_256/Places365_val_00000001.jpg").unlink()  # no Places image left: the report says so
    assert places_notes(read_places_ade20k(tmp_path, places_root=places), places) == [
        f"dataset: no Places365 images were found under {places} (file lists or image folders missing); "
        "the explainers were trained on ADE20K images only"]
    (places / "categories_places365.txt").write_text("/b/bathroom 0\nkitchen 1\n")
    with pytest.raises(InputError, match=r"categories_places365.txt:2: expected '/x/name index'"):
        read_places_ade20k(tmp_path, places_root=places)


def test_scene_keys():
    assert scene_key("/h/home_office") == scene_key("/home_office") == scene_key("Home office") == "home office"
    assert scene_key("/a/apartment_building/outdoor") == "apartment building outdoor"


def test_ade_index_refuses_foreign_pickles(tmp_path):
    ade = tmp_path / "ADE20K_2021_17_01"
    ade.mkdir()
    (ade / "index_ade20k.pkl").write_bytes(pickle.dumps({"filename": [], "folder": [], "scene": [Path("x")]}))
    with pytest.raises(InputError, match="refusing to load pathlib"):
        read_places_ade20k(tmp_path)
    (ade / "index_ade20k.pkl").write_bytes(pickle.dumps({"filename": ["a.jpg"], "folder": [], "scene": []}))
    with pytest.raises(InputError, match="'folder' has 0 entries, filename has 1"):
        read_places_ade20k(tmp_path)


def test_manifest_fingerprint_sees_regenerated_images_under_the_same_names(cub):
    before = read_cub(cub).manifest_fingerprint()
    assert read_cub(cub).manifest_fingerprint() == before  # stable when nothing changed
    path = cub / "images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    noisy = np.random.default_rng(3).integers(0, 255, (30, 30, 3), dtype=np.uint8)  # same name, same 30x30 size
    Image.fromarray(noisy).save(path, quality=95)
    after = read_cub(cub)
    assert (after.images["width"].tolist(), after.images["height"].tolist()) == ([50, 60, 30], [40, 45, 30])
    assert after.manifest_fingerprint() != before


def test_manifest_fingerprint_follows_the_synthetic_generator_version(tmp_path, monkeypatch):
    from srae.datasets import synthetic

    root = synthetic.make_synthbirds(tmp_path, classes=2, per_class=2, size=32)
    v1 = read_cub(root, name="synthbirds").manifest_fingerprint()
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    synthetic.make_synthbirds(tmp_path, classes=2, per_class=2, size=32)  # same drawing, new version
    stamp = json.loads((root / "synth.json").read_text())
    assert stamp["params"]["version"] == synthetic.GENERATOR_VERSION
    assert read_cub(root, name="synthbirds").manifest_fingerprint() != v1


def test_synthrooms_manifest_includes_the_generator_stamp(tmp_path):
    from srae.datasets.ade20k import read_places_ade20k
    from srae.datasets.common import _synth_stamp
    from srae.datasets.synthetic import make_synthrooms

    ade = make_synthrooms(tmp_path, classes=2, per_class=3, size=40, seed=1, design="unique")
    idx = read_places_ade20k(tmp_path, places_root=tmp_path / "places365")
    assert _synth_stamp(Path(idx.root)) == json.loads((ade / "synth.json").read_text())
    before = idx.manifest_fingerprint()
    stamp = json.loads((ade / "synth.json").read_text())
    stamp["params"]["version"] = -1  # as if written by another generator version
    (ade / "synth.json").write_text(json.dumps(stamp))
    assert read_places_ade20k(tmp_path, places_root=tmp_path / "places365").manifest_fingerprint() != before
