"""Batched trainer: stacked members equal separately trained twins; CV/refit; bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from srae.cv import ExplainerSettings, method_configs, train_explainers
from srae.errors import InputError
from srae.losses import balanced_weights, faithfulness_loss, mean_reconstruction_loss, pull_away_loss, sparse_reconstruction_loss
from srae.model import Architecture, StackedSRAE
from srae.sampling import design_samples, minibatch_stream, stratified_folds
from srae.train import Member, TrainSettings, fit_stack


def _twin_train(z, y, member, arch, method, steps, mb):
    """One model on its own: nn.Linear layers + torch.optim.Adam, same init, same minibatches."""
    init = StackedSRAE(arch, [member.seed], dtype=torch.float64)
    enc = [nn.Linear(w.shape[2], w.shape[1]).double() for w in init.enc_w]
    dec = [nn.Linear(w.shape[2], w.shape[1]).double() for w in init.dec_w]
    with torch.no_grad():
        for lin, w, b in zip(enc + dec, list(init.enc_w) + list(init.dec_w), list(init.enc_b) + list(init.dec_b)):
            lin.weight.copy_(w[0])
            lin.bias.copy_(b[0])
    v = nn.Parameter(init.v[0].detach().clone())
    params = [p for lin in enc + dec for p in lin.parameters()] + [v]
    opt = torch.optim.Adam(params, lr=member.hparams["lr"])
    hp = member.hparams
    wts = balanced_weights(torch.as_tensor(member.train_pos)).double()
    stream = minibatch_stream(member.seed, len(member.train_idx), mb)
    for _ in range(steps):
        local = next(stream)
        rows = member.train_idx[local]
        zb, yb, wb = z[rows], y[rows, member.category], wts[local]
        h = zb
        for lin in enc:
            h = torch.relu(lin(h))
        e = h
        loss = faithfulness_loss(e @ v, yb, wb)
        if method != "NN":
            r = e
            for i, lin in enumerate(dec):
                r = lin(r)
                if i < len(dec) - 1:
                    r = torch.relu(r)
            loss = loss + hp["beta"] * (sparse_reconstruction_loss(r, zb, hp["q"]) if method == "SRAE"
                                        else mean_reconstruction_loss(r, zb))
        if method == "SRAE":
            loss = loss + hp["eta"] * pull_away_loss(e)
        wd = hp["weight_decay"]
        loss = loss + wd * sum((lin.weight ** 2).sum() for lin in enc) + wd * sum((lin.weight ** 2).sum() for lin in dec) \
            + wd * (v ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ([lin.weight for lin in enc] + [lin.bias for lin in enc] + [lin.weight for lin in dec]
            + [lin.bias for lin in dec] + [v])


@pytest.mark.parametrize("method", ["SRAE", "SAE", "NN"])
def test_stacked_members_equal_separately_trained_twins(method):
    g = np.random.default_rng(3)
    N, D, C = 120, 10, 3
    z = torch.as_tensor(g.uniform(0, 2, (N, D)))
    y = torch.as_tensor(g.normal(0, 3, (N, C)))
    labels = g.integers(0, C, N)
    members = []
    for k, (cat, lr, beta, eta, q, wd) in enumerate([(0, 1e-2, 1.0, 0.1, 1.0, 1e-3), (1, 3e-3, 0.5, 0.5, 10.0, 0.0),
                                                      (2, 2e-2, 2.0, 0.0, 3.0, 1e-2)]):
        idx = np.sort(g.choice(N, 50 + 10 * k, replace=False))
        members.append(Member(cat, idx, labels[idx] == cat, dict(lr=lr, beta=beta, eta=eta, q=q, weight_decay=wd), seed=100 + k))
    arch = Architecture(D, 4, (8, 6))
    settings = TrainSettings(batch_size=16, max_steps=20, normalize=False, dtype=torch.float64, revive=False)
    res = fit_stack(z, y, members, method, arch, settings)
    assert res.steps == 20
    for b, m in enumerate(members):
        twin = _twin_train(z, y, m, Architecture(D, 4, (8, 6), decoder=method != "NN"), method, 20, 16)
        mine = ([w[b] for w in res.model.enc_w] + [bb[b] for bb in res.model.enc_b] + [w[b] for w in res.model.dec_w]
                + [bb[b] for bb in res.model.dec_b] + [res.model.v[b]])
        assert len(mine) == len(twin)
        for a, t in zip(mine, twin):
            scale = t.detach().abs().max().item()
            assert (a.detach() - t.detach()).abs().max().item() <= 1e-8 * scale
        # and training moved the parameters
        init = StackedSRAE(arch, [m.seed], dtype=torch.float64)
        assert (init.enc_w[0][0] - res.model.enc_w[0][b]).abs().max() > 1e-4


def test_design_counts_and_disjointness():
    labels = np.repeat(np.arange(5), 40)
    d = design_samples(labels, 2, n_pos=30, n_neg=100, n_test_neg=50, seed=0)
    assert d.counts() == {"train_pos": 30, "train_neg": 100, "test_pos": 10, "test_neg": 50}
    assert not set(d.train_idx) & set(d.test_idx)
    assert (labels[d.train_idx] == 2).sum() == 30
    # scarce positives: about 5/6 train, at least one test
    d2 = design_samples(labels, 1, n_pos=100, n_neg=10, n_test_neg=10, seed=0)
    assert d2.counts()["train_pos"] == 33 and d2.counts()["test_pos"] == 7
    # scarce negatives (160 < 5 + 2000 asked): proportional shrink, but
    # never rounded down to no training negative; and never all of them in training
    d3 = design_samples(labels, 2, n_pos=30, n_neg=5, n_test_neg=2000, seed=0)
    assert d3.counts()["train_neg"] == 1 and d3.counts()["test_neg"] == 159
    d4 = design_samples(labels, 2, n_pos=30, n_neg=2000, n_test_neg=1, seed=0)
    assert d4.counts()["train_neg"] == 159 and d4.counts()["test_neg"] == 1
    d5 = design_samples(labels, 2, n_pos=30, n_neg=100, n_test_neg=100, seed=0)  # floor(160/2) each
    assert d5.counts()["train_neg"] == 80 and d5.counts()["test_neg"] == 80
    folds = stratified_folds(d.train_pos, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(d.train_idx)))
    assert all(abs(d.train_pos[f].sum() - 10) <= 1 for f in folds)


def test_method_configs_drop_irrelevant_keys():
    grid = {"beta": [1, 2], "eta": [0.1, 0.2], "q": [1], "lr": [1e-3], "weight_decay": [0.0]}
    assert len(method_configs("SRAE", grid)) == 4
    assert method_configs("NN", grid) == [{"lr": 1e-3, "weight_decay": 0.0}]
    assert len(method_configs("SAE", grid)) == 2
    # eq. 5's per-term L2 weights: unset (None) axes are no axis; each method takes its own
    grid.update(lambda1=[0.1, 0.2], lambda2=[0.3], lambda3=None)
    assert method_configs("NN", grid) == [{"lr": 1e-3, "weight_decay": 0.0, "lambda1": 0.1},
                                          {"lr": 1e-3, "weight_decay": 0.0, "lambda1": 0.2}]
    assert {tuple(sorted(c)) for c in method_configs("CAE", grid)} == {("lambda1", "lambda2", "lr", "weight_decay")}
    assert len(method_configs("SRAE", grid)) == 8


def _toy(n=300, d=12, c=3, seed=0):
    g = np.random.default_rng(seed)
    z = g.uniform(0, 1, (n, d)).astype(np.float32)
    logits = g.normal(size=(n, c)).astype(np.float32)
    return z, logits, logits.argmax(1)


SMALL = ExplainerSettings(n=3, hidden=(8, 6), n_pos=20, n_neg=60, n_test_neg=30, folds=2,
                          train=TrainSettings(batch_size=32, max_epochs=3, patience=2))


def test_bad_input_names_the_array_or_category():
    z, logits, labels = _toy()
    bad = z.copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError, match=r"Z has 1 NaN/inf values \(first in row 7\)"):
        train_explainers(bad, logits, labels, [0], "SRAE", SMALL)
    badl = logits.copy()
    badl[2, 0] = np.inf
    with pytest.raises(InputError, match="logits has 1 NaN/inf"):
        train_explainers(z, badl, labels, [0], "SRAE", SMALL)
    labels0 = labels.copy()
    labels0[labels0 == 1] = 0
    with pytest.raises(InputError, match="warbler: no positive samples"):
        train_explainers(z, logits, labels0, [1], "SRAE", SMALL, class_names=["a", "warbler", "c"])
    with pytest.raises(InputError, match="categories: expected a list of class indices, got 0"):
        train_explainers(z, logits, labels, 0, "SRAE", SMALL)
    split_settings = ExplainerSettings(**{**SMALL.__dict__, "use_dataset_split": True})
    with pytest.raises(InputError, match="use_dataset_split is set, but no splits array"):
        train_explainers(z, logits, labels, [0], "SRAE", split_settings)
    with pytest.raises(InputError, match=r"splits: shape \(5,\), expected \(300,\)"):
        train_explainers(z, logits, labels, [0], "SRAE", split_settings, splits=np.array(["train"] * 5))
    big = ExplainerSettings(**{**SMALL.__dict__, "n": 13})
    with pytest.raises(InputError, match="n = 13 x-features is larger than the Z dimension D = 12"):
        train_explainers(z, logits, labels, [0], "SRAE", big)
    # collect mode: the bad category is reported, the others are trained
    out = train_explainers(z, logits, labels0, [0, 1, 2], "NN", SMALL, errors="collect")
    assert set(out.explainers) == {0, 2} and "no positive samples" in out.failed[1]


def test_a_diverged_model_is_an_error_naming_its_category_never_a_nan_explainer(monkeypatch):
    import srae.cv as CV

    z, logits, labels = _toy()
    real = CV._unstack

    def nan_for_category_1(res, b, method, category, meta):
        e = real(res, b, method, category, meta)
        if category == 1:
            e.weights[0][0, 0] = float("nan")  # as after an overflowing update
        return e

    monkeypatch.setattr(CV, "_unstack", nan_for_category_1)
    with pytest.raises(InputError, match="warbler: NN training diverged .*lower the learning rate"):
        train_explainers(z, logits, labels, [1], "NN", SMALL, class_names=["a", "warbler", "c"])
    out = train_explainers(z, logits, labels, [0, 1, 2], "NN", SMALL, errors="collect")
    assert set(out.explainers) == {0, 2} and "diverged" in out.failed[1]
    assert all(bool(torch.isfinite(w).all()) for e in out.explainers.values() for w in e.weights)


def test_the_selection_criterion_and_rule_are_recorded():
    z, logits, labels = _toy()
    for method, criterion in (("SRAE", "val_faithfulness_mse"), ("CAE", "val_reconstruction_mse")):
        meta = train_explainers(z, logits, labels, [0], method, SMALL).explainers[0].meta
        assert meta["cv_criterion"] == criterion and meta["cv_rule"] == SMALL.cv_rule
        assert meta["samples"] == {"train_pos": 20, "train_neg": 60, "test_pos": meta["samples"]["test_pos"],
                                   "test_neg": 30} and meta["samples"]["test_pos"] > 0


def test_early_stopping_stops_a_member_and_restores_its_best_epoch(monkeypatch):
    """Validation values are scripted per epoch: member 0 is best after epoch 2 and stops after
    `patience` worse epochs, with its epoch-2 parameters restored (equal to a 2-epoch fit of
    its twin without validation); member 1 keeps improving and trains every epoch."""
    import srae.train as T

    g = np.random.default_rng(5)
    N, D = 90, 8
    z = torch.as_tensor(g.uniform(0, 2, (N, D)))
    y = torch.as_tensor(g.normal(0, 2, (N, 2)))
    idx, val = np.arange(60), np.arange(60, 90)
    hp = dict(lr=1e-2, beta=1.0, eta=0.1, q=1.0, weight_decay=0.0)
    members = [Member(c, idx, (y[idx, c] > 0).numpy(), hp, seed=7 + c, val_idx=val, val_pos=(y[val, c] > 0).numpy())
               for c in (0, 1)]
    script = {0: [5.0, 3.0, 4.0, 4.5, 6.0, 7.0, 8.0], 1: [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2]}
    calls = []

    def scripted(model, *args, **kwargs):
        calls.append(1)
        return [script[b][len(calls) - 1] for b in range(2)]

    monkeypatch.setattr(T, "evaluate_criterion", scripted)
    arch = Architecture(D, 3, (6,))
    settings = TrainSettings(batch_size=20, max_epochs=7, patience=2, normalize=False, dtype=torch.float64,
                             revive=False)
    res = fit_stack(z, y, members, "SRAE", arch, settings)
    assert res.best_epoch == [2, 7] and res.best_val == [3.0, 0.2]
    assert len(res.curves[0]["val"]) == 4 and len(res.curves[1]["val"]) == 7  # 0 stopped after epoch 4
    assert len(res.curves[0]["train"]) == 4

    monkeypatch.undo()
    twin = Member(0, idx, members[0].train_pos, hp, seed=7)
    two = fit_stack(z, y, [twin], "SRAE", arch, TrainSettings(batch_size=20, max_epochs=2, normalize=False,
                                                               dtype=torch.float64, revive=False))
    for mine, ref in zip(res.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(mine[0], ref[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["SRAE", "CAE"])
def test_a_predictor_bias_is_off_by_default_and_learns_an_offset_when_on(method):
    """y-hat far from 0 on every image: with the bias on, it carries the offset (the
    contributions v_i E_i plus the bias give y-bar); off (the paper's choice) it stays 0."""
    z, logits, labels = _toy()
    shifted = logits + 40.0
    on = ExplainerSettings(**{**SMALL.__dict__, "predictor_bias": True,
                              "train": TrainSettings(batch_size=32, max_epochs=60, patience=60)})
    off = ExplainerSettings(**{**on.__dict__, "predictor_bias": False})
    with_bias = train_explainers(z, shifted, labels, [0], method, on).explainers[0]
    without = train_explainers(z, shifted, labels, [0], method, off).explainers[0]
    assert without.bias == 0.0 and abs(with_bias.bias) > 1.0
    rows = z[:20]
    np.testing.assert_allclose(with_bias.contributions(rows).sum(1) + with_bias.bias, with_bias.predict(rows),
                               rtol=1e-9, atol=1e-9)
    assert with_bias.meta["F_reg_train"] < without.meta["F_reg_train"]


def test_dead_x_features_are_revived_to_fire_on_about_half_the_batch():
    from srae.optim import StackedAdam
    from srae.train import _revive_features

    arch = Architecture(6, 4, (8,))
    model = StackedSRAE(arch, [1, 2], dtype=torch.float64)
    opt = StackedAdam([p for p in model.parameters() if p.requires_grad], torch.tensor([1e-3, 1e-3], dtype=torch.float64))
    with torch.no_grad():
        model.enc_b[-1][0, 1] = -1e3  # member 0, x-feature 1: dead
        model.enc_b[-1][1, 3] = -1e3  # member 1, x-feature 3: dead
    for m in opt.m + opt.v:
        m.fill_(0.5)
    zb = torch.rand(2, 64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (model.encode(zb)[0, :, 1] == 0).all() and (model.encode(zb)[1, :, 3] == 0).all()
    members = [Member(0, np.arange(10), np.zeros(10, bool), {}, seed=5), Member(1, np.arange(10), np.zeros(10, bool), {}, seed=6)]
    counts = [0, 0]
    before = model.enc_w[-1][0, 0].clone()
    _revive_features(model, opt, zb, [[0, 1], [1, 3]], members, counts)
    e = model.encode(zb)
    assert counts == [1, 1]
    for b, l in ((0, 1), (1, 3)):
        rate = (e[b, :, l] > 0).double().mean().item()
        assert 0.4 <= rate <= 0.6, rate
        assert model.v[b, l].item() == 0.0 and (model.dec_w[0][b, :, l] == 0).all()
    assert torch.equal(model.enc_w[-1][0, 0], before)  # other features untouched
    w_state = opt.m[[id(p) for p in opt.params].index(id(model.enc_w[-1]))]
    assert (w_state[0, 1] == 0).all() and (w_state[0, 0] == 0.5).all()
    # Late in training (step count 2000) the revived row's next Adam step stays below the
    # learning rate: its second moment restarts at the tensor's typical value, not at 0
    # (which with the shared bias correction gave steps of ~3x the learning rate).
    opt.t[:] = 2000
    w = model.enc_w[-1]
    row = w[0, 1].detach().clone()
    for p in opt.params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert (w[0, 1] - row).abs().max().item() <= 1e-3


def test_fixed_epoch_members_stop_at_their_own_budget():
    z, logits, labels = _toy()
    idx = np.arange(96)
    members = [Member(0, idx, labels[idx] == 0, {"lr": 1e-3}, seed=1, epochs=2),
               Member(1, idx, labels[idx] == 1, {"lr": 1e-3}, seed=2, epochs=5)]
    res = fit_stack(torch.as_tensor(z), torch.as_tensor(logits), members, "NN", Architecture(12, 3, (8,)),
                    TrainSettings(batch_size=32))
    assert res.steps == 5 * 3  # 96 rows / 32 per step = 3 steps per epoch
    assert [len(c["train"]) for c in res.curves] == [2, 5]
    assert res.best_epoch == [2, 5]


def test_torch_inputs_with_grad_train_like_numpy():
    z, logits, labels = _toy()
    ref = train_explainers(z, logits, labels, [1], "NN", SMALL).explainers[1]
    got = train_explainers(torch.tensor(z, requires_grad=True), torch.tensor(logits), torch.tensor(labels),
                           [1], "NN", SMALL).explainers[1]
    assert torch.equal(ref.v, got.v) and all(torch.equal(a, b) for a, b in zip(ref.weights, got.weights))


def test_refit_keeps_the_best_fitting_of_several_inits():
    z, logits, labels = _toy()
    out = train_explainers(z, logits, labels, [0, 2], "SRAE", SMALL)
    for c, e in out.explainers.items():
        cands = e.meta["refit_candidates"]
        assert len(cands) == 2 and e.meta["refit_train_mse"] == min(cands)
        d = out.designs[c]
        y = logits[d.train_idx, c].astype(np.float64)
        w = np.where(d.train_pos, (~d.train_pos).sum() / d.train_pos.sum(), 1.0)
        assert e.meta["refit_train_mse"] == pytest.approx(float((w * (e.predict(z[d.train_idx]) - y) ** 2).sum() / w.sum()))


def test_dead_x_features_are_found_and_recorded():
    from srae.explainers import Explainer

    # hand case: x2's bias keeps it below 0 on every row, x1 fires on row 1 only, x3 on all
    w = torch.tensor([[1.0, -1.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.0, -10.0, 0.5], dtype=torch.float64)
    e = Explainer("SRAE", 0, [w], [b], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    z = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    assert e.dead_features(z) == [1]
    assert e.dead_features(z[:1]) == [0, 1]  # only row 0: x1 = relu(0 - 1) = 0 as well
    assert e.dead_features(z[:0]) == []
    # training records the x-features that are 0 on the whole training set, and the revivals
    z, logits, labels = _toy()
    out = train_explainers(z, logits, labels, [0, 2], "SRAE", SMALL)
    for c, ex in out.explainers.items():
        feats = ex.features(z[out.designs[c].train_idx])
        assert ex.meta["dead_features"] == [int(i) for i in np.flatnonzero(feats.max(axis=0) == 0)]
        assert isinstance(ex.meta["revivals"], int) and ex.meta["revivals"] >= 0


def test_a_member_trains_the_same_alone_or_in_any_stack():
    """Own minibatches, own epoch boundaries, own early stopping: stack-mates change nothing."""
    g = np.random.default_rng(11)
    N, D, C = 400, 10, 3
    z = torch.as_tensor(g.uniform(0, 2, (N, D)))
    y = torch.as_tensor(g.normal(0, 3, (N, C)))
    labels = g.integers(0, C, N)

    def member(cat, n, seed):
        idx = np.sort(g.choice(N, n + 40, replace=False))
        return Member(cat, idx[:n], labels[idx[:n]] == cat, {"lr": 5e-3, "beta": 0.5, "eta": 0.2, "q": 2.0},
                      seed=seed, val_idx=idx[n:], val_pos=labels[idx[n:]] == cat)

    a, b, c = member(0, 200, 1), member(1, 64, 2), member(2, 130, 3)
    settings = TrainSettings(batch_size=32, max_epochs=6, patience=2, dtype=torch.float64)
    arch = Architecture(D, 3, (8,))
    stacked = fit_stack(z, y, [b, a, c], "SRAE", arch, settings)
    for k, m in enumerate([b, a, c]):
        alone = fit_stack(z, y, [m], "SRAE", arch, settings)
        assert stacked.best_epoch[k] == alone.best_epoch[0]
        assert stacked.curves[k]["val"] == pytest.approx(alone.curves[0]["val"], rel=1e-10)
        for p_alone, p_stack in zip(alone.model.parameters(), stacked.model.parameters()):
            assert torch.allclose(p_alone[0], p_stack[k], rtol=1e-10, atol=1e-12)
    # members whose minibatch size differs (fewer rows than the batch) are stacked apart
    small = member(0, 20, 4)
    with pytest.raises(ValueError, match="one minibatch size"):
        fit_stack(z, y, [a, small], "SRAE", arch, settings)
    from srae.train import stack_groups
    assert stack_groups([a, small, b, c], 32, 2) == [[0, 2], [3], [1]]


@pytest.mark.parametrize("lambdas", [{}, {"lambda1": 0.02, "lambda2": 0.3, "lambda3": 0.007}])
@pytest.mark.parametrize("method", ["SRAE", "SAE"])
def test_normalised_training_minimises_eq5_in_raw_units(method, lambdas):
    """The objective fit_stack reports at init (trained on Z / z_scale, y / y_scale) equals
    eq. 5 evaluated by hand on the raw data with the raw-unit weights, L2 terms included:
    weight_decay for all three, or lambda1/2/3 (encoder, decoder, v) one by one."""
    g = np.random.default_rng(5)
    N, D = 40, 6
    z = torch.as_tensor(g.uniform(0, 30, (N, D)))  # far from unit scale on purpose
    y = torch.as_tensor(g.normal(0, 8, (N, 2)))
    idx = np.arange(N)
    pos = g.random(N) < 0.3
    hp = dict(lr=0.0, beta=0.7, eta=0.2, q=3.0, weight_decay=0.05, **lambdas)
    m = Member(1, idx, pos, hp, seed=11)
    arch = Architecture(D, 3, (5,), decoder=True)
    res = fit_stack(z, y, [m], method, arch, TrainSettings(batch_size=N, max_steps=1, dtype=torch.float64, revive=False))
    reported = res.curves[0]["train"][0]

    zs = float(torch.sqrt((z**2).mean()))
    ys = float(torch.sqrt((y[:, 1] ** 2).mean()))
    init = StackedSRAE(arch, [11], dtype=torch.float64)
    enc_w = [w[0].detach() for w in init.enc_w]
    enc_b = [b[0].detach() for b in init.enc_b]
    dec_w = [w[0].detach() for w in init.dec_w]
    dec_b = [b[0].detach() for b in init.dec_b]
    enc_w[0] = enc_w[0] / zs  # raw units: reads Z, writes Z, predicts y
    dec_w[-1], dec_b[-1] = dec_w[-1] * zs, dec_b[-1] * zs
    v = init.v[0].detach() * ys
    h = z
    for w, b in zip(enc_w, enc_b):
        h = torch.relu(h @ w.T + b)
    e = h
    r = e
    for i, (w, b) in enumerate(zip(dec_w, dec_b)):
        r = r @ w.T + b
        if i < len(dec_w) - 1:
            r = torch.relu(r)
    wts = balanced_weights(torch.as_tensor(pos)).double()
    expected = float((wts * (e @ v - y[:, 1]) ** 2).sum() / wts.sum())
    if method == "SRAE":
        per_dim = ((r - z) ** 2).mean(0)
        expected += hp["beta"] * float(torch.log1p(hp["q"] * per_dim).mean()) + hp["eta"] * float(pull_away_loss(e))
    else:
        expected += hp["beta"] * float(((r - z) ** 2).mean())
    lam = [hp.get(k, hp["weight_decay"]) for k in ("lambda1", "lambda2", "lambda3")]
    expected += (lam[0] * float(sum((w**2).sum() for w in enc_w)) + lam[1] * float(sum((w**2).sum() for w in dec_w))
                 + lam[2] * float((v**2).sum()))
    assert reported == pytest.approx(expected, rel=1e-9)


def test_a_configs_cv_score_does_not_depend_on_the_rest_of_the_grid():
    """Common random numbers: every config of a (category, fold) starts from one init, so a
    config scores the same alone or among others (its members are trained independently)."""
    from dataclasses import replace

    z, logits, labels = _toy()
    base = {"beta": [1.0], "eta": [0.1], "q": [1.0], "lr": [1e-2], "weight_decay": [0.0]}
    wide = dict(base, beta=[0.1, 1.0, 3.0])
    rows = {}
    for name, grid in (("alone", base), ("wide", wide)):
        out = train_explainers(z, logits, labels, [0], "SRAE", replace(SMALL, grid=grid))
        rows[name] = {r["hparams"]["beta"]: r["val_criterion"] for r in out.explainers[0].meta["cv"]}
    assert len(rows["wide"]) == 3
    assert rows["wide"][1.0] == pytest.approx(rows["alone"][1.0], rel=1e-6)


def test_stack_init_is_each_members_own_seeded_draw(monkeypatch):
    """Member b starts from init_uniform(Generator(seeds[b])): PyTorch's Linear bounds, drawn
    per tensor in order, whatever the stack size or the grouping used to initialise it."""
    import math

    import srae.model as model_mod
    from srae.model import init_uniform

    arch = Architecture(7, 3, (5,))
    seeds = [4, 17, 4, 99]

    def expected(seed):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for fan_in, fan_out in zip(arch.encoder_sizes[:-1], arch.encoder_sizes[1:]):
            b = 1 / math.sqrt(fan_in)
            out += [init_uniform(gen, (fan_out, fan_in), b, torch.float32), init_uniform(gen, (fan_out,), b, torch.float32)]
        dec = []
        for fan_in, fan_out in zip(arch.decoder_sizes[:-1], arch.decoder_sizes[1:]):
            b = 1 / math.sqrt(fan_in)
            dec += [init_uniform(gen, (fan_out, fan_in), b, torch.float32), init_uniform(gen, (fan_out,), b, torch.float32)]
        return out, dec, init_uniform(gen, (arch.n,), 1 / math.sqrt(arch.n), torch.float32)

    for buffer in (1 << 28, 8 * 7 * 5 + 1):  # all members at once, one member per group
        monkeypatch.setattr(model_mod, "_INIT_BUFFER_BYTES", buffer)
        m = StackedSRAE(arch, seeds)
        for k, s in enumerate(seeds):
            enc, dec, v = expected(s)
            got_enc = [t[k] for pair in zip(m.enc_w, m.enc_b) for t in pair]
            got_dec = [t[k] for pair in zip(m.dec_w, m.dec_b) for t in pair]
            for want, got in zip(enc + dec + [v], got_enc + got_dec + [m.v[k]]):
                assert torch.equal(want, got)
    # the bounds are PyTorch's default Linear init: |w| <= 1/sqrt(fan_in), and they are used
    top = float(m.enc_w[0].detach().abs().max())
    assert top <= 1 / math.sqrt(7)
    assert top > 0.8 / math.sqrt(7)


def test_minibatches_are_gathered_feature_major_with_equal_values():
    """fit_stack's minibatch Z / z_scale: the same numbers as the plain gather, laid out so the
    encoder and the reconstruction loss read it in one memory order (a transposed view of a
    contiguous (B, D, m) tensor, like the decoder's output)."""
    from srae.train import _gather_scaled

    g = torch.Generator().manual_seed(0)
    z = torch.rand(50, 7, generator=g)
    rows = torch.randint(0, 50, (3, 4), generator=g)
    zs = torch.tensor([0.5, 2.0, 3.0]).view(3, 1, 1)
    got = _gather_scaled(z, rows, zs, torch.float64)
    assert got.shape == (3, 4, 7) and got.dtype == torch.float64
    assert torch.equal(got, z[rows].double() / zs.double())
    assert got.transpose(1, 2).is_contiguous()
    model = StackedSRAE(Architecture(7, 2, (5,)), [1, 2, 3], dtype=torch.float64)
    _, z_hat, _ = model(got)
    assert z_hat.stride() == got.stride()  # elementwise loss terms pair equal layouts


def test_cv_rules_pick_the_lowest_mean_or_the_most_regularised_within_one_se():
    from srae.cv import select_config

    def row(eta, beta, mean, se):
        return {"hparams": {"eta": eta, "beta": beta, "lr": 0.01}, "val_criterion": mean, "val_se": se}

    rows = [row(0.1, 1.0, 1.00, 0.08), row(0.5, 1.0, 1.05, 0.20), row(0.5, 2.0, 1.07, 0.01),
            row(1.0, 2.0, 1.30, 0.01), row(2.0, 2.0, float("nan"), 0.0)]
    assert select_config(rows, "best") is rows[0]
    # within 1.00 + 0.08: rows 0-2; the largest eta wins, then the larger beta
    assert select_config(rows, "one_se") is rows[2]
    rows[2]["val_criterion"] = 1.09  # outside the band now
    assert select_config(rows, "one_se") is rows[1]
    with pytest.raises(InputError, match="cv_rule 'mean'"):
        select_config(rows, "mean")


def test_the_spread_rule_takes_the_widest_spread_among_the_nearly_best():
    from srae.cv import select_config

    def row(beta, mean, se, spread):
        return {"hparams": {"beta": beta}, "val_criterion": mean, "val_se": se, "val_n_eff": spread}

    # best 1.00; tolerance max(SE 0.02, 10% of 1.00) = 0.10: rows 0-2 are within, row 3 is not
    rows = [row(0.1, 1.00, 0.02, 1.2), row(1.0, 1.08, 0.02, 2.5), row(2.0, 1.10, 0.3, float("nan")),
            row(5.0, 1.11, 0.01, 4.0)]
    assert select_config(rows, "spread") is rows[1]
    rows[0]["val_se"] = 0.2  # a wider band (1 SE = 0.2) now admits row 3
    assert select_config(rows, "spread") is rows[3]
    tie = [row(0.1, 1.00, 0.0, 2.0), row(1.0, 1.05, 0.0, 2.0)]
    assert select_config(tie, "spread") is tie[0]  # equal spread: the lower mean


def test_the_refit_kept_under_the_spread_rule_is_the_widest_among_the_nearly_best():
    import torch

    from srae.cv import pick_refit
    from srae.explainers import Explainer

    def expl(v):  # two x-features E = relu(Z) on 2-d Z, weights v
        return Explainer("SRAE", 0, [torch.eye(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)],
                         torch.tensor(v, dtype=torch.float64))

    z = np.array([[1.0, 1.0], [2.0, 1.0]])
    collapsed, spread, far = expl([1.0, 0.0]), expl([1.0, 1.0]), expl([1.0, 1.0])
    cands = [(1.00, collapsed), (1.05, spread), (1.50, far)]  # far: outside 10% of the best fit
    assert pick_refit(cands, "best", z)[1] is collapsed
    assert pick_refit(cands, "one_se", z)[1] is collapsed
    assert pick_refit(cands, "spread", z)[1] is spread
    assert pick_refit([(1.0, collapsed), (1.2, spread)], "spread", z)[1] is collapsed


def test_train_explainers_with_the_spread_rule_records_each_configs_spread():
    from dataclasses import replace

    from srae.cv import select_config

    z, logits, labels = _toy()
    s = replace(SMALL, grid={"beta": [0.1, 1.0], "eta": [0.01], "q": [1.0], "lr": [1e-2], "weight_decay": [0.0]},
                cv_rule="spread")
    e = train_explainers(z, logits, labels, [0], "SRAE", s).explainers[0]
    assert e.meta["cv_rule"] == "spread" and len(e.meta["cv"]) == 2
    assert all(1.0 <= r["val_n_eff"] <= s.n for r in e.meta["cv"])
    assert e.meta["hparams"] == select_config(e.meta["cv"], "spread")["hparams"]


def test_train_explainers_records_the_rule_and_its_choice():
    z, logits, labels = _toy()
    from dataclasses import replace

    s = replace(SMALL, grid={"beta": [0.1], "eta": [0.01, 0.5], "q": [1.0], "lr": [1e-2], "weight_decay": [0.0]},
                cv_rule="one_se")
    from srae.cv import select_config

    e = train_explainers(z, logits, labels, [0], "SRAE", s).explainers[0]
    assert e.meta["cv_rule"] == "one_se" and all("val_se" in r for r in e.meta["cv"])
    assert e.meta["hparams"] == select_config(e.meta["cv"], "one_se")["hparams"]


@pytest.mark.parametrize("change, what", [
    ({"n": 0}, "settings.n = 0"), ({"n_pos": 0}, "settings.n_pos = 0"), ({"hidden": (8, 0)}, "settings.hidden"),
    ({"folds": 0}, "settings.folds"), ({"grid": {"lr": []}}, r"settings.grid\['lr'\]"),
    ({"grid": {"lr": [-1e-3]}}, r"settings.grid\['lr'\] = \[-0.001\]"), ({"grid": {"lr": [0.0]}}, "must be > 0"),
    ({"grid": {"beta": [float("nan")]}}, "finite"),
    ({"cv_rule": "mean"}, "cv_rule"), ({"train": TrainSettings(batch_size=0)}, "train.batch_size"),
    ({"train": TrainSettings(max_epochs=0)}, "train.max_epochs"), ({"train": TrainSettings(device="gpu")}, "train.device"),
])
def test_bad_settings_fail_before_training(change, what):
    """Settings that trained nonsense (0 positives, negative lr, 1 epoch for 0) or failed deep in
    torch (ZeroDivisionError, IndexError) are one InputError naming the setting."""
    from dataclasses import replace

    z, logits, labels = _toy()
    with pytest.raises(InputError, match=what):
        train_explainers(z, logits, labels, [0], "SRAE", replace(SMALL, **change))


def test_bad_call_arguments_are_named():
    z, logits, labels = _toy()
    for kwargs, what in (({"errors": "bogus"}, "errors 'bogus'"), ({"image_ids": np.arange(3)}, "image_ids"),
                         ({"class_names": ["a"]}, "class_names: 1 names for 3")):
        with pytest.raises(InputError, match=what):
            train_explainers(z, logits, labels, [0], "SRAE", SMALL, **kwargs)
    with pytest.raises(InputError, match="unknown method 'srae'"):
        train_explainers(z, logits, labels, [0], "srae", SMALL)
    with pytest.raises(InputError, match="categories: 1.0"):
        train_explainers(z, logits, labels, [1.0], "SRAE", SMALL)
    with pytest.raises(InputError, match="labels 1-D"):
        train_explainers(z, logits, labels[:, None], [0], "SRAE", SMALL)
    auto = train_explainers(z, logits, labels, [0], "NN", replace_train(SMALL, device="auto"))
    assert 0 in auto.explainers


def replace_train(s, **kw):
    from dataclasses import replace

    return replace(s, train=replace(s.train, **kw))


def test_a_stop_request_ends_training_in_another_thread_promptly():
    """Ctrl-C reaches the main thread only; training in a Prefect worker thread used to run to
    its end (minutes) before the interrupted command could exit."""
    import threading
    import time

    from srae import cancel

    z, logits, labels = _toy()
    member = Member(0, np.arange(200), labels[:200] == 0, {"lr": 1e-3}, seed=1)
    outcome: dict = {}

    def train() -> None:
        try:
            fit_stack(torch.as_tensor(z), torch.as_tensor(logits), [member], "NN", Architecture(12, 3, (8,)),
                      TrainSettings(batch_size=32, max_steps=10_000_000))
        except cancel.Stopped as exc:
            outcome["stopped"] = (str(exc), time.monotonic())

    t = threading.Thread(target=train)
    t.start()
    time.sleep(0.3)
    asked = time.monotonic()
    try:
        cancel.request_stop()
        t.join(10)
    finally:
        cancel.reset()
    assert not t.is_alive()
    message, when = outcome["stopped"]
    assert message == "explainer training: stopped (the command was interrupted)" and when - asked < 2
    assert not cancel.stop_requested()


def test_a_member_trains_the_same_alone_or_beside_others_in_float32():
    """Incremental runs must match a full run: a member trained alone equals itself trained
    beside another, bit for bit (float32, CPU, one torch thread as conftest sets, with
    revivals). On the CPU the fused Adam kernel rounded a member differently inside a longer
    slice, and revivals and early stopping turned that into a different model (weights apart by
    0.3 on the demo). With several threads batched matmuls still split work by stack size
    (README: Incremental and scheduled runs)."""
    g = np.random.default_rng(0)
    n_rows, d = 400, 128
    z = torch.as_tensor(g.uniform(0, 2, (n_rows, d)).astype(np.float32))
    y = torch.as_tensor(g.normal(0, 3, (n_rows, 3)).astype(np.float32))
    labels = g.integers(0, 3, n_rows)
    hp = {"lr": 1e-2, "beta": 1.0, "eta": 0.1, "q": 10.0, "weight_decay": 1e-4}
    a = Member(0, np.arange(0, 200), labels[:200] == 0, hp, seed=1)
    b = Member(1, np.arange(100, 300), labels[100:300] == 1, hp, seed=2)
    arch, settings = Architecture(d, 5, (64, 32)), TrainSettings(batch_size=64, max_steps=100)
    alone = fit_stack(z, y, [a], "SRAE", arch, settings)
    beside = fit_stack(z, y, [a, b], "SRAE", arch, settings)
    assert alone.revivals[0] == beside.revivals[0] > 0
    for p_alone, p_beside in zip(alone.model.parameters(), beside.model.parameters()):
        assert torch.equal(p_alone[0], p_beside[0])


def _two_thread_case():
    """A planted problem whose shapes (n = 5, minibatch 64) make this machine's 2-thread CPU
    matmuls split their work differently for a stack of 1 or 2 members than for one of 4 or 8:
    with shared stacks, category 3 alone vs beside 0-2 came out 0.02 apart here."""
    g = np.random.default_rng(0)
    n, d, k = 1200, 128, 4
    z = g.uniform(0, 2, (n, d)).astype(np.float32)
    labels = g.integers(0, k, n)
    logits = (z[:, :k] * 2 + g.normal(0, 0.3, (n, k))).astype(np.float32)
    grid = {"beta": [1.0], "eta": [0.1], "q": [10.0], "lr": [1e-2], "weight_decay": [1e-5]}
    s = ExplainerSettings(n=5, hidden=(64, 32), n_pos=60, n_neg=120, n_test_neg=60, folds=2, refit_seeds=1,
                          grid=grid, train=TrainSettings(batch_size=64, max_epochs=30, patience=5))
    return z, logits, labels, s


def test_a_category_trains_the_same_alone_or_beside_others_at_two_cpu_threads():
    """Incremental runs on the CPU at the default thread count: by default (stack_categories
    None) each category trains in its own stacks there, so its explainer is bit for bit the one
    a run with more categories makes, whatever the matmul kernels do with stack sizes."""
    z, logits, labels, s = _two_thread_case()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = train_explainers(z, logits, labels, [3], "SRAE", s).explainers[3]
        full = train_explainers(z, logits, labels, [0, 1, 2, 3], "SRAE", s).explainers[3]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(alone.weights + alone.biases + [alone.v], full.weights + full.biases + [full.v]):
        assert torch.equal(a, b)
    assert alone.meta["cv"] == full.meta["cv"]


def test_stack_categories_setting():
    from srae.cv import checked_settings, stacks_categories

    cpu, gpu = ExplainerSettings(), ExplainerSettings(train=TrainSettings(device="cuda"))
    assert not stacks_categories(cpu) and stacks_categories(gpu)  # None: share on an accelerator only
    assert stacks_categories(ExplainerSettings(stack_categories=True))
    assert not stacks_categories(ExplainerSettings(stack_categories=False, train=TrainSettings(device="cuda")))
    assert stacks_categories(ExplainerSettings(train=TrainSettings(device="auto"))) == torch.cuda.is_available()
    with pytest.raises(InputError, match="settings.train.device 'gpu0'"):
        stacks_categories(ExplainerSettings(train=TrainSettings(device="gpu0")))
    with pytest.raises(InputError, match="stack_categories = 'yes'"):
        checked_settings(ExplainerSettings(stack_categories="yes"))


def test_shared_stacks_are_one_fit_per_stack(monkeypatch):
    """stack_categories=True fits a group's categories together (what makes a GPU fast); the
    default on the CPU fits each category on its own."""
    import srae.cv

    z, logits, labels, s = _two_thread_case()
    calls = []
    real = srae.cv.fit_stack

    def counting(z, y, members, *args, **kw):
        calls.append(sorted({m.category for m in members}))
        return real(z, y, members, *args, **kw)

    monkeypatch.setattr(srae.cv, "fit_stack", counting)
    train_explainers(z, logits, labels, [0, 1, 2], "NN", s)
    assert calls == [[0], [1], [2], [0], [1], [2]]  # CV, then refit
    calls.clear()
    from dataclasses import replace

    train_explainers(z, logits, labels, [0, 1, 2], "NN", replace(s, stack_categories=True))
    assert calls == [[0, 1, 2], [0, 1, 2]]
