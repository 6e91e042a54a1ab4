"""Dask-parallel locality / orthogonality / concept-recovery scoring of heatmap groups.

A :class:`ScoreJob` names one heatmap Zarr group (``maps`` (M, n, H, W) float32, ``image_id``
(M,)) with its category, method and split. :func:`score` splits every job into chunks of
images, runs :func:`score_chunk` on a ``dask.distributed`` client (a LocalCluster by default,
or an existing scheduler at ``address``) - each task reads its heatmaps straight from Zarr -
and reduces the per-chunk statistics on the client, in chunk order, into rows of the long
metrics table (docs/design.md, "Data contracts"). :func:`score_serial` runs the very same
chunks in-process; both give identical results. Each job's mean histogram is returned too, so
concept scores against the parts the CNN uses can be computed later (:mod:`srae.causal`).

Annotations are scaled to the map grid by scaling alone (``x' = x * W / width``; see
docs/design.md, "Data contracts").
CUB-style data (parts + bbox) use :func:`part_probabilities`; ADE20K-style data (object masks)
use :func:`object_probabilities`, with the unlabeled label 0 left out of locality and of the
concept statistics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from srae import cancel
from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError
from srae.metrics.concepts import concept_summary
from srae.metrics.locality import PartGeometry, check_values, entropy, part_geometry, resize_labels_nearest
from srae.metrics.orthogonality import OrthogonalityStats
from srae.progress import ProgressLog

log = logging.getLogger(__name__)

UNLABELED = "unlabeled"  # the histogram column of object label 0 (left out of locality and concepts)
METRIC_COLUMNS = ["experiment", "category", "method", "metric", "split", "value", "n_features", "hparams"]
DEFAULT_METRICS = ("locality", "O1", "O2", "concept_recovery")
BLOCK_BYTES = 128 * 2**20  # heatmap bytes read per block inside a task


@dataclass(frozen=True)
class ScoreJob:
    """One heatmap group to score and how to label its rows.

    ``class_index`` is the category's class: with ``positives_only`` only images of that class
    are scored (the paper's "Positive" rows), and it selects the ground-truth evidence for
    concept recovery. ``metrics`` picks among "locality", "O1", "O2", "concept_recovery"
    (e.g. only "locality" for the "Z" and "ExcitationBP" columns).
    """

    heatmaps: str
    category: str | int  # label of the rows (class name or class index)
    method: str
    split: str = "test"
    class_index: int | None = None
    experiment: str = ""
    hparams: Mapping[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    positives_only: bool = True
    feature_rows: bool = True  # a ``locality_x<i>`` row per x-feature (off for thousands of Z dims)


@dataclass
class ChunkSpec:
    """Everything one task needs: small arrays only, the heatmaps are read from Zarr. Paths
    are absolute, so workers started in another directory open the same files."""

    job: int
    path: str
    start: int
    stop: int
    rows: np.ndarray  # offsets in [0, stop - start) of the images to score
    mode: str  # "parts" | "objects"
    parts: np.ndarray | None  # (len(rows), P, 3) original pixel coordinates
    bboxes: np.ndarray | None  # (len(rows), 4), NaN row = no bbox (whole map)
    sizes: np.ndarray  # (len(rows), 2) original width, height
    mask_paths: list[str] | None
    orthogonality: bool


@dataclass
class ChunkStats:
    """Per-chunk sums: histogram over columns ``cols`` and orthogonality statistics."""

    job: int
    images: int
    cols: np.ndarray  # (K,) column ids (parts: 0..P; objects: label ids)
    hist: np.ndarray  # (n, K) sum over images of the per-image probabilities
    orth: OrthogonalityStats | None


@dataclass
class ScoreResult:
    """Long metric rows, the per-class top-part table, each job's mean histogram, and notes
    on what was left out (e.g. concept rows of a job whose evidence names are unknown)."""

    metrics: pd.DataFrame
    concepts: pd.DataFrame
    histograms: list[tuple[list[str], np.ndarray]]
    notes: list[str] = field(default_factory=list)


def _add_sparse(cols: np.ndarray, hist: np.ndarray, new_cols: np.ndarray, new_hist: np.ndarray):
    """Sum two column-sparse histograms (columns sorted ascending)."""
    if cols.size == 0:
        return new_cols, new_hist.copy()
    union = np.union1d(cols, new_cols)
    out = np.zeros((hist.shape[0], union.size))
    out[:, np.searchsorted(union, cols)] += hist
    out[:, np.searchsorted(union, new_cols)] += new_hist
    return union, out


def load_ade_labels(path: str) -> np.ndarray:
    """ADE20K ``*_seg.png`` -> object class map ``(R // 10) * 256 + G`` (0 = unlabeled)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise InputError(f"object mask {path}: cannot be read ({exc})") from exc
    return (rgb[..., 0] // 10) * 256 + rgb[..., 1]


def spec_part_geometry(spec: ChunkSpec, k: int, height: int, width: int) -> PartGeometry:
    """Algorithm-1 geometry of image ``k`` of a "parts" spec on a ``height x width`` map grid
    (parts and bbox scaled from the image's original size, docs/design.md, "Data contracts")."""
    scale = np.array([width, height], dtype=np.float64) / spec.sizes[k]
    parts = spec.parts[k].copy()
    parts[:, :2] *= scale
    box = spec.bboxes[k]
    box = None if np.isnan(box).any() else box * np.r_[scale, scale]
    return part_geometry(parts, box, height, width)


def spec_labels(spec: ChunkSpec, k: int, height: int, width: int) -> np.ndarray:
    """Flat ``(height * width,)`` object labels of image ``k`` of an "objects" spec at map resolution."""
    return resize_labels_nearest(load_ade_labels(spec.mask_paths[k]), height, width).ravel()


def spec_object_columns(spec: ChunkSpec, height: int,
                        width: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The object labels present in an "objects" spec's images (sorted: the histogram's
    columns) and per image (its labels' positions among them, each pixel's index into its
    labels)."""
    uniq = [np.unique(spec_labels(spec, k, height, width), return_inverse=True) for k in range(len(spec.rows))]
    cols = np.unique(np.concatenate([u for u, _ in uniq])) if uniq else np.zeros(0, np.int64)
    return cols, [(np.searchsorted(cols, u), inv.ravel()) for u, inv in uniq]


def score_chunk(spec: ChunkSpec) -> ChunkStats:
    """Score one chunk of images of one heatmap group (runs on a Dask worker)."""
    import zarr

    arr = zarr.open_group(spec.path, mode="r")["maps"]
    _, n, h, w = arr.shape
    if spec.mode == "parts":
        geoms = [spec_part_geometry(spec, k, h, w) for k in range(len(spec.rows))]
        cols = np.arange(spec.parts.shape[1] + 1)
        hist = np.zeros((n, cols.size))
    else:
        cols, local = spec_object_columns(spec, h, w)
        hist = np.zeros((n, cols.size))
    orth = OrthogonalityStats(n=n, pixels=h * w) if spec.orthogonality else None
    per_image = max(1, h * w * 4 * max(1, min(arr.chunks[0], spec.stop - spec.start)))
    block = n if spec.orthogonality else max(1, min(n, BLOCK_BYTES // per_image))
    step = max(1, arr.chunks[0])
    for f0 in range(0, n, block):
        f1 = min(n, f0 + block)
        for s0 in range(spec.start - spec.start % step, spec.stop, step):
            # Read one stored chunk at a time: each is decompressed once and processed while it
            # is still in cache; only the rows of this task inside it are scored.
            lo, hi = max(s0, spec.start), min(s0 + step, spec.stop)
            mine = [(k, r) for k, r in enumerate(spec.rows) if lo <= spec.start + r < hi]
            if not mine:
                continue
            try:
                maps = np.asarray(arr[lo:hi, f0:f1])
            except Exception as exc:  # noqa: BLE001 - a damaged chunk file: codec errors of any kind
                raise SraeError(f"heatmaps {spec.path}: images {lo}..{hi - 1} cannot be read "
                                f"({type(exc).__name__}: {exc}); delete the store to redraw it") from None
            for k, r in mine:
                # Work on the stored dtype (float32): sums and sparse mat-vecs cast in cache-sized
                # pieces instead of materialising float64 copies of the block.
                img = maps[spec.start + r - lo].reshape(f1 - f0, -1)
                tot = img.sum(axis=1, dtype=np.float64)
                check_values(img, tot, f"{spec.path}/maps[{spec.start + int(r)}]")
                if spec.mode == "parts":
                    hist[f0:f1] += geoms[k].apply_flat(img, tot)
                else:
                    to_col, inv = local[k]
                    prob = img / np.where(tot > 0, tot, 1.0)[:, None]
                    idx = (np.arange(f1 - f0)[:, None] * cols.size + to_col[inv][None, :]).ravel()
                    hist[f0:f1] += np.bincount(idx, prob.ravel(), (f1 - f0) * cols.size).reshape(f1 - f0, -1)
                if orth is not None:
                    orth.add_flat(img.astype(np.float64), tot)
    return ChunkStats(spec.job, len(spec.rows), cols, hist, orth)


class _Annotations:
    """A DatasetIndex's per-image annotations as arrays, looked up by image id."""

    def __init__(self, index: DatasetIndex) -> None:
        self.index = index
        images = index.images
        ids = images["image_id"].to_numpy(dtype=np.int64)
        self.lookup = pd.Index(ids)
        if not self.lookup.is_unique:
            raise InputError(f"dataset {index.name!r}: duplicate image ids")
        self.ids = ids
        self.labels = images["label"].to_numpy()
        self.sizes = images[["width", "height"]].to_numpy(dtype=np.float64)
        has_parts = np.array([not _missing(p) for p in images["parts"]], dtype=bool)
        has_masks = np.array([not _missing(m) for m in images["mask_path"]], dtype=bool)
        if not (has_parts.any() or has_masks.any()):
            raise InputError(f"dataset {index.name!r}: has neither part annotations nor object masks")
        self.mode = "parts" if has_parts.any() else "objects"
        self.present = has_parts if self.mode == "parts" else has_masks
        if self.mode == "parts":
            shapes = {np.shape(p) for p, ok in zip(images["parts"], has_parts) if ok}
            shape = next(iter(shapes))
            if len(shapes) != 1 or len(shape) != 2 or shape[1] != 3:
                raise InputError(f"dataset {index.name!r}: part arrays must all be (P, 3); found {sorted(shapes)}")
            self.parts = np.full((len(ids), *shape), np.nan)
            for k in np.flatnonzero(has_parts):
                self.parts[k] = np.asarray(images["parts"].iloc[k], dtype=np.float64)
            self.bboxes = np.array([[np.nan] * 4 if _missing(b) else list(b) for b in images["bbox"]],
                                   dtype=np.float64).reshape(len(ids), 4)
        else:
            # absolute: workers of an existing cluster may run in another working directory
            self.masks = [os.path.abspath(index.abspath(m)) if ok else ""
                          for m, ok in zip(images["mask_path"], has_masks)]

    def positions(self, ids: np.ndarray, path: str) -> np.ndarray:
        """Row of each image id in the index; unknown ids raise InputError naming them."""
        pos = self.lookup.get_indexer(np.asarray(ids, dtype=np.int64))
        if (pos < 0).any():
            missing = np.asarray(ids)[pos < 0][:5].tolist()
            raise InputError(f"heatmaps {path}: image ids {missing} are not in dataset {self.index.name!r}")
        return pos

    def column_names(self, cols: np.ndarray) -> list[str]:
        if self.mode == "parts":
            names = list(self.index.part_names) or [f"part_{i}" for i in range(len(cols) - 1)]
            return names[: len(cols) - 1] + ["context"]
        names = {0: UNLABELED, **self.index.object_names}
        return [names.get(int(c), f"object_{int(c)}") for c in cols]


def _missing(value: Any) -> bool:
    """None / NaN cell of the images frame."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _chunk_spec(job_id: int, job: ScoreJob, ann: _Annotations, pos: np.ndarray, start: int,
                stop: int, orth: bool) -> ChunkSpec | None:
    """The spec of images ``[start, stop)`` (``pos``: their rows in the index), or None if empty."""
    keep = np.ones(stop - start, dtype=bool)
    if job.positives_only and job.class_index is not None:
        keep = ann.labels[pos] == job.class_index
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return None
    sel = pos[rows]
    bad = sel[~ann.present[sel]]
    if bad.size:
        what = "(P, 3) part array" if ann.mode == "parts" else "object mask"
        raise InputError(f"dataset {ann.index.name!r}: image {int(ann.ids[bad[0]])} has no {what}")
    sizes = ann.sizes[sel]
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise InputError(f"dataset {ann.index.name!r}: an image of {job.heatmaps} has no valid width/height")
    path = os.path.abspath(job.heatmaps)  # workers may run elsewhere (an existing cluster)
    if ann.mode == "parts":
        return ChunkSpec(job_id, path, start, stop, rows, "parts", ann.parts[sel], ann.bboxes[sel], sizes, None, orth)
    return ChunkSpec(job_id, path, start, stop, rows, "objects", None, None, sizes, [ann.masks[k] for k in sel], orth)


def plan(jobs: Sequence[ScoreJob], index: DatasetIndex, chunk_size: int | None = None) -> list[ChunkSpec]:
    """Split every job into chunk specs (images ``[start, stop)``, aligned to Zarr chunks)."""
    return _plan(jobs, _Annotations(index), chunk_size)


def _plan(jobs: Sequence[ScoreJob], ann: _Annotations, chunk_size: int | None) -> list[ChunkSpec]:
    import zarr

    specs: list[ChunkSpec] = []
    for j, job in enumerate(jobs):
        unknown = set(job.metrics) - set(DEFAULT_METRICS)
        if unknown:
            raise InputError(f"job {job.category}/{job.method}: unknown metrics {sorted(unknown)}")
        try:
            group = zarr.open_group(str(job.heatmaps), mode="r")
            maps, ids = group["maps"], np.asarray(group["image_id"][:])
        except (FileNotFoundError, KeyError) as exc:
            raise InputError(f"heatmaps {job.heatmaps}: not a heatmap group with maps and image_id ({exc})") from exc
        if group.attrs.get("complete", True) is False:
            raise SraeError(f"heatmaps {job.heatmaps}: group is incomplete (attrs complete=false)")
        if maps.ndim != 4 or ids.shape != (maps.shape[0],):
            raise InputError(f"heatmaps {job.heatmaps}: maps {maps.shape} and image_id {ids.shape} disagree")
        pos = ann.positions(ids, str(job.heatmaps))
        step = chunk_size or max(maps.chunks[0], 16 // max(1, maps.chunks[0]) * maps.chunks[0])
        orth = ("O1" in job.metrics or "O2" in job.metrics) and maps.shape[1] > 1
        n_before = len(specs)
        for start in range(0, maps.shape[0], step):
            stop = min(start + step, maps.shape[0])
            spec = _chunk_spec(j, job, ann, pos[start:stop], start, stop, orth)
            if spec is not None:
                specs.append(spec)
        if len(specs) == n_before:
            raise InputError(f"heatmaps {job.heatmaps}: no images to score for category {job.category!r}")
    return specs


def reduce_results(jobs: Sequence[ScoreJob], index: DatasetIndex, stats: Sequence[ChunkStats],
                   ann: _Annotations | None = None) -> ScoreResult:
    """Merge chunk statistics (in the given order) into long rows and the concept table."""
    ann = ann or _Annotations(index)
    rows: list[dict] = []
    tables: list[pd.DataFrame] = []
    notes: list[str] = []
    hists: list[tuple[list[str], np.ndarray]] = []
    for j, job in enumerate(jobs):
        mine = [s for s in stats if s.job == j]
        cols, hist, images, orth = np.zeros(0, np.int64), np.zeros((0, 0)), 0, None
        for s in mine:
            cols, hist = _add_sparse(cols, hist, s.cols, s.hist)
            images += s.images
            if s.orth is not None:  # merge into a fresh accumulator: the inputs stay untouched
                orth = (orth or OrthogonalityStats(n=s.orth.n, pixels=s.orth.pixels)).merge(s.orth)
        mean = hist / max(images, 1)
        n = mean.shape[0]
        names = ann.column_names(cols)
        hists.append((names, mean))
        base = {"experiment": job.experiment, "category": job.category, "method": job.method,
                "split": job.split, "n_features": n, "hparams": json.dumps(dict(job.hparams), sort_keys=True)}
        if "locality" in job.metrics:
            loc_hist = mean[:, cols != 0] if ann.mode == "objects" else mean
            loc = entropy(loc_hist) if loc_hist.shape[1] else np.full(n, np.nan)
            ok = ~np.isnan(loc)
            if not ok.all():
                who = f"class {job.class_index + 1}" if job.class_index is not None else str(job.category)
                log.warning("%s %s (%s): %d of %d x-features have no located mass; left out of locality",
                            who, job.method, job.split, int((~ok).sum()), n)
            if ok.any():
                rows.append({**base, "metric": "locality", "value": float(loc[ok].mean())})
            if job.feature_rows:
                rows += [{**base, "metric": f"locality_x{i}", "value": float(loc[i])} for i in np.flatnonzero(ok)]
        if orth is not None:
            o1, o2 = orth.result()
            rows += [{**base, "metric": m, "value": v} for m, v in (("O1", o1), ("O2", o2)) if m in job.metrics]
        evid = index.evidence.get(job.class_index) if job.class_index is not None else None
        if "concept_recovery" in job.metrics and evid:
            # objects: label 0 (unlabeled) is left out, as in locality; absent known objects count as missed
            keep = cols != 0 if ann.mode == "objects" else np.ones(cols.size, dtype=bool)
            known = list(index.object_names.values()) if ann.mode == "objects" else []
            try:
                values, table = concept_summary(mean[:, keep], [c for c, k in zip(names, keep) if k], evid, known)
            except InputError as exc:  # drops this job's concept rows only, never its locality / O1 / O2
                notes.append(f"{job.category}/{job.method}/{job.split}: concept recovery not scored ({exc})")
                log.warning("%s", notes[-1])
            else:
                # coverage is scored against the parts the CNN uses, at report time (srae.causal)
                rows += [{**base, "metric": m, "value": v} for m, v in values.items() if m != "concept_coverage"]
                for key in ("experiment", "category", "method", "split"):
                    table.insert(0, key, base[key])
                tables.append(table)
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    concepts = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return ScoreResult(metrics, concepts, hists, notes)


def score_serial(jobs: Sequence[ScoreJob], index: DatasetIndex, chunk_size: int | None = None) -> ScoreResult:
    """Score in this process, chunk by chunk (same chunks and reduction as :func:`score`)."""
    ann = _Annotations(index)
    specs = _plan(jobs, ann, chunk_size)
    return reduce_results(jobs, index, [score_chunk(s) for s in specs], ann)


def check_dask_address(address: str, timeout: float = 10.0) -> None:
    """Fail early, in one line, when no scheduler answers at ``address`` (``tcp://host:port``).

    Scoring comes after the expensive stages, so a wrong ``scoring.dask_address`` would
    otherwise be noticed only once everything else ran (and never on a warm cache). A TCP
    connection is enough to tell an address that answers from one that does not."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if parts.scheme in ("inproc", "ucx", "ws", "wss"):
        return  # in-process or other transports: left to the Dask client
    if parts.scheme not in ("tcp", "tls") or not host or port is None:
        raise InputError(f"scoring.dask_address {address!r}: expected tcp://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SraeError(f"scoring.dask_address {address}: no Dask scheduler answers within {timeout:g} s "
                        f"({type(exc).__name__}: {exc})") from None


@contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None,
                processes: bool = True, threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``dask.distributed`` Client: to the scheduler at ``address``, else a fresh LocalCluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise SraeError("dask.distributed is not installed: pip install 'dask[distributed]'") from exc
    if address:
        try:
            client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise SraeError(f"dask scheduler {address}: cannot connect ({exc})") from exc
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    workers = n_workers or max(1, os.cpu_count() or 1)
    # Dask starts worker processes with MALLOC_TRIM_THRESHOLD_ set, which makes glibc hand every
    # large numpy temporary back to the OS: scoring then runs ~2x slower. Our tasks are short
    # and numeric, so the workers of our own LocalCluster keep glibc's default behaviour.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # Status servers on loopback, any free port: the defaults bind the scheduler's to port 8787
    # (a second cluster, e.g. a notebook's, makes distributed warn that it is taken) and, with
    # processes=False, bind both the scheduler's and the workers' to the machine's network address.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=processes,
                               dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0")
    log.debug("Dask LocalCluster: %d worker(s), status page %s", workers, cluster.dashboard_link)
    with cluster, Client(cluster) as client:
        yield client


def score(jobs: Sequence[ScoreJob], index: DatasetIndex, *, client: Any = None, address: str | None = None,
          n_workers: int | None = None, processes: bool = True, chunk_size: int | None = None) -> ScoreResult:
    """Score all jobs on Dask: ``client`` if given, else ``address``, else a LocalCluster.

    One task per (job, chunk of images); results are gathered and reduced in chunk order, so
    the output equals :func:`score_serial` exactly.
    """
    ann = _Annotations(index)
    specs = _plan(jobs, ann, chunk_size)
    if client is None:
        with dask_client(address, n_workers, processes) as own:
            return reduce_results(jobs, index, _run(own, specs), ann)
    return reduce_results(jobs, index, _run(client, specs), ann)


def _score_chunk_or_error(spec: ChunkSpec) -> ChunkStats | tuple[str, BaseException]:
    """:func:`score_chunk` with its failure returned as a value: a task that raises makes each
    Dask worker log "Compute Failed" with the task's arguments and a traceback (about 40
    lines on the console per failed chunk); the client raises the error instead."""
    try:
        return score_chunk(spec)
    except Exception as exc:  # noqa: BLE001 - re-raised by _run in the client
        return ("error", exc)


def _run(client: Any, specs: list[ChunkSpec]) -> list[ChunkStats]:
    """Run every chunk as one Dask task; results come back in spec order. Progress is logged
    now and then; a stop request (Ctrl-C) cancels the chunks not yet scored."""
    from distributed import as_completed

    log.info("scoring %d chunks as Dask tasks", len(specs))
    # keys named after score_chunk: what a user watching the cluster's dashboard looks for
    keys = [f"score_chunk-{uuid.uuid4().hex}" for _ in specs]
    futures = client.map(_score_chunk_or_error, specs, key=keys, pure=False)
    progress = ProgressLog(log, "scoring", len(futures), "chunks scored")
    try:
        for done, _ in enumerate(as_completed(futures), start=1):
            progress.update(done)
            cancel.check("scoring")
    except BaseException:
        client.cancel(futures)
        raise
    out = client.gather(futures)
    for res in out:
        if isinstance(res, tuple):
            raise res[1]
    return out
