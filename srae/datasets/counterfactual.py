"""Counterfactual renders of the synthetic datasets: the same scene with one part swapped.

A synthetic image is drawn from its own seeded random stream, so it can be drawn again
exactly, and again with one part (a bird's evidence slot, a room's evidence object) painted
in a nuisance colour while pose, background, every other colour and the noise stay the same.
Running the model on both measures what that part contributes to the class logit: a causal
ground truth for the explanations (see ``docs/design.md``, "Causal ground truth").

Each generator is one entry of :data:`GENERATORS`; :func:`counterfactuals` and
:func:`evidence_of` read the dataset's ``synth.json`` and dispatch on its generator.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from srae.datasets import synthbirds as sb
from srae.datasets import synthrooms as sr
from srae.datasets.synthetic import JPEG_SETTINGS, STAMP
from srae.errors import InputError

# Bump when a renderer's swaps change (nuisance colour streams, which object is the control):
# part effects computed from earlier renders are then measured again.
RENDER_VERSION = 1
__all__ = ["GENERATORS", "JPEG_SETTINGS", "RENDER_VERSION", "counterfactuals", "evidence_of", "jpeg_roundtrip",
           "part_columns", "synth_params"]


@dataclass(frozen=True)
class Generator:
    """How one synthetic generator redraws an image and names a class's evidence parts.

    ``parts`` maps each swappable part to the annotation columns it covers (a bird slot to
    its CUB parts, a room object to itself); ``render(params, c, j, parts)`` returns
    ``{"original": image, part: swapped image, ...}``; ``evidence(params, c)`` the parts the
    generator meant to carry class ``c``."""

    render: Callable[[Mapping[str, Any], int, int, Sequence[str] | None], dict[str, np.ndarray]]
    evidence: Callable[[Mapping[str, Any], int], list[str]]
    columns: Callable[[Mapping[str, Any]], dict[str, list[str]]]


def _bird_evidence(params: Mapping[str, Any], c: int) -> list[str]:
    return sb.class_slots(sb.class_pairs(params)[c])


def _bird_columns(params: Mapping[str, Any]) -> dict[str, list[str]]:
    return {slot: list(parts) for slot, parts in sb.SLOTS.items()}


def _room_columns(params: Mapping[str, Any]) -> dict[str, list[str]]:
    return {name: [name] for c in range(int(params["classes"])) for name in sr.room_evidence(params, c)}


GENERATORS: dict[str, Generator] = {
    "synthbirds": Generator(sb.bird_counterfactuals, _bird_evidence, _bird_columns),
    "synthrooms": Generator(sr.room_counterfactuals, sr.room_evidence, _room_columns),
}


def synth_params(dataset_dir: str | Path) -> dict[str, Any]:
    """The generator parameters in ``synth.json`` of a synthetic dataset directory."""
    path = Path(dataset_dir) / STAMP
    try:
        params = json.loads(path.read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a synthetic dataset's stamp ({exc})") from exc
    if params.get("generator") not in GENERATORS:
        raise InputError(f"{path}: unknown generator {params.get('generator')!r} "
                         f"(one of {', '.join(GENERATORS)})")
    return params


def generator(params: Mapping[str, Any]) -> Generator:
    """The :class:`Generator` entry of ``params["generator"]``."""
    try:
        return GENERATORS[str(params["generator"])]
    except KeyError:
        raise InputError(f"no counterfactual renderer for generator {params.get('generator')!r} "
                         f"(one of {', '.join(GENERATORS)})") from None


def counterfactuals(params: Mapping[str, Any], c: int, j: int,
                    parts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Draw ``j`` of class ``c`` and its one-part swaps (uint8 HxWx3, before JPEG encoding)."""
    return generator(params).render(params, c, j, parts)


def evidence_of(params: Mapping[str, Any], c: int) -> list[str]:
    """The parts the generator meant to carry class ``c``'s evidence."""
    return generator(params).evidence(params, c)


def part_columns(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each swappable part -> the annotation columns (CUB parts / ADE objects) it covers."""
    return generator(params).columns(params)


def jpeg_roundtrip(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` encoded and decoded as the generators save their images
    (:data:`srae.datasets.synthetic.JPEG_SETTINGS`), so a counterfactual reaches the model as
    its original did."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **JPEG_SETTINGS)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB")).copy()
