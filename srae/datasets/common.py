"""The in-memory dataset index shared by every reader (DESIGN §2).

Every dataset (CUB-200-2011, ADE20K/Places365, the synthetic ones) is read into one
:class:`DatasetIndex`. Its ``images`` frame has one row per image with the columns
``image_id`` (int), ``path`` (str, relative to ``root``), ``label`` (0-based int),
``split`` ("train" | "test"), ``width``/``height`` (original pixels), ``bbox``
(tuple ``(x, y, w, h)`` or None; CUB only), ``parts`` (``(P, 3)`` float array of
x, y, visible or None; CUB only) and ``mask_path`` (str relative to ``root`` or None;
ADE20K only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

IMAGE_COLUMNS = ("image_id", "path", "label", "split", "width", "height", "bbox", "parts", "mask_path")


@dataclass
class DatasetIndex:
    """One dataset read into memory: images, class names, part/object names, ground truth."""

    name: str
    root: Path
    class_names: list[str]
    images: pd.DataFrame
    part_names: list[str] = field(default_factory=list)
    object_names: dict[int, str] = field(default_factory=dict)
    # Synthetic data only: class index -> names of the parts/objects carrying its evidence.
    evidence: dict[int, list[str]] = field(default_factory=dict)
    # Images that could not be read: dicts with at least "path" and "reason".
    bad_inputs: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [c for c in IMAGE_COLUMNS if c not in self.images.columns]
        if missing:
            raise ValueError(f"dataset {self.name!r}: images frame lacks columns {missing}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def abspath(self, rel: str) -> Path:
        return Path(self.root) / rel

    def split(self, split: str) -> pd.DataFrame:
        return self.images[self.images["split"] == split]

    def manifest_fingerprint(self) -> str:
        """sha256 of what the features depend on: ids, paths, labels, splits, sizes."""
        cols = self.images[["image_id", "path", "label", "split", "width", "height"]]
        payload = json.dumps(
            {"name": self.name, "classes": self.class_names, "rows": cols.astype(str).values.tolist()},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(payload).hexdigest()
