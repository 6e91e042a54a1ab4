"""Stage 1: get the dataset onto disk (download or generate) and read its index.

Synthetic datasets are generated into ``<root>/<kind>-<hash of generation params>`` so two
configs never share (or overwrite) one another's images. Real datasets are downloaded by
:func:`srae.datasets.download.download` (resumable, checksummed) when ``download`` is on.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from srae.config import DatasetConfig, stable_hash
from srae.datasets.common import DatasetIndex
from srae.errors import SraeError
from tasks.common import retry_unless_user_error, TASK_DEFAULTS, record_work, run_logger, stage_cache, timed

GEN_PARAMS = ("classes", "per_class", "size", "seed")


def dataset_dir(ds: DatasetConfig) -> Path:
    """Where the reader finds the dataset for this config."""
    if ds.kind.startswith("synth"):
        params = {k: getattr(ds, k) for k in GEN_PARAMS}
        return Path(ds.root) / f"{ds.kind}-{stable_hash(params, 10)}"
    return Path(ds.root)


def _lib(module: str, name: str):
    """A library function that another part of the project provides (clear error if absent)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SraeError(f"{module}.{name} is not available ({exc})") from None


def _generated_root(path: Path) -> Path | None:
    """The generated dataset directory under ``path`` if its ``synth.json`` stamp says complete."""
    for stamp in sorted(path.glob("*/synth.json")):
        try:
            if json.loads(stamp.read_text()).get("complete"):
                return stamp.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


@functools.lru_cache(maxsize=8)
def _read_index(kind: str, root: str, stamp: float, reader: str) -> DatasetIndex:
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


def load_index(dataset: dict[str, Any]) -> DatasetIndex:
    """The index of the dataset described by :func:`prepare_dataset`'s result (memoised per
    process while the directory is unchanged)."""
    p = Path(dataset["root"])
    if not p.exists():
        raise SraeError(f"dataset {dataset['kind']}: {p} does not exist")
    reader = json.dumps(dataset.get("reader") or {}, sort_keys=True)
    return _read_index(dataset["kind"], str(p), p.stat().st_mtime, reader)


def _generate(ds: DatasetConfig, out: Path) -> Path:
    fn_name = {"synthbirds": "make_synthbirds", "synthrooms": "make_synthrooms"}[ds.kind]
    make = _lib("srae.datasets.synthetic", fn_name)
    return Path(make(out, classes=ds.classes, per_class=ds.per_class, size=ds.size, seed=ds.seed))


def _fetch(ds: DatasetConfig, root: Path) -> Path:
    """Download what the reader needs; returns its root (ADE20K for places)."""
    download = _lib("srae.datasets.download", "download")
    if ds.kind == "cub":
        return download("cub", root, url=ds.url)
    if ds.places_root is not None and not Path(ds.places_root).exists():
        download("places", Path(ds.places_root).parent, images=True)
    return download("ade20k", root, url=ds.url)


def _present(ds: DatasetConfig, path: Path) -> bool:
    """Whether a real dataset is on disk where its reader looks (CUB_200_2011 / ADE20K dir)."""
    finder = ("srae.datasets.cub", "find_cub_dir") if ds.kind == "cub" else ("srae.datasets.ade20k", "find_ade_dir")
    try:
        _lib(*finder)(path)
    except SraeError:
        return False
    return ds.places_root is None or Path(ds.places_root).exists()


def _dataset_outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    ds = DatasetConfig.model_validate(inputs["dataset"])
    path = dataset_dir(ds)
    done = _generated_root(path) is not None if ds.kind.startswith("synth") else _present(ds, path)
    return [(str(path), done)]


@task(name="dataset", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error, cache_policy=stage_cache(_dataset_outputs),
      **TASK_DEFAULTS)
def prepare_dataset(dataset: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Generate / download the dataset if needed; return its root, fingerprint and names."""
    logger = run_logger()
    ds = DatasetConfig.model_validate(dataset)
    path = dataset_dir(ds)
    with timed() as t:
        if ds.kind.startswith("synth"):
            found = _generated_root(path)
            if found is None:
                path.mkdir(parents=True, exist_ok=True)
                found = _generate(ds, path)
                record_work(cache_dir, "dataset", str(path), t())
            path = found
        elif not _present(ds, path):
            if not ds.download:
                raise SraeError(f"dataset.root: no {ds.kind} dataset under {path} and dataset.download is false")
            _fetch(ds, path)
            record_work(cache_dir, "dataset", str(path), t())
    info = {"kind": ds.kind, "root": str(path), "reader": reader_options(ds)}
    index = load_index(info)
    logger.info("dataset %s: %d images, %d classes, %d bad inputs", ds.kind, len(index.images),
                index.num_classes, len(index.bad_inputs))
    return {
        **info, "fingerprint": index.manifest_fingerprint(),
        "num_classes": index.num_classes, "class_names": list(index.class_names),
        "n_images": int(len(index.images)),
        "bad_inputs": [{k: str(v) for k, v in b.items()} for b in index.bad_inputs],
    }
