"""The in-memory dataset index shared by every reader (docs/design.md, "Data contracts").

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from srae.config import DatasetConfig

# The generation parameters that name a synthetic dataset's directory (see dataset_dir).
GEN_PARAMS: tuple[str, ...] = ("classes", "per_class", "size", "seed")

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
        """sha256 of what the features depend on: ids, paths, labels, splits, sizes, each
        image file's byte size (-1 when unreadable) and, for synthetic data, the generator
        stamp (``synth.json``: parameters and generator version).

        Cheap: one ``stat`` per image, no image is read. Images regenerated under the
        same names almost always change size; a new generator version always changes
        the stamp."""
        cols = self.images[["image_id", "path", "label", "split", "width", "height"]]
        payload = json.dumps(
            {"name": self.name, "classes": self.class_names, "rows": cols.astype(str).values.tolist(),
             "bytes": [_file_size(self.abspath(p)) for p in self.images["path"]],
             "generator": _synth_stamp(Path(self.root))},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(payload).hexdigest()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _synth_stamp(root: Path) -> object:
    """The parsed ``synth.json`` of a synthetic dataset at ``root`` or in one of its direct
    subfolders (synthrooms keeps it inside ``ADE20K_2021_17_01/``); None for real data, the
    raw text when it is not valid JSON."""
    found = [p for p in [root / "synth.json", *sorted(root.glob("*/synth.json"))] if p.is_file()]
    if not found:
        return None
    stamp = found[0]
    try:
        text = stamp.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------- reader helpers
# Shared by the CUB and ADE20K/Places readers (additive; nothing above depends on them).


def annotation_lines(path: Path, min_fields: int, *, maxsplit: int = -1) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of a whitespace-separated annotation file, blank lines skipped.

    A missing file or a line with fewer than ``min_fields`` fields is an
    :class:`~srae.errors.InputError` naming the file and the line.
    """
    from srae.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation file {path} is missing")
    out: list[tuple[int, list[str]]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            fields = line.split(None, maxsplit) if maxsplit >= 0 else line.split()
            if len(fields) < min_fields:
                raise InputError(f"{path}:{lineno}: expected {min_fields} fields, got {line.strip()!r}")
            out.append((lineno, fields))
    return out


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image after decoding it fully at reduced scale.

    Decoding (JPEG draft mode: 1/8 scale, still reading every byte) catches truncated and
    corrupt files that a header-only open would accept. Raises ``OSError``/``ValueError``.
    """
    from PIL import Image

    with Image.open(path) as img:
        size = img.size
        img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        img.load()
    return int(size[0]), int(size[1])


def probe_images(root: Path, rel_paths: list[str], workers: int = 2,
                 desc: str = "checking images") -> tuple[dict[str, tuple[int, int]], list[dict]]:
    """Probe many images; return ``({path: (w, h)}, bad_inputs)`` with one dict per failure.

    Shows a progress bar on a terminal (decoding all of CUB or ADE20K takes minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(rel: str) -> tuple[str, tuple[int, int] | None, str]:
        try:
            return rel, probe_image(Path(root) / rel), ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure marks the image bad
            return rel, None, f"{type(exc).__name__}: {exc}"

    sizes: dict[str, tuple[int, int]] = {}
    bad: list[dict] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        results = pool.map(one, rel_paths)
        for rel, size, reason in tqdm(results, total=len(rel_paths), desc=desc, unit="img", disable=None,
                                      mininterval=1.0, leave=False):
            if size is None:
                bad.append({"path": rel, "reason": f"unreadable image ({reason})"})
            else:
                sizes[rel] = size
    finally:
        # On Ctrl-C / SIGTERM the queued probes are dropped (a `with` block would wait for all
        # of them: minutes on CUB or ADE20K); only those already running finish.
        pool.shutdown(wait=True, cancel_futures=True)
    return sizes, bad


def images_frame(rows: list[dict]) -> pd.DataFrame:
    """The ``images`` frame from row dicts: integer columns as int64, missing values as None."""
    frame = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))
    frame = frame.astype({"image_id": "int64", "label": "int64", "width": "int64", "height": "int64"})
    for col in ("bbox", "parts", "mask_path"):
        values = frame[col].astype(object).tolist()
        frame[col] = pd.Series([None if v is None or (isinstance(v, float) and v != v) else v for v in values],
                               index=frame.index, dtype=object)
    return frame.reset_index(drop=True)


def synthetic_generator(directory: Path) -> str | None:
    """``"synthbirds"``/``"synthrooms"`` when ``directory`` holds a synthetic dataset's stamp, else None."""
    stamp = Path(directory) / "synth.json"
    try:
        return str(json.loads(stamp.read_text())["params"]["generator"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_dataset_dir(kind: str, root: str | Path) -> Path:
    """The directory the reader of ``kind`` reads under ``root``: ``CUB_200_2011`` for
    synthbirds/cub, the ADE20K directory for synthrooms/places. :class:`~srae.errors.SraeError`
    when no such dataset is there."""
    if kind in ("synthbirds", "cub"):
        from srae.datasets.cub import find_cub_dir

        return find_cub_dir(Path(root))
    from srae.datasets.ade20k import find_ade_dir

    return find_ade_dir(Path(root))


def dataset_dir(ds: DatasetConfig) -> Path:
    """Where the pipeline keeps the dataset of a config: ``dataset.root`` for real data;
    ``<root>/<kind>-<hash of generation params>`` for synthetic data, so two configs never
    share (or overwrite) one another's images. ``srae run`` generates there and
    ``srae features`` reads from there."""
    if ds.kind.startswith("synth"):
        from srae.config import stable_hash

        params = {k: getattr(ds, k) for k in GEN_PARAMS}
        return Path(ds.root) / f"{ds.kind}-{stable_hash(params, 10)}"
    return Path(ds.root)
