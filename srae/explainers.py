"""A trained explainer: encoder (Z -> x-features), linear predictor, metadata; save/load.

Loading needs only torch + safetensors (no training code path). The encoder operates on raw
Z (any training-time normalisation is folded into the weights), so ``trunk + encoder()`` is
the chain whose units are the x-features.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from srae.errors import InputError, SraeError
from srae.stores import temp_beside

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"


def _as_tensor(z) -> Tensor:
    if isinstance(z, Tensor):
        return z.detach().cpu().to(torch.float64)
    return torch.as_tensor(np.asarray(z), dtype=torch.float64)


@dataclass
class Explainer:
    """x-features ``E = encoder(Z) >= 0`` and prediction ``y_bar = v . E + bias``."""

    method: str
    category: int
    weights: list[Tensor]  # encoder layer weights, raw-Z space, (out, in)
    biases: list[Tensor]
    v: Tensor  # (n,)
    bias: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.v.shape[0])

    def encoder(self) -> nn.Sequential:
        """Plain ``nn.Sequential`` of Linear/ReLU, ReLU after every layer (float32, eval)."""
        layers: list[nn.Module] = []
        for w, b in zip(self.weights, self.biases):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w.to(torch.float32))
                lin.bias.copy_(b.to(torch.float32))
            layers += [lin, nn.ReLU()]
        return nn.Sequential(*layers).eval()

    def features(self, z) -> np.ndarray:
        """x-features for rows of Z, computed in float64: (M, D) -> (M, n)."""
        h = _as_tensor(z)
        d = int(self.weights[0].shape[1]) if self.weights else None
        if h.ndim != 2 or (d is not None and h.shape[1] != d):
            raise InputError(f"{self.method} explainer (category {self.category}): Z must be (M, {d}), "
                             f"got {tuple(h.shape)}")
        if not bool(torch.isfinite(h).all()):
            raise InputError(f"{self.method} explainer (category {self.category}): Z contains NaN or inf")
        for w, b in zip(self.weights, self.biases):
            h = torch.relu(h @ w.to(torch.float64).T + b.to(torch.float64))
        return h.numpy()

    def dead_features(self, z) -> list[int]:
        """Indices of the x-features that are 0 on every row of ``z`` (e.g. the training rows).

        Such an x-feature adds nothing to ``y_bar`` on those rows; its heatmaps still show
        what would excite it, so reports and figures mark it instead of presenting it as
        evidence the model used."""
        e = self.features(z)
        if e.shape[0] == 0 or e.shape[1] == 0:
            return []
        return [int(i) for i in np.flatnonzero(e.max(axis=0) <= 0)]

    def predict(self, z) -> np.ndarray:
        """The explainer's approximation of the logit: (M, D) -> (M,)."""
        return self.features(z) @ self.v.to(torch.float64).numpy() + self.bias

    def contributions(self, z) -> np.ndarray:
        """Per-x-feature contribution ``v_i * E_i``: (M, D) -> (M, n)."""
        return self.features(z) * self.v.to(torch.float64).numpy()

    def save(self, directory: Path) -> Path:
        """Write ``weights.safetensors`` + ``meta.json`` (meta last, so its presence means done)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"encoder.{i}.weight": w.detach().float().contiguous().cpu() for i, w in enumerate(self.weights)}
        tensors |= {f"encoder.{i}.bias": b.detach().float().contiguous().cpu() for i, b in enumerate(self.biases)}
        tensors["v"] = self.v.detach().float().contiguous().cpu()
        tensors["bias"] = torch.tensor([float(self.bias)])
        tmp = temp_beside(directory / WEIGHTS_FILE)  # concurrent writers never share a temp file
        save_file(tensors, str(tmp))
        tmp.replace(directory / WEIGHTS_FILE)
        meta = dict(self.meta, method=self.method, category=int(self.category), n_features=self.n_features,
                    layers=len(self.weights))
        tmp = temp_beside(directory / META_FILE)
        tmp.write_text(json.dumps(_strict_json(meta), indent=1, default=_json_default, allow_nan=False))
        tmp.replace(directory / META_FILE)
        return directory


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _strict_json(obj):
    """``obj`` with NaN / inf floats as None (null): bare ``NaN`` is not JSON, and strict
    parsers (browsers, jq, other languages) reject the file. E.g. F_reg_test of an empty test set."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def _files_present(d: Path) -> bool:
    return (d / META_FILE).is_file() and (d / WEIGHTS_FILE).is_file()


def is_complete(directory: Path) -> bool:
    """Both files present and ``meta.json`` readable: a truncated meta (a full disk, a killed
    copy) counts as not done, so the pipeline retrains that category instead of failing on it."""
    d = Path(directory)
    if not _files_present(d):
        return False
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "layers" in meta


def load_explainer(directory: Path) -> Explainer:
    """Load an explainer written by :meth:`Explainer.save`."""
    d = Path(directory)
    if not _files_present(d):
        raise SraeError(f"no complete explainer at {d} (expected {WEIGHTS_FILE} and {META_FILE})")
    try:
        meta = json.loads((d / META_FILE).read_text())
        t = load_file(str(d / WEIGHTS_FILE))
        layers = int(meta["layers"])
        return Explainer(
            method=meta["method"],
            category=int(meta["category"]),
            weights=[t[f"encoder.{i}.weight"] for i in range(layers)],
            biases=[t[f"encoder.{i}.bias"] for i in range(layers)],
            v=t["v"],
            bias=float(t["bias"][0]),
            meta=meta,
        )
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise SraeError(f"explainer at {d}: unreadable ({what}); delete the folder to retrain it") from None


def hparams_key(hparams: dict) -> str:
    """Short stable hash of a hyperparameter dict (for directory names and cache keys)."""
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:12]


def explainer_dir(root: Path, feature_fingerprint: str, method: str, hparams: dict, category: int) -> Path:
    """One directory per (feature fingerprint, method, hyperparameters, category): see
    docs/design.md, "Data contracts"."""
    return Path(root) / feature_fingerprint[:16] / method / hparams_key(hparams) / f"cat{int(category):04d}"
