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
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            act = active.view(shape)
            g = p.grad
            m.copy_(torch.where(act, m * self.b1 + g * (1 - self.b1), m))
            v.copy_(torch.where(act, v * self.b2 + g * g * (1 - self.b2), v))
            step_size = (self.lr / bc1).to(p.dtype).view(shape)
            denom = v.sqrt() / bc2_sqrt.to(p.dtype).view(shape) + self.eps
            p.sub_(torch.where(act, step_size * m / denom, torch.zeros_like(p)))
