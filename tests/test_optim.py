"""StackedAdam against torch.optim.Adam run separately per member (float64)."""

import numpy as np
import pytest
import torch

from srae.optim import StackedAdam


def _reference(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, steps_taken: list[bool]) -> torch.Tensor:
    """One member alone: plain torch Adam (non-fused), stepping only where ``steps_taken``."""
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p], lr=lr, foreach=False)
    for g, take in zip(grads, steps_taken):
        if take:
            p.grad = g.clone()
            opt.step()
    return p.detach()


@pytest.mark.parametrize("device_lr", [[1e-2, 1e-2, 3e-3, 1e-2, 3e-3], [5e-3] * 5])
def test_members_with_own_rates_and_freezes_follow_their_twins(device_lr):
    B, steps = len(device_lr), 7
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 4)]
    p0 = [torch.randn((B, *s), generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn((B, *s), generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    # member 1 frozen on steps 2-3 then resumes; member 3 stops after step 4 (early stopping)
    act = np.ones((steps, B), dtype=bool)
    act[2:4, 1] = False
    act[4:, 3] = False
    params = [p.clone() for p in p0]
    opt = StackedAdam(params, torch.tensor(device_lr, dtype=torch.float64))
    for k in range(steps):
        for p, gr in zip(params, grads[k]):
            p.grad = gr.clone()
        opt.step(act[k] if k % 2 else torch.as_tensor(act[k]))  # host and device masks alike
    for b in range(B):
        for i in range(len(shapes)):
            ref = _reference(p0[i][b], [gr[i][b] for gr in grads], device_lr[b], list(act[:, b]))
            torch.testing.assert_close(params[i][b], ref, rtol=1e-12, atol=1e-14)
    assert opt.t.tolist() == act.sum(0).tolist()


def test_frozen_member_is_bit_identical_and_bad_mask_is_refused():
    p = torch.randn(3, 5, dtype=torch.float64)
    before = p.clone()
    opt = StackedAdam([p], [1e-2, 1e-2, 1e-2])
    p.grad = torch.ones_like(p)
    opt.step([True, False, True])
    assert torch.equal(p[1], before[1]) and not torch.equal(p[0], before[0])
    assert (opt.m[0][1] == 0).all() and (opt.v[0][1] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        opt.step([True, False])
