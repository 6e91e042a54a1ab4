"""The embedded default datasets: ``synthbirds`` (CUB layout) and ``synthrooms`` (ADE20K layout).

Both are deterministic for a seed (each image draws from its own ``(seed, class, j)``
random stream), are written to a temporary directory and renamed into place only when
complete, and carry a ``synth.json`` stamp: asking again for the same parameters is a
no-op, other parameters regenerate. A directory without that stamp (a real dataset) is
never overwritten. A failed or interrupted run removes its temporary directory; ones left
by killed runs (``.<name>.tmp-<pid>`` of a process that is gone) are removed by the next.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from srae.datasets import synthbirds as sb
from srae.datasets.cub import CUB_DIRNAME, CUB_PART_NAMES, EVIDENCE_FILE
from srae.datasets.staging import ensure_directory, remove_stale
from srae.errors import InputError

log = logging.getLogger(__name__)

STAMP = "synth.json"
GENERATOR_VERSION = 1  # bump whenever the drawing changes, so stamped copies regenerate
MAX_SIZE = 1024  # image side: larger is a typo (and hours of drawing)


def _check_sizes(kind: str, classes: int, per_class: int, size: int, train_fraction: float) -> None:
    for name, v in (("classes", classes), ("per_class", per_class), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{kind}: {name} must be an integer, got {v!r}")
    if classes < 2:
        raise InputError(f"{kind}: need at least 2 classes, got {classes}")
    if per_class < 2:
        raise InputError(f"{kind}: need at least 2 images per class, got {per_class}")
    if size < 32:
        raise InputError(f"{kind}: image size must be at least 32 pixels, got {size}")
    if size > MAX_SIZE:
        raise InputError(f"{kind}: image size must be at most {MAX_SIZE} pixels, got {size}")
    if not 0.0 < train_fraction < 1.0:
        raise InputError(f"{kind}: train_fraction must be in (0, 1), got {train_fraction}")


def prepare_target(final: Path, params: dict) -> Path | None:
    """Return a fresh temporary directory to write into, or None when ``final`` is up to date.

    Refuses to replace a directory that is not a synthetic dataset written by this module,
    and an output location that is not a directory. Removes temporary directories that
    killed runs left beside ``final``.
    """
    parent = final.parent
    ensure_directory(parent, "output")
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a synthetic dataset; refusing to overwrite it")
    for kind in ("tmp", "old"):
        remove_stale(parent, f".{final.name}.{kind}-")
    stamp = final / STAMP
    if final.exists():
        if not stamp.is_file():
            raise InputError(f"{final} exists and is not a synthetic dataset; refusing to overwrite it")
        try:
            old = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("params") == params and old.get("complete"):
            log.info("%s is up to date (%s); not regenerating", final, params)
            return None
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def staged(final: Path, params: dict) -> Iterator[Path | None]:
    """:func:`prepare_target` whose temporary directory is removed however the block ends
    (after :func:`publish` it no longer exists, so success removes nothing)."""
    tmp = prepare_target(final, params)
    try:
        yield tmp
    finally:
        if tmp is not None and tmp.exists():
            log.info("removing the unfinished %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, params: dict, extra: dict) -> Path:
    """Write the stamp last, then swap ``tmp`` into ``final`` (replacing an older synthetic copy)."""
    (tmp / STAMP).write_text(json.dumps({"params": params, **extra, "complete": True}, indent=1))
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    return final


# How generated images are saved: no chroma subsampling, so small vivid patches keep their colour.
JPEG_SETTINGS: dict[str, int] = {"quality": 92, "subsampling": 0}


def save_jpeg(path: Path, pixels: np.ndarray) -> None:
    """JPEG with :data:`JPEG_SETTINGS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **JPEG_SETTINGS)


def make_synthbirds(out: Path, classes: int = 4, per_class: int = 48, size: int = 64, seed: int = 0, *,
                    train_fraction: float = 0.5, occlusion: float = 0.25, design: str = "factorial") -> Path:
    """Generate ``synthbirds`` under ``out`` in the CUB layout; return ``out/CUB_200_2011``.

    ``design`` names the class design (:func:`srae.datasets.synthbirds.design_classes`):
    ``factorial`` shares every trait between classes, ``unique`` is the earlier design in
    which few classes each have a trait of their own.

    Writes ``classes.txt``, ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``bounding_boxes.txt``, ``parts/parts.txt``,
    ``parts/part_locs.txt``, the JPEG images and ``evidence.json`` ({class name: [parts]}).
    """
    _check_sizes("synthbirds", classes, per_class, size, train_fraction)
    params = {"generator": "synthbirds", "version": GENERATOR_VERSION, "classes": classes, "per_class": per_class,
              "size": size, "seed": seed, "train_fraction": train_fraction, "occlusion": occlusion,
              "design": design}
    if design not in sb.DESIGNS:
        raise InputError(f"synthbirds: unknown class design {design!r} (one of {', '.join(sb.DESIGNS)})")
    final = Path(out) / CUB_DIRNAME
    with staged(final, params) as tmp:
        if tmp is None:
            return final
        pairs = sb.design_classes(classes, seed, design)
        names = [sb.class_name(c, p) for c, p in enumerate(pairs)]
        n_train = min(per_class - 1, max(1, round(train_fraction * per_class)))
        images, labels, splits, boxes, locs = [], [], [], [], []
        image_id = 0
        for c, pair in enumerate(pairs):
            train = set(np.random.default_rng([seed, c, 104729]).permutation(per_class)[:n_train].tolist())
            stem = names[c].split(".", 1)[1]
            for j in range(per_class):
                image_id += 1
                rng = np.random.default_rng([seed, c, j])
                pixels, bbox, parts = sb.draw_sample(rng, pair, size, occlusion)
                rel = f"{names[c]}/{stem}_{j + 1:04d}_{image_id}.jpg"
                save_jpeg(tmp / "images" / rel, pixels)
                images.append(f"{image_id} {rel}")
                labels.append(f"{image_id} {c + 1}")
                splits.append(f"{image_id} {1 if j in train else 0}")
                boxes.append(f"{image_id} " + " ".join(f"{b:.1f}" for b in bbox))
                for k, (x, y, vis) in enumerate(parts):
                    locs.append(f"{image_id} {k + 1} {x:.1f} {y:.1f} {int(vis)}")
        files = {
            "classes.txt": [f"{c + 1} {n}" for c, n in enumerate(names)],
            "images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": splits,
            "bounding_boxes.txt": boxes, "parts/parts.txt": [f"{k + 1} {p}" for k, p in enumerate(CUB_PART_NAMES)],
            "parts/part_locs.txt": locs,
        }
        for rel, lines in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text("\n".join(lines) + "\n")
        evidence = {names[c]: sb.evidence_parts(p) for c, p in enumerate(pairs)}
        (tmp / EVIDENCE_FILE).write_text(json.dumps(evidence, indent=1))
        traits = {names[c]: [vars(t) for t in p] for c, p in enumerate(pairs)}
        log.info("synthbirds: wrote %d images of %d classes at %d px to %s", image_id, classes, size, final)
        return publish(tmp, final, params, {"traits": traits})


def make_synthrooms(out: Path, classes: int = 4, per_class: int = 48, size: int = 64, seed: int = 0, *,
                    train_fraction: float = 0.5, design: str = "factorial") -> Path:
    """Generate ``synthrooms`` under ``out`` in the ADE20K layout; return ``out/ADE20K_2021_17_01``
    (``design``: see :func:`srae.datasets.synthrooms.design_rooms`)."""
    from srae.datasets.synthrooms import write_synthrooms

    _check_sizes("synthrooms", classes, per_class, size, train_fraction)
    return write_synthrooms(Path(out), classes, per_class, size, seed, train_fraction, design=design)
