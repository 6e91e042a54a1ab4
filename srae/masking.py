"""The masking test (paper Table 2b / Table 4): keep only what the heatmaps highlight,
inpaint the rest, reclassify.

For a threshold ``gamma`` a pixel is kept when it reaches ``gamma`` times the maximum of its
heatmap; with several heatmaps per image (the n x-features) a pixel is kept if *any* of them,
each scaled by its own maximum, keeps it. Everything else is painted black and filled by
OpenCV's Telea inpainting; the backbone then classifies the result. A map that is zero
everywhere keeps nothing. Next to each accuracy, :func:`masking_report` records the share of
pixels kept (``mask_area@<gamma>``): the union of n maps keeps far more than one map at the
same gamma, and the accuracies only compare with the areas beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from srae.errors import InputError
from srae.excitation import resize_maps

log = logging.getLogger(__name__)

__all__ = [
    "GAMMAS", "UNMASKED", "metric_name", "area_metric_name", "keep_mask", "mask_and_inpaint", "masked_images",
    "backbone_classifier", "masking_accuracy", "masking_report",
]

GAMMAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3)
UNMASKED = "mask_acc@original"  # metric name of the accuracy on the unmasked images
Classifier = Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W, 3) -> logits (B, C)


def metric_name(gamma: float) -> str:
    """Long-table metric name for one threshold, e.g. ``mask_acc@0.05`` (the name the report's
    masking table reads: :func:`srae.report.gamma_metric`)."""
    from srae.report import gamma_metric

    return gamma_metric(gamma)


def area_metric_name(gamma: float) -> str:
    """Long-table metric name of the share of pixels kept at one threshold, e.g. ``mask_area@0.05``."""
    return f"mask_area@{gamma:g}"


def _maps4(maps: np.ndarray | torch.Tensor, what: str = "maps") -> np.ndarray:
    m = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if m.ndim != 4:
        raise InputError(f"{what}: expected (M, n, H, W) heatmaps, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InputError(f"{what}: contains NaN or inf")
    return m


def keep_mask(maps: np.ndarray | torch.Tensor, gamma: float) -> np.ndarray:
    """(M, n, H, W) heatmaps -> bool (M, H, W): kept iff some map is >= gamma * its own max
    (and that max is positive)."""
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"gamma {gamma}: must lie in [0, 1]")
    m = _maps4(maps)
    peak = m.max(axis=(2, 3), keepdims=True)
    return ((m >= gamma * peak) & (peak > 0)).any(axis=1)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images: expected uint8 (M, H, W, 3), got {images.dtype} {images.shape}")
    return images


def mask_and_inpaint(image: np.ndarray, keep: np.ndarray, radius: float = 3.0) -> np.ndarray:
    """Paint pixels outside ``keep`` black and inpaint them (Telea); uint8 (H, W, 3) -> same."""
    import cv2

    image = np.ascontiguousarray(image)
    keep = np.asarray(keep, dtype=bool)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if keep.shape != image.shape[:2]:
        raise InputError(f"keep mask: shape {keep.shape} does not match the image {image.shape[:2]}")
    if keep.all():
        return image.copy()
    painted = image.copy()
    painted[~keep] = 0
    hole = (~keep).astype(np.uint8) * 255
    return cv2.inpaint(painted, hole, float(radius), cv2.INPAINT_TELEA)


def _maps_at(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    m = _maps4(maps)
    if m.shape[2:] != size:  # bilinear, as the maps would have been made at this size
        m = resize_maps(torch.from_numpy(m.astype(np.float32)), size).numpy()
    return m


def masked_images(images: np.ndarray, maps: np.ndarray | torch.Tensor, gamma: float,
                  radius: float = 3.0) -> np.ndarray:
    """Mask + inpaint every image with its heatmaps: (M, H, W, 3) uint8, (M, n, h, w) -> uint8.
    Maps at another resolution are resized bilinearly to the images first."""
    images = _check_images(images)
    return _masked(images, _keep_masks(images, maps, gamma), radius)


def _keep_masks(images: np.ndarray, maps: np.ndarray | torch.Tensor, gamma: float) -> np.ndarray:
    m = _maps_at(maps, images.shape[1:3])
    if m.shape[0] != images.shape[0]:
        raise InputError(f"maps: {m.shape[0]} heatmap sets for {images.shape[0]} images")
    return keep_mask(m, gamma)


def _masked(images: np.ndarray, keep: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([mask_and_inpaint(img, k, radius) for img, k in zip(images, keep)])


def backbone_classifier(model: nn.Module, mean: Sequence[float], std: Sequence[float], *,
                        device: str | torch.device = "cpu", batch_size: int = 64) -> Classifier:
    """A classifier for the masking test: uint8 (B, H, W, 3) images -> logits (B, C), using the
    backbone's own normalisation; the model runs in eval mode (train flags restored)."""
    from srae.images import normalize

    def classify(images: np.ndarray) -> np.ndarray:
        flags = {m: m.training for m in model.modules()}
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for s in range(0, len(images), batch_size):
                    x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2)
                    out.append(model(normalize(x.to(device), mean, std)).float().cpu().numpy())
        finally:
            for m, flag in flags.items():
                m.training = flag
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return classify


def _accuracy(classify: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits = np.asarray(classify(images))
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise InputError(f"classifier: returned shape {logits.shape} for {len(labels)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):  # would just score as wrong
        raise InputError(f"labels: outside the classifier's classes 0..{logits.shape[1] - 1}")
    return float(np.mean(logits.argmax(axis=1) == labels))


def masking_accuracy(classify: Classifier, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                     maps: np.ndarray | torch.Tensor, gammas: Sequence[float] = GAMMAS,
                     radius: float = 3.0) -> dict[str, float]:
    """Accuracy of ``classify`` on the unmasked images and on the masked + inpainted images
    for each gamma: ``{"mask_acc@original": a, "mask_acc@0.01": a1, ...}``."""
    res = masking_report(classify, images, labels, {"maps": maps}, gammas, radius)["maps"]
    return {k: v for k, v in res.items() if k.startswith("mask_acc@")}


def masking_report(classify: Classifier, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                   maps_by_method: Mapping[str, np.ndarray | torch.Tensor],
                   gammas: Sequence[float] = GAMMAS, radius: float = 3.0) -> dict[str, dict[str, float]]:
    """:func:`masking_accuracy` for several methods' heatmaps of the same images (e.g. SRAE
    x-features, shape (M, n, H, W), and ExcitationBP on the logit, (M, 1, H, W)); the
    unmasked accuracy is computed once and repeated in each method's dict, which also holds
    the mean share of pixels kept per gamma (``mask_area@<gamma>``)."""
    images = _check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise InputError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
    if images.shape[0] == 0:
        raise InputError("images: no images to classify")
    base = _accuracy(classify, images, labels)
    report = {}
    for method, maps in maps_by_method.items():
        res = {UNMASKED: base}
        for g in gammas:
            keep = _keep_masks(images, maps, g)
            res[metric_name(g)] = _accuracy(classify, _masked(images, keep, radius), labels)
            res[area_metric_name(g)] = float(keep.mean())
        log.info("masking test %s: %s", method, ", ".join(f"{k}={v:.3f}" for k, v in res.items()))
        report[method] = res
    return report
