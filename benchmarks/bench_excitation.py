"""c-MWP heatmaps with 6 units per image (5 x-features + the class logit): batched vs per unit.

- batched: :func:`srae.excitation.excitation_maps_multi`, one trunk forward and one top-down
  pass carrying all 6 units (the SRAE encoder and the backbone head share the trunk).
- per-unit calls: ``excitation_maps(trunk + head, x, [u])`` once per unit (forward + backward
  each), the way one would call a one-unit Excitation Backprop.
- per-unit backward: one shared forward, then one top-down pass per unit (isolates the
  batching of the backward itself).

CPU: a demo-CNN-like chain (64 x 64 input, readout pool2). CUDA: torchvision VGG19 at 224
(random weights, its in-place ReLUs kept), readout pool3, plus a CUDA-vs-CPU agreement check.
Needs only torch/torchvision/numpy and srae.excitation.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from srae import excitation as ex

TITLE = "Excitation Backprop: batched units vs one backward per unit"
log = logging.getLogger(__name__)
N_FEATURES = 5
CATEGORY = 3


def _encoder(z_dim: int) -> nn.Sequential:
    """An SRAE-shaped encoder (800-100-n, ReLU after every layer)."""
    return nn.Sequential(nn.Linear(z_dim, 800), nn.ReLU(), nn.Linear(800, 100), nn.ReLU(),
                         nn.Linear(100, N_FEATURES), nn.ReLU()).eval()


def demo_chain() -> tuple[nn.Sequential, nn.Sequential, int, int]:
    """Same layout as srae.backbones.build_demo_cnn: (trunk, head, readout pool2, input size)."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (16, 32, 64, 64):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU()).eval()
    head = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    return trunk, head, 5, 64


def vgg19_chain() -> tuple[nn.Sequential, nn.Sequential, int, int]:
    """torchvision VGG19 split at fc6's ReLU: (trunk, head, readout pool3 = features[18], 224)."""
    import torchvision

    vgg = torchvision.models.vgg19(weights=None, num_classes=200).eval()
    trunk = nn.Sequential(*vgg.features, vgg.avgpool, nn.Flatten(), *vgg.classifier[:2])
    return trunk, nn.Sequential(*vgg.classifier[2:]), 18, 224


def batched(trunk, head, enc, x, readout, size) -> list[torch.Tensor]:
    return ex.excitation_maps_multi(trunk, [(enc, list(range(N_FEATURES))), (head, [CATEGORY])], x,
                                    readout=readout, output_size=size)


def per_unit_calls(trunk, head, enc, x, readout, size) -> list[torch.Tensor]:
    xchain, ychain = nn.Sequential(*trunk, *enc), nn.Sequential(*trunk, *head)
    maps = [ex.excitation_maps(xchain, x, [u], readout=readout, output_size=size) for u in range(N_FEATURES)]
    return maps + [ex.excitation_maps(ychain, x, [CATEGORY], readout=readout, output_size=size)]


def per_unit_backward(trunk, head, enc, x, readout, size) -> list[torch.Tensor]:
    """One forward; then the top-down pass once per unit (uses the module's internals)."""
    tmods = ex._modules(trunk)
    out = []
    with torch.no_grad(), ex.full_fp32():  # the same precision as the batched path
        tr = ex._forward(tmods, x, keep_from=readout + 1)
        for chain, units in ((enc, range(N_FEATURES)), (head, [CATEGORY])):
            hmods = ex._modules(chain)
            htr = ex._forward(hmods, tr.output, keep_from=0)
            for u in units:
                p, t = ex._top(hmods, htr, [u], True)
                p = ex._down(tmods, tr, ex._down(hmods, htr, p, t - 1, -1), len(tmods) - 1, readout)
                out.append(ex._to_map(p, readout, size))
    return out


def _layer_macs(chain: nn.Sequential, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Multiply-accumulates per image of each module of ``chain`` (0 for non-affine ones),
    counted from the shapes of one forward pass; and the chain's output."""
    macs = [0.0] * len(chain)
    a = x[:1]
    with torch.no_grad():
        for i, m in enumerate(chain):
            out = m(a.clone())  # clone: torchvision's in-place ReLUs must not touch `a`
            if isinstance(m, nn.Conv2d):
                macs[i] = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                macs[i] = out.numel() * m.in_features
            a = out
    return macs, a


def flop_ceiling(trunk: nn.Sequential, head: nn.Sequential, enc: nn.Sequential, x: torch.Tensor,
                 readout: int) -> float:
    """Speed-up of batched over per-unit calls if both ran at the same FLOP rate.

    Per image: the forward costs every affine layer once; the excitation rule costs each affine
    layer above the readout once more for ``z = W+ a`` (per forward) and once per unit for the
    transposed product ``W+^T r``. Batched: one forward and one ``z`` for the shared trunk and
    both heads, then 6 units down. Per-unit calls: all of it again for each unit."""
    t_macs, z = _layer_macs(trunk, x)
    trunk_all, trunk_above = sum(t_macs), sum(t_macs[readout + 1:])
    enc_all, head_all = sum(_layer_macs(enc, z)[0]), sum(_layer_macs(head, z)[0])
    batched = trunk_all + enc_all + head_all + (trunk_above + enc_all + head_all) \
        + N_FEATURES * (trunk_above + enc_all) + (trunk_above + head_all)
    calls = N_FEATURES * (trunk_all + enc_all + 2 * (trunk_above + enc_all)) \
        + (trunk_all + head_all + 2 * (trunk_above + head_all))
    return calls / batched


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_kib(field: str) -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _reset_peak(device: str) -> float:
    """Reset the peak-memory counter; returns the CPU baseline (KiB resident) it starts from."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    try:  # reset the process's resident-memory high-water mark (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_kib("VmRSS")


def _peak_mib(device: str, base_kib: float) -> float:
    """CUDA: peak allocated; CPU: peak resident set above the baseline."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return (_proc_kib("VmHWM") - base_kib) / 1024


def _cuda_peaks(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        base = _reset_peak("cuda")
        fn()
        torch.cuda.synchronize()
        peaks[name] = _peak_mib("cuda", base)
    return peaks


def _cpu_peaks(batch: int) -> dict[str, float]:
    """Peak resident memory of each method on the demo chain, measured in a fresh process
    where glibc returns every block over 64 KiB to the OS on free, so the high-water mark
    follows live tensor memory (in this process freed memory stays cached)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, benchmarks.bench_excitation as b; print(json.dumps(b.cpu_peaks_here({batch})))"
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        log.warning("CPU peak memory not measured: %s", exc)
        return {}


def cpu_peaks_here(batch: int) -> dict[str, float]:
    """Child-process side of :func:`_cpu_peaks`."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trunk, head, readout, size = demo_chain()
    enc = _encoder(trunk[-2].out_features)
    x = torch.rand(batch, 3, size, size)
    peaks = {}
    for name, f in (("batched", batched), ("per-unit calls", per_unit_calls),
                    ("per-unit backward", per_unit_backward)):
        f(trunk, head, enc, x, readout, size)
        base = _reset_peak("cpu")
        f(trunk, head, enc, x, readout, size)
        peaks[name] = _peak_mib("cpu", base)
    return peaks


def _measure(tag: str, trunk, head, enc, x, readout, size, device, reps) -> tuple[list[dict], list[dict], float]:
    """Interleaved timing (each rep runs every method once, so load drifts hit all alike);
    median seconds per method; peak memory from a separate run of each method."""
    n_maps = x.shape[0] * (N_FEATURES + 1)
    fns = {name: (lambda f=f: f(trunk, head, enc, x, readout, size)) for name, f in
           (("batched", batched), ("per-unit calls", per_unit_calls), ("per-unit backward", per_unit_backward))}
    ref = torch.cat(fns["batched"](), 1)
    err = float((ref - torch.cat(fns["per-unit calls"](), 1)).abs().max() / ref.abs().max().clamp(min=1e-30))
    del ref
    peaks = _cuda_peaks(fns) if device.startswith("cuda") else _cpu_peaks(x.shape[0])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    secs = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in fns:
        rows.append({"name": f"{tag} {name}: maps/s", "value": n_maps / secs[name], "unit": "maps/s"})
        rows.append({"name": f"{tag} {name}: peak memory", "value": peaks.get(name, float("nan")),
                     "unit": "MiB allocated" if device.startswith("cuda") else "MiB RSS above baseline"})
    ratios = [{"name": f"{tag} batched vs per-unit calls", "value": secs["per-unit calls"] / secs["batched"],
               "target": 4.0},
              {"name": f"{tag} batched vs per-unit backward (shared forward)",
               "value": secs["per-unit backward"] / secs["batched"], "target": 1.0}]
    return rows, ratios, err


def run(device: str = "cpu", full: bool = False) -> dict:
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    rows: list[dict] = []
    ratios: list[dict] = []
    notes = []
    if cuda:
        trunk, head, readout, size = vgg19_chain()
        batch, reps, tag = (32 if full else 8), (5 if full else 3), "VGG19@224 pool3"
    else:
        trunk, head, readout, size = demo_chain()
        batch, reps, tag = (64 if full else 32), (5 if full else 3), "demo CNN@64 pool2"
    enc = _encoder(trunk[-2].out_features)
    trunk, head, enc = trunk.to(device), head.to(device), enc.to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    r, q, err = _measure(tag, trunk, head, enc, x, readout, size, device, reps)
    rows += r
    ratios += q
    ceiling = flop_ceiling(trunk, head, enc, x, readout)
    rows.append({"name": f"{tag} FLOP ceiling of batched vs per-unit calls", "value": ceiling, "unit": "x"})
    notes.append(f"{tag}: batch {batch} images x {N_FEATURES + 1} units, device {device}; max relative "
                 f"difference batched vs per-unit maps {err:.2e}.")
    if cuda:
        xs = x[:2]
        gpu = torch.cat(batched(trunk, head, enc, xs, readout, size), 1).cpu()
        cpu_models = [m.to("cpu") for m in (trunk, head, enc)]
        cpu = torch.cat(batched(*cpu_models, xs.cpu(), readout, size), 1)
        rel = float((gpu - cpu).abs().max() / cpu.abs().max())
        rows.append({"name": "CUDA vs CPU max |diff| / max|map| (2 images)", "value": rel, "unit": "ratio"})
        notes.append("Excitation runs in IEEE fp32 on CUDA (TF32 off); the remaining CUDA-vs-CPU difference "
                     "(~2e-3 of the map's max on random VGG19) is fp32 rounding amplified by the contrast, a small "
                     "difference of large signals.")
    notes.append("Bound: all methods do the same per-unit top-down FLOPs; batching saves the repeated "
                 "forward passes and z = W+ a (computed once per image and layer), and runs larger kernels. "
                 f"Counted from the layer shapes, those savings cap the batched/per-unit-calls ratio at "
                 f"{ceiling:.2f}x for equal FLOP rates (the FLOP ceiling row); a measured ratio above it "
                 "comes from per-call overhead, and a 4x target above the ceiling cannot be met by doing "
                 "the same work faster. Deeper readouts (e.g. VGG pool4) raise the ceiling.")
    return {"rows": rows, "ratios": ratios, "notes": " ".join(notes)}


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", "--full" in sys.argv), indent=1))
