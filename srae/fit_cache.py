"""Where ``srae run`` keeps a fitted backbone, so other commands find the same weights.

``<cache_dir>/backbones/<name>-<key>``, the key naming everything :func:`srae.fit.fit`
compares before reusing a finished fit (dataset fingerprint, starting weights, fit settings,
package version), with the starting weights named by cheap facts (:func:`start_identity`:
no network is built and no checkpoint hashed), so looking a fit up costs a few ``stat`` calls.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from srae.config import BackboneConfig, stable_hash
from srae.errors import SraeError

__all__ = ["MODEL_FILE", "SUMMARY_FILE", "finished_fit", "fitted_dir", "start_identity"]

MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "fit.json"


def _dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def start_identity(bb: BackboneConfig, num_classes: int) -> dict[str, Any]:
    """What decides the weights a backbone starts from, from cheap facts only: the
    architecture settings and seed, the checkpoint file's path, size and mtime, and the
    torch/torchvision versions (random init and ImageNet weights come from them).
    Raises :class:`SraeError` for a missing checkpoint."""
    ckpt = None
    if bb.checkpoint is not None:
        path = Path(bb.checkpoint)
        if not path.is_file():
            raise SraeError(f"backbone.checkpoint: {path} not found")
        st = path.stat()
        ckpt = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"name": bb.name, "num_classes": int(num_classes), "input_size": bb.input_size,
            "pretrained": bb.pretrained, "seed": bb.fit.seed, "checkpoint": ckpt,
            "torch": _dist_version("torch"), "torchvision": _dist_version("torchvision")}


def fitted_dir(cache_dir: str | Path, bb: BackboneConfig, dataset_fingerprint: str, num_classes: int) -> Path:
    """The directory of the fit of ``bb`` on the dataset with this manifest fingerprint
    (:meth:`DatasetIndex.manifest_fingerprint`). Any change of what the fit depends on gives
    a new directory, so a fit never meets a finished fit made with other settings."""
    from srae import fit as F  # the package version fit compares (srae.fit.fit_config)

    key = stable_hash({"start": start_identity(bb, int(num_classes)),
                       "fit": bb.fit.model_dump(mode="json", exclude={"device"}),
                       "dataset": dataset_fingerprint, "version": F.__version__}, 16)
    return Path(cache_dir) / "backbones" / f"{bb.name}-{key}"


def finished_fit(directory: str | Path) -> Path | None:
    """The weights file of a finished fit in ``directory`` (weights and summary both
    written), or None."""
    d = Path(directory)
    return d / MODEL_FILE if (d / MODEL_FILE).is_file() and (d / SUMMARY_FILE).is_file() else None
