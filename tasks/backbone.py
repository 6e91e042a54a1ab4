"""Stage 2: the CNN to explain: train the demo CNN / fine-tune VGG, or take a checkpoint as is.

The fit lives in ``<cache>/backbones/<name>-<key>``, the key naming everything
:func:`srae.fit.fit` compares before reusing a finished fit (dataset fingerprint, starting
weights, fit settings, package version) from cheap facts (:func:`start_identity`: no network
is built and no checkpoint hashed to check the cache). Any change of those lands in a new
directory, so fit never meets a finished fit made with other settings; fit resumes an
interrupted fit there and reuses a finished one. With ``fit.epochs: 0`` the weights are used
as they are; the stage's identity then includes the checkpoint's size and mtime, so a
checkpoint overwritten at the same path is noticed (and its sha256 recomputed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from srae import fit_cache
from srae.config import BackboneConfig, stable_hash
from srae.errors import SraeError
from srae.stores import writer_lock
from tasks.common import (WAIT_FOR_OTHER_RUN_S, retry_unless_user_error, TASK_DEFAULTS, record_work, resolve_device,
                          run_logger, stage_cache, timed)
from tasks.download import load_index


def initial_weights(backbone: dict[str, Any], num_classes: int) -> tuple[str, int]:
    """(sha256 identifying the weights the backbone starts from, its input size), by building
    it as fit does: content, not path. Raises :class:`SraeError` for a missing checkpoint."""
    from srae.backbones import build_backbone

    bb = BackboneConfig.model_validate(backbone)
    ckpt = None if bb.checkpoint is None else str(bb.checkpoint)
    if ckpt is not None and not Path(ckpt).is_file():
        raise SraeError(f"backbone.checkpoint: {ckpt} not found")
    built = build_backbone(bb.name, int(num_classes), ckpt, pretrained=bb.pretrained, input_size=bb.input_size,
                           seed=bb.fit.seed)
    return built.checkpoint_sha256, built.input_size


def start_identity(backbone: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """What decides the weights a backbone starts from, from cheap facts only
    (:func:`srae.fit_cache.start_identity` of the config section)."""
    return fit_cache.start_identity(BackboneConfig.model_validate(backbone), num_classes)


def backbone_dir(cache_dir: str | Path, backbone: dict[str, Any], dataset: dict[str, Any]) -> Path:
    """Where the fitted backbone of this config section on ``dataset`` (the dataset stage's
    result: ``fingerprint``, ``num_classes``) lives: :func:`srae.fit_cache.fitted_dir`, the
    directory ``srae features`` looks in too. Checking it never builds a network or hashes
    a checkpoint."""
    return fit_cache.fitted_dir(cache_dir, BackboneConfig.model_validate(backbone), dataset["fingerprint"],
                                int(dataset["num_classes"]))


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    bb = BackboneConfig.model_validate(inputs["backbone"])
    if bb.fit.epochs == 0:
        start = start_identity(inputs["backbone"], int(inputs["dataset"]["num_classes"]))
        return [(str(bb.checkpoint or bb.name), True), (f"weights:{stable_hash(start, 16)}", True)]
    d = backbone_dir(inputs["cache_dir"], inputs["backbone"], inputs["dataset"])
    return [(str(d), fit_cache.finished_fit(d) is not None)]


@task(name="backbone", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def prepare_backbone(backbone: dict[str, Any], dataset: dict[str, Any], cache_dir: str,
                     device: str = "auto") -> dict[str, Any]:
    """Fit (or load) the backbone; return its checkpoint path and sha256.

    ``checkpoint`` is None only for VGG used with its ImageNet weights as they are."""
    logger = run_logger()
    bb = BackboneConfig.model_validate(backbone)
    if bb.fit.epochs == 0:
        # built seeded, so a resized classifier head is the same head when the backbone is rebuilt
        sha, size = initial_weights(backbone, int(dataset["num_classes"]))
        return {"name": bb.name, "checkpoint": str(bb.checkpoint) if bb.checkpoint else None,
                "sha256": sha, "test_accuracy": None, "input_size": size,
                "pretrained": bb.pretrained, "seed": bb.fit.seed}
    from srae.fit import fit

    index = load_index(dataset)
    # keyed by the index fit itself is given, so the directory matches what fit checks
    out = backbone_dir(cache_dir, backbone, {"fingerprint": index.manifest_fingerprint(),
                                             "num_classes": index.num_classes})
    out.parent.mkdir(parents=True, exist_ok=True)
    # another run fitting the same backbone (overlapping schedules) is waited for, then reused
    with writer_lock(out, WAIT_FOR_OTHER_RUN_S, what="backbone"), timed() as t:
        done = fit_cache.finished_fit(out) is not None
        res = fit(index, out, backbone=bb.name, checkpoint=bb.checkpoint, pretrained=bb.pretrained,
                  input_size=bb.input_size, epochs=bb.fit.epochs, lr=bb.fit.lr, batch_size=bb.fit.batch_size,
                  weight_decay=bb.fit.weight_decay, seed=bb.fit.seed, augment=bb.fit.augment,
                  device=resolve_device(bb.fit.device if device == "auto" else device), num_workers=0,
                  progress=False)
        if not (done and res.reused):
            record_work(cache_dir, "backbone", str(out), t())
    logger.info("backbone %s: test accuracy %.4f (%s)", bb.name, res.test_accuracy,
                "reused" if res.reused else "trained")
    return {"name": bb.name, "checkpoint": str(res.checkpoint), "sha256": res.checkpoint_sha256,
            "test_accuracy": float(res.test_accuracy), "input_size": res.backbone.input_size}


def load_fitted_backbone(info: dict[str, Any], num_classes: int, device: str = "cpu"):
    """The backbone described by :func:`prepare_backbone`'s result, in eval mode on ``device``."""
    from srae import backbones as B

    if info.get("checkpoint") and Path(info["checkpoint"]).suffix == ".safetensors":
        try:
            bb = B.load_backbone(info["checkpoint"])
        except Exception:
            bb = B.build_backbone(info["name"], num_classes, info["checkpoint"])
    else:
        bb = B.build_backbone(info["name"], num_classes, info.get("checkpoint"),
                              pretrained=info.get("pretrained", True), input_size=info.get("input_size"),
                              seed=info.get("seed"))
    return bb.to(device).eval()
