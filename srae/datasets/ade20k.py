"""Reader for ADE20K (full format, 2021 release) plus Places365 scene categories and file lists.

ADE20K layout: ``ADE20K_2021_17_01/index_ade20k.pkl`` (a pickled dict with per-image
``filename``, ``folder`` (relative to the directory holding ``ADE20K_2021_17_01``),
``scene`` and the list ``objectnames``), images ``<folder>/<name>.jpg`` and masks
``<name>_seg.png`` whose object class is ``(R // 10) * 256 + G`` (0 = unlabeled; class
``k`` is ``objectnames[k - 1]``). Folders under ``training`` are the train split, under
``validation`` the test split. ``synthrooms`` writes exactly this layout plus
``evidence.json`` ({scene: [object names]}).

Places365: ``categories_places365.txt`` (``/b/bedroom 52`` lines) and the file lists
``places365_train_standard.txt`` / ``places365_val.txt`` (``path index`` lines); images
under ``data_256``/``data_large`` and ``val_256``/``val_large`` when present.

Scene names are compared by :func:`scene_key` (``/l/living_room`` == ``living room``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path, PurePosixPath

import numpy as np

from srae.datasets.common import DatasetIndex, annotation_lines, images_frame, probe_images, synthetic_generator
from srae.errors import InputError

log = logging.getLogger(__name__)

ADE_DIRNAME = "ADE20K_2021_17_01"
ADE_INDEX_FILE = "index_ade20k.pkl"
EVIDENCE_FILE = "evidence.json"
PLACES_CATEGORIES = "categories_places365.txt"
PLACES_LISTS = {"train": "places365_train_standard.txt", "test": "places365_val.txt"}
PLACES_IMAGE_DIRS = {"train": ("data_256", "data_large"), "test": ("val_256", "val_large")}
# Image ids: ADE20K images are numbered by index position (1-based); Places365 images by
# file-list line plus an offset per list, so ids never change with the chosen classes.
PLACES_ID_OFFSET = {"train": 100_000_000, "test": 200_000_000}
# The paper's 10 Places categories (rooms with enough ADE20K object labels).
PAPER_ROOMS: tuple[str, ...] = (
    "bathroom", "bedroom", "conference room", "dining room", "home office",
    "hotel room", "kitchen", "living room", "office", "waiting room",
)


def scene_key(name: str) -> str:
    """Canonical scene name: ``/h/home_office``, ``/home_office``, ``home office`` -> ``home office``."""
    s = str(name).strip().lower()
    s = re.sub(r"^/[a-z]/", "", s).strip("/")
    return re.sub(r"\s+", " ", s.replace("/", " ").replace("_", " ")).strip()


def read_places_categories(path: Path) -> list[str]:
    """Category names of ``categories_places365.txt`` in index order (raw, e.g. ``/b/bedroom``)."""
    path = Path(path)
    names: dict[int, str] = {}
    for lineno, fields in annotation_lines(path, 2):
        if len(fields) != 2 or not fields[0].startswith("/"):
            raise InputError(f"{path}:{lineno}: expected '/x/name index', got {' '.join(fields)!r}")
        try:
            idx = int(fields[1])
        except ValueError:
            raise InputError(f"{path}:{lineno}: category index {fields[1]!r} is not an integer") from None
        if idx in names:
            raise InputError(f"{path}:{lineno}: category index {idx} repeats")
        names[idx] = fields[0]
    if sorted(names) != list(range(len(names))):
        raise InputError(f"{path}: category indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the index never needs more."""

    _ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "bytearray"), ("builtins", "complex"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> object:
        numpy_ok = module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                              "numpy._core.numeric") and name in ("_reconstruct", "ndarray", "dtype", "scalar",
                                                                  "_frombuffer")
        if numpy_ok or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_ade_index(path: Path) -> dict:
    """The ADE20K index dict, with ``filename``/``folder``/``scene`` of equal length."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ADE20K index {path} is missing")
    try:
        with open(path, "rb") as fh:
            index = _IndexUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"ADE20K index {path}: not a readable index pickle ({exc})") from None
    if not isinstance(index, dict):
        raise InputError(f"ADE20K index {path}: expected a dict, got {type(index).__name__}")
    missing = [k for k in ("filename", "folder", "scene") if k not in index]
    if missing:
        raise InputError(f"ADE20K index {path}: missing fields {missing}")
    n = len(index["filename"])
    for key in ("folder", "scene"):
        if len(index[key]) != n:
            raise InputError(f"ADE20K index {path}: {key!r} has {len(index[key])} entries, filename has {n}")
    return index


def find_ade_dir(root: Path) -> Path:
    """The ``ADE20K_2021_17_01`` directory: ``root`` itself or its child of that name."""
    root = Path(root)
    for cand in (root / ADE_DIRNAME, root):
        if (cand / ADE_INDEX_FILE).is_file():
            return cand
    raise InputError(f"no ADE20K dataset under {root}: {root / ADE_DIRNAME / ADE_INDEX_FILE} is missing")


def _split_of(folder: str, filename: str) -> str | None:
    parts = set(PurePosixPath(folder.replace("\\", "/")).parts)
    if "training" in parts or filename.startswith("ADE_train_"):
        return "train"
    if "validation" in parts or filename.startswith("ADE_val_"):
        return "test"
    return None


def _ade_rows(ade_dir: Path, index: dict, wanted: dict[str, int]) -> tuple[Path, list[dict]]:
    """Rows for the images whose scene is wanted; paths relative to the returned base."""
    folders = [str(f) for f in index["folder"]]
    # The official index stores folders relative to the parent of ADE20K_2021_17_01.
    base = ade_dir.parent if folders and (ade_dir.parent / folders[0]).is_dir() else ade_dir
    rows = []
    for i, (fname, folder, scene) in enumerate(zip(index["filename"], folders, index["scene"])):
        label = wanted.get(scene_key(str(scene)))
        if label is None:
            continue
        split = _split_of(folder, str(fname))
        if split is None:
            raise InputError(f"{ade_dir / ADE_INDEX_FILE}: entry {i} ({folder}/{fname}) is neither training "
                             "nor validation")
        path = f"{folder}/{fname}"
        rows.append({"image_id": i + 1, "path": path, "label": label, "split": split,
                     "mask_path": re.sub(r"\.jpg$", "_seg.png", path, flags=re.IGNORECASE)})
    return base, rows


def _places_rows(places_dir: Path, categories: list[str], wanted: dict[str, int],
                 per_class: int | None) -> list[dict]:
    """Rows of the Places365 file lists for wanted categories whose image folder exists."""
    by_index = {i: wanted[scene_key(c)] for i, c in enumerate(categories) if scene_key(c) in wanted}
    rows = []
    for split, listname in PLACES_LISTS.items():
        img_dir = next((d for d in PLACES_IMAGE_DIRS[split] if (places_dir / d).is_dir()), None)
        if img_dir is None:
            log.warning("Places365 %s images not found under %s (%s); using none", split, places_dir,
                        " or ".join(PLACES_IMAGE_DIRS[split]))
            continue
        taken: dict[int, int] = {}
        for lineno, fields in annotation_lines(places_dir / listname, 2):
            try:
                idx = int(fields[1])
            except ValueError:
                raise InputError(
                    f"{places_dir / listname}:{lineno}: category {fields[1]!r} is not an integer") from None
            if not 0 <= idx < len(categories):
                raise InputError(f"{places_dir / listname}:{lineno}: category {idx} not in {PLACES_CATEGORIES}")
            label = by_index.get(idx)
            if label is None or (per_class is not None and taken.get(label, 0) >= per_class):
                continue
            taken[label] = taken.get(label, 0) + 1
            rows.append({"image_id": PLACES_ID_OFFSET[split] + lineno, "path": f"{img_dir}/{fields[0].lstrip('/')}",
                         "label": label, "split": split, "mask_path": None})
    return rows


def _read_evidence(path: Path, class_names: list[str], object_names: dict[int, str]) -> dict[int, list[str]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    keys = {scene_key(c): k for k, c in enumerate(class_names)}
    known = set(object_names.values())
    out: dict[int, list[str]] = {}
    for scene, objs in raw.items():
        if not isinstance(objs, list) or any(o not in known for o in objs):
            raise InputError(f"{path}: scene {scene!r}: objects {objs!r} are not all in the index's objectnames")
        if scene_key(scene) in keys:
            out[keys[scene_key(scene)]] = [str(o) for o in objs]
    return out


def read_places_ade20k(root: Path, *, class_names: list[str] | None = None, places_root: Path | None = None,
                       places_per_class: int | None = None, workers: int = 2, name: str | None = None) -> DatasetIndex:
    """Read the ADE20K images of the chosen scene classes (and Places365 images if given).

    ``class_names`` defaults to the paper's ten rooms that occur in the index. With
    ``places_root`` the names are checked against ``categories_places365.txt`` and, where
    the image folders exist, Places365 images of those classes are added (``mask_path``
    None), at most ``places_per_class`` per class and split. Images and masks that cannot
    be decoded, or whose sizes disagree, are skipped and listed in ``bad_inputs``. ``name``
    defaults to ``"synthrooms"`` for generated data and ``"places"`` otherwise.
    """
    ade_dir = find_ade_dir(root)
    name = name or synthetic_generator(ade_dir) or "places"
    index = load_ade_index(ade_dir / ADE_INDEX_FILE)
    present = {scene_key(str(s)) for s in index["scene"]}
    if class_names is None:
        names = [c for c in PAPER_ROOMS if c in present]
        if not names:
            raise InputError(f"{ade_dir / ADE_INDEX_FILE}: none of the paper's rooms {list(PAPER_ROOMS)} occur")
        if len(names) < len(PAPER_ROOMS):
            log.warning("ADE20K: using %d of the paper's rooms present in the index: %s", len(names), names)
    else:
        names = [scene_key(c) for c in class_names]
        absent = [c for c in names if c not in present]
        if absent:
            raise InputError(f"{ade_dir / ADE_INDEX_FILE}: no images of scene {absent[0]!r}")
    if len(set(names)) != len(names):
        raise InputError(f"class_names {names}: repeated scene")
    wanted = {c: k for k, c in enumerate(names)}
    base, rows = _ade_rows(ade_dir, index, wanted)
    if places_root is not None:
        places_dir = Path(places_root)
        categories = read_places_categories(places_dir / PLACES_CATEGORIES)
        known = {scene_key(c) for c in categories}
        unknown = [c for c in names if c not in known]
        if unknown:
            raise InputError(f"{places_dir / PLACES_CATEGORIES}: no Places365 category {unknown[0]!r}")
        extra = _places_rows(places_dir, categories, wanted, places_per_class)
        common = Path(os.path.commonpath([base.resolve(), places_dir.resolve()]))
        rows = [{**r, "path": os.path.relpath(base.resolve() / r["path"], common),
                 "mask_path": os.path.relpath(base.resolve() / r["mask_path"], common)} for r in rows]
        rows += [{**r, "path": os.path.relpath(places_dir.resolve() / r["path"], common)} for r in extra]
        base = common
    sizes, bad = probe_images(base, [r["path"] for r in rows], workers=workers)
    id_of = {r["path"]: r["image_id"] for r in rows}
    for entry in bad:
        entry["image_id"] = id_of[entry["path"]]
    masks = [r["mask_path"] for r in rows if r["mask_path"] and r["path"] in sizes]
    mask_sizes, mask_bad = probe_images(base, masks, workers=workers, desc="checking masks")
    mask_reason = {m["path"]: m["reason"] for m in mask_bad}
    kept = []
    for r in rows:
        if r["path"] not in sizes:
            continue
        mask = r["mask_path"]
        reason = ""
        if mask and mask in mask_reason:
            reason = f"mask {mask}: {mask_reason[mask]}"
        elif mask and mask_sizes[mask] != sizes[r["path"]]:
            reason = f"mask {mask} is {mask_sizes[mask]}, image is {sizes[r['path']]} (width, height)"
        if reason:
            bad.append({"path": r["path"], "image_id": r["image_id"], "reason": reason})
            continue
        w, h = sizes[r["path"]]
        kept.append({**r, "width": w, "height": h, "bbox": None, "parts": None})
    for b in bad:
        log.warning("skipping %s: %s", b["path"], b["reason"])
    frame = images_frame(kept)
    object_names = {k + 1: str(n) for k, n in enumerate(index.get("objectnames", []))}
    ev_path = ade_dir / EVIDENCE_FILE
    evidence = _read_evidence(ev_path, names, object_names) if ev_path.is_file() else {}
    log.info("read %s: %d images of %d scenes, %d skipped", ade_dir, len(frame), len(names), len(bad))
    return DatasetIndex(name=name, root=Path(base), class_names=names, images=frame, object_names=object_names,
                        evidence=evidence, bad_inputs=bad)


def read_object_mask(path: Path) -> np.ndarray:
    """Object class map of an ADE20K ``*_seg.png``: ``(R // 10) * 256 + G`` as int32 (0 = unlabeled)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            seg = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"mask {path}: cannot be read ({exc})") from None
    return (seg[..., 0].astype(np.int32) // 10) * 256 + seg[..., 1].astype(np.int32)
