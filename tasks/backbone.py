"""Stage 2: the CNN to explain: train the demo CNN / fine-tune VGG, or take a checkpoint as is.

The fit lives in ``<cache>/backbones/<name>-<hash>`` where the hash covers the dataset
fingerprint, the backbone section of the config and the starting checkpoint's path;
:func:`srae.fit.fit` resumes an interrupted fit there and reuses a finished one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from srae.config import BackboneConfig, stable_hash
from srae.errors import SraeError
from tasks.common import retry_unless_user_error, TASK_DEFAULTS, record_work, resolve_device, run_logger, stage_cache, timed
from tasks.download import load_index

MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "fit.json"


def backbone_dir(cache_dir: str | Path, backbone: dict[str, Any], dataset_fingerprint: str) -> Path:
    """Where the fitted backbone of this (config section, dataset) lives."""
    bb = BackboneConfig.model_validate(backbone)
    key = stable_hash({"backbone": bb.model_dump(mode="json", exclude={"fit": {"device"}}),
                       "dataset": dataset_fingerprint})
    return Path(cache_dir) / "backbones" / f"{bb.name}-{key}"


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    bb = BackboneConfig.model_validate(inputs["backbone"])
    if bb.fit.epochs == 0:
        return [(str(bb.checkpoint or bb.name), True)]
    d = backbone_dir(inputs["cache_dir"], inputs["backbone"], inputs["dataset"]["fingerprint"])
    return [(str(d), (d / MODEL_FILE).is_file() and (d / SUMMARY_FILE).is_file())]


@task(name="backbone", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error, cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def prepare_backbone(backbone: dict[str, Any], dataset: dict[str, Any], cache_dir: str,
                     device: str = "auto") -> dict[str, Any]:
    """Fit (or load) the backbone; return its checkpoint path and sha256.

    ``checkpoint`` is None only for VGG used with its ImageNet weights as they are."""
    from srae import backbones as B

    logger = run_logger()
    bb = BackboneConfig.model_validate(backbone)
    if bb.fit.epochs == 0:
        if bb.checkpoint is not None and not Path(bb.checkpoint).is_file():
            raise SraeError(f"backbone.checkpoint: {bb.checkpoint} not found")
        # seeded, so a resized classifier head is the same head when the backbone is rebuilt
        built = B.build_backbone(bb.name, dataset["num_classes"], bb.checkpoint, pretrained=bb.pretrained,
                                 input_size=bb.input_size, seed=bb.fit.seed)
        return {"name": bb.name, "checkpoint": str(bb.checkpoint) if bb.checkpoint else None,
                "sha256": built.checkpoint_sha256, "test_accuracy": None, "input_size": built.input_size,
                "pretrained": bb.pretrained, "seed": bb.fit.seed}
    out = backbone_dir(cache_dir, backbone, dataset["fingerprint"])
    done = (out / MODEL_FILE).is_file() and (out / SUMMARY_FILE).is_file()
    from srae.fit import fit

    index = load_index(dataset)
    with timed() as t:
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
