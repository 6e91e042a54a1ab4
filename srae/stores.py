"""Small helpers shared by the stores (features, heatmaps, checkpoints): root attributes,
completion, temporary file names."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from srae import cancel
from srae.errors import SraeError
from srae.shared_setting import SharedSetting

log = logging.getLogger(__name__)


def temp_beside(path: str | Path) -> Path:
    """A temporary name next to ``path``, unique to this process and call: two runs writing the
    same file at once (two schedules on one cache) never write into each other's temp file,
    and the final ``replace`` is atomic."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


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


# Root attribute of stores whose arrays store every chunk (zarr's write_empty_chunks): a chunk
# file that is missing there means damage, not "all fill value", and reads would silently
# return the fill value (zeros) in its place.
ALL_CHUNKS = "all_chunks"
ARRAY_CONFIG = {"write_empty_chunks": True}


def _write_empty_chunks(value: bool) -> None:
    import zarr

    zarr.config.set({"array.write_empty_chunks": value})


def _read_empty_chunks() -> bool:
    import zarr

    return zarr.config.get("array.write_empty_chunks")


# zarr's write_empty_chunks is not saved with an array, and each ``group[name]`` handle starts
# from the global default, so the setting is made global while writing, shared by the writers
# in Prefect's thread pool (none may switch it off under another).
_EVERY_CHUNK = SharedSetting(_read_empty_chunks, _write_empty_chunks, True)


def every_chunk_written() -> contextlib.AbstractContextManager[None]:
    """While any such block runs (in any thread), zarr stores chunks that equal the fill value
    too, so a missing chunk file means damage (:func:`missing_chunks`)."""
    return _EVERY_CHUNK.held()


def is_complete(path: str | Path) -> bool:
    """True iff the store at ``path`` carries ``complete: true`` (written last on success) and,
    where every chunk is stored, no chunk file is missing or changed size since then."""
    attrs = root_attrs(path)
    return bool(attrs and attrs.get("complete") is True) and not damage(path, attrs)


# Root attribute written with ``complete: true``: the byte size of every chunk file then. A chunk
# file cut short later (a full disk, an interrupted copy of the cache) is then seen before any
# read, and the store is rebuilt rather than failing in the middle of scoring.
CHUNK_BYTES = "chunk_bytes"


def completion_attrs(path: str | Path) -> dict:
    """The attributes that mark the store at ``path`` finished: ``complete`` and the chunk
    file sizes :func:`damage` compares against later."""
    return {CHUNK_BYTES: {key: f.stat().st_size for key, f in _chunk_files(path)[0].items() if f.is_file()},
            "complete": True}


def damage(path: str | Path, attrs: dict | None) -> list[str]:
    """What is missing or changed in a store marked complete whose arrays store every chunk
    (``attrs``: its root attributes); ``[]`` for any other store. Such a store must be rebuilt,
    never read."""
    if not (attrs and attrs.get("complete") is True and attrs.get(ALL_CHUNKS)):
        return []
    sizes = attrs.get(CHUNK_BYTES)
    return missing_chunks(path, sizes if isinstance(sizes, dict) else None)


def _chunk_files(path: str | Path) -> tuple[dict[str, Path], dict[str, list[str]], list[str]]:
    """Every chunk file the arrays of the Zarr v3 group at ``path`` should have (default
    "c/i/j/..." keys), as {"<array>/c/i/j": file}; the keys per array; arrays whose metadata
    cannot be read."""
    files: dict[str, Path] = {}
    per_array: dict[str, list[str]] = {}
    unreadable = []
    for meta_file in sorted(Path(path).glob("*/zarr.json")):
        name = meta_file.parent.name
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if meta.get("node_type") != "array":
                continue
            shape = meta["shape"]
            grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        except (ValueError, OSError, KeyError, TypeError):
            unreadable.append(name)
            continue
        counts = [-(-int(s) // int(c)) for s, c in zip(shape, grid)] if all(shape) else [0]
        keys = per_array.setdefault(name, [])
        for idx in itertools.product(*(range(k) for k in counts)):
            key = "/".join((name, "c", *map(str, idx)))
            files[key] = meta_file.parent.joinpath("c", *map(str, idx))
            keys.append(key)
    return files, per_array, unreadable


def missing_chunks(path: str | Path, sizes: dict[str, int] | None = None) -> list[str]:
    """``"<array>: k of n chunk files missing"`` for each array of the Zarr v3 group at ``path``
    lacking some of the chunk files its chunk grid has (each expected key is checked, so zarr's
    leftover temp files cannot stand in for one); with ``sizes`` (:data:`CHUNK_BYTES`), also
    ``"<array>: k of n chunk files changed size"`` for files whose size differs from it."""
    files, per_array, unreadable = _chunk_files(path)
    out = [f"{name}: metadata unreadable" for name in unreadable]
    for name, keys in per_array.items():
        missing = changed = 0
        for key in keys:
            try:
                st = files[key].stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                missing += 1
            elif sizes is not None and key in sizes and sizes[key] != st.st_size:
                changed += 1
        if missing:
            out.append(f"{name}: {missing} of {len(keys)} chunk files missing")
        if changed:
            out.append(f"{name}: {changed} of {len(keys)} chunk files changed size since the store was finished")
    return sorted(out)


@contextlib.contextmanager
def writer_lock(store: Path, wait: float = 0.0, what: str = "store") -> Iterator[int]:
    """Hold the exclusive writer lock of ``store`` (``<store>.lock``, its folder created if
    missing); yields its fd.

    flock locks die with their process, so a killed writer never leaves a stale lock. When
    another writer holds it: wait up to ``wait`` seconds for it (a second scheduled run on
    the same cache then reuses the first one's store), else a one-line error.
    """
    import fcntl

    lock_path = store.with_name(store.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)  # a store not yet written may lack its folder
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
                if time.monotonic() >= deadline:
                    raise SraeError(f"{what} {store}: another writer ({holder}) holds {lock_path}; "
                                    "wait for it to finish") from None
                if not told:
                    log.info("%s %s is being written by another run (%s); waiting for it", what, store, holder)
                    told = True
                cancel.check(f"waiting for {what} {store}")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except BaseException:  # gave up, stopped or interrupted while waiting: no descriptor left open
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
