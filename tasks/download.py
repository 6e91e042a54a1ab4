"""Stage 1: get the dataset onto disk (download or generate) and read its index.

Synthetic datasets are generated into ``<root>/<kind>-<hash of generation params>``
(:func:`srae.datasets.common.dataset_dir`, shared with ``srae features``) so two
configs never share (or overwrite) one another's images. Real datasets are downloaded by
:func:`srae.datasets.download.download` (resumable, checksummed) when ``download`` is on.

Datasets edited in place: the stage's cache key includes the size and ``mtime_ns`` of the
index / annotation files the reader parses (:func:`index_files`; a stat, no image is read),
so an edited file re-runs the stage; its result then carries the new manifest fingerprint
and ``annotations`` (sha256 of those files' bytes), which downstream cache keys see. A file
only touched re-runs this stage but gives the same result, so nothing downstream re-runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from srae.config import DatasetConfig, stable_hash
from srae.datasets.common import GEN_PARAMS, DatasetIndex, dataset_dir, find_dataset_dir  # noqa: F401 - re-exported
from srae.errors import SraeError
from srae.stores import writer_lock
from tasks.common import (WAIT_FOR_OTHER_RUN_S, retry_unless_user_error, TASK_DEFAULTS, record_work, run_logger,
                          stage_cache, timed)


def _lib(module: str, name: str):
    """A library function that another part of the project provides (clear error if absent)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SraeError(f"{module}.{name} is not available ({exc})") from None


def generated_root(path: Path) -> Path | None:
    """The generated dataset directory at or under ``path`` if its ``synth.json`` stamp says
    complete (None on real data, or while generation is unfinished)."""
    for stamp in [path / "synth.json", *sorted(path.glob("*/synth.json"))]:
        if not stamp.is_file():
            continue
        try:
            if json.loads(stamp.read_text()).get("complete"):
                return stamp.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def index_files(kind: str, root: str | Path, reader: dict[str, Any] | None = None) -> list[Path]:
    """The index / annotation files the reader of ``kind`` parses for the dataset at ``root``
    (optional ones included; empty when no dataset is there yet)."""
    reader = reader or {}
    try:
        base = find_dataset_dir(kind, root)
    except SraeError:
        return []
    if kind in ("synthbirds", "cub"):
        from srae.datasets import cub

        names = ["classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt", cub.EVIDENCE_FILE, "synth.json"]
        return [base / n for n in names]
    from srae.datasets import ade20k

    files = [base / n for n in (ade20k.ADE_INDEX_FILE, ade20k.EVIDENCE_FILE, "synth.json")]
    if reader.get("places_root"):
        places = Path(reader["places_root"])
        files += [places / ade20k.PLACES_CATEGORIES] + [places / n for n in ade20k.PLACES_LISTS.values()]
        # which image folders exist decides which list entries are used
        files += [places / d for dirs in ade20k.PLACES_IMAGE_DIRS.values() for d in dirs]
    return files


def index_stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """``(path, size, mtime_ns)`` per file (``-1, -1`` when absent; folders: presence only).
    Cheap: one stat per file."""
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            out.append((str(f), -1, -1))
            continue
        out.append((str(f), 0, 0) if f.is_dir() else (str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def annotations_sha256(files: list[Path]) -> str:
    """sha256 over the names and bytes of the (present) index files: what they say, so a
    file only touched keeps its value."""
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f"{f.name}|{f.stat().st_size}|".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{f.name}|{'dir' if f.is_dir() else 'absent'}|".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _read_index(kind: str, root: str, stamp: tuple, reader: str) -> DatasetIndex:
    opts = json.loads(reader)
    if kind in ("synthbirds", "cub"):
        return _lib("srae.datasets.cub", "read_cub")(Path(root), name=kind)
    places_root = opts.get("places_root")
    return _lib("srae.datasets.ade20k", "read_places_ade20k")(
        Path(root), class_names=opts.get("class_names"), places_root=Path(places_root) if places_root else None,
        places_per_class=opts.get("places_per_class"), name=kind)


def reader_options(ds: DatasetConfig) -> dict[str, Any]:
    """What the places/ADE20K reader needs besides the root (empty for CUB-style data)."""
    if ds.kind in ("synthbirds", "cub"):
        return {}
    return {"class_names": ds.class_names, "places_root": str(ds.places_root) if ds.places_root else None,
            "places_per_class": ds.places_per_class}


def places_notes(index: DatasetIndex, places_root: str | Path | None) -> list[str]:
    """A report note when Places365 was asked for (``places_root``) but no Places image made
    it into ``index`` (its file lists or image folders are missing): the reader only logged it."""
    if places_root is None or "mask_path" not in index.images:
        return []
    if index.images["mask_path"].isna().any():  # Places rows are the ones without an ADE20K object mask
        return []
    return [f"dataset: no Places365 images were found under {places_root} (file lists or image folders "
            "missing); the explainers were trained on ADE20K images only"]


def load_index(dataset: dict[str, Any]) -> DatasetIndex:
    """The index of the dataset described by :func:`prepare_dataset`'s result (memoised per
    process while the directory is unchanged)."""
    p = Path(dataset["root"])
    if not p.exists():
        raise SraeError(f"dataset {dataset['kind']}: {p} does not exist")
    opts = dataset.get("reader") or {}
    stamp = (p.stat().st_mtime_ns, index_stamp(index_files(dataset["kind"], p, opts)))
    return _read_index(dataset["kind"], str(p), stamp, json.dumps(opts, sort_keys=True))


def _generate(ds: DatasetConfig, out: Path) -> Path:
    fn_name = {"synthbirds": "make_synthbirds", "synthrooms": "make_synthrooms"}[ds.kind]
    make = _lib("srae.datasets.synthetic", fn_name)
    return Path(make(out, classes=ds.classes, per_class=ds.per_class, size=ds.size, seed=ds.seed,
                     design=ds.design))


def _fetch(ds: DatasetConfig, root: Path) -> Path:
    """Download what the reader needs; returns its root (ADE20K for places)."""
    download = _lib("srae.datasets.download", "download")
    if ds.kind == "cub":
        return download("cub", root, url=ds.url, md5=ds.md5)
    if ds.places_root is not None and not Path(ds.places_root).exists():
        download("places", Path(ds.places_root).parent, images=True)
    return download("ade20k", root, url=ds.url, md5=ds.md5)


def _present(ds: DatasetConfig, path: Path) -> bool:
    """Whether a real dataset is on disk where its reader looks (CUB_200_2011 / ADE20K dir, and
    the Places365 categories file: a download that failed after creating the folder used to
    count as present and was never retried)."""
    from srae.datasets.ade20k import PLACES_CATEGORIES

    try:
        find_dataset_dir(ds.kind, path)
    except SraeError:
        return False
    return ds.places_root is None or (Path(ds.places_root) / PLACES_CATEGORIES).is_file()


def _dataset_outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    ds = DatasetConfig.model_validate(inputs["dataset"])
    path = dataset_dir(ds)
    found = generated_root(path) if ds.kind.startswith("synth") else (path if _present(ds, path) else None)
    if found is None:
        return [(str(path), False)]
    # the index files' stats: an edited annotation file changes the key, so the stage re-runs
    stamp = index_stamp(index_files(ds.kind, found, reader_options(ds)))
    return [(str(path), True), (f"index-files:{stable_hash(stamp)}", True)]


@task(name="dataset", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=stage_cache(_dataset_outputs),
      **TASK_DEFAULTS)
def prepare_dataset(dataset: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Generate / download the dataset if needed; return its root, fingerprint and names."""
    logger = run_logger()
    ds = DatasetConfig.model_validate(dataset)
    path = dataset_dir(ds)
    with timed() as t:
        if ds.kind.startswith("synth"):
            found = generated_root(path)
            if found is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with writer_lock(path, WAIT_FOR_OTHER_RUN_S, what="dataset"):  # another run may be generating it
                    found = generated_root(path)
                    if found is None:
                        path.mkdir(parents=True, exist_ok=True)
                        found = _generate(ds, path)
                        record_work(cache_dir, "dataset", str(path), t())
            path = found
        elif not _present(ds, path):
            if not ds.download:
                raise SraeError(f"dataset.root: no {ds.kind} dataset under {path} and dataset.download is false")
            path.parent.mkdir(parents=True, exist_ok=True)
            with writer_lock(path, WAIT_FOR_OTHER_RUN_S, what="dataset"):  # another run may be fetching it
                if not _present(ds, path):
                    _fetch(ds, path)
                    record_work(cache_dir, "dataset", str(path), t())
    info = {"kind": ds.kind, "root": str(path), "reader": reader_options(ds)}
    index = load_index(info)
    logger.info("dataset %s: %d images, %d classes, %d bad inputs", ds.kind, len(index.images),
                index.num_classes, len(index.bad_inputs))
    notes = places_notes(index, ds.places_root)
    return {
        **info, "fingerprint": index.manifest_fingerprint(),
        "annotations": annotations_sha256(index_files(ds.kind, path, info["reader"])),
        "num_classes": index.num_classes, "class_names": list(index.class_names),
        "n_images": int(len(index.images)),
        "bad_inputs": [{k: str(v) for k, v in b.items()} for b in index.bad_inputs],
        "notes": notes,
    }
