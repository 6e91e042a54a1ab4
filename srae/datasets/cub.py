"""Reader for the CUB-200-2011 on-disk layout (the real archive and ``synthbirds`` output).

Files (ids 1-based, whitespace separated, all under ``CUB_200_2011/``): ``classes.txt``,
``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
``bounding_boxes.txt``, ``parts/parts.txt`` (names may contain spaces) and
``parts/part_locs.txt`` (``image part x y visible``; invisible parts are ``0 0 0``).
Synthetic data adds ``evidence.json`` ({class name: [part names]}).

A missing or malformed annotation file is an :class:`InputError` naming file and line. An
image that cannot be decoded, or whose annotations fall outside it, is skipped and listed
in ``bad_inputs``; no image is ever kept with a guessed label or part.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from srae.datasets.common import DatasetIndex, annotation_lines, images_frame, probe_images, synthetic_generator
from srae.errors import InputError

log = logging.getLogger(__name__)

CUB_DIRNAME = "CUB_200_2011"
CUB_PART_NAMES: tuple[str, ...] = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
)
EVIDENCE_FILE = "evidence.json"
# Annotations may sit this many pixels outside the image (rounding) before an image is rejected.
_EDGE_TOLERANCE = 1.0


def find_cub_dir(root: Path) -> Path:
    """The ``CUB_200_2011`` directory: ``root`` itself or its child of that name."""
    root = Path(root)
    for cand in (root / CUB_DIRNAME, root):
        if (cand / "images.txt").is_file():
            return cand
    raise InputError(f"no CUB-200-2011 dataset under {root}: {root / CUB_DIRNAME / 'images.txt'} is missing")


def _int(path: Path, lineno: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {what} {text!r} is not an integer") from None


def _float(path: Path, lineno: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{path}:{lineno}: {what} is {text}")
    return value


def _id_table(path: Path, ids: set[int] | None, n_values: int, *,
              maxsplit: int = -1) -> dict[int, tuple[int, list[str]]]:
    """``{id: (line, values)}`` for a file keyed by a 1-based id; duplicates/unknown ids are errors."""
    table: dict[int, tuple[int, list[str]]] = {}
    for lineno, fields in annotation_lines(path, n_values + 1, maxsplit=maxsplit):
        key = _int(path, lineno, fields[0], "id")
        if key in table:
            raise InputError(f"{path}:{lineno}: id {key} repeats line {table[key][0]}")
        if ids is not None and key not in ids:
            raise InputError(f"{path}:{lineno}: image id {key} is not listed in images.txt")
        table[key] = (lineno, fields[1:])
    if ids is not None:
        missing = sorted(ids - table.keys())
        if missing:
            raise InputError(f"{path}: no entry for image id {missing[0]} ({len(missing)} image(s) missing)")
    return table


def _read_names(path: Path, what: str) -> tuple[list[int], list[str]]:
    """Ids and names of ``classes.txt`` / ``parts.txt`` (names may contain spaces), by id."""
    table = _id_table(path, None, 1, maxsplit=1)
    if not table:
        raise InputError(f"{path}: no {what} listed")
    ids = sorted(table)
    return ids, [table[i][1][0].strip() for i in ids]


def _read_part_locs(path: Path, ids: set[int], part_ids: list[int]) -> dict[int, np.ndarray]:
    """``{image id: (P, 3) float array}``; every (image, part) pair exactly once."""
    col = {pid: k for k, pid in enumerate(part_ids)}
    locs = {i: np.full((len(part_ids), 3), np.nan) for i in ids}
    where: dict[tuple[int, int], int] = {}
    for lineno, f in annotation_lines(path, 5):
        img = _int(path, lineno, f[0], "image id")
        part = _int(path, lineno, f[1], "part id")
        if img not in locs:
            raise InputError(f"{path}:{lineno}: image id {img} is not listed in images.txt")
        if part not in col:
            raise InputError(f"{path}:{lineno}: part id {part} is not listed in parts/parts.txt")
        if (img, part) in where:
            raise InputError(f"{path}:{lineno}: image {img} part {part} repeats line {where[(img, part)]}")
        where[(img, part)] = lineno
        x, y = _float(path, lineno, f[2], "x"), _float(path, lineno, f[3], "y")
        vis = _float(path, lineno, f[4], "visible")
        if vis not in (0.0, 1.0):
            raise InputError(f"{path}:{lineno}: visible must be 0 or 1, got {f[4]!r}")
        locs[img][col[part]] = (x, y, vis) if vis else (0.0, 0.0, 0.0)
    for img, arr in locs.items():
        if np.isnan(arr).any():
            missing = part_ids[int(np.flatnonzero(np.isnan(arr[:, 0]))[0])]
            raise InputError(f"{path}: no entry for image {img} part {missing}")
    return locs


def _read_evidence(path: Path, class_names: list[str], part_names: list[str]) -> dict[int, list[str]]:
    """``evidence.json`` -> {class index: [part names]}; unknown names are errors."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object {{class name: [part names]}}")
    index = {name: k for k, name in enumerate(class_names)}
    out: dict[int, list[str]] = {}
    for name, parts in raw.items():
        if name not in index:
            raise InputError(f"{path}: class {name!r} is not in classes.txt")
        if not isinstance(parts, list) or any(p not in part_names for p in parts):
            raise InputError(f"{path}: class {name!r}: parts {parts!r} are not all in parts/parts.txt")
        out[index[name]] = [str(p) for p in parts]
    return out


def _outside(x: float, y: float, width: int, height: int) -> bool:
    t = _EDGE_TOLERANCE
    return not (-t <= x <= width + t and -t <= y <= height + t)


def read_cub(root: Path, *, workers: int = 2, name: str | None = None) -> DatasetIndex:
    """Read CUB-200-2011 (or ``synthbirds``) at ``root`` into a :class:`DatasetIndex`.

    ``root`` is the ``CUB_200_2011`` directory or its parent; paths in the index are
    relative to the ``CUB_200_2011`` directory. Every image is decoded once to check it.
    ``name`` defaults to ``"synthbirds"`` for generated data and ``"cub"`` otherwise.
    """
    base = find_cub_dir(root)
    name = name or synthetic_generator(base) or "cub"
    class_ids, class_names = _read_names(base / "classes.txt", "classes")
    label_of = {cid: k for k, cid in enumerate(class_ids)}
    images = _id_table(base / "images.txt", None, 1, maxsplit=1)
    ids = set(images)
    labels = _id_table(base / "image_class_labels.txt", ids, 1)
    splits = _id_table(base / "train_test_split.txt", ids, 1)
    boxes = _id_table(base / "bounding_boxes.txt", ids, 4)
    part_ids, part_names = _read_names(base / "parts" / "parts.txt", "parts")
    locs = _read_part_locs(base / "parts" / "part_locs.txt", ids, part_ids)

    rows: list[dict] = []
    for img in sorted(ids):
        path = "images/" + images[img][1][0].strip()
        lab_line, (lab,) = labels[img][0], labels[img][1][:1]
        cid = _int(base / "image_class_labels.txt", lab_line, lab, "class id")
        if cid not in label_of:
            raise InputError(f"{base / 'image_class_labels.txt'}:{lab_line}: class id {cid} is not in classes.txt")
        sp_line, (sp,) = splits[img][0], splits[img][1][:1]
        if sp not in ("0", "1"):
            raise InputError(f"{base / 'train_test_split.txt'}:{sp_line}: expected 0 or 1, got {sp!r}")
        bb_line, bb = boxes[img]
        x, y, w, h = (_float(base / "bounding_boxes.txt", bb_line, v, "bbox value") for v in bb[:4])
        if w < 0 or h < 0:
            raise InputError(f"{base / 'bounding_boxes.txt'}:{bb_line}: negative box size {w} x {h}")
        rows.append({"image_id": img, "path": path, "label": label_of[cid],
                     "split": "train" if sp == "1" else "test", "bbox": (x, y, w, h),
                     "parts": locs[img], "mask_path": None, "_bb_line": bb_line})

    sizes, bad = probe_images(base, [r["path"] for r in rows], workers=workers)
    kept: list[dict] = []
    for r in rows:
        if r["path"] not in sizes:
            continue
        width, height = sizes[r["path"]]
        x, y, w, h = r["bbox"]
        reason = ""
        if _outside(x, y, width, height) or _outside(x + w, y + h, width, height):
            reason = f"bbox {r['bbox']} outside the {width}x{height} image (bounding_boxes.txt:{r['_bb_line']})"
        vis = r["parts"][:, 2] > 0
        for p in np.flatnonzero(vis):
            if not reason and _outside(r["parts"][p, 0], r["parts"][p, 1], width, height):
                reason = f"part {part_names[p]!r} at {tuple(r['parts'][p, :2])} outside the {width}x{height} image"
        if reason:
            bad.append({"path": r["path"], "reason": reason})
            continue
        r.update(width=width, height=height)
        kept.append(r)
    for b in bad:
        b.setdefault("image_id", next((r["image_id"] for r in rows if r["path"] == b["path"]), None))
        log.warning("skipping %s: %s", b["path"], b["reason"])

    frame = images_frame(kept)
    evidence_path = base / EVIDENCE_FILE
    evidence = _read_evidence(evidence_path, class_names, part_names) if evidence_path.is_file() else {}
    log.info("read %s: %d images, %d classes, %d skipped", base, len(frame), len(class_names), len(bad))
    return DatasetIndex(name=name, root=base, class_names=class_names, images=frame,
                        part_names=part_names, evidence=evidence, bad_inputs=bad)
