"""``synthbirds``: procedurally drawn birds written in the exact CUB-200-2011 layout.

Each bird is built from soft-edged shapes in a canonical frame (facing +u, v up, body
length ~1) and mapped to the image by a random pose: scale, rotation, position and a
horizontal flip. A bird facing right shows its *right* side, so its near eye, wing and leg
are the right ones; flipping mirrors the drawing and swaps every left/right label.

A class is defined by two *traits*: a vivid colour (and, for wings, a pattern) on one
evidence slot (crown, wing, breast or tail). Every other part is drawn in dull colours
drawn at random for each image and shared by all classes, so only the evidence parts
carry the class. Backgrounds are muted clutter plus a perch; occluding leaves hide parts,
which are then annotated invisible. Part keypoints are the centres of the visible part
pixels and the bounding box is the tight box of the bird's pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srae.datasets import drawing as dr
from srae.datasets.cub import CUB_PART_NAMES
from srae.errors import InputError

PART_ID = {name: k + 1 for k, name in enumerate(CUB_PART_NAMES)}  # label-map value = CUB part id
SLOTS: dict[str, tuple[str, ...]] = {
    "crown": ("crown", "forehead"),
    "wing": ("left wing", "right wing"),
    "breast": ("breast", "throat"),
    "tail": ("tail",),
}
# Saturated hues at least ~55 degrees apart, so no two are confused at low resolution.
VIVID: dict[str, tuple[int, int, int]] = {
    "red": (235, 20, 30), "yellow": (250, 225, 10), "green": (30, 205, 45),
    "cyan": (10, 215, 225), "blue": (35, 45, 250), "magenta": (225, 30, 220),
}
PATTERNS: tuple[str, ...] = ("solid", "barred", "spotted")
# Canonical geometry (units of body length; facing +u): head centre and radius, and the
# points occluding leaves are centred near (head, back, wing, breast, tail, legs).
HEAD = (0.38, 0.31)
HEAD_R = 0.19
ANCHORS = ((0.36, 0.42), (0.0, 0.14), (-0.07, 0.04), (0.26, 0.01), (-0.55, -0.22), (0.05, -0.30))
# Tail length and half-width at the tip (body lengths), drawn per bird.
TAIL_LEN = (0.34, 0.46)
TAIL_SPREAD = (0.08, 0.12)
_ADJ = {"crown": "crowned", "wing": "winged", "breast": "breasted", "tail": "tailed"}
# Dull bird tones (saturation <= 0.4): nuisance colours shared by every class.
DULL: tuple[tuple[int, int, int], ...] = (
    (120, 100, 80), (150, 132, 108), (96, 94, 90), (176, 170, 160), (112, 106, 74),
    (72, 62, 52), (192, 182, 152), (136, 122, 116), (64, 68, 74), (158, 150, 140),
)


@dataclass(frozen=True)
class Trait:
    """A class trait: a vivid colour (and wing pattern) on one evidence slot."""

    slot: str
    colour: str
    pattern: str = "solid"

    def words(self) -> str:
        pat = f"_{self.pattern}" if self.pattern != "solid" else ""
        return f"{self.colour.capitalize()}{pat}_{_ADJ[self.slot]}"


DESIGNS: tuple[str, ...] = ("factorial", "unique")
# Evidence slots of the factorial design, in the order they are used: the two largest evidence
# areas first, so a class's two traits carry comparable weight (see :func:`factorial_classes`).
FACTORIAL_SLOTS: tuple[str, ...] = ("wing", "tail", "breast", "crown")
# Where each slot starts in the seeded colour order: the first traits of different slots get
# different colours, so a colour alone never says which slot it is on in small designs.
_COLOUR_OFFSET = {"wing": 0, "tail": 3, "breast": 5, "crown": 2}


def design_classes(k: int, seed: int, design: str = "factorial") -> list[tuple[Trait, Trait]]:
    """``k`` distinct trait pairs, one per class, by the named ``design``.

    ``factorial`` (the default, :func:`factorial_classes`): every trait is shared by at least
    two classes (from 3 classes on), so only the combination of a class's two traits tells it
    apart and its negatives include the classes that share one of them. ``unique``
    (:func:`unique_classes`): traits spread as evenly as possible, so with few classes each
    class has a trait no other class has and one part suffices to recognise it.
    """
    if design == "factorial":
        return factorial_classes(k, seed)
    if design == "unique":
        return unique_classes(k, seed)
    raise InputError(f"synthbirds: unknown class design {design!r} (one of {', '.join(DESIGNS)})")


def _all_pairs() -> list[tuple[Trait, Trait]]:
    traits = [Trait(s, c, p) for s in SLOTS for c in VIVID for p in (PATTERNS if s == "wing" else ("solid",))]
    return [(a, b) for a, b in itertools.combinations(traits, 2) if a.slot != b.slot]


def _cycle_slots(t: int) -> list[str]:
    """Slots of ``t`` traits laid on a cycle, neighbours (and first/last) in different slots.

    Up to 12 traits use the first two factorial slots alternately (an odd count ends on the
    third), beyond that all four slots in turn."""
    if t <= 2 * len(VIVID):
        seq = [FACTORIAL_SLOTS[i % 2] for i in range(t)]
    else:
        seq = [FACTORIAL_SLOTS[i % len(FACTORIAL_SLOTS)] for i in range(t)]
    if t > 2 and seq[-1] == seq[0]:
        seq[-1] = next(s for s in FACTORIAL_SLOTS if s not in (seq[0], seq[-2]))
    return seq


def _cycle_traits(t: int, seed: int) -> list[Trait]:
    """``t`` distinct traits on a cycle: per slot the colours in a seeded order, each slot's
    order offset so that neighbours on the cycle differ in colour as well as slot."""
    colours = [list(VIVID)[i] for i in np.random.default_rng([seed, 7927]).permutation(len(VIVID))]
    slots = _cycle_slots(t)
    used: dict[str, int] = {}
    out: list[Trait] = []
    for s in slots:
        n = used.get(s, 0)
        used[s] = n + 1
        offset = _COLOUR_OFFSET[s]
        colour = colours[(n + offset) % len(colours)]
        rounds = n // len(VIVID)
        if s == "wing":
            pattern = PATTERNS[rounds % len(PATTERNS)]
        elif rounds:
            raise InputError(f"synthbirds: the factorial design has no more distinct {s} traits ({t} asked)")
        else:
            pattern = "solid"
        out.append(Trait(s, colour, pattern))
    return out


def factorial_classes(k: int, seed: int) -> list[tuple[Trait, Trait]]:
    """Classes whose traits are all shared: a cycle of traits, class ``i`` = traits ``i, i+1``.

    With ``k >= 3`` classes ``min(k, T)`` traits (``T`` distinct ones available) are laid on a
    cycle and class ``i`` takes neighbours ``i`` and ``i + 1``, so every trait belongs to exactly
    two classes (4 classes on two slots: the 2 x 2 factorial wing {A, B} x tail {C, D}); classes
    beyond the cycle (more than 24) are further cross-slot pairs of the cycle's traits that raise
    the fewest trait counts (up to 216 classes; beyond, new wing patterns join). With 2
    classes the closest design shares one trait (each class keeps one trait of its own).
    """
    pairs = _all_pairs()
    if k > len(pairs):
        raise InputError(f"synthbirds: at most {len(pairs)} classes can be told apart, asked for {k}")
    if k == 2:
        a, b, c = _cycle_traits(3, seed)
        return [_ordered(a, b), _ordered(a, c)]
    ring = _cycle_traits(min(k, 24), seed)
    chosen = [_ordered(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]
    degree = {t: 2 for t in ring}
    taken = {frozenset(p) for p in chosen}
    order = np.random.default_rng([seed, 7933]).permutation(len(pairs))
    while len(chosen) < k:
        best = min((i for i in order if frozenset(pairs[i]) not in taken),
                   key=lambda i: ((pairs[i][0] not in degree) + (pairs[i][1] not in degree),
                                  degree.get(pairs[i][0], 0) + degree.get(pairs[i][1], 0)))
        a, b = pairs[best]
        taken.add(frozenset((a, b)))
        for t in (a, b):
            degree[t] = degree.get(t, 0) + 1
        chosen.append((a, b))
    return chosen


def _ordered(a: Trait, b: Trait) -> tuple[Trait, Trait]:
    """A pair in slot order (crown, wing, breast, tail), as class names list them."""
    order = list(SLOTS)
    return (a, b) if order.index(a.slot) <= order.index(b.slot) else (b, a)


def unique_classes(k: int, seed: int) -> list[tuple[Trait, Trait]]:
    """``k`` distinct trait pairs, spreading (slot, colour) use as evenly as possible."""
    pairs = _all_pairs()
    if k > len(pairs):
        raise InputError(f"synthbirds: at most {len(pairs)} classes can be told apart, asked for {k}")
    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(len(pairs))
    used_sc: dict[tuple[str, str], int] = {}
    used_slot: dict[str, int] = {}
    used_colour: dict[str, int] = {}
    used_pair: dict[frozenset[str], int] = {}
    chosen: list[tuple[Trait, Trait]] = []
    taken: set[int] = set()
    for _ in range(k):
        def cost(i: int) -> float:
            a, b = pairs[i]
            sc = used_sc.get((a.slot, a.colour), 0) + used_sc.get((b.slot, b.colour), 0)
            pat = (a.pattern != "solid") + (b.pattern != "solid")  # plain colours are easiest to see
            same = a.colour == b.colour  # two different colours make two distinct evidence parts
            colour = used_colour.get(a.colour, 0) + used_colour.get(b.colour, 0)  # few classes: no shared colour
            slot = used_slot.get(a.slot, 0) + used_slot.get(b.slot, 0)
            pair = used_pair.get(frozenset((a.colour, b.colour)), 0)  # the colour pair alone names the class
            return 6.0 * pair + 4.0 * sc + 1.5 * colour + 1.0 * slot + 0.5 * pat + 2.0 * same
        best = min((i for i in order if i not in taken), key=cost)
        taken.add(best)
        a, b = pairs[best]
        for t in (a, b):
            used_sc[(t.slot, t.colour)] = used_sc.get((t.slot, t.colour), 0) + 1
            used_slot[t.slot] = used_slot.get(t.slot, 0) + 1
            used_colour[t.colour] = used_colour.get(t.colour, 0) + 1
        used_pair[frozenset((a.colour, b.colour))] = used_pair.get(frozenset((a.colour, b.colour)), 0) + 1
        chosen.append((a, b))
    return chosen


def class_name(index: int, pair: tuple[Trait, Trait]) -> str:
    """CUB-style class directory name, e.g. ``001.Red_crowned_Blue_barred_winged_Bird``."""
    return f"{index + 1:03d}." + "_".join(t.words() for t in pair) + "_Bird"


def evidence_parts(pair: tuple[Trait, Trait]) -> list[str]:
    """The CUB part names carrying a class's evidence, in CUB part order."""
    names = {p for t in pair for p in SLOTS[t.slot]}
    return [p for p in CUB_PART_NAMES if p in names]


@dataclass
class BirdPose:
    """Where the canonical bird lands: centre (pixels), rotation (deg), pixels per unit, flip."""

    cx: float
    cy: float
    theta: float
    k: float
    flip: bool

    def to_canonical(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.deg2rad(self.theta)
        gx, gy = (x - self.cx) / self.k, -(y - self.cy) / self.k
        fu = np.cos(t) * gx + np.sin(t) * gy
        return (-fu if self.flip else fu), -np.sin(t) * gx + np.cos(t) * gy

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        t, fu = np.deg2rad(self.theta), (-u if self.flip else u)
        return (self.cx + self.k * (np.cos(t) * fu - np.sin(t) * v),
                self.cy - self.k * (np.sin(t) * fu + np.cos(t) * v))


@dataclass
class BirdLook:
    """Colours and shape details of one bird (RGB 0-255 floats)."""

    body: np.ndarray
    head: np.ndarray
    belly: np.ndarray
    crown: np.ndarray
    breast: np.ndarray
    wing: np.ndarray
    tail: np.ndarray
    beak: np.ndarray
    legs: np.ndarray
    wing_pattern: str = "solid"
    pattern_shade: float = 0.35  # brightness of the pattern marks relative to the wing colour
    far_wing: bool = True
    beak_len: float = 0.14
    tail_len: float = 0.38
    tail_spread: float = 0.08
    branch: np.ndarray | None = field(default_factory=lambda: np.array([90.0, 70.0, 50.0]))  # None: no perch
    occluder: tuple | None = None  # ((u, v), a, b, rot, colour) in canonical units


@dataclass
class BirdRender:
    """A rendered bird: image, part label maps (after / before occlusion) and bird coverage."""

    image: np.ndarray
    labels: np.ndarray
    labels_unoccluded: np.ndarray
    alpha: np.ndarray


def _dull(rng: np.random.Generator) -> np.ndarray:
    base = np.array(DULL[rng.integers(len(DULL))], dtype=float)
    return np.clip(base * rng.uniform(0.88, 1.12) + rng.normal(0, 5, 3), 0, 255)


def _vivid(rng: np.random.Generator, name: str) -> np.ndarray:
    return np.clip(np.array(VIVID[name], dtype=float) * rng.uniform(0.9, 1.03), 0, 255)


def sample_look(rng: np.random.Generator, pair: tuple[Trait, Trait], occlusion: float) -> BirdLook:
    """Random nuisance colours/shapes; the class's two traits painted vivid."""
    look = BirdLook(body=_dull(rng), head=_dull(rng), belly=_dull(rng), crown=_dull(rng),
                    breast=_dull(rng), wing=_dull(rng), tail=_dull(rng), beak=_dull(rng) * 0.6,
                    legs=_dull(rng), wing_pattern=str(rng.choice(PATTERNS)), pattern_shade=rng.uniform(0.72, 0.85),
                    far_wing=bool(rng.random() < 0.6), beak_len=rng.uniform(0.10, 0.17),
                    tail_len=rng.uniform(*TAIL_LEN), tail_spread=rng.uniform(*TAIL_SPREAD),
                    branch=dr.muted_colour(rng, hue=(0.05, 0.12), sat=(0.2, 0.4), val=(0.25, 0.5)))
    if rng.random() < 0.5:
        look.head = look.body.copy()
    for t in pair:
        setattr(look, t.slot, _vivid(rng, t.colour))
        if t.slot == "wing":
            look.wing_pattern, look.pattern_shade = t.pattern, 0.35  # evidence patterns are bold
    if rng.random() < occlusion:
        anchor = ANCHORS[rng.integers(len(ANCHORS))]
        centre = (anchor[0] + rng.normal(0, 0.04), anchor[1] + rng.normal(0, 0.04))
        colour = dr.muted_colour(rng, hue=(0.18, 0.38), sat=(0.15, 0.35), val=(0.25, 0.5))
        look.occluder = (centre, rng.uniform(0.08, 0.13), rng.uniform(0.05, 0.09), rng.uniform(0, 180), colour)
    return look


def sample_pose(rng: np.random.Generator, size: int) -> BirdPose:
    """Random scale, tilt, flip and a position that keeps the bird inside the frame."""
    k = size * rng.uniform(0.47, 0.58)
    theta = rng.uniform(-15.0, 15.0)
    pose = BirdPose(0.0, 0.0, theta, k, bool(rng.random() < 0.5))
    box = np.array([pose.to_image(u, v) for u, v in ((-0.85, -0.47), (-0.85, 0.48), (0.72, -0.47), (0.72, 0.48))])
    lo, hi = box.min(axis=0), box.max(axis=0)
    margin = 0.02 * size
    cx = rng.uniform(margin - lo[0], max(margin - lo[0], size - margin - hi[0]))
    cy = rng.uniform(margin - lo[1], max(margin - lo[1], size - margin - hi[1]))
    pose.cx, pose.cy = float(cx), float(cy)
    return pose


def _pattern_mask(u: np.ndarray, v: np.ndarray, pattern: str, centre: tuple[float, float], rot: float) -> np.ndarray:
    x, y = dr.local(u, v, centre, rot)
    if pattern == "barred":
        return (np.sin(2 * np.pi * x / 0.13) > 0.2).astype(float)
    if pattern == "spotted":
        px, py = np.mod(x, 0.11) - 0.055, np.mod(y + 0.02, 0.09) - 0.045
        return ((px**2 + py**2) < 0.028**2).astype(float)
    return np.zeros_like(u)


def render_bird(size: int, pose: BirdPose, look: BirdLook, background: np.ndarray) -> BirdRender:
    """Draw one bird over ``background`` (``size x size x 3`` floats); labels hold CUB part ids.

    Each shape is evaluated only inside the crop that bounds it, which keeps drawing cheap.
    """
    x, y = dr.pixel_grid(size)
    u, v = pose.to_canonical(x, y)
    px = 1.0 / pose.k
    img = np.array(background, dtype=np.float64, copy=True)
    labels = np.zeros((size, size), dtype=np.int16)
    bird = np.zeros((size, size))
    near, far = ("left", "right") if pose.flip else ("right", "left")

    def box(points: list[tuple[float, float]], pad: float) -> tuple[slice, slice] | None:
        pts = [pose.to_image(pu, pv) for pu, pv in points]
        return dr.crop((size, size), [p[0] for p in pts], [p[1] for p in pts], pad * pose.k + 2.0)

    def put(sl: tuple[slice, slice] | None, shape: Callable, colour: np.ndarray,
            label: int | Callable | None, is_bird: bool = True) -> None:
        if sl is None:
            return
        uu, vv = u[sl], v[sl]
        alpha = shape(uu, vv)
        dr.paint(img[sl], alpha, colour)
        if label is not None:
            hit = alpha > 0.5
            lab = labels[sl]
            lab[hit] = label(uu, vv)[hit] if callable(label) else label
        if is_bird:
            np.maximum(bird[sl], alpha, out=bird[sl])

    def ell(c: tuple[float, float], a: float, b: float, rot: float) -> Callable:
        return lambda uu, vv: dr.ellipse(uu, vv, c, a, b, rot, px)

    def ebox(c: tuple[float, float], a: float, b: float) -> tuple[slice, slice] | None:
        return box([c], max(a, b))

    bw = 0.035 + 0.015 * (look.tail_len - 0.34) / 0.12
    b0, b1 = (-4.0, -0.45 - bw), (4.0, -0.45 - bw)
    if look.branch is not None:
        put(box([b0, b1], bw), lambda uu, vv: dr.capsule(uu, vv, b0, b1, bw, px), look.branch, 0, is_bird=False)
    legs = {}
    for side, (u0, u1) in (("far", (-0.03, -0.02)), ("near", (0.06, 0.09))):
        def leg(uu: np.ndarray, vv: np.ndarray, u0: float = u0, u1: float = u1) -> np.ndarray:
            a = dr.capsule(uu, vv, (u0, -0.15), (u1, -0.43), 0.018, px)
            return np.maximum(a, dr.capsule(uu, vv, (u1 - 0.04, -0.44), (u1 + 0.07, -0.445), 0.012, px))
        legs[side] = (box([(u0, -0.15), (u1 - 0.04, -0.445), (u1 + 0.07, -0.445)], 0.02), leg)
    put(*legs["far"], look.legs * 0.8, PART_ID[f"{far} leg"])
    wing_far = ((-0.03, 0.13), 0.27, 0.10, 22.0)
    if look.far_wing:
        dark = look.wing * 0.72
        sl = ebox(*wing_far[:3])
        put(sl, ell(*wing_far), dark, PART_ID[f"{far} wing"])
        put(sl, lambda uu, vv: ell(*wing_far)(uu, vv) * _pattern_mask(uu, vv, look.wing_pattern, wing_far[0],
                                                                      wing_far[3]), dark * look.pattern_shade, None)
    d = np.array([np.cos(np.deg2rad(200)), np.sin(np.deg2rad(200))])
    perp, base = np.array([-d[1], d[0]]), np.array([-0.33, -0.085])
    tip = base + d * look.tail_len
    tail_pts = [tuple(base + perp * 0.06), tuple(tip + perp * look.tail_spread),
                tuple(tip - perp * look.tail_spread), tuple(base - perp * 0.06)]
    put(box(tail_pts, 0.0), lambda uu, vv: dr.polygon(uu, vv, tail_pts, px), look.tail, PART_ID["tail"])
    body = ell((0.0, 0.0), 0.42, 0.23, 15.0)
    body_box = ebox((0.0, 0.0), 0.42, 0.23)

    def back_or_belly(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        _, by = dr.local(uu, vv, (0.0, 0.0), 15.0)
        return np.where(by > 0, PART_ID["back"], PART_ID["belly"]).astype(np.int16)

    put(body_box, body, look.body, back_or_belly)
    belly = ell((0.0, -0.10), 0.33, 0.13, 15.0)
    put(body_box, lambda uu, vv: np.minimum(body(uu, vv), belly(uu, vv)), look.belly, PART_ID["belly"])
    breast = ell((0.26, 0.02), 0.19, 0.18, 15.0)
    put(ebox((0.26, 0.02), 0.19, 0.18), lambda uu, vv: np.minimum(body(uu, vv), breast(uu, vv)), look.breast,
        PART_ID["breast"])
    wing_near = ((-0.07, 0.04), 0.31, 0.12, 8.0)
    sl = ebox(*wing_near[:3])
    put(sl, ell(*wing_near), look.wing, PART_ID[f"{near} wing"])
    put(sl, lambda uu, vv: ell(*wing_near)(uu, vv) * _pattern_mask(uu, vv, look.wing_pattern, wing_near[0],
                                                                    wing_near[3]), look.wing * look.pattern_shade, None)
    neck = ell((0.27, 0.18), 0.13, 0.12, 30.0)
    put(ebox((0.27, 0.18), 0.13, 0.12), neck, look.body, PART_ID["nape"])
    head = ell(HEAD, HEAD_R, HEAD_R, 0.0)
    head_box = ebox(HEAD, HEAD_R, HEAD_R)
    put(head_box, head, look.head, 0)
    put(head_box, lambda uu, vv: np.minimum(head(uu, vv), dr.halfplane(uu, vv, (HEAD[0], HEAD[1] + 0.025),
                                                                          (-0.15, 1.0), px)),
        look.crown, lambda uu, vv: np.where(uu < HEAD[0] + 0.05, PART_ID["crown"], PART_ID["forehead"]))
    throat = ell((0.42, 0.18), 0.10, 0.08, 0.0)
    put(ebox((0.42, 0.18), 0.10, 0.08), lambda uu, vv: np.minimum(np.maximum(head(uu, vv), neck(uu, vv)),
                                                                    throat(uu, vv)), look.breast, PART_ID["throat"])
    eye_c = (HEAD[0] + 0.07, HEAD[1] + 0.005)
    put(ebox(eye_c, 0.036, 0.036), ell(eye_c, 0.036, 0.036, 0.0), np.array([235.0, 235.0, 225.0]),
        PART_ID[f"{near} eye"])
    put(ebox(eye_c, 0.025, 0.025), ell(eye_c, 0.025, 0.025, 0.0), np.array([15.0, 15.0, 20.0]), None)
    hu, hv = HEAD
    bu = hu + 0.82 * HEAD_R
    beak_pts = [(bu, hv + 0.045), (bu + look.beak_len, hv - 0.005), (bu, hv - 0.05)]
    put(box(beak_pts, 0.0), lambda uu, vv: dr.polygon(uu, vv, beak_pts, px), look.beak, PART_ID["beak"])
    put(*legs["near"], look.legs, PART_ID[f"{near} leg"])
    unoccluded = labels.copy()
    if look.occluder is not None:
        centre, a_, b_, rot, colour = look.occluder
        c2 = (centre[0] + 0.6 * a_, centre[1] - 0.3 * b_)

        def leaf(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
            return np.maximum(dr.ellipse(uu, vv, centre, a_, b_, rot, px),
                              dr.ellipse(uu, vv, c2, 0.7 * a_, 0.7 * b_, rot + 50.0, px))

        put(box([centre, c2], a_), leaf, colour, 0, is_bird=False)
    return BirdRender(image=img, labels=labels, labels_unoccluded=unoccluded, alpha=bird)


def annotate(render: BirdRender, min_fraction: float = 0.35) -> tuple[tuple[float, float, float, float], np.ndarray]:
    """Tight bbox (x, y, w, h) of the bird pixels and the (15, 3) CUB part array.

    A part is visible when at least ``min_fraction`` of its unoccluded pixels show; its
    keypoint is the centre of its visible pixels (moved onto the part if it falls off it).
    """
    rows, cols = np.nonzero(render.alpha > 0.5)
    bbox = (float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()),
            float(rows.max() + 1 - rows.min()))
    n = len(CUB_PART_NAMES) + 1
    flat = render.labels.ravel()
    before = np.bincount(render.labels_unoccluded.ravel(), minlength=n)
    count = np.bincount(flat, minlength=n)
    size = render.labels.shape[1]
    pix = np.arange(flat.size)
    sum_x = np.bincount(flat, weights=pix % size + 0.5, minlength=n)
    sum_y = np.bincount(flat, weights=pix // size + 0.5, minlength=n)
    parts = np.zeros((n - 1, 3))
    for pid in range(1, n):
        if before[pid] == 0 or count[pid] == 0 or count[pid] < min_fraction * before[pid]:
            continue
        cx, cy = sum_x[pid] / count[pid], sum_y[pid] / count[pid]
        if render.labels[int(cy), int(cx)] != pid:  # centre off the part (e.g. a crescent): nearest part pixel
            ys, xs = np.nonzero(render.labels == pid)
            j = int(np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2))
            cx, cy = xs[j] + 0.5, ys[j] + 0.5
        parts[pid - 1] = (round(float(cx), 1), round(float(cy), 1), 1.0)
    return bbox, parts


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted cluttered scenery: a gradient, soft noise, leaves and twigs (no vivid colours)."""
    sky = dr.muted_colour(rng, hue=(0.45, 0.65), sat=(0.05, 0.25), val=(0.55, 0.9))
    ground = dr.muted_colour(rng, hue=(0.1, 0.38), sat=(0.1, 0.35), val=(0.25, 0.6))
    t = np.clip(np.linspace(0, 1, size)[:, None] + 0.35 * dr.smooth_noise(rng, (size, size), 3), 0, 1)[..., None]
    img = sky * (1 - t) + ground * t
    img = img + 14.0 * dr.smooth_noise(rng, (size, size), 7)[..., None]
    x, y = dr.pixel_grid(size)
    for _ in range(int(rng.integers(3, 8))):
        colour = dr.muted_colour(rng, hue=(0.08, 0.4), sat=(0.1, 0.35), val=(0.2, 0.7))
        c = (rng.uniform(0, size), rng.uniform(0, size))
        if rng.random() < 0.7:
            a = size * rng.uniform(0.03, 0.10)
            b, rot = a * rng.uniform(0.3, 0.6), rng.uniform(0, 180)
            sl = dr.crop((size, size), [c[0]], [c[1]], a + 2)
            shape = lambda xx, yy: dr.ellipse(xx, yy, c, a, b, rot, 1.0)  # noqa: E731
        else:
            ang = rng.uniform(0, np.pi)
            d = size * rng.uniform(0.15, 0.4) * np.array([np.cos(ang), np.sin(ang)])
            p0, p1, hw = (c[0] - d[0], c[1] - d[1]), (c[0] + d[0], c[1] + d[1]), size * rng.uniform(0.006, 0.015)
            sl = dr.crop((size, size), [p0[0], p1[0]], [p0[1], p1[1]], hw + 2)
            shape = lambda xx, yy: dr.capsule(xx, yy, p0, p1, hw, 1.0)  # noqa: E731
        opacity = rng.uniform(0.6, 1.0)
        if sl is not None:
            dr.paint(img[sl], shape(x[sl], y[sl]) * opacity, colour)
    return np.clip(img, 0, 255)


def draw_sample(rng: np.random.Generator, pair: tuple[Trait, Trait], size: int, occlusion: float,
                swap: Mapping[str, np.random.Generator] | None = None
                ) -> tuple[np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """One finished image (uint8 ``size x size x 3``) with its bbox and part array.

    ``swap`` maps slots to generators: each such slot is repainted in a nuisance colour (and
    a nuisance wing pattern) drawn from its generator, after everything else was drawn from
    ``rng``, so the scene (pose, background, the other colours, noise) stays the same.
    """
    bg = background(rng, size)
    pose = sample_pose(rng, size)
    look = sample_look(rng, pair, occlusion)
    for slot, g in (swap or {}).items():
        if slot not in SLOTS:
            raise InputError(f"synthbirds: cannot swap {slot!r}, not one of the slots {list(SLOTS)}")
        setattr(look, slot, _dull(g))
        if slot == "wing":
            look.wing_pattern, look.pattern_shade = str(g.choice(PATTERNS)), g.uniform(0.72, 0.85)
    render = render_bird(size, pose, look, bg)
    bbox, parts = annotate(render)
    img = render.image * rng.uniform(0.9, 1.08) + rng.normal(0.0, 3.0, render.image.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), bbox, parts


def class_pairs(params: Mapping[str, Any]) -> list[tuple[Trait, Trait]]:
    """The class traits of the dataset whose ``synth.json`` parameters are ``params``."""
    return design_classes(int(params["classes"]), int(params["seed"]), str(params.get("design", "unique")))


def bird_counterfactuals(params: Mapping[str, Any], c: int, j: int,
                         parts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Image ``j`` of class ``c`` as the generator drew it, and the same scene per slot swapped.

    Returns ``{"original": image, slot: image with that slot in a nuisance colour, ...}``
    (uint8, before JPEG encoding) for ``parts`` (default: all four slots, the class's two
    evidence slots and two non-evidence controls); a name joining slots with ``+`` (``"wing+tail"``)
    swaps them together. Each slot's nuisance colour comes from its own stream ``(seed, c, j,
    slot number, 15485863)``, so it is the same on every call and in every combination.
    """
    pairs = class_pairs(params)
    if not 0 <= c < len(pairs) or not 0 <= j < int(params["per_class"]):
        raise InputError(f"synthbirds: no image {j} of class {c} in a dataset of {len(pairs)} classes x "
                         f"{params['per_class']}")
    seed, size, occ = int(params["seed"]), int(params["size"]), float(params.get("occlusion", 0.25))
    out = {"original": draw_sample(np.random.default_rng([seed, c, j]), pairs[c], size, occ)[0]}
    for name in (list(SLOTS) if parts is None else parts):
        swap = {slot: np.random.default_rng([seed, c, j, list(SLOTS).index(slot) if slot in SLOTS else 99, 15485863])
                for slot in name.split("+")}
        out[name] = draw_sample(np.random.default_rng([seed, c, j]), pairs[c], size, occ, swap)[0]
    return out


def class_slots(pair: tuple[Trait, Trait]) -> list[str]:
    """The evidence slots of a class, in slot order."""
    return [s for s in SLOTS if s in {t.slot for t in pair}]
