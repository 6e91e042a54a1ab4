"""SRAE losses against float64 loop references (docs/design.md, "Math contracts"), with leading batch dims."""

import itertools
import math

import pytest
import torch

from srae.losses import (
    balanced_weights,
    faithfulness_loss,
    mean_reconstruction_loss,
    pull_away_loss,
    sparse_reconstruction_loss,
    srae_objective,
)


def ref_faithfulness(y_bar, y_hat, w):
    num = sum(w[i] * (y_bar[i] - y_hat[i]) ** 2 for i in range(len(y_bar)))
    return num / sum(w)


def ref_sparse(z_hat, z, q):
    M, D = len(z), len(z[0])
    total = 0.0
    for k in range(D):
        Qk = sum((z_hat[i][k] - z[i][k]) ** 2 for i in range(M)) / M
        total += math.log(1 + q * Qk)
    return total / D


def ref_pull_away(e):
    M, n = len(e), len(e[0])
    cols = [[e[i][l] for i in range(M)] for l in range(n)]
    norm = [math.sqrt(sum(x * x for x in c)) for c in cols]
    total = 0.0
    for l, lp in itertools.permutations(range(n), 2):
        dot = sum(a * b for a, b in zip(cols[l], cols[lp]))
        total += (dot / (norm[l] * norm[lp])) ** 2
    return total / (n * (n - 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def test_faithfulness_loss_matches_loop(gen):
    y_bar = torch.randn(3, 2, 11, generator=gen, dtype=torch.float64)
    y_hat = torch.randn(3, 2, 11, generator=gen, dtype=torch.float64)
    w = torch.rand(3, 2, 11, generator=gen, dtype=torch.float64) + 0.1
    got = faithfulness_loss(y_bar, y_hat, w)
    assert got.shape == (3, 2)
    for a, b in itertools.product(range(3), range(2)):
        ref = ref_faithfulness(y_bar[a, b].tolist(), y_hat[a, b].tolist(), w[a, b].tolist())
        assert got[a, b].item() == pytest.approx(ref, rel=1e-12)
    unweighted = faithfulness_loss(y_bar, y_hat)
    assert unweighted[1, 0].item() == pytest.approx(ref_faithfulness(y_bar[1, 0].tolist(), y_hat[1, 0].tolist(), [1] * 11), rel=1e-12)


def test_sparse_reconstruction_matches_loop(gen):
    z = torch.rand(2, 3, 9, 6, generator=gen, dtype=torch.float64)
    z_hat = z + 0.7 * torch.randn(2, 3, 9, 6, generator=gen, dtype=torch.float64)
    for q in (1.0, 10.0):
        got = sparse_reconstruction_loss(z_hat, z, q)
        assert got.shape == (2, 3)
        for a, b in itertools.product(range(2), range(3)):
            assert got[a, b].item() == pytest.approx(ref_sparse(z_hat[a, b].tolist(), z[a, b].tolist(), q), rel=1e-12)
    # q per member broadcasts over the batch dims
    qs = torch.tensor([[1.0, 2.0, 5.0], [0.5, 3.0, 10.0]], dtype=torch.float64)
    got = sparse_reconstruction_loss(z_hat, z, qs)
    assert got[1, 2].item() == pytest.approx(ref_sparse(z_hat[1, 2].tolist(), z[1, 2].tolist(), 10.0), rel=1e-12)


def test_mean_reconstruction_matches_loop(gen):
    """The SAE/CAE reconstruction term: mean over samples and dims of the squared error."""
    z = torch.rand(2, 3, 7, 5, generator=gen, dtype=torch.float64)
    z_hat = z + torch.randn(2, 3, 7, 5, generator=gen, dtype=torch.float64)
    got = mean_reconstruction_loss(z_hat, z)
    assert got.shape == (2, 3)
    for a, b in itertools.product(range(2), range(3)):
        ref = sum((z_hat[a, b, i, k].item() - z[a, b, i, k].item()) ** 2 for i in range(7) for k in range(5)) / 35
        assert got[a, b].item() == pytest.approx(ref, rel=1e-12)


def test_pull_away_matches_loop(gen):
    e = torch.rand(4, 13, 5, generator=gen, dtype=torch.float64)
    got = pull_away_loss(e)
    assert got.shape == (4,)
    for a in range(4):
        assert got[a].item() == pytest.approx(ref_pull_away(e[a].tolist()), rel=1e-10)


def test_pull_away_hand_cases():
    orth = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert pull_away_loss(orth).item() == 0.0
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # parallel columns: cos = 1
    assert pull_away_loss(same).item() == pytest.approx(1.0)
    dead = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # an all-zero column: no NaN
    assert pull_away_loss(dead).item() == 0.0
    assert pull_away_loss(torch.rand(5, 1)).item() == 0.0


def test_balanced_weights_equalise_class_totals():
    is_pos = torch.tensor([True, False, False, False, True, False, False])
    w = balanced_weights(is_pos)
    assert w[is_pos].sum().item() == pytest.approx(w[~is_pos].sum().item())
    w2 = balanced_weights(is_pos, factor=2.0)
    assert w2[is_pos].sum().item() == pytest.approx(2 * w2[~is_pos].sum().item())


def test_full_objective_value_and_gradcheck(gen):
    M, D, n = 7, 4, 3
    z = torch.rand(2, M, D, generator=gen, dtype=torch.float64)
    y_hat = torch.randn(2, M, generator=gen, dtype=torch.float64)
    w = torch.rand(2, M, generator=gen, dtype=torch.float64) + 0.5
    enc = torch.randn(2, n, D, generator=gen, dtype=torch.float64, requires_grad=True)
    dec = torch.randn(2, D, n, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n, generator=gen, dtype=torch.float64, requires_grad=True)
    beta, eta, q, l1, l2, l3 = 0.7, 0.3, 2.0, 1e-2, 2e-2, 3e-2

    def objective(enc, dec, v):
        e = torch.relu(z @ enc.transpose(1, 2)) + 0.1  # keep away from the ReLU kink
        z_hat = e @ dec.transpose(1, 2)
        y_bar = (e * v.unsqueeze(1)).sum(-1)
        return srae_objective(y_bar=y_bar, y_hat=y_hat, weight=w, e=e, z=z, z_hat=z_hat, beta=beta, eta=eta, q=q,
                              encoder_weights=[enc], decoder_weights=[dec], v=v, lambda1=l1, lambda2=l2, lambda3=l3)

    got = objective(enc, dec, v)
    for b in range(2):
        e = (torch.relu(z[b] @ enc[b].T) + 0.1).detach()
        z_hat = (e @ dec[b].T).detach()
        y_bar = (e @ v[b]).detach()
        ref = (ref_faithfulness(y_bar.tolist(), y_hat[b].tolist(), w[b].tolist())
               + beta * ref_sparse(z_hat.tolist(), z[b].tolist(), q) + eta * ref_pull_away(e.tolist())
               + l1 * float((enc[b].detach() ** 2).sum()) + l2 * float((dec[b].detach() ** 2).sum()) + l3 * float((v[b].detach() ** 2).sum()))
        assert got[b].item() == pytest.approx(ref, rel=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, c: objective(a, b, c).sum(), (enc, dec, v))
