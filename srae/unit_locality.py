"""Locality of many units scored while their maps are drawn, never stored: the paper's "Z"
column over all 4096 dims of fc6 (Table 1: "computed over all the dimensions of Z").

A heatmap store of every Z dim is out of reach (4096 maps of 224 x 224 float32 per image,
about 820 MB), so here the units go down the network ``unit_chunk`` at a time after one
forward pass per image batch (:func:`srae.excitation.excitation_maps_chunked`), and each
chunk's maps become per-image probabilities over parts or objects at once, on the maps'
device: one dense float64 product ``(U, H*W) @ (H*W, K)`` per image with that image's
Algorithm-1 weights (parts, context column included) or object indicators. The sums over
images are reduced into rows exactly like a stored group's (:func:`srae.scoring.reduce_results`),
so scoring stored maps of the same units gives the same locality (test).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from srae import cancel
from srae.config import stable_hash
from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError
from srae.excitation import excitation_maps_chunked
from srae.heatmaps import batch_images, output_grid, unpack_batch
from srae.progress import ProgressLog
from srae.scoring import (ChunkSpec, ChunkStats, ScoreJob, ScoreResult, _Annotations, _chunk_spec, reduce_results,
                          spec_object_columns, spec_part_geometry)
from srae.stores import temp_beside

log = logging.getLogger(__name__)

__all__ = ["score_units"]


class _Weights:
    """Per scored image: its columns (positions in the job's column list) and the dense
    ``(K_image, H*W)`` float64 weights that turn a normalised map into its probabilities."""

    def __init__(self, spec: ChunkSpec, height: int, width: int) -> None:
        self.spec, self.height, self.width = spec, height, width
        if spec.mode == "parts":
            self.cols = np.arange(spec.parts.shape[1] + 1)
            self._labels: list[tuple[np.ndarray, np.ndarray]] = []
        else:
            self.cols, self._labels = spec_object_columns(spec, height, width)

    def of(self, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(column positions (K_k,), weights (K_k, H*W)) of scored image ``k`` on ``device``."""
        if self.spec.mode == "parts":
            dense = spec_part_geometry(self.spec, k, self.height, self.width).matrix.toarray()
            pos = np.arange(dense.shape[0])
        else:
            pos, inv = self._labels[k]
            dense = np.zeros((pos.size, inv.size))
            dense[inv, np.arange(inv.size)] = 1.0
        return (torch.from_numpy(pos).to(device), torch.from_numpy(dense).to(device))


class _Resume:
    """The running sums of :func:`score_units` in one ``.npz`` file, tagged with the hash of
    everything they depend on, so a file made for other units, images or settings is never
    mixed in."""

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path, self.key = Path(path), stable_hash(identity, 32)

    def load(self, shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]] | None:
        try:
            with np.load(self.path, allow_pickle=False) as f:
                if str(f["key"]) != self.key or f["hist"].shape != shape:
                    return None
                return f["hist"].astype(np.float64), [int(i) for i in f["seen"]]
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged file (a write cut short): start over
            log.warning("%s: unreadable (%s), starting over", self.path, exc)
            return None

    def save(self, hist: np.ndarray, seen: set[int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(self.path)
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(self.key), hist=hist, seen=np.array(sorted(seen), dtype=np.int64))
        os.replace(tmp, self.path)


def _sums_device(device: torch.device) -> torch.device:
    """Where the float64 sums run: on the maps' device, except where it has no float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure (CUDA, MPS or host), which a smaller pass may avoid."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _batch_sums(trunk: Any, head: Any, units: list[int], x: Tensor, images: list[tuple[int, Tensor, Tensor]],
                shape: torch.Size, method: str, *, readout: int | str, chunk: int, contrastive: bool,
                output_size: tuple[int, int]) -> Tensor:
    """Sum over the images of one batch of each unit's probabilities (``shape``: units x
    columns), ``chunk`` units per top-down pass. ``images``: (image id, its columns, its
    weights) per image of ``x``, on the device the sums run on."""
    sums = images[0][2].device
    out = torch.zeros(shape, dtype=torch.float64, device=sums)
    for start, maps in excitation_maps_chunked(trunk, head, units, x, readout=readout, chunk=chunk,
                                               contrastive=contrastive, output_size=output_size):
        stop = start + maps.shape[1]
        for b, (iid, pos, wmat) in enumerate(images):
            flat = maps[b].flatten(1).to(sums, torch.float64)  # (U_chunk, H*W): one image at a time
            total = flat.sum(dim=1)
            if not bool(torch.isfinite(total).all()):
                raise SraeError(f"{method} maps of image {iid}: contain NaN or inf")
            out[start:stop, pos] += (flat @ wmat.T) / torch.where(total > 0, total, 1.0)[:, None]
            del flat
        del maps  # before the next pass allocates its own
    return out


def score_units(trunk: nn.Module | Sequence[nn.Module], head: nn.Module | Sequence[nn.Module],
                units: Sequence[int], batches: Iterable[Any], job: ScoreJob, index: DatasetIndex,
                image_ids: Sequence[int] | np.ndarray, *, readout: int | str, output_size: int | tuple[int, int],
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, unit_chunk: int = 256,
                contrastive: bool = True, resume: str | Path | None = None) -> ScoreResult:
    """Locality rows of ``units`` of ``trunk + head`` over the images ``image_ids`` (c-MWP,
    as :func:`srae.heatmaps.compute_heatmaps` would draw them), without storing any map.

    ``batches`` yields ``(x, ..., image_id)`` like a heatmap DataLoader (uint8 images need
    ``mean``/``std``); ``job`` names the rows and says which images count (``positives_only``,
    ``class_index``) and which metrics (locality and concept recovery; orthogonality needs
    every map of an x-feature and is not offered here). ``job.heatmaps`` is only a label.
    Work runs on the device of ``trunk``'s parameters, ``unit_chunk`` units per pass (memory
    grows with images per batch x ``unit_chunk``; a pass that runs out of memory is retried
    with half the units, down to one).

    ``resume`` names a file holding the sums so far, rewritten atomically after every batch:
    a rerun with the same units, images, job and drawing settings continues from it (every
    image's maps cost ~4096 top-down passes on VGG); any other file there is ignored and
    replaced. The caller deletes it once the result is safely written.
    """
    if {"O1", "O2"} & set(job.metrics):
        raise InputError(f"{job.method}: O1/O2 need stored maps; score_units computes locality and concept recovery")
    units = [int(u) for u in units]
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids):
        raise InputError("image_ids: contains duplicates")
    ann = _Annotations(index)
    spec = _chunk_spec(0, job, ann, ann.positions(ids, job.heatmaps), 0, len(ids), False)
    if spec is None:
        raise InputError(f"{job.heatmaps}: no images to score for category {job.category!r}")
    scored = {int(ids[r]): k for k, r in enumerate(spec.rows)}  # image id -> position in the spec
    height, width = output_grid(output_size)
    weights = _Weights(spec, height, width)
    device = next(p for m in ([trunk] if isinstance(trunk, nn.Module) else trunk) for p in m.parameters()).device
    sums = _sums_device(device)
    hist = torch.zeros((len(units), weights.cols.size), dtype=torch.float64, device=sums)
    seen: set[int] = set()
    state = _Resume(resume, {"units": units, "ids": ids.tolist(), "job": [job.heatmaps, job.category, job.method,
                                                                        job.split, job.class_index, job.positives_only],
                             "readout": str(readout), "size": [height, width], "contrastive": bool(contrastive),
                             "cols": weights.cols.tolist()}) if resume is not None else None
    if state is not None and (old := state.load(tuple(hist.shape))) is not None:
        hist += torch.from_numpy(old[0]).to(sums)
        seen.update(old[1])
        log.info("%s: resuming, %d of %d images already scored", job.heatmaps, len(seen), len(scored))
    progress = ProgressLog(log, f"{job.method} locality, category {job.category}", len(scored), "images scored")
    planned = set(ids.tolist())
    chunk = int(unit_chunk)
    for batch in batches:
        cancel.check("Z locality")
        x, bids = unpack_batch(batch, planned, "unit locality batches")
        keep = [b for b, i in enumerate(bids) if int(i) in scored and int(i) not in seen]
        if not keep:
            continue
        x = batch_images(x, keep, device, mean, std, "unit locality batches")
        images = [(int(bids[b]), *weights.of(scored[int(bids[b])], sums)) for b in keep]
        while True:  # out of memory: fewer units per pass, same sums (each unit's maps are its own)
            try:
                part = _batch_sums(trunk, head, units, x, images, hist.shape, job.method, readout=readout,
                                   chunk=chunk, contrastive=contrastive, output_size=(height, width))
                break
            except Exception as exc:  # noqa: BLE001 - only allocation failures are retried
                if chunk == 1 or not _out_of_memory(exc):
                    raise
            # Out of the except block: the failed pass's traceback, and the tensors its frames
            # held, are gone before the cache is emptied and the smaller pass allocates.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("%s: out of memory with %d units per pass on %d images; retrying with %d",
                        job.heatmaps, chunk, len(images), chunk // 2)
            chunk //= 2
        hist += part
        seen.update(i for i, _, _ in images)
        if state is not None:
            state.save(hist.cpu().numpy(), seen)
        progress.update(len(seen))
    missing = sorted(set(scored) - seen)
    if missing:
        raise SraeError(f"{job.heatmaps}: {len(missing)} planned images never came in the batches "
                        f"(first: {missing[:5]})")
    log.debug("%s: %d units scored on %d images", job.heatmaps, len(units), len(seen))
    stats = ChunkStats(0, len(scored), weights.cols, hist.cpu().numpy(), None)
    return reduce_results([job], index, [stats], ann)
