"""Small helpers shared by the Zarr stores (features, heatmaps): root attributes, completion."""

from __future__ import annotations

import json
from pathlib import Path

from srae.errors import SraeError


def root_attrs(path: str | Path) -> dict | None:
    """The root attributes of a Zarr v3 store/group, read from ``zarr.json`` without opening it;
    None when there is no store at ``path``. A ``zarr.json`` that cannot be parsed (a write
    cut short) is a one-line :class:`SraeError` saying to delete the store."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SraeError(f"store metadata unreadable: {path}; delete it to rebuild "
                        f"({type(exc).__name__} in {meta.name})") from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise SraeError(f"store metadata unreadable: {path}; delete it to rebuild (no attribute mapping)")
    return attrs


def is_complete(path: str | Path) -> bool:
    """True iff the store at ``path`` carries ``complete: true`` (written last on success)."""
    attrs = root_attrs(path)
    return bool(attrs and attrs.get("complete") is True)
