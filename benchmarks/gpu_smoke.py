"""The library's stages on a CUDA device, checked against the same calls on the CPU.

CI has no GPU, so these code paths (device placement, dtype and generator handling) are only
exercised here. Each check prints one line: ``ok`` with what was compared, ``skipped`` when a
module this machine lacks is needed, or ``FAILED`` with the error. Exit status 1 if any
check failed. Needs torch and numpy; zarr for the heatmap store, scikit-learn for Lasso,
OpenCV for masking (each check says what it is missing).

    python -m benchmarks.gpu_smoke --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from srae.backbones import build_backbone
from srae.cv import ExplainerSettings, train_explainers
from srae.train import TrainSettings

CLASSES, SIZE, N = 3, 64, 240


def _data(dev: str):
    """Demo-CNN backbone (random weights), images, their Z and logits, and labels (assigned
    round robin: a random network predicts one class for nearly everything)."""
    bb = build_backbone("demo_cnn", CLASSES, pretrained=False, input_size=SIZE, seed=0).eval()
    x = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = bb.forward(x)[0].numpy()
    # Targets with structure to find (a random network's logits barely vary): each class's
    # "logit" is a positive combination of 4 Z dims, standardised.
    g = np.random.default_rng(0)
    w = np.zeros((z.shape[1], CLASSES), dtype=np.float32)
    for c in range(CLASSES):
        w[g.choice(z.shape[1], 4, replace=False), c] = g.uniform(0.5, 1.5, 4)
    y = z @ w
    y = (y - y.mean(0)) / y.std(0).clip(1e-12)
    return bb, x, z, y.astype(np.float32), np.arange(N) % CLASSES


def _settings(dev: str) -> ExplainerSettings:
    return ExplainerSettings(n=3, hidden=(32,), n_pos=20, n_neg=60, n_test_neg=30, folds=2,
                             grid={"beta": [0.1], "eta": [0.05, 0.2], "q": [10.0], "lr": [0.01],
                                   "weight_decay": [1e-4]},
                             train=TrainSettings(batch_size=32, max_epochs=8, patience=3, device=dev))


def _maps_agree(what: str, dev: str, bb, maps_on: Callable[[str], np.ndarray], tol: float = 2e-2) -> float:
    """``maps_on(device)`` on the CPU and on ``dev`` (backbone moved along); the largest
    difference relative to the CPU maps' maximum, asserted below ``tol``."""
    try:
        out = {d: maps_on(d) for d in ("cpu", dev)}
    finally:
        bb.to("cpu")
    worst = float(np.abs(out["cpu"] - out[dev]).max() / max(np.abs(out["cpu"]).max(), 1e-30))
    assert np.isfinite(out[dev]).all() and worst < tol, f"{what} {dev} vs cpu differs by {worst:.2e}"
    return worst


def check_training(dev: str, ctx: dict) -> str:
    _, _, z, logits, labels = ctx["data"]
    cats = sorted(set(labels.tolist()))[:2]
    out = {}
    for d in ("cpu", dev):
        res = train_explainers(z, logits, labels, cats, "SRAE", _settings(d))
        assert not res.failed, res.failed
        out[d] = res.explainers
    ctx["explainers"] = out[dev]
    lines = []
    for c in cats:
        a, b = out["cpu"][c], out[dev][c]
        for e in (a, b):
            assert all(bool(torch.isfinite(w).all()) for w in e.weights), "non-finite weights"
        fa, fb = a.meta.get("F_reg_test"), b.meta.get("F_reg_test")
        lines.append(f"cat {c}: test F_reg cpu {fa:.4g} / {dev} {fb:.4g}")
    return "SRAE with CV (2 folds, 2 configs), validation, revival: " + "; ".join(lines)


def check_heatmaps(dev: str, ctx: dict) -> str:
    from srae.heatmaps import HeatmapJob, compute_heatmaps, open_heatmaps

    bb, x, _, _, labels = ctx["data"]
    expl = next(iter(ctx["explainers"].values()))
    ids = np.arange(8)
    readout = bb.readouts[bb.default_readout]
    maps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("cpu", dev):
            bb.to(d)
            jobs = [HeatmapJob(Path(tmp) / d / "x.zarr", expl.encoder().to(d), list(range(expl.n_features)), {"m": "SRAE"}),
                    HeatmapJob(Path(tmp) / d / "y.zarr", bb.head, [int(labels[0])], {"m": "ExcitationBP"})]
            batches = [(x[s:s + 4].to(d), torch.zeros(4), torch.from_numpy(ids[s:s + 4])) for s in range(0, 8, 4)]
            paths = compute_heatmaps(bb.trunk, jobs, batches, ids, readout=readout, output_size=SIZE)
            maps[d] = [np.asarray(open_heatmaps(p).maps[:]) for p in paths]
        bb.to("cpu")
    worst = 0.0
    for a, b in zip(maps["cpu"], maps[dev]):
        assert a.shape == b.shape and np.isfinite(b).all()
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    assert worst < 2e-2, f"c-MWP {dev} vs cpu differs by {worst:.2e} of the map maximum"
    return f"c-MWP stores (x-features + logit) {dev} vs cpu: max diff {worst:.1e} of the map maximum"


def check_gradcam(dev: str, ctx: dict) -> str:
    from srae.gradcam import gradcam_maps

    bb, x, _, _, labels = ctx["data"]
    worst = _maps_agree("Grad-CAM", dev, bb, lambda d: gradcam_maps(
        bb.to(d).model, x[:4].to(d), [int(labels[0])], readout=bb.default_readout, output_size=SIZE).cpu().numpy())
    return f"Grad-CAM {dev} vs cpu: max diff {worst:.1e} of the map maximum"


def check_lasso_heatmaps(dev: str, ctx: dict) -> str:
    from srae.baselines import train_lasso  # scikit-learn
    from srae.excitation import excitation_maps
    from srae.heatmaps import explainer_head
    from srae.sampling import design_samples

    bb, x, z, logits, labels = ctx["data"]
    c = int(labels[0])
    design = design_samples(labels, c, n_pos=20, n_neg=60, n_test_neg=30, seed=0)
    expl = train_lasso(z, logits, design, [1e-3, 1e-4], folds=2)
    assert expl.n_features > 0, "Lasso selected no dims"
    below_z, z_head = list(bb.trunk)[:-2], list(bb.trunk)[-2:]  # ... fc6, ReLU = Z
    head, units, _ = explainer_head(expl, z_head)
    readout = bb.readouts[bb.default_readout]
    worst = _maps_agree("Lasso maps", dev, bb, lambda d: excitation_maps(
        torch.nn.Sequential(*[m.to(d) for m in below_z], *head.to(d)), x[:4].to(d), units, readout=readout,
        output_size=SIZE).cpu().numpy())
    return f"Lasso x-features as Z units, {len(units)} maps {dev} vs cpu: max diff {worst:.1e}"


def check_masking(dev: str, ctx: dict) -> str:
    from srae.masking import backbone_classifier, masking_report  # OpenCV

    bb, x, _, _, labels = ctx["data"]
    imgs = (x[:6].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    maps = np.random.default_rng(0).random((6, 2, 16, 16)).astype(np.float32)
    out = {}
    for d in ("cpu", dev):
        classify = backbone_classifier(bb.to(d).model, bb.mean, bb.std, device=d)
        out[d] = masking_report(classify, imgs, labels[:6], {"SRAE": maps}, [0.05, 0.3])
    bb.to("cpu")
    assert str(out["cpu"]) == str(out[dev]), f"masking accuracies differ: {out['cpu']} vs {out[dev]}"
    return f"masking report {dev} equals cpu: {out[dev]}"


CHECKS: list[tuple[str, Callable[[str, dict], str]]] = [
    ("training", check_training), ("heatmaps", check_heatmaps), ("gradcam", check_gradcam),
    ("lasso heatmaps", check_lasso_heatmaps), ("masking", check_masking),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ctx = {"data": _data(args.device)}
    failed = 0
    for name, fn in CHECKS:
        try:
            print(f"ok       {name}: {fn(args.device, ctx)}", flush=True)
        except ModuleNotFoundError as exc:
            print(f"skipped  {name}: needs {exc.name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the others
            failed += 1
            print(f"FAILED   {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=4, file=sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
