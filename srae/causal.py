"""Causal ground truth: which parts the model being explained really uses.

For test images of a synthetic dataset, each part is swapped for a nuisance colour in a
counterfactual render of the same scene (:mod:`srae.datasets.counterfactual`) and the model
is run on both; the drop of the class logit y-hat is that part's effect on that image.
Per category and part, the mean drop (``part_effect``) says what the CNN uses, measured on
the CNN and not taken from the generator's intent; a part counts as *used* by the rule of
:func:`srae.metrics.degeneracy.used_parts`. Concept coverage and purity score explanations
against these used parts (``docs/design.md``, "Causal ground truth").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from srae.datasets.counterfactual import JPEG_SETTINGS, counterfactuals, evidence_of, jpeg_roundtrip
from srae.errors import InputError
from srae.images import RESIZE_METHOD, resize_uint8
from srae.metrics.concepts import concept_recovery
from srae.metrics.degeneracy import causal_coverage, concept_purity, group_mass, part_effect_summary

Classifier = Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W, 3) -> logits (B, C)
EFFECT_COLUMNS = ["image_id", "category", "part", "evidence", "y", "y_swapped", "drop"]


def draw_numbers(images: pd.DataFrame, per_class: int) -> pd.Series:
    """Per image id, its draw number ``j`` within its class.

    Both generators write class ``c``'s draws ``j = 0 .. per_class - 1`` in order and number
    images from 1 in that order (CUB's ``images.txt``; the position in ADE20K's index), so
    ``j = image_id - 1 - c * per_class``. Computed from the id, not from the image's rank, so
    an image the reader skipped (unreadable) shifts nothing. An id outside its class's range
    (not a generated image) is an InputError."""
    ids = images["image_id"].to_numpy(np.int64)
    j = ids - 1 - images["label"].to_numpy(np.int64) * int(per_class)
    bad = (j < 0) | (j >= int(per_class))
    if bad.any():
        raise InputError(f"image {int(ids[bad][0])}: not a draw of its class in a generated dataset of "
                         f"{per_class} images per class")
    return pd.Series(j, index=ids, name="j")


def model_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """As the pipeline feeds an image: JPEG as the generators save it, then
    :func:`srae.images.resize_uint8` to ``size`` (uint8 H x W x 3)."""
    return resize_uint8(Image.fromarray(jpeg_roundtrip(pixels)), size).permute(1, 2, 0).numpy()


def model_input_settings() -> dict[str, Any]:
    """What :func:`model_input` does, for cache keys of results computed from its images."""
    return {"jpeg": JPEG_SETTINGS, "resize": RESIZE_METHOD}


def measure_part_effects(classify: Classifier, params: Mapping[str, Any],
                         draws: Sequence[tuple[int, int, int]], input_size: int,
                         parts: Sequence[str] | None = None, batch: int = 16,
                         progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Per (image, part): y-hat of the original, of the swap, and the drop.

    ``draws`` holds ``(image_id, class c, draw j)``; the logit read is the image's own class
    ``c``. ``parts`` defaults to every swappable part of the generator (evidence and controls).
    Returns a frame with :data:`EFFECT_COLUMNS`.
    """
    rows: list[dict[str, Any]] = []
    for s in range(0, len(draws), batch):
        chunk = draws[s:s + batch]
        images, keys = [], []
        for image_id, c, j in chunk:
            renders = counterfactuals(params, int(c), int(j), parts)
            for name, pixels in renders.items():
                images.append(model_input(pixels, input_size))
                keys.append((int(image_id), int(c), name))
        logits = np.asarray(classify(np.stack(images)), dtype=np.float64)
        if logits.ndim != 2 or logits.shape[0] != len(keys):
            raise InputError(f"classifier: expected ({len(keys)}, C) logits, got {logits.shape}")
        y = {(i, n): float(logits[k, c]) for k, (i, c, n) in enumerate(keys)}
        for image_id, c, _ in chunk:
            evidence = set(evidence_of(params, int(c)))
            y0 = y[(int(image_id), "original")]
            for (i, name), v in y.items():
                if i == int(image_id) and name != "original":
                    rows.append({"image_id": i, "category": int(c), "part": name, "evidence": name in evidence,
                                 "y": y0, "y_swapped": v, "drop": y0 - v})
        if progress is not None:
            progress(min(s + batch, len(draws)), len(draws))
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def summarise_effects(effects: pd.DataFrame) -> pd.DataFrame:
    """Per category and part: :func:`srae.metrics.degeneracy.part_effect_summary` of the
    per-image drops (mean, se, count, share, used) and whether the part is evidence by the
    generator's design. Columns ``category`` then those of the summary, then ``evidence``."""
    frames = []
    for c, g in effects.groupby("category", sort=True):
        parts = list(dict.fromkeys(g["part"]))
        s = part_effect_summary({p: g.loc[g["part"] == p, "drop"].to_numpy(float) for p in parts})
        ev = g.groupby("part")["evidence"].first()
        s.insert(0, "category", int(c))
        s["evidence"] = [bool(ev[p]) for p in s["part"]]
        frames.append(s)
    cols = ["category", "part", "mean", "se", "count", "share", "used", "evidence"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def concept_scores(hist: np.ndarray, column_names: Sequence[str], groups: Mapping[str, Sequence[str]],
                   used: Sequence[str], shares: Sequence[float], min_share: float = 0.1,
                   ignore: Sequence[str] = ()) -> dict[str, float]:
    """``concept_coverage``, ``concept_purity`` and ``concept_recovery`` of one explanation
    against the parts the CNN uses (recovery: the mean share of each map's located mass on
    those parts' columns, :func:`srae.metrics.concepts.concept_recovery`).

    ``hist`` (n, K) is each map's mean located mass over ``column_names``; ``groups`` maps
    each swappable part to its annotation columns (a bird's wing to its left and right wing);
    ``shares`` is each map's mean share of y-hat (1 for a single map of y-hat). Used parts
    that have no annotation column (a room's "control" object) are left out, and so are the
    ``ignore`` columns (e.g. unlabeled pixels of object masks, as in locality). NaN entries
    mean "not defined" (no used part, no known share, or no qualifying map for purity)."""
    keep = [k for k, name in enumerate(column_names) if name not in set(ignore)]
    hist = np.asarray(hist, dtype=np.float64)[:, keep]
    column_names = [column_names[k] for k in keep]
    known = [m for members in groups.values() for m in members]
    mass, names = group_mass(hist, column_names, groups, known=known)
    scored = [u for u in used if u in groups]
    if not scored:
        return {"concept_coverage": float("nan"), "concept_purity": float("nan"), "concept_recovery": float("nan")}
    members = {str(m).strip().lower() for u in scored for m in groups[u]}
    columns = [k for k, name in enumerate(column_names) if str(name).strip().lower() in members]
    return {"concept_coverage": causal_coverage(mass, names, shares, scored, min_share),
            "concept_purity": concept_purity(mass, names, shares, scored, min_share),
            "concept_recovery": concept_recovery(hist, columns)}
