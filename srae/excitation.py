"""(Contrastive) Excitation Backprop: MWP and c-MWP heatmaps (Zhang et al. 2016; see
docs/design.md, "Math contracts").

The top-down rule for a layer with non-negative weights ``W+`` (bias excluded) and input
activations ``a`` is ``z = W+ a``, ``r = P_out / z`` (0 where ``z == 0`` or subnormal),
``P_in = a * (W+^T r)``. ReLU and Dropout pass the signal through, MaxPool routes it to the
argmax, Flatten reshapes it. For c-MWP the top affine layer is also run with ``-W`` (the
"dual" unit); both signals are subtracted at that layer's input and the (signed) difference
is propagated down with the same rule, which is linear in the signal.

The rule is written by hand per layer, without autograd: one forward pass saves what the rule
needs, and the signals of all requested units travel down together with a ``(B, U, ...)``
leading shape. ``z = W+ a`` depends on the image only, so it is computed once per layer and
shared by every unit. On CUDA the pass runs in IEEE fp32 (TF32 off, see :func:`full_fp32`):
the contrastive difference would drown in TF32 rounding. Modules are never called in place
and never modified, so torchvision's ``ReLU(inplace=True)`` is harmless and parameters /
``requires_grad`` / train flags stay as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.utils import _pair

from srae.errors import InputError
from srae.shared_setting import SharedSetting

__all__ = [
    "SUPPORTED_MODULES", "excitation_maps", "excitation_maps_chunked", "excitation_maps_multi", "excitation_signals",
    "full_fp32",
    "resolve_readout", "unit_index", "resize_maps", "top_affine_index",
]

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, _DropoutNd, nn.Identity,
)
_PASS = (nn.ReLU, _DropoutNd, nn.Identity)  # signal passes through unchanged
Units = Sequence[int] | Tensor | np.ndarray


def _children(chain: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The modules of a flat chain (an ``nn.Sequential`` or a list of modules)."""
    if isinstance(chain, (nn.Sequential, list, tuple)):
        return list(chain)
    raise InputError(f"excitation chain: expected a flat nn.Sequential, got {type(chain).__name__} "
                     "(Grad-CAM works on any network)")


def _modules(chain: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The chain's modules, each checked against the supported set."""
    mods = _children(chain)
    if not mods:
        raise InputError("excitation chain: the chain is empty")
    for i, m in enumerate(mods):
        if not isinstance(m, SUPPORTED_MODULES):
            raise InputError(
                f"excitation chain: module {i} ({type(m).__name__}) is not supported by Excitation "
                "Backprop; allowed: Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, "
                "Flatten, Dropout (Grad-CAM works on any network)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise InputError(f"excitation chain: module {i} (Conv2d) uses padding_mode="
                             f"{m.padding_mode!r}; only 'zeros' is supported")
    return mods


def top_affine_index(chain: nn.Module | Sequence[nn.Module]) -> int:
    """Index of the last Conv2d/Linear of the chain (the layer contrasted in c-MWP)."""
    mods = _modules(chain)
    idx = [i for i, m in enumerate(mods) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not idx:
        raise InputError("excitation chain: has no Conv2d or Linear layer")
    return idx[-1]


def resolve_readout(chain: nn.Module | Sequence[nn.Module], readout: int | str | None) -> int:
    """Readout as a module index; ``None`` means the chain input (returned as -1).
    A string is looked up among the child names of a named ``nn.Sequential``."""
    n = len(_children(chain))
    if readout is None:
        return -1
    if isinstance(readout, str):
        names = [name for name, _ in chain.named_children()] if isinstance(chain, nn.Module) else []
        if readout not in names:
            raise InputError(f"readout {readout!r}: no module of that name in the chain "
                             f"(names: {', '.join(names[:12])}{'...' if len(names) > 12 else ''})")
        return names.index(readout)
    if isinstance(readout, bool) or not isinstance(readout, (int, np.integer)):
        raise InputError(f"readout {readout!r}: expected a module index, a module name or None")
    if not 0 <= int(readout) < n:
        raise InputError(f"readout {readout}: must be a module index in 0..{n - 1} (None = chain input)")
    return int(readout)


def unit_index(units: Units, batch: int, n_out: int, device: torch.device) -> Tensor:
    """Units as a (B, U) int64 tensor: a 1-D list applies to every image, a 2-D array is per image."""
    u = torch.as_tensor(np.asarray(units.cpu() if isinstance(units, Tensor) else units))
    if u.numel() == 0:  # before the dtype check: numpy makes an empty list float64
        raise InputError("units: empty; expected at least one output index")
    if u.dtype.is_floating_point or u.dtype == torch.bool:
        raise InputError(f"units: expected integer output indices, got dtype {u.dtype}")
    if u.ndim == 1:
        u = u.unsqueeze(0).expand(batch, -1)
    if u.ndim != 2 or u.shape[0] != batch or u.shape[1] == 0:
        raise InputError(f"units: expected a non-empty list or a ({batch}, U) array, got shape {tuple(u.shape)}")
    if int(u.min()) < 0 or int(u.max()) >= n_out:
        bad = int(u.max()) if int(u.max()) >= n_out else int(u.min())
        raise InputError(f"units: index {bad} out of range for a chain output of {n_out} values")
    return u.to(device=device, dtype=torch.long)


@dataclass
class _Trace:
    """What one forward pass saved per module index: input shape, input (affine layers and
    average pools only) and MaxPool argmax."""

    inputs: dict[int, Tensor] = field(default_factory=dict)
    shapes: dict[int, torch.Size] = field(default_factory=dict)
    argmax: dict[int, Tensor] = field(default_factory=dict)
    output: Tensor | None = None


def _forward(mods: list[nn.Module], x: Tensor, keep_from: int) -> _Trace:
    """Run the chain with functional, out-of-place ops (eval semantics); save the inputs of
    modules ``>= keep_from``."""
    tr = _Trace()
    a = x
    for i, m in enumerate(mods):
        keep = i >= keep_from
        if keep:
            tr.shapes[i] = a.shape
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                tr.inputs[i] = a
        if isinstance(m, nn.Conv2d):
            a = F.conv2d(a, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.Linear):
            a = F.linear(a, m.weight, m.bias)
        elif isinstance(m, nn.ReLU):
            a = torch.relu(a)
        elif isinstance(m, nn.MaxPool2d):
            a, idx = F.max_pool2d(a, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                  return_indices=True)
            if keep:
                tr.argmax[i] = idx
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            a, idx = F.adaptive_max_pool2d(a, m.output_size, return_indices=True)
            if keep:
                tr.argmax[i] = idx
        elif isinstance(m, nn.AvgPool2d):
            a = F.avg_pool2d(a, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                             m.divisor_override)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            a = F.adaptive_avg_pool2d(a, m.output_size)
        elif isinstance(m, nn.Flatten):
            a = a.flatten(m.start_dim, m.end_dim)
        # Dropout / Identity: eval mode, nothing to do
    tr.output = a
    return tr


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in totals):
            raise InputError("excitation chain: Conv2d padding='same' with an even kernel is not supported")
        return (totals[0] // 2, totals[1] // 2)
    return _pair(m.padding)


def _ratio(p: Tensor, z: Tensor) -> Tensor:
    """``p / z`` with the image-only ``z`` (B, ...) broadcast over units; 0 where ``z == 0``.
    The reciprocal is taken once per image, so the (B, U, ...) signal sees one multiply.

    A subnormal ``z`` (below the dtype's smallest normal number) also counts as 0: its
    reciprocal overflows to inf and the maps turn NaN. Long L2-regularised training leaves
    thousands of weights at 1e-42 (measured on a 1000-epoch NN explainer), and a unit whose
    positive weights are all that small has such a ``z``."""
    tiny = torch.finfo(z.dtype).tiny
    inv = torch.where(z.abs() < tiny, torch.zeros_like(z), 1.0 / z)
    return p * inv.unsqueeze(1)


def _affine_rule(m: nn.Module, a: Tensor, p: Tensor, weight: Tensor) -> Tensor:
    """The excitation rule through Conv2d/Linear with the given non-negative weight."""
    b, u = p.shape[:2]
    if isinstance(m, nn.Linear):
        r = _ratio(p, F.linear(a, weight))
        return torch.matmul(r, weight) * a.unsqueeze(1)
    pad = _conv_padding(m)
    r = _ratio(p, F.conv2d(a, weight, None, m.stride, pad, m.dilation, m.groups))
    g = torch.nn.grad.conv2d_input((b * u, *a.shape[1:]), weight, r.flatten(0, 1), m.stride, pad,
                                   m.dilation, m.groups)
    return g.view(b, u, *a.shape[1:]) * a.unsqueeze(1)


def _step(m: nn.Module, i: int, tr: _Trace, p: Tensor, weight: Tensor | None = None) -> Tensor:
    """Signal at module ``i``'s output (B, U, ...) -> signal at its input."""
    if isinstance(m, _PASS):
        return p
    b, u = p.shape[:2]
    shape = tr.shapes[i]
    if isinstance(m, nn.Flatten):
        return p.reshape(b, u, *shape[1:])
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        idx = tr.argmax[i]
        c, hw = shape[1], shape[2] * shape[3]
        out = p.new_zeros(b, u, c, hw)
        out.scatter_add_(3, idx.flatten(2).unsqueeze(1).expand(b, u, c, -1), p.flatten(3))
        return out.view(b, u, *shape[1:])
    a = tr.inputs[i]
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _affine_rule(m, a, p, m.weight.clamp(min=0) if weight is None else weight)
    flat_in = a.new_empty((b * u, *a.shape[1:]))
    if isinstance(m, nn.AvgPool2d):
        stride = m.stride if m.stride else m.kernel_size
        r = _ratio(p, F.avg_pool2d(a, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                   m.count_include_pad, m.divisor_override))
        g = torch.ops.aten.avg_pool2d_backward(r.flatten(0, 1), flat_in, list(_pair(m.kernel_size)),
                                               list(_pair(stride)), list(_pair(m.padding)), m.ceil_mode,
                                               m.count_include_pad, m.divisor_override)
    else:  # AdaptiveAvgPool2d
        r = _ratio(p, F.adaptive_avg_pool2d(a, m.output_size))
        g = torch.ops.aten._adaptive_avg_pool2d_backward(r.flatten(0, 1), flat_in)
    return g.view(b, u, *a.shape[1:]) * a.unsqueeze(1)


def _down(mods: list[nn.Module], tr: _Trace, p: Tensor, start: int, stop: int,
          keep: dict[int, Tensor] | None = None) -> Tensor:
    """Propagate the signal at module ``start``'s output down to module ``stop``'s output
    (``stop = -1``: the chain input), through modules ``start, ..., stop + 1``."""
    for i in range(start, stop, -1):
        p = _step(mods[i], i, tr, p)
        if keep is not None:
            keep[i - 1] = p
    return p


def _top(mods: list[nn.Module], tr: _Trace, units: Units, contrastive: bool,
         keep: dict[int, Tensor] | None = None) -> tuple[Tensor, int]:
    """One-hot signal at the chain output, carried to the top affine layer's input (contrast
    applied there). Returns (signal at the output of module t - 1, t)."""
    out = tr.output
    b = out.shape[0]
    flat = out.reshape(b, -1)
    u = unit_index(units, b, flat.shape[1], out.device)
    p = flat.new_zeros(b, u.shape[1], flat.shape[1])
    p.scatter_(2, u.unsqueeze(2), 1.0)
    p = p.view(b, u.shape[1], *out.shape[1:])
    if keep is not None:
        keep[len(mods) - 1] = p
    t = top_affine_index(mods)
    p = _down(mods, tr, p, len(mods) - 1, t, keep)
    m = mods[t]
    mwp = _step(m, t, tr, p)
    if contrastive:
        mwp = mwp - _step(m, t, tr, p, weight=(-m.weight).clamp(min=0))
    if keep is not None:
        keep[t - 1] = mwp
    return mwp, t


def _set_tf32(flags: tuple[bool, bool]) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


# torch's TF32 flags are process-wide: two heatmap tasks running in parallel threads (Prefect's
# thread pool) with a plain save/restore could interleave so that the first to finish turned
# cuDNN's TF32 back on while the other was still computing, silently putting its maps off by
# several times their size. Held, TF32 stays off until the last block exits.
_FP32 = SharedSetting(lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32),
                      _set_tf32, (False, False))


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Run CUDA convolutions and matmuls in IEEE fp32 (no TF32) inside the block.

    c-MWP is a small difference of two large signals: on a random VGG19 TF32 (cuDNN's default
    for fp32 convolutions) put the map off by several times its own size, full fp32 by 2e-3.
    Blocks may overlap across threads: TF32 stays off until the last one exits, which restores
    the flags as the first one found them. (Code that sets the flags itself while a block runs
    is not guarded against.)"""
    with _FP32.held():
        yield


def check_input(x: Tensor, model: nn.Module | Sequence[nn.Module], what: str = "excitation") -> Tensor:
    """``x`` checked (a batched, finite, floating tensor) and cast to the dtype of ``model``'s
    parameters (a float64 batch on a float32 network is a user's everyday mix-up)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise InputError(f"{what} input x: expected a batched tensor (B, ...)")
    if not x.is_floating_point():
        raise InputError(f"{what} input x: expected normalised float images, got {x.dtype}")
    if x.shape[0] == 0:
        raise InputError(f"{what} input x: empty batch (B = 0)")
    mods = [model] if isinstance(model, nn.Module) else list(model)
    param = next((q for m in mods for q in m.parameters()), None)
    cast = x.to(param.dtype) if param is not None and param.dtype != x.dtype else x
    # One float64 reduction (one sync) proves every entry finite; only when it overflows (values
    # near the dtype's limit, e.g. a float16 batch summing past 65504) are the entries checked.
    # Checked after the cast: a float64 1e300 is inf in a float32 network.
    if not bool(torch.isfinite(cast.sum(dtype=torch.float64))) and not bool(torch.isfinite(cast).all()):
        cast_note = f" (after the cast to the model's {cast.dtype})" if cast is not x else ""
        raise InputError(f"{what} input x: contains NaN or inf{cast_note}")
    return cast


def excitation_signals(chain: nn.Module | Sequence[nn.Module], x: Tensor, units: Units, *,
                       readout: int | str | None, contrastive: bool = True,
                       all_layers: bool = False) -> Tensor | dict[int, Tensor]:
    """Raw (signed, un-summed) signal at the readout: (B, U, *readout output shape).

    ``readout=None`` reads the chain input. With ``all_layers`` a dict {module index: signal
    at that module's output} for every layer from the readout to the chain output (-1 = the
    chain input) is returned, e.g. to check that MWP sums to 1 at every layer.
    """
    mods = _modules(chain)
    ro = resolve_readout(chain, readout)
    t = top_affine_index(mods)
    if ro >= t:
        raise InputError(f"readout {ro}: must lie below the top affine layer (module {t}, "
                         f"{type(mods[t]).__name__})")
    x = check_input(x, mods)
    keep: dict[int, Tensor] | None = {} if all_layers else None
    with torch.no_grad(), full_fp32():
        tr = _forward(mods, x, keep_from=ro + 1)
        p, t = _top(mods, tr, units, contrastive, keep)
        p = _down(mods, tr, p, t - 1, ro, keep)
    if keep is not None:
        return {k: v for k, v in keep.items() if k >= ro}
    return p


def resize_maps(maps: Tensor, output_size: int | tuple[int, int] | None) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, U, H, W) maps; None leaves them as they are."""
    if output_size is None:
        return maps
    size = _pair(output_size)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in size):
        raise InputError(f"output_size {output_size!r}: expected a positive int or (H, W) pair of them")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _to_map(p: Tensor, ro: int, output_size: int | tuple[int, int] | None) -> Tensor:
    if p.ndim != 5:
        where = "the chain input" if ro < 0 else f"module {ro}"
        raise InputError(f"readout {where}: output per image has shape {tuple(p.shape[2:])}, "
                         "not a (C, H, W) map")
    return resize_maps(p.sum(dim=2).clamp_(min=0), output_size)


def excitation_maps(chain: nn.Module | Sequence[nn.Module], x: Tensor, units: Units, *,
                    readout: int | str | None, contrastive: bool = True,
                    output_size: int | tuple[int, int] | None = None) -> Tensor:
    """(c-)MWP heatmaps ``max(0, sum over channels)`` at ``readout``: (B, len(units), H, W).

    ``chain``: flat ``nn.Sequential`` of supported modules; ``units``: output indices of the
    chain's last module (a list shared by all images or a (B, U) array per image);
    ``readout``: index (or child name) of the module whose output is read. One forward pass
    and one batched top-down pass for all units.
    """
    ro = resolve_readout(chain, readout)
    p = excitation_signals(chain, x, units, readout=ro if ro >= 0 else None, contrastive=contrastive)
    return _to_map(p, ro, output_size)


def excitation_maps_multi(trunk: nn.Module | Sequence[nn.Module],
                          heads: Sequence[tuple[nn.Module | Sequence[nn.Module], Units]],
                          x: Tensor, *, readout: int | str | None, contrastive: bool = True,
                          output_size: int | tuple[int, int] | None = None) -> list[Tensor]:
    """Maps for several chains ``trunk + head`` sharing one trunk (e.g. an SRAE encoder and
    the backbone head): one trunk forward, each head's units contrasted at its own top layer,
    then one batched pass down the trunk. Returns one (B, U_h, H, W) tensor per head, equal to
    ``excitation_maps(trunk + head, x, units_h, ...)``."""
    tmods = _modules(trunk)
    ro = resolve_readout(trunk, readout)
    if not heads:
        raise InputError("excitation_maps_multi: no heads given")
    x = check_input(x, tmods)
    with torch.no_grad(), full_fp32():
        tr = _forward(tmods, x, keep_from=ro + 1)
        sigs = []
        for head, units in heads:
            hmods = _modules(head)
            htr = _forward(hmods, tr.output, keep_from=0)
            p, t = _top(hmods, htr, units, contrastive)
            sigs.append(_down(hmods, htr, p, t - 1, -1))
        sizes = [s.shape[1] for s in sigs]
        p = _down(tmods, tr, torch.cat(sigs, dim=1), len(tmods) - 1, ro)
    return list(_to_map(p, ro, output_size).split(sizes, dim=1))


def excitation_maps_chunked(trunk: nn.Module | Sequence[nn.Module], head: nn.Module | Sequence[nn.Module],
                            units: Sequence[int], x: Tensor, *, readout: int | str | None, chunk: int,
                            contrastive: bool = True,
                            output_size: int | tuple[int, int] | None = None) -> Iterator[tuple[int, Tensor]]:
    """Maps of many units of ``trunk + head`` (e.g. all 4096 dims of Z), ``chunk`` units at a
    time: yields ``(start, maps)`` with ``maps`` (B, len(units[start:start + chunk]), H, W),
    equal to :func:`excitation_maps_multi` with ``[(head, units[start:start + chunk])]``.

    One forward pass serves every chunk, and only one chunk's signals are alive at a time, so
    memory stays at one chunk's whatever the number of units. Consume it at once: TF32 stays
    off (see :func:`full_fp32`) until the generator finishes or is closed."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"chunk {chunk!r}: expected a positive number of units per pass")
    units = [int(u) for u in units]
    if not units:
        raise InputError("units: empty; expected at least one output index")
    tmods, hmods = _modules(trunk), _modules(head)
    ro = resolve_readout(trunk, readout)
    x = check_input(x, tmods)
    with torch.no_grad(), full_fp32():
        tr = _forward(tmods, x, keep_from=ro + 1)
        htr = _forward(hmods, tr.output, keep_from=0)
        for start in range(0, len(units), chunk):
            p, t = _top(hmods, htr, units[start:start + chunk], contrastive)
            p = _down(hmods, htr, p, t - 1, -1)
            maps = _to_map(_down(tmods, tr, p, len(tmods) - 1, ro), ro, output_size)
            del p  # not kept alive while the caller works on the maps
            yield start, maps
            del maps
