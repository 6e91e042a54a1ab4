"""The SRAE model family (paper Fig. 2b), stored as B independent members at once.

Every member has an encoder ``in -> 800 -> 100 -> n`` with a ReLU after every layer (so the
x-features ``E >= 0``), an optional decoder ``n -> 100 -> 800 -> in`` (ReLU hidden, linear
output) and a linear predictor ``y_bar = v^T E`` (bias off by default). Parameters are
stacked on a leading member dim so one ``bmm`` runs all members; ``B = 1`` is a single model.

The baselines are the same family with other loss terms (docs/design.md, "Math contracts"):
SRAE (sparse log reconstruction + pull-away), NN (no decoder), SAE (plain reconstruction),
CAE (reconstruction only; ``v`` fitted afterwards by least squares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MethodSpec:
    """How a method of the family is trained."""

    name: str
    decoder: bool
    reconstruction: str  # "sparse" | "mean" | "none"
    faithfulness: float  # weight of the faithfulness term (0 for CAE)
    pull_away: bool
    hparams: tuple[str, ...]  # which grid keys matter for this method


# lambda1/2/3: eq. 5's L2 weights of the encoder, the decoder and v, each defaulting to
# weight_decay. NN has no decoder; CAE's v is fitted afterwards by least squares.
METHODS: dict[str, MethodSpec] = {
    "SRAE": MethodSpec("SRAE", True, "sparse", 1.0, True,
                       ("beta", "eta", "q", "lr", "weight_decay", "lambda1", "lambda2", "lambda3")),
    "NN": MethodSpec("NN", False, "none", 1.0, False, ("lr", "weight_decay", "lambda1", "lambda3")),
    "SAE": MethodSpec("SAE", True, "mean", 1.0, False, ("beta", "lr", "weight_decay", "lambda1", "lambda2", "lambda3")),
    "CAE": MethodSpec("CAE", True, "mean", 0.0, False, ("lr", "weight_decay", "lambda1", "lambda2")),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None


@dataclass(frozen=True)
class Architecture:
    """Layer sizes of one member (paper: 800-100-n, n = 5)."""

    in_dim: int
    n: int = 5
    hidden: tuple[int, ...] = (800, 100)
    decoder: bool = True
    predictor_bias: bool = False

    @property
    def encoder_sizes(self) -> list[int]:
        return [self.in_dim, *self.hidden, self.n]

    @property
    def decoder_sizes(self) -> list[int]:
        return [self.n, *reversed(self.hidden), self.in_dim]


_INIT_BUFFER_BYTES = 1 << 28  # float64 scratch per group of members while initialising a stack


def init_uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float, dtype: torch.dtype) -> Tensor:
    """Uniform in ``[-bound, bound]``, drawn in float64 from ``gen`` on ``gen``'s device.

    CPU generators give the same numbers for a seed on every machine; CUDA generators (Philox)
    give other numbers, which may also differ between GPU models. A member therefore starts
    from the same weights in a stack and alone on one device, not across device types."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device) * 2 - 1).mul_(bound).to(dtype)


class StackedSRAE(nn.Module):
    """B independent members of the SRAE family with parameters stacked on dim 0.

    Member ``b`` is initialised from ``seeds[b]`` alone (PyTorch's default Linear init:
    uniform in ``±1/sqrt(fan_in)``), so a member is identical whether trained in a stack or
    on its own. The draw happens on ``device`` (see :func:`init_uniform`): at paper size a
    stack of 200 members holds 1.3 G parameters, which take seconds to draw on a CPU thread
    and milliseconds on a GPU.
    """

    def __init__(self, arch: Architecture, seeds: list[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.arch = arch
        self.enc_w = nn.ParameterList()
        self.enc_b = nn.ParameterList()
        self.dec_w = nn.ParameterList()
        self.dec_b = nn.ParameterList()
        dev = torch.device(device if device is not None else "cpu")
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]

        def stacked(shape: tuple[int, ...], bound: float) -> nn.Parameter:
            # init_uniform per member, with the arithmetic done once per group of members: one
            # draw per member and four whole-group ops, instead of six small ops per member
            # (at 200 paper-size members the launches of the small ops took 0.15 s on a GPU).
            out = torch.empty((len(gens), *shape), dtype=dtype, device=dev)
            per = max(1, _INIT_BUFFER_BYTES // (8 * max(1, math.prod(shape))))
            for a in range(0, len(gens), per):
                buf = torch.empty((min(per, len(gens) - a), *shape), dtype=torch.float64, device=dev)
                for k, g in enumerate(gens[a : a + per]):
                    buf[k].uniform_(0.0, 1.0, generator=g)  # = torch.rand(shape, generator=g)
                out[a : a + len(buf)] = (buf * 2 - 1).mul_(bound)
            return nn.Parameter(out)

        for fan_in, fan_out in zip(arch.encoder_sizes[:-1], arch.encoder_sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.enc_w.append(stacked((fan_out, fan_in), bound))
            self.enc_b.append(stacked((fan_out,), bound))
        if arch.decoder:
            for fan_in, fan_out in zip(arch.decoder_sizes[:-1], arch.decoder_sizes[1:]):
                bound = 1.0 / math.sqrt(fan_in)
                self.dec_w.append(stacked((fan_out, fan_in), bound))
                self.dec_b.append(stacked((fan_out,), bound))
        self.v = stacked((arch.n,), 1.0 / math.sqrt(arch.n))
        self.v_bias = nn.Parameter(torch.zeros(len(seeds), dtype=dtype, device=dev), requires_grad=arch.predictor_bias)

    @property
    def members(self) -> int:
        return self.v.shape[0]

    @staticmethod
    def _affine(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # x (B, m, in), w (B, out, in), b (B, out) -> (B, m, out)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def _affine_t(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # Feature-major: h (B, in, m), w (B, out, in), b (B, out) -> (B, out, m). Training runs
        # in this layout because the weight gradient (grad_out @ h^T) then comes out in w's own
        # (B, out, in) layout; the sample-major form yields it transposed, and autograd copies
        # every weight gradient to match w's strides (about a quarter of a CPU step).
        return torch.baddbmm(b.unsqueeze(2), w, h)

    def encode(self, z: Tensor) -> Tensor:
        """``z`` (B, m, D) -> x-features E (B, m, n), non-negative."""
        h = z.transpose(1, 2)
        for w, b in zip(self.enc_w, self.enc_b):
            h = torch.relu(self._affine_t(h, w, b))
        return h.transpose(1, 2)

    def decode(self, e: Tensor) -> Tensor:
        """E (B, m, n) -> reconstruction (B, m, D)."""
        h = e.transpose(1, 2)
        last = len(self.dec_w) - 1
        for i, (w, b) in enumerate(zip(self.dec_w, self.dec_b)):
            h = self._affine_t(h, w, b)
            if i < last:
                h = torch.relu(h)
        return h.transpose(1, 2)

    def predict(self, e: Tensor) -> Tensor:
        """E (B, m, n) -> y_bar (B, m)."""
        return (e * self.v.unsqueeze(1)).sum(-1) + self.v_bias.unsqueeze(1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        e = self.encode(z)
        z_hat = self.decode(e) if self.arch.decoder else None
        return e, z_hat, self.predict(e)

    def encoder_weights(self) -> list[Tensor]:
        return list(self.enc_w)

    def decoder_weights(self) -> list[Tensor]:
        return list(self.dec_w)
