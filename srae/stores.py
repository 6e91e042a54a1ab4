"""Small helpers shared by the Zarr stores (features, heatmaps): root attributes, completion."""

from __future__ import annotations

import json
from pathlib import Path


def root_attrs(path: str | Path) -> dict | None:
    """The root attributes of a Zarr v3 store/group, read from ``zarr.json`` without opening it;
    None when there is no store at ``path``."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("attributes", {})


def is_complete(path: str | Path) -> bool:
    """True iff the store at ``path`` carries ``complete: true`` (written last on success)."""
    attrs = root_attrs(path)
    return bool(attrs and attrs.get("complete") is True)
