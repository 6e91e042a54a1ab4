"""Adam for stacked members: per-member learning rates and per-member freezing.

Elementwise the update equals ``torch.optim.Adam`` (no weight decay) for each member, so a
member trained in a stack follows the same trajectory as alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StackedAdam:
    """Adam over parameters whose dim 0 indexes members."""

    def __init__(self, params: list[Tensor], lr: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        members = lr.shape[0]
        self.t = torch.zeros(members, dtype=torch.float64, device=lr.device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        """One update for members where ``active`` (bool, (B,)) is true; others are untouched."""
        self.t += active.to(self.t.dtype)
        bc1 = 1 - self.b1 ** self.t.clamp_min(1)
        bc2_sqrt = (1 - self.b2 ** self.t.clamp_min(1)).sqrt()
        step_size = torch.where(active, self.lr / bc1, torch.zeros_like(bc1))  # 0 freezes a member
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad
            act = active.to(p.dtype).view(shape)
            # m <- m + (1 - b1)(g - m), v <- v + (1 - b2)(g^2 - v) where active; a frozen
            # member's interpolation weight is 0 (in place, no host sync).
            m.lerp_(g, act * (1 - self.b1))
            v.lerp_(g * g, act * (1 - self.b2))
            # p -= step_size * m / denom; dividing denom by step_size keeps it to one temporary,
            # and a frozen member's step size 0 makes denom inf, so its update is exactly 0.
            denom = v.sqrt().div_(bc2_sqrt.to(p.dtype).view(shape)).add_(self.eps)
            denom.div_(step_size.to(p.dtype).view(shape))
            p.addcdiv_(m, denom, value=-1.0)
