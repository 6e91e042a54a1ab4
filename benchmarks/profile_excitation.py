"""Batched c-MWP against variants, all in IEEE fp32 like :mod:`srae.excitation`: one top-down
pass per unit, and the batched pass split into unit chunks (cuDNN picks its algorithm by
batch size, so a chunk can be faster than the whole). A diagnosis tool, not a benchmark.

    python -m benchmarks.profile_excitation --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from benchmarks import bench_excitation as be
from srae import excitation as ex


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def batched_chunked(trunk, head, enc, x, readout, size, chunk: int) -> list[Tensor]:
    """:func:`srae.excitation.excitation_maps_multi` with the trunk pass run ``chunk`` units at a time."""
    tmods = ex._modules(trunk)
    with torch.no_grad(), ex.full_fp32():
        tr = ex._forward(tmods, x, keep_from=readout + 1)
        sigs = []
        for h, units in ((enc, list(range(be.N_FEATURES))), (head, [be.CATEGORY])):
            hmods = ex._modules(h)
            htr = ex._forward(hmods, tr.output, keep_from=0)
            p, t = ex._top(hmods, htr, units, True)
            sigs.append(ex._down(hmods, htr, p, t - 1, -1))
        p = torch.cat(sigs, dim=1)
        out = [ex._down(tmods, tr, q, len(tmods) - 1, readout) for q in p.split(chunk, dim=1)]
        return [ex._to_map(torch.cat(out, 1), readout, size)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    if dev.startswith("cuda"):
        trunk, head, readout, size = be.vgg19_chain()
    else:
        trunk, head, readout, size = be.demo_chain()
    enc = be._encoder(trunk[-2].out_features)
    trunk, head, enc = trunk.to(dev), head.to(dev), enc.to(dev)
    x = torch.rand(args.batch, 3, size, size, device=dev)
    fns = {"batched": be.batched, "per-unit backward (fp32)": be.per_unit_backward,
           "per-unit calls": be.per_unit_calls}
    for c in (1, 2, 3):
        fns[f"batched, trunk pass in chunks of {c} units"] = (
            lambda *a, c=c: batched_chunked(*a, chunk=c))
    ref = torch.cat(be.batched(trunk, head, enc, x, readout, size), 1)
    n_maps = args.batch * (be.N_FEATURES + 1)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, f in fns.items():
            out = torch.cat(f(trunk, head, enc, x, readout, size), 1)
            err = float((out - ref).abs().max() / ref.abs().max())
            f(trunk, head, enc, x, readout, size)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(3):
                f(trunk, head, enc, x, readout, size)
            _sync(dev)
            ms = (time.perf_counter() - t0) / 3 * 1e3
            print(f"cudnn.benchmark={bench} {name}: {ms:.1f} ms, {n_maps / ms * 1e3:.0f} maps/s "
                  f"(max rel diff vs batched {err:.1e})", flush=True)
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
