"""``synthrooms``: room scenes written in the ADE20K full format (plus a Places365 categories file).

Each image is a room (wall, ceiling, floor) with a few shared furniture objects drawn in
muted colours (nuisance common to all classes) and the class's two evidence objects, each
with its own saturated colour and shape. The *design* (:func:`design_rooms`) picks them:
``unique`` gives each room its own two objects (kitchen: stove + refrigerator; one object
alone identifies the room; each is present with probability 0.85, at least one);
``factorial`` (3 or more rooms) shares every object between two rooms, so only the pair
identifies a room, and draws both always. Masks use the ADE20K ``*_seg.png`` encoding
(class ``(R // 10) * 256 + G``, instance in B), the index is an ``index_ade20k.pkl`` like
the official one, and ``evidence.json`` names each room's evidence objects.

A scene is sampled (:func:`sample_room`) then painted (:func:`paint_room`), so
:func:`room_counterfactuals` can repaint one object in a nuisance colour and leave
everything else (shapes, other colours, noise) as it was.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from srae.datasets import drawing as dr
from srae.datasets.ade20k import ADE_DIRNAME, ADE_INDEX_FILE, EVIDENCE_FILE, PAPER_ROOMS, PLACES_CATEGORIES
from srae.errors import InputError

ROOM_OBJECTS: dict[str, tuple[str, str]] = {
    "bathroom": ("toilet", "bathtub"), "bedroom": ("bed", "pillow"),
    "conference room": ("conference table", "projection screen"), "dining room": ("dining table", "chandelier"),
    "home office": ("desk", "computer"), "hotel room": ("suitcase", "nightstand"),
    "kitchen": ("stove", "refrigerator"), "living room": ("sofa", "fireplace"),
    "office": ("swivel chair", "filing cabinet"), "waiting room": ("bench", "clock"),
}
SHARED = ("wall", "floor", "ceiling", "windowpane", "door", "painting", "lamp", "plant", "rug", "cabinet", "chair")
OBJECT_NAMES: tuple[str, ...] = SHARED + tuple(o for pair in ROOM_OBJECTS.values() for o in pair)
OBJECT_ID = {name: k + 1 for k, name in enumerate(OBJECT_NAMES)}
KIND = {
    "windowpane": "wall_rect", "door": "door", "painting": "wall_rect", "lamp": "hang", "plant": "plant",
    "rug": "floor_disc", "cabinet": "floor_box", "chair": "chair", "toilet": "floor_box", "bathtub": "floor_wide",
    "bed": "floor_wide", "pillow": "floor_disc", "conference table": "table", "projection screen": "wall_rect",
    "dining table": "table", "chandelier": "hang", "desk": "table", "computer": "wall_rect", "suitcase": "floor_box",
    "nightstand": "floor_box", "stove": "floor_box", "refrigerator": "floor_tall", "sofa": "floor_wide",
    "fireplace": "door", "swivel chair": "chair", "filing cabinet": "floor_tall", "bench": "table",
    "clock": "wall_disc",
}
ROOM_DESIGNS = ("factorial", "unique")  # see design_rooms
_GROUP = {"conference room": "work_place", "office": "work_place", "waiting room": "work_place"}


def _evidence_colour(k: int) -> np.ndarray:
    """Saturated colour number ``k`` of 20 (hues 18 degrees apart, alternating brightness)."""
    r, g, b = colorsys.hsv_to_rgb((k * 7 % 20) / 20.0, 0.85, 0.95 if k % 2 == 0 else 0.7)
    return np.array([r, g, b]) * 255.0


def _shape(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int, horizon: float,
           ceil: float) -> tuple[np.ndarray, float]:
    """Coverage of one object of ``kind`` at a random place, and its depth key (bottom y)."""
    s = float(size)
    rect = lambda x0, y0, x1, y1: dr.polygon(x, y, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], 1.0)  # noqa: E731
    if kind in ("wall_rect", "wall_disc"):
        w, h = s * rng.uniform(0.14, 0.28), s * rng.uniform(0.1, 0.22)
        x0, y0 = rng.uniform(0, s - w), rng.uniform(ceil + 2, max(ceil + 3, horizon - h - 2))
        if kind == "wall_disc":
            r = min(w, h) / 2
            return dr.ellipse(x, y, (x0 + r, y0 + r), r, r, 0.0, 1.0), 0.0
        return rect(x0, y0, x0 + w, y0 + h), 0.0
    if kind == "hang":
        cx, drop = rng.uniform(0.15 * s, 0.85 * s), s * rng.uniform(0.08, 0.2)
        a = dr.capsule(x, y, (cx, ceil - 2), (cx, ceil + drop), 0.8, 1.0)
        return np.maximum(a, dr.ellipse(x, y, (cx, ceil + drop), s * 0.09, s * 0.05, 0.0, 1.0)), 1e9
    bottom = rng.uniform(horizon + 0.04 * s, s - 1)
    if kind == "floor_disc":
        cx, a_ = rng.uniform(0.1 * s, 0.9 * s), s * rng.uniform(0.08, 0.2)
        return dr.ellipse(x, y, (cx, bottom - a_ * 0.3), a_, a_ * 0.35, 0.0, 1.0), bottom - 0.5 * s
    sizes = {"floor_box": (0.14, 0.24, 0.16, 0.26), "floor_tall": (0.12, 0.2, 0.38, 0.55),
             "floor_wide": (0.32, 0.5, 0.12, 0.2), "door": (0.14, 0.2, 0.4, 0.5),
             "table": (0.25, 0.42, 0.12, 0.2), "chair": (0.1, 0.16, 0.16, 0.24), "plant": (0.1, 0.16, 0.2, 0.3)}
    w0, w1, h0, h1 = sizes[kind]
    w, h = s * rng.uniform(w0, w1), s * rng.uniform(h0, h1)
    if kind == "door":
        bottom = horizon + 1
    x0 = rng.uniform(0, s - w)
    if kind == "table":
        a = rect(x0, bottom - h, x0 + w, bottom - h + 0.25 * h)
        for lx in (x0 + 0.1 * w, x0 + 0.9 * w):
            a = np.maximum(a, dr.capsule(x, y, (lx, bottom - h), (lx, bottom), max(0.8, 0.03 * w), 1.0))
        return a, bottom
    if kind == "chair":
        seat, back = rect(x0, bottom - 0.5 * h, x0 + w, bottom - 0.35 * h), rect(x0, bottom - h, x0 + 0.2 * w, bottom)
        a = np.maximum(seat, back)
        return np.maximum(a, rect(x0 + 0.8 * w, bottom - 0.5 * h, x0 + w, bottom)), bottom
    if kind == "plant":
        a = rect(x0 + 0.25 * w, bottom - 0.35 * h, x0 + 0.75 * w, bottom)
        return np.maximum(a, dr.ellipse(x, y, (x0 + w / 2, bottom - 0.65 * h), w / 2, 0.35 * h, 0.0, 1.0)), bottom
    return rect(x0, bottom - h, x0 + w, bottom), bottom


@dataclass(frozen=True)
class SceneObject:
    """One painted object of a sampled room: coverage ``alpha`` (H x W in [0, 1]), depth key
    (painting order: smaller first) and RGB ``colour`` (0-255 floats)."""

    name: str
    alpha: np.ndarray
    depth: float
    colour: np.ndarray


@dataclass(frozen=True)
class RoomScene:
    """A sampled room before painting: objects in painting order (walls first, then far-to-near
    floor objects, hanging ones last), the image noise, and the design's evidence pair."""

    size: int
    objects: tuple[SceneObject, ...]
    noise: np.ndarray
    evidence: tuple[str, str]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def control(self) -> str:
        """The control object: the first shared furniture object (not wall/floor/ceiling, not
        evidence) in painting order. Every room has 2 or 3 of them."""
        return next(o.name for o in self.objects if o.name in SHARED[3:] and o.name not in self.evidence)

    def swap_rng(self, name: str) -> np.random.Generator:
        """A generator for the nuisance colour of swapped object ``name``, derived from this
        scene's own draw (its noise and colours), independent of the scene's generator."""
        h = hashlib.sha256(np.ascontiguousarray(self.noise).tobytes())
        for o in self.objects:
            h.update(np.asarray(o.colour, dtype=np.float64).tobytes())
        words = np.frombuffer(h.digest()[:16], dtype=np.uint32).tolist()
        return np.random.default_rng([*words, OBJECT_ID[name], 7919])


def sample_room(rng: np.random.Generator, room: str, size: int, *,
                evidence: tuple[str, str] | None = None) -> RoomScene:
    """Sample one room scene (shapes, colours, noise) without painting it.

    ``evidence=None`` is the ``unique`` design: the room's own :data:`ROOM_OBJECTS`, each
    present with probability 0.85 (at least one). A pair (from :func:`design_rooms`) draws
    both objects, always.
    """
    if room not in ROOM_OBJECTS:
        raise InputError(f"synthrooms: unknown room {room!r}; known: {', '.join(ROOM_OBJECTS)}")
    x, y = dr.pixel_grid(size)
    horizon, ceil = size * rng.uniform(0.55, 0.7), size * rng.uniform(0.06, 0.12)
    objects: list[SceneObject] = []
    for name, alpha in (("wall", np.ones((size, size))), ("ceiling", dr.halfplane(x, y, (0, ceil), (0, -1), 1.0)),
                        ("floor", dr.halfplane(x, y, (0, horizon), (0, 1), 1.0))):
        tone = {"wall": (0.55, 0.9), "ceiling": (0.8, 0.95), "floor": (0.3, 0.6)}[name]
        objects.append(SceneObject(name, alpha, -1.0, dr.muted_colour(rng, sat=(0.05, 0.3), val=tone)))
    for name in rng.choice(SHARED[3:], size=int(rng.integers(2, 4)), replace=False):
        alpha, depth = _shape(KIND[str(name)], rng, x, y, size, horizon, ceil)
        objects.append(SceneObject(str(name), alpha, depth,
                                   dr.muted_colour(rng, sat=(0.05, 0.35), val=(0.25, 0.8))))
    if evidence is None:
        a, b = pair = ROOM_OBJECTS[room]
        present = [o for o in (a, b) if rng.random() < 0.85] or [a if rng.random() < 0.5 else b]
    else:
        pair = (str(evidence[0]), str(evidence[1]))
        unknown = [o for o in pair if o not in OBJECT_NAMES[len(SHARED):]]
        if unknown or pair[0] == pair[1]:
            raise InputError(f"synthrooms: evidence must be two different room objects, got {list(pair)}")
        present = list(pair)
    for name in present:
        alpha, depth = _shape(KIND[name], rng, x, y, size, horizon, ceil)
        colour = _evidence_colour(OBJECT_NAMES.index(name) - len(SHARED)) * rng.uniform(0.9, 1.05)
        objects.append(SceneObject(name, alpha, depth, colour))
    objects.sort(key=lambda o: o.depth)  # walls first, then far-to-near floor objects, hanging ones last
    noise = 6.0 * dr.smooth_noise(rng, (size, size), 5)[..., None] + rng.normal(0, 3.0, (size, size, 3))
    return RoomScene(size, tuple(objects), noise, pair)


def paint_room(scene: RoomScene, swap: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint ``scene``: uint8 image, object class map (0 = unlabeled) and instance map.

    ``swap`` (an object name, or ``"control"`` for :meth:`RoomScene.control`) repaints that
    object in a muted nuisance colour from :meth:`RoomScene.swap_rng`; everything else (shapes,
    other colours, noise, the maps) is unchanged. An object absent from the scene (an
    evidence object the unique design left out) changes nothing.
    """
    if swap is not None and swap != "control" and swap not in OBJECT_ID:
        raise InputError(f"synthrooms: cannot swap {swap!r}: not an object name or 'control'")
    target = scene.control() if swap == "control" else swap
    size = scene.size
    img = np.zeros((size, size, 3))
    cls = np.zeros((size, size), dtype=np.int32)
    inst = np.zeros((size, size), dtype=np.int32)
    for instance, o in enumerate(scene.objects, start=1):
        colour = o.colour
        if target is not None and o.name == target:
            colour = dr.muted_colour(scene.swap_rng(o.name), sat=(0.05, 0.35), val=(0.25, 0.8))
        dr.paint(img, o.alpha, colour)
        hit = o.alpha > 0.5
        cls[hit], inst[hit] = OBJECT_ID[o.name], instance
    img += scene.noise
    return np.clip(img, 0, 255).round().astype(np.uint8), cls, inst


def draw_room(rng: np.random.Generator, room: str, size: int, *, evidence: tuple[str, str] | None = None,
              swap: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One room (:func:`sample_room` then :func:`paint_room`): uint8 image, object class map
    (0 = unlabeled) and instance map. ``evidence=None`` is the unique design's drawing."""
    return paint_room(sample_room(rng, room, size, evidence=evidence), swap)


def design_rooms(rooms: list[str], design: str = "factorial") -> list[tuple[str, str]]:
    """The two evidence objects of each room in ``rooms`` under ``design``.

    ``unique``: each room's own :data:`ROOM_OBJECTS` (one object alone identifies the room).
    ``factorial`` (3 or more rooms): with ``A_c`` the first own object of room c, room c gets
    ``(A_c, A_{(c+1) mod k})``: every object is shared by exactly two rooms, only the pair
    identifies a room.
    """
    if design not in ROOM_DESIGNS:
        raise InputError(f"synthrooms: unknown design {design!r}; valid designs: {', '.join(ROOM_DESIGNS)}")
    rooms = [str(r) for r in rooms]
    unknown = [r for r in rooms if r not in ROOM_OBJECTS]
    if unknown:
        raise InputError(f"synthrooms: unknown rooms {unknown}; known: {', '.join(ROOM_OBJECTS)}")
    if len(set(rooms)) != len(rooms):
        raise InputError(f"synthrooms: rooms repeat: {rooms}")
    if design == "unique":
        return [ROOM_OBJECTS[r] for r in rooms]
    k = len(rooms)
    if k < 3:
        raise InputError(f"synthrooms: design factorial needs at least 3 room classes, got {k} (with 2, each "
                         "room would be identified by its one unshared object); use design: unique")
    first = [ROOM_OBJECTS[r][0] for r in rooms]
    return [(first[c], first[(c + 1) % k]) for c in range(k)]


def _params_rooms(params: dict) -> tuple[list[str], str]:
    if params.get("generator") != "synthrooms":
        raise InputError(f"synthrooms: params are not a synthrooms stamp: {params.get('generator')!r}")
    # stamps written before designs existed were drawn with the unique design
    return list(PAPER_ROOMS[: int(params["classes"])]), str(params.get("design", "unique"))


def room_evidence(params: dict, c: int) -> list[str]:
    """Room ``c``'s two evidence objects in the dataset ``params`` (``synth.json``'s ``params``) describe."""
    rooms, design = _params_rooms(params)
    if not 0 <= c < len(rooms):
        raise InputError(f"synthrooms: room class {c} out of range 0..{len(rooms) - 1}")
    return list(design_rooms(rooms, design)[c])


def room_counterfactuals(params: dict, c: int, j: int,
                         parts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Room ``c``'s draw ``j`` as :func:`write_synthrooms` drew it (before JPEG) under ``"original"``,
    and for each name in ``parts`` (default: the room's evidence objects, then ``"control"``) the
    same scene with that object repainted in a nuisance colour (see :func:`paint_room`)."""
    rooms, design = _params_rooms(params)
    evidence = room_evidence(params, c)
    if not 0 <= j < int(params["per_class"]):
        raise InputError(f"synthrooms: draw {j} out of range 0..{int(params['per_class']) - 1}")
    parts = [*evidence, "control"] if parts is None else [str(p) for p in parts]
    rng = np.random.default_rng([int(params["seed"]), c, j, 1])
    scene = sample_room(rng, rooms[c], int(params["size"]),
                        evidence=None if design == "unique" else (evidence[0], evidence[1]))
    out = {"original": paint_room(scene)[0]}
    for part in parts:
        out[part] = paint_room(scene, part)[0]
    return out


def encode_seg(cls: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """ADE20K ``_seg.png`` pixels: R = (class // 256) * 10, G = class % 256, B = instance."""
    return np.stack([(cls // 256) * 10, cls % 256, inst % 256], axis=-1).astype(np.uint8)


def write_synthrooms(out: Path, classes: int, per_class: int, size: int, seed: int, train_fraction: float,
                     design: str = "factorial") -> Path:
    """Write ``synthrooms`` under ``out``; return ``out/ADE20K_2021_17_01`` (see module doc).

    ``design`` picks each room's two evidence objects (:func:`design_rooms`); room c's draw j
    uses ``np.random.default_rng([seed, c, j, 1])`` (:func:`room_counterfactuals` redraws it).
    """
    from srae.datasets.synthetic import GENERATOR_VERSION, STAMP, publish, save_jpeg, staged

    if classes > len(PAPER_ROOMS):
        raise InputError(f"synthrooms: at most {len(PAPER_ROOMS)} room classes, asked for {classes}")
    rooms = list(PAPER_ROOMS[:classes])
    pairs = design_rooms(rooms, design)
    params = {"generator": "synthrooms", "version": GENERATOR_VERSION, "classes": classes, "per_class": per_class,
              "size": size, "seed": seed, "train_fraction": train_fraction, "design": design}
    final = out / ADE_DIRNAME
    places = out / "places365"
    with staged(final, params) as tmp:
        if tmp is not None:
            n_train = min(per_class - 1, max(1, round(train_fraction * per_class)))
            index: dict = {"filename": [], "folder": [], "scene": [], "objectnames": list(OBJECT_NAMES)}
            presence: list[np.ndarray] = []
            counters = {"train": 0, "val": 0}
            for c, room in enumerate(rooms):
                train = set(np.random.default_rng([seed, c, 104729]).permutation(per_class)[:n_train].tolist())
                for j in range(per_class):
                    pixels, cls, inst = draw_room(np.random.default_rng([seed, c, j, 1]), room, size,
                                                  evidence=None if design == "unique" else pairs[c])
                    split = "train" if j in train else "val"
                    counters[split] += 1
                    folder = (f"{ADE_DIRNAME}/images/ADE/{'training' if split == 'train' else 'validation'}/"
                              f"{_GROUP.get(room, 'home_or_hotel')}/{room.replace(' ', '_')}")
                    stem = f"ADE_{split}_{counters[split]:08d}"
                    rel = Path(folder).relative_to(ADE_DIRNAME)
                    save_jpeg(tmp / rel / f"{stem}.jpg", pixels)
                    Image.fromarray(encode_seg(cls, inst)).save(tmp / rel / f"{stem}_seg.png")
                    index["filename"].append(f"{stem}.jpg")
                    index["folder"].append(folder)
                    index["scene"].append("/" + room.replace(" ", "_"))
                    counts = np.zeros(len(OBJECT_NAMES), dtype=np.int32)
                    for k in np.unique(inst[inst > 0]):
                        counts[cls[inst == k][0] - 1] += 1
                    presence.append(counts)
            index["objectPresence"] = np.stack(presence, axis=1)
            index["description"] = {"generator": "srae synthrooms",
                                    "objectnames": "class k of *_seg.png is objectnames[k-1]"}
            with open(tmp / ADE_INDEX_FILE, "wb") as fh:
                pickle.dump(index, fh, protocol=4)
            evidence = {room: list(pair) for room, pair in zip(rooms, pairs)}
            (tmp / EVIDENCE_FILE).write_text(json.dumps(evidence, indent=1))
            publish(tmp, final, params, {"traits": evidence})
    places.mkdir(parents=True, exist_ok=True)
    cat = places / PLACES_CATEGORIES
    if cat.exists() and not (places / STAMP).exists():
        raise InputError(f"{cat} exists and is not synthetic; refusing to overwrite it")
    cat.write_text("".join(f"/{r[0]}/{r.replace(' ', '_')} {i}\n" for i, r in enumerate(rooms)))
    (places / STAMP).write_text(json.dumps({"params": params, "complete": True}))
    return final
