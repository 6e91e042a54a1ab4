"""Image loading and the backbone preprocessing: resize to S x S without cropping, normalise.

Resizing without a crop keeps every annotation inside the frame, so part locations, boxes
and masks map onto heatmaps by scaling alone (docs/design.md, "Data contracts"). The same code is
used for training, feature extraction and heatmaps, so the three always agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from srae.datasets.common import DatasetIndex
from srae.errors import InputError, SraeError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Label returned by ImageDataset for an image that could not be read.
BAD_LABEL = -1
RESIZE_METHOD = "PIL bilinear, no crop"


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, fully decoded; a broken file raises InputError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"image {path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Resize to ``size x size`` (aspect ratio not kept, nothing cropped) -> uint8 (3, S, S)."""
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 image(s) (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``.

    The op order is fixed so the CPU and the GPU produce the same values for the same input.
    In a GPU loop pass ``mean``/``std`` as tensors already on the device: building them from
    lists copies them over, and that blocking copy would stall the pipeline every batch.
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return ((x.to(torch.float32) / 255.0) - m) / s


def preprocess(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """A PIL image -> the backbone input (3, S, S) float32."""
    return normalize(resize_uint8(img.convert("RGB"), size), mean, std)


def preprocessing_dict(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> dict:
    """The preprocessing settings as a JSON-able dict (part of the feature fingerprint)."""
    return {
        "size": int(size),
        "resize": RESIZE_METHOD,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


class ImageDataset(Dataset):
    """Images of one split of a :class:`DatasetIndex` as ``(tensor, label, image_id)``.

    The tensor is the normalised float32 (3, S, S) input, or the resized uint8 image when
    ``normalize=False`` (cheaper to ship between processes; normalise on the device with
    :func:`normalize`). An unreadable image does not stop the loader: it is logged and
    returned as zeros with label :data:`BAD_LABEL`; :meth:`failure_reason` says why.
    ``split=None`` takes every image, in index order.
    """

    def __init__(
        self,
        index: DatasetIndex,
        split: str | None,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        normalize: bool = True,
    ) -> None:
        if split is not None and split not in ("train", "test"):
            raise InputError(f"split {split!r}: expected 'train', 'test' or None")
        if size <= 0:
            raise InputError(f"image size {size}: must be positive")
        frame = index.images if split is None else index.split(split)
        self.rows = frame.reset_index(drop=True)
        self.root = Path(index.root)
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.normalize = normalize
        self._paths = self.rows["path"].astype(str).tolist()
        self._labels = self.rows["label"].astype(np.int64).to_numpy()
        self._ids = self.rows["image_id"].astype(np.int64).to_numpy()

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def image_ids(self) -> np.ndarray:
        return self._ids

    def path(self, i: int) -> Path:
        return self.root / self._paths[i]

    def _load(self, i: int) -> torch.Tensor:
        x = resize_uint8(load_image(self.path(i)), self.size)
        return normalize(x, self.mean, self.std) if self.normalize else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        try:
            x = self._load(i)
            label = int(self._labels[i])
        except SraeError as exc:
            log.warning("skipping unreadable image: %s", exc)
            dtype = torch.float32 if self.normalize else torch.uint8
            x = torch.zeros((3, self.size, self.size), dtype=dtype)
            label = BAD_LABEL
        return x, label, int(self._ids[i])

    def failure_reason(self, i: int) -> str | None:
        """Why image ``i`` cannot be read (None if it can); re-reads it in this process."""
        try:
            load_image(self.path(i))
        except SraeError as exc:
            return str(exc)
        return None
