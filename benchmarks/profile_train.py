"""Where a batched training step spends its time: phase timings (synchronised) and the top
kernels of a torch.profiler trace. A diagnosis tool for bench_train, not a benchmark.

    python -m benchmarks.profile_train --device cuda --full
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks import bench_train as bt
from srae.losses import srae_objective
from srae.model import StackedSRAE
from srae.optim import StackedAdam
from srae.train import TrainSettings, _gather_scaled, fit_stack


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--tf32", action="store_true")
    args = ap.parse_args(argv)
    dev = args.device
    cats, D, per_cat, N, _ = bt.sizes(args.full)
    steps = 6 if args.full else 4
    mb = 256
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    z, y, members, arch = bt.workload(dev, cats, D, per_cat, N)
    fit_stack(z, y, members[:2], "SRAE", arch, TrainSettings(batch_size=mb, max_steps=2, device=dev))
    _sync(dev)
    t0 = time.perf_counter()
    fit_stack(z, y, members, "SRAE", arch, TrainSettings(batch_size=mb, max_steps=steps, device=dev))
    _sync(dev)
    print(f"fit_stack: {(time.perf_counter() - t0) / steps * 1e3:.1f} ms/step (tf32={args.tf32})", flush=True)

    # Phase timings of the same step, written out.
    B = cats
    model = StackedSRAE(arch, list(range(B)), device=dev)
    g = np.random.default_rng(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = StackedAdam(params, [1e-3] * B)
    row_table = torch.as_tensor(np.stack([m.train_idx for m in members]), device=dev)
    w = torch.ones(B, mb, device=dev)
    cats_t = torch.arange(B, device=dev)
    phases: dict[str, float] = {}

    def tick(name: str, t: float) -> float:
        _sync(dev)
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + (now - t)
        return now

    for it in range(steps + 1):
        if it == 1:
            phases.clear()
        t = time.perf_counter()
        local = torch.as_tensor(np.stack([g.integers(0, per_cat, mb) for _ in range(B)]), device=dev)
        rows = row_table.gather(1, local)
        zb = _gather_scaled(z, rows, torch.ones(B, 1, 1, device=dev), z.dtype)  # as fit_stack lays it out
        yb = y[rows, cats_t[:, None]]
        t = tick("gather", t)
        e, z_hat, y_bar = model(zb)
        t = tick("forward", t)
        loss = srae_objective(y_bar=y_bar, y_hat=yb, weight=w, e=e, z=zb, z_hat=z_hat, beta=1.0, eta=0.1, q=1.0)
        t = tick("loss", t)
        opt.zero_grad()
        loss.sum().backward()
        t = tick("backward", t)
        opt.step()
        t = tick("adam", t)
    for k, v in phases.items():
        print(f"  {k:10s} {v / steps * 1e3:8.2f} ms/step", flush=True)

    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fit_stack(z, y, members, "SRAE", arch, TrainSettings(batch_size=mb, max_steps=3, device=dev))
        _sync(dev)
    key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
