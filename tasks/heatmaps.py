"""Stage 5: c-MWP heatmaps per category group: x-features of each headline explainer,
ExcitationBP on y-hat (the category's logit) and dimensions of Z; Grad-CAM on y-hat at the
same readout as a second method (``heatmaps.gradcam``). Lasso's x-features are its
selected Z dims and are drawn exactly like the Z column (contrasted at fc6).

The Z column either draws a sample of Z dims into a store like the others (scored by the
scoring stage), or, with ``heatmaps.z_dims: all`` (the default on a GPU), scores every dim
as its maps are drawn (:func:`srae.unit_locality.score_units`): no store, its rows go
straight to the scores file the scoring stage would have written, which then reuses them.
Its running sums are kept beside that file after every batch (``*.partial.npz``), so an
interrupted category resumes with the images it had not scored.

One Zarr group per (explainer or category, heatmap settings, split) holds ``maps``
(M, n, H, W) float32 and ``image_id`` (M,), with ``complete: true`` written last. Images are
the positive images of the split in the category's shared sample design (the paper's
"Positive" rows), at most ``heatmaps.max_images`` of them, and with ``heatmaps.images: all``
the design's negatives of that split too (scoring, masking and figures still use the
positives). All heads of one category share
one trunk pass (:func:`srae.heatmaps.compute_heatmaps`); only groups without their
completion marker are computed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from srae.config import ExperimentConfig, stable_hash
from srae.progress import ProgressLog
from tasks.common import (TASK_DEFAULTS, WAIT_FOR_OTHER_RUN_S, atomic_write_parquet, record_work, resolve_device,
                          run_logger, short_error, stage_cache, timed)

LOCALITY_ONLY = ("locality", "concept_recovery")
# Images per pass when every Z dim is scored as drawn: memory grows with images x z_chunk
# (VGG19 at pool3: ~8.5 MB per image and unit, measured on a CPU; ~9 GB at 4 x 256), and
# the running sums are saved once per batch, so a small batch keeps both in bounds.
Z_ALL_BATCH = 4
ALL_METRICS = ("locality", "O1", "O2", "concept_recovery")


def group_complete(path: str | Path) -> bool:
    """A heatmap group is done when its root attributes say ``complete: true``."""
    from srae.heatmaps import is_complete

    return is_complete(path)


def _heat_key(cfg: ExperimentConfig, backbone: dict[str, Any], images: str | None = None) -> str:
    """Name of a heatmap set: its settings and weights. Annotations are not part of it: the
    images a store holds are in its spec (a changed image set rebuilds it), and the scores
    computed from annotations are named by them (:func:`tasks.scoring.scores_path`), so an
    edited box or part redoes the scoring without redrawing the maps."""
    h = cfg.heatmaps
    key = {"readout": h.readout, "max_images": h.max_images, "backbone": backbone["sha256"],
           "input_size": backbone.get("input_size"),
           "samples": {k: getattr(cfg.explainer, k) for k in ("n_pos", "n_neg", "n_test_neg", "use_dataset_split",
                                                              "seed")}}
    images = images or h.images
    if images != "positives":  # only then: the stores of positives keep their names
        key["images"] = images
    return stable_hash(key, 12)


def heatmap_jobs(expl_results: list[dict[str, Any]], groups: list[list[int]], features: dict[str, Any],
                 backbone: dict[str, Any], cfg: ExperimentConfig, heat_root: str,
                 dataset: dict[str, Any] | None = None) -> list[tuple[list[int], list[dict]]]:
    """Plan the heatmap groups of every category group (headline explainers only)."""
    from srae.explainers import META_FILE
    from tasks.explainers import row_hparams

    key = _heat_key(cfg, backbone)
    # the streamed Z column only ever scores positives: its scores keep their place whatever
    # heatmaps.images is (they are the most expensive result of the stage)
    positives_key = _heat_key(cfg, backbone, images="positives")
    ann = str((dataset or {}).get("annotations") or "")[:12]  # names the score files
    root = Path(heat_root)
    per_cat: dict[int, list[dict[str, Any]]] = {}
    for res in expl_results:
        if res["settings"].get("sweep"):
            continue
        for cat, d in res["explainers"].items():
            meta = json.loads((Path(d) / META_FILE).read_text())
            if int(meta.get("n_features", 0)) < 1:
                continue
            hp = row_hparams(res["method"], res["settings"], meta)
            rel = Path(d).relative_to(Path(d).parents[3])
            for split in cfg.heatmaps.splits:
                per_cat.setdefault(int(cat), []).append({
                    "method": res["method"], "category": int(cat), "split": split, "explainer": d, "hparams": hp,
                    "heatmaps": str(root / rel / key / f"{split}.zarr"), "annotations": ann,
                    "metrics": list(ALL_METRICS if int(meta.get("n_features", 0)) > 1 else LOCALITY_ONLY)})
    fp = features["fingerprint"][:16]
    z_dims = _z_dims_of(cfg)
    out = []
    for g in groups:
        jobs = []
        for c in g:
            jobs += per_cat.get(c, [])
            for split in cfg.heatmaps.splits:
                base = root / fp / "baselines" / key / f"cat{c:04d}"
                jobs.append({"method": "ExcitationBP", "category": c, "split": split, "explainer": None, "hparams": {},
                             "heatmaps": str(base / f"ExcitationBP-{split}.zarr"), "annotations": ann,
                             "metrics": list(LOCALITY_ONLY)})
                if cfg.heatmaps.gradcam:
                    jobs.append({"method": "Grad-CAM", "category": c, "split": split, "explainer": None,
                                 "hparams": {}, "heatmaps": str(base / f"GradCAM-{split}.zarr"), "annotations": ann,
                                 "metrics": list(LOCALITY_ONLY), "kind": "Grad-CAM"})
                if z_dims == "all":  # no store: "heatmaps" only names the scores file
                    zall = root / fp / "baselines" / positives_key / f"cat{c:04d}" / f"Zall-{split}.zarr"
                    jobs.append({"method": "Z", "category": c, "split": split, "explainer": None,
                                 "hparams": {"z_dims": "all"}, "heatmaps": str(zall),
                                 "annotations": ann, "metrics": ["locality"], "stream": True,
                                 "experiment": cfg.name})
                elif z_dims > 0:
                    jobs.append({"method": "Z", "category": c, "split": split, "explainer": None,
                                 "hparams": {"z_dims": z_dims}, "heatmaps": str(base / f"Z{z_dims}-{split}.zarr"),
                                 "annotations": ann, "metrics": ["locality"]})
        out.append((g, jobs))
    return out


def _z_dims_of(cfg: ExperimentConfig) -> int | str:
    """``heatmaps.z_dims`` as it applies on the device the heatmaps stage runs on."""
    return cfg.heatmaps.effective_z_dims(resolve_device(cfg.stage_device(cfg.heatmaps.device)))


def z_column_note(cfg: ExperimentConfig) -> str:
    """One report line saying what the Z column is made of in this run."""
    z = _z_dims_of(cfg)
    if z == "all":
        return "Z column: ExcitationBP on every dimension of Z, each scored as it was drawn (heatmaps.z_dims: all)"
    if z == 0:
        return "Z column: not computed (heatmaps.z_dims: 0)"
    return (f"Z column: ExcitationBP on {z} sampled dimensions of Z per category (heatmaps.z_dims; 'all' "
            "scores every one, the paper's column)")


def job_done(job: dict[str, Any]) -> bool:
    """A job's heatmap group is complete and was drawn from its explainer as it is now (a
    streamed Z job: its scores are written)."""
    if job.get("stream"):
        from tasks.scoring import scores_path

        return scores_path(job["heatmaps"], job.get("annotations")).is_file()
    if not group_complete(job["heatmaps"]):
        return False
    if not job.get("explainer"):
        return True
    from srae.heatmaps import open_heatmaps

    try:
        attrs = open_heatmaps(job["heatmaps"]).attrs
        if job["method"] == "Lasso" and attrs.get("x_units") != "Z":
            return False  # drawn through the one-hot selection layer (plain MWP): redraw as Z units
        return attrs.get("explainer_sha256") == _explainer_sha(job["explainer"])
    except OSError:
        return False


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(j["heatmaps"], job_done(j)) for j in inputs["jobs"]]


def _images(dataset, features, category: int, split: str, settings: dict[str, Any], max_images: int | None,
            which: str = "positives") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, their Z rows, which are positives) of ``split`` in the category's shared
    sample design: its annotated positives (annotated = with parts or an object mask, so
    locality can be scored), at most ``max_images`` of them, then with ``which="all"`` every
    negative of the design in that split as well."""
    from tasks.download import load_index
    from tasks.explainers import category_design, feature_splits, load_feature_arrays

    z, _, labels, ids = load_feature_arrays(features["path"])
    splits = feature_splits(features["path"]) if settings.get("use_dataset_split") else None
    d = category_design(labels, category, settings, splits)
    idx, pos = (d.test_idx, d.test_pos) if split == "test" else (d.train_idx, d.train_pos)
    frame = load_index(dataset).images
    annotated = set(frame.loc[frame["parts"].notna() | frame["mask_path"].notna(), "image_id"].astype(int))
    rows = np.array([r for r in np.sort(idx[pos]) if int(ids[r]) in annotated], dtype=np.int64)[: max_images or None]
    positive = np.ones(len(rows), dtype=bool)
    if which == "all":
        neg = np.sort(idx[~pos])
        rows, positive = np.concatenate([rows, neg]), np.concatenate([positive, np.zeros(len(neg), dtype=bool)])
        order = np.argsort(rows, kind="stable")  # the store in index order
        rows, positive = rows[order], positive[order]
    return ids[rows], z[rows], positive


def _batches(index, path_of, ids: np.ndarray, size: int, batch_size: int):
    """(uint8 images (B, 3, S, S), ids) batches, loaded lazily."""
    import torch

    from srae.images import load_image, resize_uint8

    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        x = torch.stack([resize_uint8(load_image(index.abspath(path_of[int(i)])), size) for i in chunk])
        yield x, chunk


def _split_trunk(bb):
    """(trunk below fc6, [fc6, ReLU]): every head then starts at Z's own affine layer, so the
    Z dims, the logit and the x-features share one trunk pass."""
    from torch import nn

    mods = list(bb.trunk)
    k = max(i for i, m in enumerate(mods) if isinstance(m, nn.Linear))
    return nn.Sequential(*mods[:k]), mods[k:]


@task(name="heatmaps", cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def heatmap_group(jobs: list[dict[str, Any]], dataset: dict[str, Any], backbone: dict[str, Any],
                  features: dict[str, Any], heatmaps: dict[str, Any], cache_dir: str,
                  sample_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw the missing heatmap groups among ``jobs`` (and score the streamed Z jobs); return
    the done jobs and failures."""
    from tasks.backbone import load_fitted_backbone
    from tasks.download import load_index

    logger = run_logger()
    todo = [j for j in jobs if not job_done(j)]
    failed: list[dict[str, Any]] = []
    if todo:
        dev = resolve_device(heatmaps.get("device", "auto"))
        bb = load_fitted_backbone(backbone, dataset["num_classes"], dev)
        ro_name = heatmaps.get("readout") or bb.default_readout
        ro = bb.check_readout(ro_name)
        base, tail = _split_trunk(bb)
        index = load_index(dataset)
        path_of = dict(zip(index.images["image_id"].astype(int), index.images["path"].astype(str)))
        by_cat: dict[tuple[int, str], list[dict]] = {}
        for j in todo:
            by_cat.setdefault((j["category"], j["split"]), []).append(j)
        progress = ProgressLog(logger, "heatmaps", len(by_cat), "categories drawn")
        draw = _Drawing(bb, base, tail, ro, ro_name, index, path_of, dev, int(heatmaps.get("batch_size", 16)))
        for done, ((c, split), cj) in enumerate(by_cat.items()):
            progress.update(done)
            # c-MWP stores first, then Grad-CAM's, then each streamed Z job: each part fails alone
            kinds = sorted({j.get("kind", "c-MWP") for j in cj if not j.get("stream")}, key=lambda k: k != "c-MWP")
            parts = [[j for j in cj if not j.get("stream") and j.get("kind", "c-MWP") == k] for k in kinds]
            ids = z = positive = None
            for part in parts + [[j] for j in cj if j.get("stream")]:
                try:
                    with timed() as t:
                        if ids is None:
                            ids, z, positive = _images(dataset, features, c, split, sample_settings or {},
                                                       heatmaps.get("max_images"), heatmaps.get("images", "positives"))
                        if not positive.any():
                            raise ValueError(f"no positive {split} images")
                        # Z dims are sampled among those active on the positives; the streamed
                        # Z column scores (so draws) the positives only
                        worked = (draw.score_streamed(part[0], ids[positive], int(heatmaps.get("z_chunk", 256)))
                                  if part[0].get("stream") else draw.stored(part, ids, z[positive]))
                    if worked:
                        record_work(cache_dir, "heatmaps", f"{c}/{split}", t(), category=int(c),
                                    methods=[j["method"] for j in part])
                except Exception as exc:  # one category's failure must not stop the others
                    logger.warning("heatmaps for class %d (%s) failed: %s", c + 1, split, exc)  # 1-based, as the CLI
                    failed += [{"category": c, "stage": "heatmaps", "method": j["method"], "error": short_error(exc)}
                               for j in part]
    return {"done": [j for j in jobs if job_done(j)], "failed": failed}


class _Drawing:
    """One heatmap task's backbone split at Z, its dataset and settings: draws a category's
    stored groups, or scores its streamed Z job."""

    def __init__(self, bb, trunk, tail, readout: int, readout_name: str, index, path_of: dict[int, str],
                 device: str, batch_size: int) -> None:
        self.bb, self.trunk, self.tail, self.readout, self.readout_name = bb, trunk, tail, readout, readout_name
        self.index, self.path_of, self.device, self.batch_size = index, path_of, device, batch_size

    def _batches(self, ids: np.ndarray, seen: list[int], batch_size: int | None = None) -> Iterator[Any]:
        return _counted(_batches(self.index, self.path_of, ids, self.bb.input_size, batch_size or self.batch_size),
                        seen)

    def stored(self, jobs: list[dict[str, Any]], ids: np.ndarray, z: np.ndarray) -> bool:
        """Draw (or finish) the stores of ``jobs`` (one category, split and kind of map) on images ``ids``;
        ``z``: the positives' Z rows, among whose active dims a Z job samples. True if any
        image was drawn (none when another run drew the maps meanwhile)."""
        from torch import nn

        from srae.explainers import load_explainer
        from srae.heatmaps import HeatmapJob, compute_heatmaps, explainer_head

        hjobs = []
        for j in jobs:
            c = int(j["category"])
            attrs = {"method": j["method"], "category": c, "split": j["split"], "readout_name": self.readout_name}
            if j["method"] in ("ExcitationBP", "Grad-CAM"):  # both on y-hat, the category's logit
                head, units = nn.Sequential(*self.tail, *self.bb.head), [c]
            elif j["method"] == "Z":
                units = _z_dims(z, int(j["hparams"]["z_dims"]), c)
                head = nn.Sequential(*self.tail)
            else:  # Lasso's x-features are Z dims: drawn like the Z column (see explainer_head)
                head, units, extra = explainer_head(load_explainer(j["explainer"]), self.tail)
                head = head.to(self.device)
                attrs.update(extra)
                attrs["explainer"] = str(j["explainer"])
                attrs["explainer_sha256"] = _explainer_sha(j["explainer"])
            hjobs.append(HeatmapJob(Path(j["heatmaps"]), head, units, attrs))
        drawn = [0]
        compute_heatmaps(self.trunk, hjobs, self._batches(ids, drawn), ids, readout=self.readout,
                         output_size=self.bb.input_size, kind=jobs[0].get("kind", "c-MWP"), mean=self.bb.mean,
                         std=self.bb.std, wait_for_writer=WAIT_FOR_OTHER_RUN_S)
        return drawn[0] > 0

    def score_streamed(self, job: dict[str, Any], ids: np.ndarray, unit_chunk: int) -> bool:
        """Score every Z dim of ``job``'s category on ``ids`` and write its scores file; False
        when another run wrote it meanwhile (waited for under the group's writer lock)."""
        from torch import nn

        from srae.scoring import ScoreJob
        from srae.stores import writer_lock
        from srae.unit_locality import score_units
        from tasks.scoring import scores_path

        with writer_lock(Path(job["heatmaps"]), WAIT_FOR_OTHER_RUN_S, what="Z locality"):
            if job_done(job):
                return False
            c = int(job["category"])
            spec = ScoreJob(heatmaps=job["heatmaps"], category=c, method="Z", split=job["split"], class_index=c,
                            experiment=str(job.get("experiment", "")), hparams=job["hparams"],
                            metrics=tuple(job["metrics"]), feature_rows=False)
            out = scores_path(job["heatmaps"], job.get("annotations"))
            partial = out.with_name(out.name + ".partial.npz")  # sums so far: an interrupted run resumes
            res = score_units(self.trunk, nn.Sequential(*self.tail), range(self.bb.z_dim),
                              self._batches(ids, [0], min(self.batch_size, Z_ALL_BATCH)),
                              spec, self.index, ids, readout=self.readout, output_size=self.bb.input_size,
                              mean=self.bb.mean, std=self.bb.std, unit_chunk=unit_chunk, resume=partial)
            atomic_write_parquet(res.metrics, out)
            partial.unlink(missing_ok=True)
        return True


def _counted(items: Iterable[Any], seen: list[int]) -> Iterator[Any]:
    """``items``, counting in ``seen[0]`` how many were taken."""
    for item in items:
        seen[0] += 1
        yield item


def _explainer_sha(explainer_dir: str) -> str:
    """sha256 of an explainer's meta.json (written once per training, with its curve and
    faithfulness): a retrained explainer makes its heatmaps stale."""
    import hashlib

    from srae.explainers import META_FILE

    return hashlib.sha256((Path(explainer_dir) / META_FILE).read_bytes()).hexdigest()


def _z_dims(z: np.ndarray, k: int, category: int) -> list[int]:
    """``k`` dims of Z active on these images, drawn reproducibly per category."""
    active = np.flatnonzero(np.asarray(z).mean(axis=0) > 0)
    pool = active if len(active) >= k else np.arange(np.asarray(z).shape[1])
    rng = np.random.default_rng([int(category), 7919])
    return sorted(int(d) for d in rng.choice(pool, size=min(k, len(pool)), replace=False))
