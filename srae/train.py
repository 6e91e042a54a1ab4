"""Batched trainer: many independent SRAE-family models (categories x configs x folds) at once.

All members share one feature matrix ``Z`` (never copied per member); each draws its own
minibatches from its own rows with its own seed, and the parameters of all members are
stacked so every layer is one ``bmm``. Adam with per-member learning rates, early stopping on
each member's validation criterion, best parameters restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from srae import cancel
from srae.errors import InputError
from srae.losses import balanced_weights_np, srae_objective
from srae.model import Architecture, StackedSRAE, init_uniform, method_spec
from srae.optim import StackedAdam
from srae.progress import ProgressLog
from srae.sampling import derive_seed, minibatch_stream

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Optimisation settings shared by all members of one fit."""

    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    positive_factor: float = 1.0  # positives' total weight relative to negatives'
    normalize: bool = True  # train on Z / rms(Z) and y / rms(y); folded back on export
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_steps: int | None = None  # fixed number of steps (overrides epochs; tests, benchmarks)
    val_chunk: int = 1024
    revive: bool = True  # re-initialise x-features that fired on no sample for a whole epoch


@dataclass
class Member:
    """One model to fit: a category's rows, its hyperparameters, its seed."""

    category: int
    train_idx: np.ndarray
    train_pos: np.ndarray
    hparams: dict[str, float]
    seed: int
    val_idx: np.ndarray | None = None
    val_pos: np.ndarray | None = None
    epochs: int | None = None  # fixed epochs (refit without validation)


@dataclass
class FitResult:
    model: StackedSRAE
    z_scale: Tensor  # (B,)
    y_scale: Tensor  # (B,)
    best_epoch: list[int]
    best_val: list[float]
    curves: list[dict[str, list[float]]] = field(default_factory=list)
    steps: int = 0
    revivals: list[int] = field(default_factory=list)  # x-features re-initialised, per member


def check_finite(name: str, x: Tensor | np.ndarray) -> None:
    """Raise InputError naming ``name`` and the first bad row when ``x`` has NaN or inf."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(f"{name} has {int(bad.sum())} NaN/inf values (first in row {row})")


def _hp(members: list[Member], key: str, default: float, device: str) -> Tensor:
    return torch.tensor([float(m.hparams.get(key, default)) for m in members], dtype=torch.float64, device=device)


def _lambda(members: list[Member], key: str, device: str) -> Tensor:
    """Eq. 5's L2 weight ``key`` (lambda1: encoder, lambda2: decoder, lambda3: v) per member:
    its own hyperparameter when given, else ``weight_decay`` (one knob for all three)."""
    return torch.tensor([float(m.hparams.get(key, m.hparams.get("weight_decay", 0.0))) for m in members],
                        dtype=torch.float64, device=device)


def fit_stack(
    z: Tensor,
    y_all: Tensor,
    members: list[Member],
    method: str,
    arch: Architecture,
    settings: TrainSettings,
    *,
    batch_log: list[np.ndarray] | None = None,
) -> FitResult:
    """Fit all ``members`` of ``method`` together. ``z`` (N, D) and ``y_all`` (N, C) live on
    ``settings.device``; member ``b`` regresses ``y_all[:, members[b].category]``."""
    spec = method_spec(method)
    dev, dt = settings.device, settings.dtype
    B = len(members)
    if B == 0:
        raise ValueError("fit_stack needs at least one member")
    arch = Architecture(arch.in_dim, arch.n, arch.hidden, spec.decoder, arch.predictor_bias)
    sizes = [len(m.train_idx) for m in members]
    mbs = {min(settings.batch_size, n) for n in sizes}
    if len(mbs) > 1:
        raise ValueError(f"members of one stack need one minibatch size, got {sorted(mbs)}; "
                         "group them with srae.train.stack_groups")
    mb = mbs.pop()
    cats = torch.tensor([m.category for m in members], device=dev)
    row_table, weight_table = _padded_tables([m.train_idx for m in members], [m.train_pos for m in members],
                                             settings.positive_factor, dev)
    weight_table = weight_table.to(dt)

    if settings.normalize:
        # root mean square of each member's training block of Z and of its logits
        valid = torch.as_tensor(np.arange(max(sizes))[None, :] < np.array(sizes)[:, None], device=dev)
        sq = torch.where(valid, _row_sumsq(z)[row_table], 0.0).sum(1)
        z_scale = (sq / (torch.as_tensor(sizes, dtype=torch.float64, device=dev) * z.shape[1])).sqrt().clamp_min(1e-6)
        ys2 = torch.where(valid, y_all[row_table, cats[:, None]].double() ** 2, 0.0).sum(1)
        y_scale = (ys2 / torch.as_tensor(sizes, dtype=torch.float64, device=dev)).sqrt().clamp_min(1e-6)
    else:
        z_scale = torch.ones(B, dtype=torch.float64, device=dev)
        y_scale = torch.ones(B, dtype=torch.float64, device=dev)
    zs, ys = z_scale.to(dt).view(B, 1, 1), y_scale.to(dt).view(B, 1)

    model = StackedSRAE(arch, [m.seed for m in members], dtype=dt, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = StackedAdam(params, _hp(members, "lr", 1e-3, dev))
    beta = _hp(members, "beta", 1.0, dev).to(dt)
    eta = (_hp(members, "eta", 0.0, dev) if spec.pull_away else torch.zeros(B, dtype=torch.float64, device=dev)).to(dt)
    q = _hp(members, "q", 1.0, dev).to(dt)
    lam = [_lambda(members, k, dev).to(dt) for k in ("lambda1", "lambda2", "lambda3")]
    use_l2 = any(bool((x != 0).any()) for x in lam)  # skip the penalty's full pass over the weights when unused
    streams = [minibatch_stream(m.seed, n, mb) for m, n in zip(members, sizes)]

    spe = [math.ceil(n / mb) for n in sizes]  # each member's steps per epoch
    has_val = [m.val_idx is not None and len(m.val_idx) > 0 for m in members]
    if settings.max_steps is not None:
        budget = [settings.max_steps] * B
    else:
        budget = [(m.epochs or settings.max_epochs) * s for m, s in zip(members, spe)]
    total = max(budget)
    spe_np, budget_np = np.array(spe), np.array(budget)
    active = np.ones(B, dtype=bool)  # host-side: the optimizer needs no device sync
    best_val = [math.inf] * B
    best_epoch = [0] * B
    since_best = [0] * B
    snapshot = [p.detach().clone() for p in params] if any(has_val) else None
    val_tables = _val_tables(members, settings.positive_factor, dev) if any(has_val) else None
    curves = [{"train": [], "val": []} for _ in range(B)]
    running = torch.zeros(B, dtype=torch.float64, device=dev)
    last_boundary = np.zeros(B, dtype=np.int64)
    fired = torch.zeros(B, arch.n, dtype=torch.bool, device=dev)  # x-feature > 0 somewhere this epoch
    revivals = [0] * B
    # Eq. 5 weighs beta, eta, q and the L2 terms against errors in raw units. Training runs on
    # y / y_scale and Z / z_scale, so the faithfulness term is scaled back by y_scale^2, and q
    # (and the plain reconstruction of SAE/CAE) by z_scale^2, and the L2 terms see the weights in
    # raw units (_raw_weights, v * y_scale): hyperparameters keep the paper's units.
    z2 = z_scale.to(dt) ** 2
    faith_weight = spec.faithfulness * y_scale.to(dt) ** 2
    q = q * z2
    if spec.reconstruction == "mean":
        beta = beta * z2

    ids = sorted({m.category + 1 for m in members})  # 1-based, as the CLI and logs name classes
    shown = ", ".join(map(str, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    progress = ProgressLog(log, f"{method} training ({B} members in one stack, class{'es' if len(ids) > 1 else ''} "
                                f"{shown})", total, "steps")
    step = 0
    while step < total:
        progress.update(step, f"{int(active.sum())} members still training")
        step += 1
        cancel.check("explainer training")
        local = np.stack([next(s) for s in streams])  # (B, mb)
        if batch_log is not None:
            batch_log.append(local)
        local_t = torch.as_tensor(local, device=dev)
        rows = row_table.gather(1, local_t)  # (B, mb)
        zb = _gather_scaled(z, rows, zs, dt)
        yb = y_all[rows, cats[:, None]].to(dt) / ys
        wb = weight_table.gather(1, local_t)
        e, z_hat, y_bar = model(zb)
        loss = srae_objective(
            y_bar=y_bar, y_hat=yb, weight=wb, e=e, z=zb, z_hat=z_hat, beta=beta, eta=eta, q=q,
            reconstruction=spec.reconstruction, faithfulness=faith_weight,
            encoder_weights=_raw_weights(model.encoder_weights(), zs, first=True) if use_l2 else [],
            decoder_weights=_raw_weights(model.decoder_weights(), zs, first=False) if use_l2 else [],
            v=model.v * ys if use_l2 else None,
            lambda1=lam[0], lambda2=lam[1], lambda3=lam[2],
        )
        opt.zero_grad()
        loss.sum().backward()
        active &= budget_np >= step
        opt.step(active)
        running += loss.detach().double()
        fired |= e.detach().amax(dim=1) > 0
        # Each member ends its own epochs (and its budget) on its own schedule.
        due = np.flatnonzero(((step % spe_np == 0) | (step == budget_np)) & (step <= budget_np))
        if due.size == 0:
            continue
        act = active.tolist()
        due_t = torch.as_tensor(due, device=dev)
        tr = running[due_t].tolist()
        running[due_t] = 0.0
        # A ReLU x-feature that fires on no sample gets no gradient and never recovers (the
        # pull-away term even rewards it): after an epoch of silence it is re-initialised,
        # except in the last fifth of a member's budget (a new feature needs time to earn its v_l).
        silent = (~fired[due_t]).tolist()
        fired[due_t] = False
        if settings.revive:
            dead = [(int(b), l) for b, row in zip(due, silent) for l, off in enumerate(row)
                    if off and act[b] and budget[b] - step > 0.2 * budget[b]]
            if dead:
                _revive_features(model, opt, zb, dead, members, revivals)
        vals = None
        if any(has_val[b] for b in due):
            vals = evaluate_criterion(model, z, y_all, val_tables, method, z_scale, y_scale, settings)
        for i, b in enumerate(due.tolist()):
            if not act[b]:
                continue  # stopped early: its curve ends where it stopped
            curves[b]["train"].append(tr[i] / (step - last_boundary[b]))
            last_boundary[b] = step
            if vals is None or not has_val[b]:
                continue
            curves[b]["val"].append(vals[b])
            if vals[b] < best_val[b]:
                best_val[b], best_epoch[b], since_best[b] = vals[b], math.ceil(step / spe[b]), 0
                with torch.no_grad():
                    for snap, p in zip(snapshot, params):
                        snap[b].copy_(p[b])
            else:
                since_best[b] += 1
                if since_best[b] >= settings.patience:
                    active[b] = False
        if not active.any():
            break
    if snapshot is not None:
        with torch.no_grad():
            for snap, p in zip(snapshot, params):
                for b in range(B):
                    if has_val[b] and best_epoch[b] > 0:
                        p[b].copy_(snap[b])
    for b in range(B):
        if not has_val[b]:
            best_epoch[b] = math.ceil(min(step, budget[b]) / spe[b])
    return FitResult(model, z_scale, y_scale, best_epoch, best_val, curves, step, revivals)


def _padded_tables(rows: list[Sequence[int]], positive: list[Sequence[bool]], positive_factor: float,
                   dev: str) -> tuple[Tensor, Tensor]:
    """Members' rows and balanced weights padded into (B, max n) tables (weight 0 = padding),
    built on the host and copied once, so one gather serves all members (per-member device
    tensors cost a host sync each)."""
    width = max(len(r) for r in rows)
    idx = np.zeros((len(rows), width), dtype=np.int64)
    wts = np.zeros((len(rows), width), dtype=np.float64)
    for b, (r, pos) in enumerate(zip(rows, positive)):
        if len(r):
            idx[b, : len(r)] = r
            wts[b, : len(r)] = balanced_weights_np(pos, positive_factor)
    return torch.as_tensor(idx, device=dev), torch.as_tensor(wts, device=dev)


def _gather_scaled(z: Tensor, rows: Tensor, zs: Tensor, dt: torch.dtype) -> Tensor:
    """``z[rows] / zs`` (B, m, D), stored feature-major: a transposed view of a contiguous
    (B, D, m) tensor. The encoder's first layer reads that layout directly, and the
    reconstruction loss then compares it with the decoder's output (also feature-major)
    element by element in one memory order; a sample-major copy made every elementwise pass
    of the loss read one operand across strides (one strided write here instead)."""
    g = z[rows]
    out = torch.empty((g.shape[0], g.shape[2], g.shape[1]), dtype=dt, device=g.device)
    torch.div(g.to(dt), zs, out=out.transpose(1, 2))
    return out.transpose(1, 2)


def _row_sumsq(z: Tensor, chunk: int = 8192) -> Tensor:
    """Float64 sum of squares of each row of ``z`` (N, D), in row chunks (no float64 copy of Z)."""
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for a in range(0, z.shape[0], chunk):
        out[a : a + chunk] = z[a : a + chunk].double().pow(2).sum(1)
    return out


def _raw_weights(weights: list[Tensor], zs: Tensor, *, first: bool) -> list[Tensor]:
    """The weights as the exported (raw-unit) model has them, for the L2 terms of eq. 5: the
    encoder's first layer reads Z / z_scale (raw W1 = W1 / z_scale) and the decoder's last
    layer writes Z / z_scale (raw W = W * z_scale); layers in between are unit-free."""
    if not weights:
        return []
    out = list(weights)
    if first:
        out[0] = out[0] / zs
    else:
        out[-1] = out[-1] * zs
    return out


@torch.no_grad()
def _revive_features(model: StackedSRAE, opt: StackedAdam, zb: Tensor, dead: list[tuple[int, int]],
                     members: list[Member], revivals: list[int]) -> None:
    """Give each dead x-feature ``(b, l)`` a fresh incoming row whose bias makes it fire on about
    half of the current minibatch; its outgoing weights (v_l, decoder column l) restart at 0.

    Adam state of the touched entries: the first moment restarts at 0 and the second at the
    median second moment of the same tensor and member. (Zeroing both would be wrong: the
    member's step count, and so Adam's bias correction, is shared by all its entries, and
    with a large count fresh zero moments give steps several times the learning rate.)"""
    h = zb
    for w, b in zip(model.enc_w[:-1], model.enc_b[:-1]):
        h = torch.relu(model._affine(h, w, b))
    W, bias = model.enc_w[-1], model.enc_b[-1]
    fan_in = W.shape[2]
    state = {id(p): (m, v) for p, m, v in zip(opt.params, opt.m, opt.v)}
    for b, l in dead:
        revivals[b] += 1
        gen = torch.Generator().manual_seed(derive_seed(members[b].seed, revivals[b]))
        row = init_uniform(gen, (fan_in,), 1.0 / math.sqrt(fan_in), W.dtype).to(W.device)
        W[b, l] = row
        bias[b, l] = 1e-3 - (h[b] @ row).median()
        model.v[b, l] = 0.0
        touched = [(W, (b, l)), (bias, (b, l)), (model.v, (b, l))]
        if len(model.dec_w):
            model.dec_w[0][b, :, l] = 0.0
            touched.append((model.dec_w[0], (b, slice(None), l)))
        for p, idx in touched:
            if id(p) in state:
                m, v = state[id(p)]
                m[idx] = 0.0
                v[idx] = v[b].median()


def stack_groups(members: list[Member], batch_size: int, max_members: int) -> list[list[int]]:
    """Indices of ``members`` split into stacks that share a minibatch size, at most
    ``max_members`` each. A member's training never depends on which stack it lands in."""
    by_mb: dict[int, list[int]] = {}
    for i, m in enumerate(members):
        by_mb.setdefault(min(batch_size, len(m.train_idx)), []).append(i)
    return [idx[k : k + max_members] for idx in by_mb.values() for k in range(0, len(idx), max_members)]


def _val_tables(members: list[Member], positive_factor: float, dev: str) -> tuple[Tensor, Tensor, Tensor]:
    """Validation rows and balanced weights padded to (B, max n_val) (weight 0 = padding), and categories."""
    idx, wts = _padded_tables([m.val_idx if m.val_idx is not None else () for m in members],
                              [m.val_pos if m.val_idx is not None else () for m in members], positive_factor, dev)
    cats = torch.tensor([m.category for m in members], device=dev)
    return idx, wts, cats


@torch.no_grad()
def evaluate_criterion(
    model: StackedSRAE,
    z: Tensor,
    y_all: Tensor,
    tables: tuple[Tensor, Tensor, Tensor],
    method: str,
    z_scale: Tensor,
    y_scale: Tensor,
    settings: TrainSettings,
) -> list[float]:
    """Validation criterion per member in raw units: balanced mean squared faithfulness error,
    or (CAE, which is not trained for faithfulness) the mean squared reconstruction error.
    ``tables`` comes from :func:`_val_tables`."""
    spec = method_spec(method)
    dt = settings.dtype
    idx, wts, cats = tables
    B, vmax = idx.shape
    num = torch.zeros(B, dtype=torch.float64, device=idx.device)
    den = torch.zeros(B, dtype=torch.float64, device=idx.device)
    zs = z_scale.to(dt).view(B, 1, 1)
    for start in range(0, vmax, settings.val_chunk):
        sl = slice(start, min(vmax, start + settings.val_chunk))
        zb = z[idx[:, sl]].to(dt) / zs
        e = model.encode(zb)
        w = wts[:, sl]
        if spec.faithfulness > 0:
            y = y_all[idx[:, sl], cats[:, None]].double()
            err = (model.predict(e).double() * y_scale[:, None] - y) ** 2
            num += (w * err).sum(1)
            den += w.sum(1)
        else:
            err = ((model.decode(e) - zb).double() ** 2).mean(-1) * z_scale[:, None] ** 2
            mask = (w > 0).double()
            num += (mask * err).sum(1)
            den += mask.sum(1)
    return [float(n / d) if d > 0 else math.inf for n, d in zip(num.tolist(), den.tolist())]
