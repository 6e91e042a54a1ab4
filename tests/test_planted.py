"""Planted problem: logits are a known non-negative combination of k <= n hidden factors of Z.

SRAE, NN and SAE must recover the logit (test F_cls >= 0.99, F_reg < 5% of std(y_hat));
CAE (no faithfulness term) and a large-alpha Lasso must be measurably less faithful.
"""

import numpy as np
import pytest
import torch

from srae.baselines import lasso_sweep, train_lasso
from srae.cv import ExplainerSettings, train_explainers
from srae.explainers import load_explainer
from srae.train import TrainSettings

CATS = [0, 1]


@pytest.fixture(scope="module")
def planted():
    g = np.random.default_rng(0)
    N, K, D, C = 2000, 12, 64, 6
    labels = g.integers(0, C, N)
    W = np.zeros((K, C))
    for c in range(C):
        W[g.choice(K, 3, replace=False), c] = g.uniform(1, 3, 3)  # k = 3 factors per class
    H = g.exponential(1.0, (N, K)) + 2.0 * (W[:, labels].T > 0)  # hidden non-negative factors
    A = g.uniform(0, 1, (K, D)) * (g.uniform(size=(K, D)) < 0.3)
    z = np.maximum(H @ A + 0.05 * g.normal(size=(N, D)), 0).astype(np.float32)
    logits = (H @ W - 3 + 0.05 * g.normal(size=(N, C))).astype(np.float32)
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] >= 1.0  # well-separated classes: no near-ties to flip
    return z[keep], logits[keep], logits[keep].argmax(1)


SETTINGS = ExplainerSettings(
    n=5, hidden=(128, 32), n_pos=150, n_neg=800, n_test_neg=400, folds=2,
    grid={"beta": [0.3], "eta": [0.1], "q": [1.0], "lr": [3e-3], "weight_decay": [1e-6]},
    train=TrainSettings(batch_size=128, max_epochs=200, patience=10),
)


@pytest.fixture(scope="module")
def trained(planted):
    z, logits, labels = planted
    return {m: train_explainers(z, logits, labels, CATS, m, SETTINGS) for m in ("SRAE", "NN", "SAE", "CAE")}


@pytest.mark.parametrize("method", ["SRAE", "NN", "SAE"])
def test_faithful_methods_recover_the_logit(planted, trained, method):
    z, logits, _ = planted
    for c in CATS:
        e = trained[method].explainers[c]
        d = trained[method].designs[c]
        std = float(logits[d.test_idx, c].std())
        assert e.meta["F_cls_test"] >= 0.99, (method, c, e.meta)
        assert e.meta["F_reg_test"] < 0.05 * std, (method, c, e.meta, std)
        assert e.meta["samples"] == {"train_pos": 150, "train_neg": 800, "test_pos": d.counts()["test_pos"], "test_neg": 400}
        E = e.features(z[d.test_idx])
        assert E.shape[1] == 5 and (E >= 0).all()


def test_cae_and_large_alpha_lasso_are_less_faithful(planted, trained):
    z, logits, _ = planted
    for c in CATS:
        srae = trained["SRAE"].explainers[c].meta
        cae = trained["CAE"].explainers[c].meta
        assert cae["F_reg_test"] > 3 * srae["F_reg_test"]
        # Classes here are separated by a margin of 1, so a rough fit can still classify every
        # test image: F_cls may tie at 1.0; the regression error is the measurable gap.
        assert cae["F_cls_test"] <= srae["F_cls_test"]
        d = trained["SRAE"].designs[c]
        lasso = train_lasso(z, logits, d, alphas=[1.0], folds=2)
        assert lasso.meta["F_reg_test"] > 3 * srae["F_reg_test"]
        assert lasso.n_features < 64


def test_lasso_sweep_selects_fewer_dims_as_alpha_grows(planted, trained):
    z, logits, _ = planted
    rows = lasso_sweep(z, logits, trained["SRAE"].designs[0], [0.01, 0.1, 0.5, 2.0])
    counts = [r["n_selected"] for r in rows]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert rows[0]["F_reg_test"] < rows[-1]["F_reg_test"]


def test_loading_an_explainer_imports_no_training_code(trained, tmp_path):
    """docs/design.md, "Data contracts" / issue 2: a saved explainer loads and predicts without the trainer, CV or
    loss modules (and without Prefect): checked in a fresh interpreter."""
    import subprocess
    import sys

    path = trained["SRAE"].explainers[0].save(tmp_path / "srae0")
    code = ("import sys, numpy as np\n"
            "from srae.explainers import load_explainer\n"
            f"e = load_explainer({str(path)!r})\n"
            "assert np.isfinite(e.predict(np.ones((2, e.weights[0].shape[1])))).all()\n"
            "e.encoder()\n"
            "bad = sorted(m for m in ('srae.train', 'srae.cv', 'srae.losses', 'srae.fit', 'prefect') if m in sys.modules)\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_explainer_roundtrip_and_encoder_export(planted, trained, tmp_path):
    z, logits, _ = planted
    e = trained["SRAE"].explainers[0]
    path = e.save(tmp_path / "srae0")
    loaded = load_explainer(path)
    assert loaded.method == "SRAE" and loaded.category == 0 and loaded.n_features == 5
    assert loaded.meta["train_ids"] == e.meta["train_ids"] and loaded.meta["F_cls_test"] == e.meta["F_cls_test"]
    rows = z[:50]
    # weights are stored in float32: predictions agree to float32 precision
    np.testing.assert_allclose(loaded.predict(rows), e.predict(rows), rtol=1e-4, atol=1e-4)
    seq = loaded.encoder()
    assert all(type(m).__name__ in ("Linear", "ReLU") for m in seq)
    with torch.no_grad():
        feats = seq(torch.as_tensor(rows)).double().numpy()
    np.testing.assert_allclose(feats, loaded.features(rows), rtol=1e-4, atol=1e-5)
    # contributions sum to the prediction (no predictor bias by default)
    np.testing.assert_allclose(loaded.contributions(rows).sum(1), loaded.predict(rows), rtol=1e-9, atol=1e-9)
    # non-finite meta values (e.g. F_reg on an empty test set) are written as null: strict JSON
    import json

    e.meta.update(F_reg_test=float("nan"), extra=np.array([1.0, np.inf]))
    try:
        path = e.save(tmp_path / "nan")
    finally:
        del e.meta["extra"]
        e.meta["F_reg_test"] = loaded.meta["F_reg_test"]
    text = (path / "meta.json").read_text()
    meta = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in meta.json"))
    assert meta["F_reg_test"] is None and meta["extra"] == [1.0, None]


def test_lasso_sweep_weights_positives_like_train_lasso(planted, trained):
    z, logits, _ = planted
    d = trained["SRAE"].designs[0]
    for factor in (1.0, 4.0):
        row = lasso_sweep(z, logits, d, [0.1], positive_factor=factor)[0]
        ref = train_lasso(z, logits, d, [0.1], folds=1, positive_factor=factor)
        assert row["n_selected"] == ref.n_features
        assert row["F_reg_test"] == pytest.approx(ref.meta["F_reg_test"], rel=1e-9)


def test_lasso_records_whether_it_converged(planted, trained, caplog, monkeypatch):
    """A fit cut off at max_iter is flagged (meta "converged", a warning naming the category),
    not silently used; a normal fit is marked converged."""
    import srae.baselines as B

    z, logits, _ = planted
    d = trained["SRAE"].designs[0]
    ok = train_lasso(z, logits, d, [0.1], folds=1, class_name="cat0")
    assert ok.meta["converged"] is True
    real = B.fit_lasso

    def capped(*a, **kw):
        return real(*a, **{**kw, "max_iter": 1})

    monkeypatch.setattr(B, "fit_lasso", capped)
    with caplog.at_level("WARNING", logger="srae.baselines"):
        cut = train_lasso(z, logits, d, [1e-4], folds=1, class_name="cat0")
    monkeypatch.undo()
    assert cut.meta["converged"] is False
    assert any("cat0" in r.getMessage() and "max_iter" in r.getMessage() for r in caplog.records)
    assert lasso_sweep(z, logits, d, [0.1])[0]["converged"] is True


def test_explainer_inputs_and_damaged_files_are_named(planted, trained, tmp_path):
    """predict() on NaN rows returned NaN and on the wrong width failed in a matmul; a damaged
    meta.json / weights file raised JSONDecodeError / SafetensorError / KeyError."""
    from srae.errors import InputError, SraeError
    from srae.explainers import is_complete

    z, _, _ = planted
    e = trained["SRAE"].explainers[0]
    bad = z[:2].copy()
    bad[0, 3] = np.nan
    with pytest.raises(InputError, match="Z contains NaN"):
        e.predict(bad)
    with pytest.raises(InputError, match=rf"Z must be \(M, {z.shape[1]}\)"):
        e.predict(z[:2, :5])
    good = e.save(tmp_path / "e")
    for name, damage, what in (("meta.json", "{not json", "JSONDecodeError"), ("weights.safetensors", "garbage", "unreadable"),
                               ("meta.json", '{"method": "SRAE", "category": 0}', "missing entry 'layers'")):
        d = tmp_path / f"bad-{name}-{len(damage)}"
        d.mkdir()
        for f in ("meta.json", "weights.safetensors"):
            (d / f).write_bytes((good / f).read_bytes())
        (d / name).write_text(damage)
        with pytest.raises(SraeError, match=f"explainer at .*{what}"):
            load_explainer(d)
        # not done: the pipeline retrains such a category instead of failing on it
        assert is_complete(d) is (name == "weights.safetensors")
    assert is_complete(good)


def test_lasso_inputs_are_checked_before_scikit_learn(planted, trained):
    from srae.errors import InputError

    z, logits, _ = planted
    d = trained["SRAE"].designs[0]
    nan_z = z.copy()
    nan_z[d.train_idx[0], 0] = np.nan  # a row the design uses (other rows are never read)
    for args, what in (((z, logits, d, [-0.1]), "alpha -0.1"), ((nan_z, logits, d, [0.1]), "Z has 1 NaN"),
                       ((z, logits[:10], d, [0.1]), "same rows"), (([[1, "a"]], logits, d, [0.1]), "numeric")):
        with pytest.raises(InputError, match=what):
            train_lasso(*args, folds=1)
    with pytest.raises(InputError, match="alpha nan"):
        lasso_sweep(z, logits, d, [float("nan")])
    with pytest.raises(InputError, match="Z has negative values"):
        train_lasso(z - 0.5, logits, d, [0.1], folds=1)  # the ReLU'd explainer would not be the fitted model
    for folds in (0, -1, 2.5, True, len(d.train_idx) + 1):
        with pytest.raises(InputError, match="folds"):
            train_lasso(z, logits, d, [0.1], folds=folds)


def test_lasso_takes_numpy_alphas_and_says_when_max_features_cannot_hold(planted, trained, caplog):
    z, logits, _ = planted
    d = trained["SRAE"].designs[0]
    alphas = np.array([0.05, 0.5])
    a = train_lasso(z, logits, d, alphas, folds=2, seed=1)
    b = train_lasso(z, logits, d, alphas.tolist(), folds=2, seed=1)
    assert a.meta["hparams"] == b.meta["hparams"] and torch.equal(a.v, b.v)
    with caplog.at_level("WARNING", logger="srae.baselines"):
        e = train_lasso(z, logits, d, [1e-4], folds=1, max_features=0, class_name="finch")
    assert e.n_features > 0
    assert "finch: no alpha selects at most 0 dims; using the sparsest, alpha 0.0001" in caplog.text
