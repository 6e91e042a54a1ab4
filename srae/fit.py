"""Train the demo CNN from scratch or fine-tune VGG on a dataset's train split.

Resumable: after every epoch the full training state goes to ``<out>/state.pt`` (written
atomically); rerunning with the same settings continues after the last finished epoch and
ends with the same weights as an uninterrupted run, because every epoch's randomness
(shuffle order, flips and shifts, dropout) is seeded from ``(seed, epoch)`` alone. A finished fit
(``<out>/fit.json`` + ``<out>/model.safetensors``) with the same settings is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from srae import __version__, cancel
from srae.backbones import Backbone, build_backbone, file_sha256, load_backbone, resolve_device, save_backbone
from srae.datasets.common import DatasetIndex
from srae.errors import InputError
from srae.fit_cache import MODEL_FILE, SUMMARY_FILE
from srae.images import BAD_LABEL, ImageDataset, normalize
from srae.stores import temp_beside

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the weights file, its sha256, accuracy, per-epoch history."""

    backbone: Backbone
    checkpoint: Path
    checkpoint_sha256: str
    test_accuracy: float
    history: list[dict] = field(default_factory=list)
    reused: bool = False


def default_workers() -> int:
    """DataLoader workers: leave one core to the training process."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _loader(ds: ImageDataset, batch_size: int, shuffle: bool, workers: int, pin: bool,
            generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin, generator=generator, persistent_workers=False)


def _lr_at(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def augment_batch(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``max_shift`` pixels per image
    (edge-replicated), drawn from ``gen``; the same draws whatever the batch content."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=gen)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if max_shift == 0:
        return x
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x.float(), (max_shift,) * 4, mode="replicate").to(x.dtype)
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, max_shift + dy: max_shift + dy + h, max_shift + dx: max_shift + dx + w]
    return out


def _optimizer(bb: Backbone, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in bb.net.parameters() if p.requires_grad]
    if bb.name == "demo_cnn":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


@torch.no_grad()
def evaluate(bb: Backbone, ds: ImageDataset, *, device: torch.device, batch_size: int = 64,
             num_workers: int = 0) -> float:
    """Top-1 accuracy of ``bb`` on ``ds`` (unreadable images left out)."""
    model = bb.model.to(device).eval()
    mean, std = torch.tensor(bb.mean, device=device), torch.tensor(bb.std, device=device)
    correct = total = 0
    for x, y, _ in _loader(ds, batch_size, False, num_workers, device.type == "cuda"):
        keep = y != BAD_LABEL
        x = normalize(x.to(device, non_blocking=True), mean, std)
        pred = model(x).argmax(1).cpu()
        correct += int((pred[keep] == y[keep]).sum())
        total += int(keep.sum())
    return correct / max(1, total)


def _save_state(path: Path, state: dict) -> None:
    tmp = temp_beside(path)
    torch.save(state, tmp)
    tmp.replace(path)


def _train_epoch(bb: Backbone, model: nn.Module, opt: torch.optim.Optimizer, ds: ImageDataset,
                 epoch: int, cfg: dict, device: torch.device, workers: int, progress: bool) -> dict:
    """One pass over ``ds``; all randomness comes from ``(seed, epoch)``."""
    seed = cfg["seed"] * 100_003 + epoch
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)  # dropout (inside fork_rng of the caller)
    loader = _loader(ds, cfg["batch_size"], True, workers, device.type == "cuda", gen)
    steps_per_epoch, total_steps = len(loader), len(loader) * cfg["epochs"]
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    mean, std = torch.tensor(bb.mean, device=device), torch.tensor(bb.std, device=device)
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    # A manual bar: wrapping the loader would let tqdm create a second iterator, which
    # consumes the shuffle generator and changes the batch order.
    bar = tqdm(total=steps_per_epoch, desc=f"fit {bb.name} epoch {epoch + 1}/{cfg['epochs']}",
               disable=not progress, leave=False, unit="batch")
    for i, (x, y, _) in enumerate(loader):
        cancel.check(f"fit {bb.name}")
        bar.update(1)
        if cfg["augment"]:
            x = augment_batch(x, aug_gen, max(1, bb.input_size // 16))
        keep = y != BAD_LABEL
        if not bool(keep.any()):
            continue
        x, y = x[keep], y[keep]
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg["lr"], epoch * steps_per_epoch + i, total_steps)
        x = normalize(x.to(device, non_blocking=True), mean, std)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    bar.close()
    if seen == 0:
        raise InputError("fit: no readable training image in the train split")
    return {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
            "seconds": time.perf_counter() - t0}


def fit_config(*, backbone: str, num_classes: int, input_size: int, dataset: str, init: str, epochs: int,
               lr: float, batch_size: int, weight_decay: float, seed: int, augment: bool) -> dict[str, Any]:
    """What identifies a fit: a finished or interrupted fit is reused only under an equal dict.

    ``dataset`` is the index's manifest fingerprint, ``init`` the starting weights' sha256
    (:attr:`Backbone.checkpoint_sha256`: content, not path); the package version is added.
    Callers that pick a directory per fit key it by :func:`fit_key` of this dict, so a
    changed input lands in a new directory instead of meeting a refusal."""
    return {"backbone": backbone, "num_classes": int(num_classes), "input_size": int(input_size),
            "dataset": dataset, "init": init, "epochs": int(epochs), "lr": float(lr),
            "batch_size": int(batch_size), "weight_decay": float(weight_decay), "seed": int(seed),
            "augment": bool(augment), "version": __version__}


def fit_key(config: dict[str, Any], length: int = 16) -> str:
    """Short sha256 of the canonical JSON of a :func:`fit_config` dict (stable across runs)."""
    payload = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


def fit(index: DatasetIndex, out_dir: str | Path, *, backbone: str = "demo_cnn",
        checkpoint: str | Path | None = None, pretrained: bool = True, input_size: int | None = None,
        epochs: int = 8, lr: float = 2e-3, batch_size: int = 32, weight_decay: float = 1e-4,
        seed: int = 0, augment: bool = True, device: str = "auto", num_workers: int | None = None,
        progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``backbone`` on the train split of ``index``; test accuracy on the test split.

    ``demo_cnn`` trains from scratch (AdamW); VGG fine-tunes from ``checkpoint`` or the
    ImageNet weights in the hub cache (SGD, momentum 0.9), its classifier resized to the
    dataset's classes. Cosine learning-rate decay; random flips and small shifts when ``augment``.
    ``on_epoch(record)`` runs after each epoch's checkpoint is on disk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError(f"fit: epochs {epochs}, batch_size {batch_size}, lr {lr}: must be positive")
    dev = resolve_device(device)
    workers = default_workers() if num_workers is None else num_workers
    bb = build_backbone(backbone, index.num_classes, checkpoint, pretrained=pretrained,
                        input_size=input_size, seed=seed)
    cfg = fit_config(backbone=backbone, num_classes=index.num_classes, input_size=bb.input_size,
                     dataset=index.manifest_fingerprint(), init=bb.checkpoint_sha256, epochs=epochs, lr=lr,
                     batch_size=batch_size, weight_decay=weight_decay, seed=seed, augment=augment)
    reused = _reuse(out, cfg)
    if reused is not None:
        return reused
    train = ImageDataset(index, "train", bb.input_size, bb.mean, bb.std, normalize=False)
    test = ImageDataset(index, "test", bb.input_size, bb.mean, bb.std, normalize=False)
    if len(train) == 0:
        raise InputError(f"fit: dataset {index.name!r} has no train images")
    bb.to(dev)
    model = bb.model
    opt = _optimizer(bb, lr, weight_decay)
    history: list[dict] = []
    start = 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != cfg:
            raise InputError(f"fit: {out} holds an unfinished fit with other settings; "
                             f"use another directory or delete {state_path}")
        bb.net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
        log.info("fit: resuming %s after epoch %d/%d from %s", backbone, start, epochs, state_path)
    for epoch in range(start, epochs):
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            record = _train_epoch(bb, model, opt, train, epoch, cfg, dev, workers, progress)
        history.append(record)
        _save_state(state_path, {"config": cfg, "epoch": epoch + 1, "model": bb.net.state_dict(),
                                 "optimizer": opt.state_dict(), "history": history})
        log.info("fit %s: epoch %d/%d loss %.4f train acc %.3f (%.1fs)", backbone, epoch + 1, epochs,
                 record["loss"], record["train_accuracy"], record["seconds"])
        if on_epoch is not None:
            on_epoch(record)
    bb.eval()
    acc = float("nan")
    if len(test):
        acc = evaluate(bb, test, device=dev, batch_size=max(batch_size, 64), num_workers=workers)
    sha = save_backbone(bb, out / MODEL_FILE)
    summary = {"config": cfg, "history": history, "test_accuracy": acc, "checkpoint_sha256": sha}
    tmp = temp_beside(out / SUMMARY_FILE)
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / SUMMARY_FILE)
    state_path.unlink(missing_ok=True)
    log.info("fit %s: test accuracy %.4f, weights %s", backbone, acc, out / MODEL_FILE)
    return FitResult(bb, out / MODEL_FILE, sha, acc, history)


def _reuse(out: Path, cfg: dict) -> FitResult | None:
    """The finished fit in ``out`` if it was made with ``cfg`` and its weights are intact."""
    summary_path, model_path = out / SUMMARY_FILE, out / MODEL_FILE
    if not (summary_path.is_file() and model_path.is_file()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("config") != cfg:
        raise InputError(f"fit: {out} holds a finished fit with other settings; use another directory")
    if file_sha256(model_path) != summary.get("checkpoint_sha256"):
        log.warning("fit: %s does not match its recorded sha256; training again", model_path)
        return None
    log.info("fit: reusing %s (test accuracy %.4f)", model_path, summary["test_accuracy"])
    bb = load_backbone(model_path)
    return FitResult(bb, model_path, bb.checkpoint_sha256, float(summary["test_accuracy"]),
                     list(summary["history"]), reused=True)
