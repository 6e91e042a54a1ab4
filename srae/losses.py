"""The SRAE objective (paper eq. 5) and its terms (docs/design.md, "Math contracts").

All functions take torch tensors and allow leading batch dims, so one call scores many
independently trained explainers stacked on a leading "member" dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor


def faithfulness_loss(y_bar: Tensor, y_hat: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted mean over the last dim of ``(y_bar - y_hat)^2``: ``(..., M) -> (...)``."""
    sq = (y_bar - y_hat) ** 2
    if weight is None:
        return sq.mean(dim=-1)
    weight = weight.to(sq.dtype).expand_as(sq)
    return (weight * sq).sum(dim=-1) / weight.sum(dim=-1)


def sparse_reconstruction_loss(z_hat: Tensor, z: Tensor, q: Tensor | float) -> Tensor:
    """``mean_k log(1 + q * Q_k)``, ``Q_k = mean_i (z_hat[i,k] - z[i,k])^2`` (paper eq. 4).

    Shapes ``(..., M, D) -> (...)``; ``q`` is a float or a tensor broadcastable to ``(...)``.
    """
    per_dim = ((z_hat - z) ** 2).mean(dim=-2)  # (..., D)
    if isinstance(q, Tensor):
        q = q.to(per_dim.dtype)[..., None]
    return torch.log1p(q * per_dim).mean(dim=-1)


def mean_reconstruction_loss(z_hat: Tensor, z: Tensor) -> Tensor:
    """Plain mean squared reconstruction error (SAE/CAE baselines): ``(..., M, D) -> (...)``."""
    return ((z_hat - z) ** 2).mean(dim=(-2, -1))


def pull_away_loss(e: Tensor, eps: float = 1e-8) -> Tensor:
    """Pull-away term (paper eq. 3): mean over ordered pairs ``l != l'`` of the squared
    cosine between columns ``e[:, l]`` and ``e[:, l']``. ``(..., M, n) -> (...)``.

    Column norms are clamped below at ``eps`` so an all-zero x-feature gives cosine 0,
    not NaN. With ``n == 1`` there are no pairs and the loss is 0.
    """
    n = e.shape[-1]
    if n < 2:
        return e.new_zeros(e.shape[:-2])
    unit = e / e.norm(dim=-2, keepdim=True).clamp_min(eps)
    gram = unit.transpose(-1, -2) @ unit  # (..., n, n)
    off = gram**2 - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1) ** 2)
    return off.sum(dim=(-2, -1)) / (n * (n - 1))


def l2_penalty(weights: list[Tensor], batch_dims: int = 0) -> Tensor:
    """Sum of squared entries of each tensor, keeping the first ``batch_dims`` dims."""
    total = None
    for w in weights:
        term = (w**2).flatten(start_dim=batch_dims).sum(dim=-1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2_penalty needs at least one tensor")
    return total


def balanced_weights(is_positive: Tensor, factor: float = 1.0) -> Tensor:
    """Per-sample weights giving positives and negatives equal total weight, times ``factor``.

    Negatives get weight 1; positives get ``factor * n_neg / n_pos`` (1 if a class is absent).
    ``is_positive`` is boolean ``(..., M)``.
    """
    is_positive = is_positive.bool()
    pos = is_positive.to(torch.float64)
    n_pos = pos.sum(dim=-1, keepdim=True)
    n_neg = (1 - pos).sum(dim=-1, keepdim=True)
    ratio = torch.where((n_pos > 0) & (n_neg > 0), n_neg / n_pos.clamp_min(1), torch.ones_like(n_pos))
    return torch.where(is_positive, factor * ratio, torch.ones_like(pos))


def balanced_weights_np(is_positive, factor: float = 1.0):
    """:func:`balanced_weights` of a boolean array-like, as a float64 numpy array (Lasso, CAE's
    least-squares ``v`` and refit selection weigh samples in numpy)."""
    import numpy as np

    return balanced_weights(torch.as_tensor(np.asarray(is_positive, dtype=bool)), factor).numpy()


def srae_objective(
    *,
    y_bar: Tensor,
    y_hat: Tensor,
    weight: Tensor | None,
    e: Tensor,
    z: Tensor | None = None,
    z_hat: Tensor | None = None,
    beta: Tensor | float = 0.0,
    eta: Tensor | float = 0.0,
    q: Tensor | float = 1.0,
    reconstruction: str = "sparse",
    faithfulness: Tensor | float = 1.0,
    encoder_weights: list[Tensor] = (),
    decoder_weights: list[Tensor] = (),
    v: Tensor | None = None,
    lambda1: Tensor | float = 0.0,
    lambda2: Tensor | float = 0.0,
    lambda3: Tensor | float = 0.0,
) -> Tensor:
    """Paper eq. 5 for a stack of members: returns the per-member loss ``(...)``.

    ``reconstruction`` is ``"sparse"`` (SRAE: log penalty), ``"mean"`` (SAE/CAE: plain MSE) or
    ``"none"`` (NN). ``faithfulness`` scales the faithfulness term (0 for CAE). L2 terms cover
    the weight matrices (biases are not penalised).
    """
    loss = faithfulness * faithfulness_loss(y_bar, y_hat, weight)
    if reconstruction != "none":
        if z is None or z_hat is None:
            raise ValueError(f"reconstruction={reconstruction!r} needs z and z_hat")
        if reconstruction == "sparse":
            rec = sparse_reconstruction_loss(z_hat, z, q)
        elif reconstruction == "mean":
            rec = mean_reconstruction_loss(z_hat, z)
        else:
            raise ValueError(f"unknown reconstruction {reconstruction!r}")
        loss = loss + beta * rec
    loss = loss + eta * pull_away_loss(e)
    bd = e.dim() - 2
    if encoder_weights:
        loss = loss + lambda1 * l2_penalty(list(encoder_weights), bd)
    if decoder_weights:
        loss = loss + lambda2 * l2_penalty(list(decoder_weights), bd)
    if v is not None:
        loss = loss + lambda3 * (v**2).flatten(start_dim=bd).sum(dim=-1)
    return loss
