"""Grad-CAM (Selvaraju et al.) at a readout layer: the second heatmap method.

Works on any network (BatchNorm, residual blocks, ...), not only the flat chains Excitation
Backprop needs. The layer below the readout runs without autograd; the readout's output is
replaced by a fresh leaf so gradients are taken with respect to it only. The model is run in
eval mode and its train flags, parameters and ``requires_grad`` flags are left as they were;
no ``.grad`` is accumulated. On CUDA it runs in IEEE fp32 like c-MWP (:func:`full_fp32`): with
cuDNN's default TF32 convolutions the maps of a random demo CNN on an H100 were 2.7e-2 of
their maximum off the CPU result (the weighted channel sum cancels), where c-MWP agreed to 5e-5.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from srae.errors import InputError
from srae.excitation import Units, check_input, full_fp32, resize_maps, unit_index

__all__ = ["gradcam_maps", "find_module"]


def find_module(model: nn.Module, readout: int | str | nn.Module) -> nn.Module:
    """The readout module: an index into a ``nn.Sequential``, a dotted submodule name
    (e.g. ``"layer4"`` or ``"features.18"``) or the module itself."""
    if isinstance(readout, nn.Module):
        if not any(m is readout for m in model.modules()):
            raise InputError(f"readout {type(readout).__name__}: not a submodule of the model")
        return readout
    if isinstance(readout, str):
        try:
            return model.get_submodule(readout)
        except AttributeError as exc:
            raise InputError(f"readout {readout!r}: no submodule of that name in the model") from exc
    if isinstance(readout, np.integer):  # e.g. an index taken from a numpy array, as excitation_maps allows
        readout = int(readout)
    if isinstance(readout, int) and not isinstance(readout, bool):
        if not isinstance(model, nn.Sequential):
            raise InputError(f"readout {readout}: an index needs an nn.Sequential model; "
                             "pass a submodule name instead")
        if not 0 <= readout < len(model):
            raise InputError(f"readout {readout}: must be a module index in 0..{len(model) - 1}")
        return model[readout]
    raise InputError(f"readout {readout!r}: expected an index, a submodule name or a module")


def gradcam_maps(model: nn.Module, x: Tensor, units: Units, *, readout: int | str | nn.Module,
                 output_size: int | tuple[int, int] | None = None) -> Tensor:
    """Grad-CAM maps ``max(0, sum_c alpha_c A_c)`` with ``alpha_c`` the spatial mean of
    ``d y_unit / d A_c``: (B, len(units), H, W). ``units`` index the flattened model output
    (a list for every image or a (B, U) array). One forward pass; one backward per unit
    column, each only through the layers above the readout."""
    x = check_input(x, model, "Grad-CAM")
    target = find_module(model, readout)
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
        if captured:
            raise InputError(f"readout {type(target).__name__}: runs more than once per forward pass")
        if not isinstance(out, Tensor):
            raise InputError(f"readout {type(target).__name__}: output is not a single tensor")
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        torch.set_grad_enabled(True)  # layers above the readout build a graph
        return leaf.clone()  # a non-leaf, so a following in-place ReLU is allowed

    # gradients above the readout, even when called under no_grad / inference_mode
    with full_fp32(), torch.inference_mode(False), torch.enable_grad():
        maps = _gradcam(model, x, units, target, hook, captured)
    return resize_maps(torch.stack(maps, dim=1), output_size)


def _gradcam(model: nn.Module, x: Tensor, units: Units, target: nn.Module, hook, captured: list[Tensor]) -> list[Tensor]:
    """The forward (hooked at ``target``) and one backward per unit column; see gradcam_maps."""
    flags = {m: m.training for m in model.modules()}
    grad_mode = torch.is_grad_enabled()
    handle = target.register_forward_hook(hook)
    try:
        model.eval()
        torch.set_grad_enabled(False)  # nothing below the readout is recorded
        y = model(x)
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
        for m, flag in flags.items():
            m.training = flag
    if not captured:
        raise InputError(f"readout {type(target).__name__}: did not run in the forward pass")
    act = captured[0]
    if act.ndim != 4:
        raise InputError(f"readout {type(target).__name__}: output has shape {tuple(act.shape)}, "
                         "not (B, C, H, W)")
    flat = y.reshape(y.shape[0], -1)
    if not flat.requires_grad:
        raise InputError(f"readout {type(target).__name__}: the model output does not depend on it")
    u = unit_index(units, flat.shape[0], flat.shape[1], flat.device)
    maps = []
    with torch.enable_grad():
        for j in range(u.shape[1]):
            sel = torch.zeros_like(flat).scatter_(1, u[:, j:j + 1], 1.0)
            (g,) = torch.autograd.grad(flat, act, sel, retain_graph=j + 1 < u.shape[1])
            alpha = g.mean(dim=(2, 3), keepdim=True)
            maps.append((alpha * act.detach()).sum(1).clamp_(min=0))
    return maps

