"""Feature extraction into the Zarr v3 feature store (docs/design.md, "Data contracts") and
reading it back.

One store per fingerprint: ``<store_root>/<fingerprint>.zarr`` with arrays ``z`` (N, D)
float32, ``logits`` (N, C) float32, ``labels`` (N,) int64, ``image_id`` (N,) int64, plus
``split`` (N,) int8 (codes into the ``split_names`` attr) and ``valid`` (N,) bool (False
for an image that could not be decoded; its rows are zeros and it is listed in the
``bad_inputs`` attr). Rows follow the dataset index order. Arrays are chunked by rows
(whole rows per chunk) so reading a subset of images touches only its chunks.

Extraction writes whole chunks, in order, from a background thread, and records
``rows_done`` after each; a rerun resumes at ``rows_done`` with the batch size and chunking
recorded in the store, so it ends bit for bit equal to an uninterrupted run. ``complete:
true`` is written last; a store without it is resumed, never read. One writer per store:
an exclusive ``flock`` on ``<store>.lock``; a second writer gets a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from srae import __version__
from srae.backbones import Backbone, resolve_device
from srae.datasets.common import DatasetIndex
from srae import cancel, stores
from srae.errors import InputError, SraeError
from srae.images import BAD_LABEL, ImageDataset, normalize

log = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, ...] = ("train", "test")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHUNK_BYTES = 4 << 20  # target bytes of one z chunk
MAX_CHUNK_ROWS = 1024


@dataclass
class FeatureSet:
    """Rows of a finished feature store, as numpy arrays (``split`` as strings)."""

    path: Path
    z: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    image_id: np.ndarray
    split: np.ndarray
    attrs: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    def __len__(self) -> int:
        return len(self.image_id)


def feature_fingerprint(dataset_fingerprint: str, checkpoint_sha256: str, layer: str,
                        preprocessing: dict, package_version: str = __version__) -> str:
    """sha256 of exactly the inputs the stored features depend on (docs/design.md, "Data contracts")."""
    payload = {"dataset_fingerprint": dataset_fingerprint, "checkpoint_sha256": checkpoint_sha256,
               "layer": layer, "preprocessing": preprocessing, "package_version": package_version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fingerprint_inputs(index: DatasetIndex, backbone: Backbone, *, checkpoint_sha256: str | None = None,
                       layer: str = "fc6", precision: str = "fp32") -> dict:
    """The inputs the store is keyed by, as stored in its attributes (precision goes
    into the preprocessing dict: it changes the values)."""
    return {"dataset_fingerprint": index.manifest_fingerprint(),
            "checkpoint_sha256": checkpoint_sha256 or backbone.checkpoint_sha256, "layer": layer,
            "preprocessing": {**backbone.preprocessing(), "precision": precision},
            "package_version": __version__}


def store_path(index: DatasetIndex, backbone: Backbone, store_root: str | Path, *,
               checkpoint_sha256: str | None = None, layer: str = "fc6", precision: str = "fp32") -> Path:
    """Where :func:`extract_features` writes (or finds) the store for these inputs."""
    inputs = fingerprint_inputs(index, backbone, checkpoint_sha256=checkpoint_sha256, layer=layer,
                                precision=precision)
    return Path(store_root) / f"{feature_fingerprint(**inputs)}.zarr"


def is_complete(path: str | Path) -> bool:
    """True iff ``path`` is a feature store whose extraction finished."""
    return stores.is_complete(path)


def writer_lock(store: Path, wait: float = 0.0) -> contextlib.AbstractContextManager[int]:
    """The feature store's exclusive writer lock (:func:`srae.stores.writer_lock`)."""
    return stores.writer_lock(Path(store), wait, what="feature store")


def _close_inherited_lock(fd: int, ident: tuple[int, int], _worker_id: int) -> None:
    """DataLoader worker init: drop the lock fd a forked worker inherited, so the lock
    dies with the writer even if a worker outlives it briefly."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == ident:
            os.close(fd)


def _chunk_rows(batch_size: int, row_bytes: int) -> int:
    """Rows per chunk: a multiple of the batch size, about CHUNK_BYTES, at most MAX_CHUNK_ROWS."""
    k = max(1, min(CHUNK_BYTES // max(1, batch_size * row_bytes), MAX_CHUNK_ROWS // batch_size))
    return k * batch_size


def _create_store(path: Path, index: DatasetIndex, attrs: dict, z_dim: int, chunk_rows: int) -> None:
    import zarr

    if path.exists():
        shutil.rmtree(path)
    n, c = len(index.images), index.num_classes
    root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={**attrs, stores.ALL_CHUNKS: True})
    rows = (chunk_rows,)
    cfg = stores.ARRAY_CONFIG  # every chunk stored, so a missing chunk file is found (stores.missing_chunks)
    root.create_array("z", shape=(n, z_dim), chunks=(chunk_rows, z_dim), dtype="float32", fill_value=0.0, config=cfg)
    root.create_array("logits", shape=(n, c), chunks=(chunk_rows, c), dtype="float32", fill_value=0.0, config=cfg)
    for name, dtype in (("labels", "int64"), ("image_id", "int64"), ("split", "int8"), ("valid", "bool")):
        root.create_array(name, shape=(n,), chunks=rows, dtype=dtype, fill_value=0, config=cfg)
    frame = index.images
    root["labels"][:] = frame["label"].to_numpy(dtype=np.int64)
    root["image_id"][:] = frame["image_id"].to_numpy(dtype=np.int64)
    root["split"][:] = frame["split"].map({s: i for i, s in enumerate(SPLIT_NAMES)}).to_numpy(dtype=np.int8)
    root.attrs.update({"rows_done": 0})  # written last: a store without it is recreated


def _open_for_writing(path: Path, index: DatasetIndex, attrs: dict, z_dim: int, chunk_rows: int):
    """Open the unfinished store at ``path`` (created if absent or half-created)."""
    import zarr

    old = stores.root_attrs(path)
    if old is None or "rows_done" not in old or old.get("fingerprint") != attrs["fingerprint"]:
        _create_store(path, index, attrs, z_dim, chunk_rows)
    elif damage := stores.damage(path, old):  # marked done, yet chunk files are missing
        log.warning("features: %s is damaged (%s); rebuilding it", path, "; ".join(damage))
        _create_store(path, index, attrs, z_dim, chunk_rows)
    else:
        log.info("features: resuming %s at row %d/%d (batch size %d as started)", path, old["rows_done"],
                 old["num_images"], old["batch_size"])
    return zarr.open_group(str(path), mode="r+")


def _forward_batches(loader: DataLoader, bb: Backbone, dev: torch.device,
                     autocast_dtype: torch.dtype | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(z, logits, labels)`` per batch as numpy. On CUDA the device->host copy of
    batch k is queued (pinned, non-blocking) and collected after batch k+1 is launched,
    so the GPU never waits for the host."""
    pending = None
    mean = torch.tensor(bb.mean, device=dev)
    std = torch.tensor(bb.std, device=dev)
    for x, y, _ in loader:
        cancel.check(f"features {bb.name}")
        x = normalize(x.to(dev, non_blocking=True), mean, std)
        amp = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            z, logits = bb.forward(x)
        if dev.type == "cuda":
            zh = torch.empty(z.shape, dtype=torch.float32, pin_memory=True)
            lh = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
            zh.copy_(z, non_blocking=True)
            lh.copy_(logits, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            item = (zh, lh, y, event)
        else:
            item = (z.float(), logits.float(), y, None)
        if pending is not None:
            yield _collect(pending)
        pending = item
    if pending is not None:
        yield _collect(pending)


def _collect(item: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, logits, y, event = item
    if event is not None:
        event.synchronize()
    return z.numpy(), logits.numpy(), y.numpy()


def _write_chunk(root, start: int, z: np.ndarray, logits: np.ndarray, valid: np.ndarray,
                 bad_inputs: list[dict]) -> None:
    end = start + len(z)
    root["z"][start:end] = z
    root["logits"][start:end] = logits
    root["valid"][start:end] = valid
    root.attrs.update({"rows_done": end, "bad_inputs": bad_inputs})


def extract_features(index: DatasetIndex, backbone: Backbone, store_root: str | Path, *,
                     checkpoint_sha256: str | None = None, layer: str = "fc6", device: str = "auto",
                     batch_size: int = 64, num_workers: int | None = None, precision: str = "fp32",
                     chunk_rows: int | None = None, progress: bool = True,
                     on_batch: Callable[[int], None] | None = None, wait_for_writer: float = 0.0) -> Path:
    """Z and logits of every image of ``index`` -> ``<store_root>/<fingerprint>.zarr``.

    Reuses a finished store with the same fingerprint, resumes an unfinished one (with the
    batch size and chunking it was started with). ``checkpoint_sha256`` defaults to
    ``backbone.checkpoint_sha256``. ``precision``: fp32 (default), bf16 or fp16 (autocast;
    stored as float32). ``chunk_rows`` must be a multiple of ``batch_size``
    (default: about 4 MB of z per chunk). ``on_batch(rows_processed)`` runs after each batch.
    The backbone is moved to the device and put in eval mode. ``wait_for_writer``: seconds to
    wait when another process is writing the same store (0: fail at once, naming it).
    """
    if layer != backbone.z_layer:
        raise InputError(f"features: layer {layer!r} not supported by {backbone.name} (Z is {backbone.z_layer!r})")
    if backbone.num_classes != index.num_classes:  # logits would be cut or fail to fit the store
        raise InputError(f"features: {backbone.name} has {backbone.num_classes} classes, dataset {index.name!r} "
                         f"has {index.num_classes}")
    if precision not in PRECISIONS:
        raise InputError(f"features: precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise InputError(f"features: batch_size {batch_size} must be >= 1")
    n = len(index.images)
    if n == 0:
        raise InputError(f"features: dataset {index.name!r} has no images")
    unknown = set(index.images["split"]) - set(SPLIT_NAMES)
    if unknown:
        raise InputError(f"features: dataset {index.name!r} has unknown splits {sorted(unknown)}")
    dev = resolve_device(device)  # before anything is written: an unusable device leaves no store
    inputs = fingerprint_inputs(index, backbone, checkpoint_sha256=checkpoint_sha256, layer=layer,
                                precision=precision)
    fp = feature_fingerprint(**inputs)
    path = Path(store_root) / f"{fp}.zarr"
    if is_complete(path):
        log.info("features: reusing finished store %s", path)
        return path
    from srae.datasets.staging import ensure_directory

    ensure_directory(Path(store_root), "features: store root")  # a file in the way: one line
    row_bytes = 4 * (backbone.z_dim + index.num_classes)
    rows = chunk_rows or _chunk_rows(batch_size, row_bytes)
    if rows % batch_size:
        raise InputError(f"features: chunk_rows {rows} must be a multiple of batch_size {batch_size}")
    attrs = {"fingerprint": fp, **inputs, "backbone": backbone.name, "dataset": index.name,
             "class_names": list(index.class_names), "split_names": list(SPLIT_NAMES), "num_images": n,
             "z_dim": backbone.z_dim, "batch_size": batch_size, "chunk_rows": rows, "bad_inputs": []}
    with writer_lock(path, wait_for_writer) as lock_fd, stores.every_chunk_written():
        if is_complete(path):  # another writer finished between our check and the lock
            return path
        root = _open_for_writing(path, index, attrs, backbone.z_dim, rows)
        _run_extraction(root, index, backbone, lock_fd, dev, num_workers, PRECISIONS[precision],
                        progress, on_batch)
        root.attrs.update(stores.completion_attrs(path))
    log.info("features: wrote %s (%d images, D=%d)", path, n, backbone.z_dim)
    return path


def _run_extraction(root, index: DatasetIndex, bb: Backbone, lock_fd: int, dev: torch.device,
                    num_workers: int | None, autocast_dtype: torch.dtype | None, progress: bool,
                    on_batch: Callable[[int], None] | None) -> None:
    """Fill rows ``rows_done..N`` of an open store, whole chunks at a time."""
    attrs = dict(root.attrs)
    start, n = int(attrs["rows_done"]), int(attrs["num_images"])
    batch_size, rows = int(attrs["batch_size"]), int(attrs["chunk_rows"])
    bad_inputs = list(attrs.get("bad_inputs", []))
    bb.to(dev).eval()
    ds = ImageDataset(index, None, bb.input_size, bb.mean, bb.std, normalize=False)
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
    st = os.fstat(lock_fd)
    loader = DataLoader(Subset(ds, range(start, n)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if workers else None,
                        worker_init_fn=partial(_close_inherited_lock, lock_fd, (st.st_dev, st.st_ino)))
    bar = tqdm(total=n, initial=start, desc=f"features {bb.name}", unit="img", disable=not progress)
    pending: list[Future] = []
    chunk_start, done = start, start
    buf_z, buf_l, buf_v = [], [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="srae-zarr-writer") as writer:
        for z, logits, y in _forward_batches(loader, bb, dev, autocast_dtype):
            valid = y != BAD_LABEL
            for i in np.flatnonzero(~valid):
                row = done + int(i)
                bad_inputs.append({"image_id": int(ds.image_ids[row]), "path": str(ds.rows["path"].iloc[row]),
                                   "reason": ds.failure_reason(row) or "unreadable"})
                z[i], logits[i] = 0.0, 0.0
            buf_z.append(z.copy())
            buf_l.append(logits.copy())
            buf_v.append(valid)
            done += len(y)
            bar.update(len(y))
            if done - chunk_start == rows or done == n:
                while len(pending) >= 2:  # bounded queue: at most two chunks in flight
                    pending.pop(0).result()
                pending.append(writer.submit(_write_chunk, root, chunk_start, np.concatenate(buf_z),
                                             np.concatenate(buf_l), np.concatenate(buf_v), list(bad_inputs)))
                chunk_start, buf_z, buf_l, buf_v = done, [], [], []
            if on_batch is not None:
                on_batch(done)
        for f in pending:
            f.result()
    bar.close()
    if done != n:
        raise SraeError(f"features: extraction stopped at row {done} of {n}")


def open_features(path: str | Path, *, rows: np.ndarray | None = None,
                  include_invalid: bool = False) -> FeatureSet:
    """Read a finished store (all rows, or the given row positions). Rows of unreadable
    images are left out unless ``include_invalid``. An unfinished store is an error."""
    import zarr

    path = Path(path)
    attrs = stores.root_attrs(path)
    if attrs is None:
        raise InputError(f"feature store {path}: not found")
    if attrs.get("complete") is not True:
        raise InputError(f"feature store {path}: incomplete (extraction interrupted); rerun `srae features` to resume")
    if damage := stores.damage(path, attrs):  # marked done, but chunk files are gone: never read them as zeros
        raise InputError(f"feature store {path}: damaged ({'; '.join(damage)}); "
                         "rerun `srae features` (or `srae run`) to rebuild it")
    root = zarr.open_group(str(path), mode="r")
    sel = slice(None) if rows is None else _row_positions(rows, int(attrs["num_images"]), path)

    def read(name: str) -> np.ndarray:
        arr = root[name]
        return arr[:] if rows is None else arr.get_orthogonal_selection((sel,) + (slice(None),) * (arr.ndim - 1))

    keep = read("valid") if not include_invalid else slice(None)
    split_names = np.asarray(attrs["split_names"])
    return FeatureSet(path=path, z=read("z")[keep], logits=read("logits")[keep], labels=read("labels")[keep],
                      image_id=read("image_id")[keep], split=split_names[read("split")[keep]], attrs=attrs)


def _row_positions(rows: Any, n: int, path: Path) -> np.ndarray:
    """``rows`` as int64 positions: integers in 0..n-1, or a boolean mask of length n
    (numpy would otherwise read True/False as rows 1/0 and cut 0.5 down to row 0)."""
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise InputError(f"feature store {path}: a boolean rows mask needs {n} entries, got shape {arr.shape}")
        return np.flatnonzero(arr)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"feature store {path}: rows must be integer positions or a boolean mask, got {arr.dtype}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise InputError(f"feature store {path}: row index out of range 0..{n - 1}")
    return arr
