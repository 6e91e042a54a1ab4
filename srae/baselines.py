"""Non-neural baselines: Lasso feature selection on Z (paper Table 1, Table 2a/5).

Lasso's x-features are the selected Z dimensions; its explainer has the same interface as
the neural ones (encoder = one-hot selection rows, a ReLU that is the identity on Z >= 0).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from srae.cv import faithfulness_summary
from srae.errors import InputError
from srae.explainers import Explainer
from srae.losses import balanced_weights_np
from srae.sampling import SampleDesign, stratified_folds

log = logging.getLogger(__name__)

# Where sklearn's coordinate descent warns that it stopped at max_iter. srae reports that
# itself (converged(), meta.json "converged", a note in the report), so the raw warning is
# ignored in this process: one narrow, permanent filter. Toggling a filter around each fit
# is not thread-safe: Lasso fits run in parallel Prefect threads, and any
# warnings.catch_warnings in another thread (sklearn's own input checks use it) saves and
# restores the whole filter list under the fit, which let the warning through or left a
# broad filter behind for good.
_CD_MODULE = r"sklearn\.linear_model\._coordinate_descent"


def _quiet_convergence() -> None:
    """Install the narrow filter if it is not there (re-checked before every fit: a restore
    in another thread may have dropped it)."""
    for action, _msg, category, module, _line in warnings.filters:
        if action == "ignore" and category is ConvergenceWarning and getattr(module, "pattern", None) == _CD_MODULE:
            return
    warnings.filterwarnings("ignore", category=ConvergenceWarning, module=_CD_MODULE)


def fit_lasso(z: np.ndarray, y: np.ndarray, is_pos: np.ndarray, alpha: float, max_iter: int = 5000,
              positive_factor: float = 1.0) -> Lasso:
    """scikit-learn Lasso on Z with positives up-weighted to balance the classes (times ``positive_factor``).

    Whether it converged is :func:`converged`'s to say: from the first fit on, sklearn's
    coordinate-descent ConvergenceWarning is ignored in this process (a narrow filter)."""
    model = Lasso(alpha=alpha, max_iter=max_iter)
    _quiet_convergence()
    model.fit(z, y, sample_weight=balanced_weights_np(is_pos, positive_factor))
    return model


def converged(model: Lasso) -> bool:
    """Whether coordinate descent stopped on its tolerance rather than on ``max_iter``."""
    return int(np.max(model.n_iter_)) < int(model.max_iter)


def lasso_explainer(model: Lasso, category: int, meta: dict) -> Explainer:
    """An :class:`Explainer` whose x-features are the dims Lasso selected (may be zero dims)."""
    coef = np.asarray(model.coef_, dtype=np.float64)
    sel = np.flatnonzero(coef != 0)
    d = coef.shape[0]
    w = torch.zeros(len(sel), d, dtype=torch.float64)
    w[torch.arange(len(sel)), torch.as_tensor(sel)] = 1.0
    return Explainer("Lasso", category, [w], [torch.zeros(len(sel), dtype=torch.float64)],
                     torch.as_tensor(coef[sel]), float(model.intercept_), dict(meta, selected_dims=sel.tolist()))


def _checked(z, logits, design: SampleDesign, alphas) -> tuple[np.ndarray, np.ndarray, SampleDesign]:
    """The design's rows of Z and logits as float64 arrays, the design re-indexed onto them,
    and alphas > 0; else one InputError (scikit-learn would fail on these deep inside with its
    own messages). Only the rows the design uses are converted: Z of a large dataset is not
    copied whole for each category."""
    try:
        z_all, logits_all = np.asarray(z), np.asarray(logits)
    except (TypeError, ValueError) as exc:
        raise InputError(f"Lasso: Z and logits must be numeric arrays ({exc})") from None
    kinds = {a.dtype.kind for a in (z_all, logits_all)}
    if not kinds <= set("biuf"):
        raise InputError(f"Lasso: Z and logits must be numeric arrays (got dtypes {z_all.dtype}, {logits_all.dtype})")
    if z_all.ndim != 2 or logits_all.ndim != 2 or len(z_all) != len(logits_all):
        raise InputError(f"Lasso: Z {z_all.shape} and logits {logits_all.shape} must be 2-D with the same rows")
    rows = np.concatenate([design.train_idx, design.test_idx]).astype(np.int64)
    if rows.size and (rows.max() >= len(z_all) or rows.min() < 0) or not 0 <= design.category < logits_all.shape[1]:
        raise InputError(f"Lasso: the sample design (category {design.category}) does not fit Z {z_all.shape} "
                         f"and logits {logits_all.shape}")
    used, inverse = np.unique(rows, return_inverse=True)
    z, logits = z_all[used].astype(np.float64), logits_all[used].astype(np.float64)
    for name, arr in (("Z", z), ("logits", logits)):
        bad = ~np.isfinite(arr)
        if bad.any():  # rows named as in the caller's array
            first = int(used[np.argwhere(bad)[0][0]])
            raise InputError(f"{name} has {int(bad.sum())} NaN/inf values (first in row {first})")
    if z.size and z.min() < 0:
        # The explainer reads each selected dim through a ReLU (Z is post-ReLU fc6), so with
        # negative values it would not be the model that was fitted.
        raise InputError(f"Lasso: Z has negative values (min {z.min():.4g}); Lasso's x-features are Z dims "
                         "after the fc6 ReLU, so Z must be >= 0")
    alphas = list(np.ravel(alphas)) if isinstance(alphas, np.ndarray) else list(alphas)
    bad_alphas = [a for a in alphas if not (isinstance(a, (int, float, np.number)) and math.isfinite(a) and a > 0)]
    if bad_alphas:
        raise InputError(f"Lasso: alpha {bad_alphas[0]!r} must be a finite number > 0")
    n_train = len(design.train_idx)
    local = replace(design, train_idx=inverse[:n_train], test_idx=inverse[n_train:])
    return z, logits, local


def lasso_sweep(z: np.ndarray, logits: np.ndarray, design: SampleDesign, alphas: list[float], *,
                positive_factor: float = 1.0) -> list[dict]:
    """Table 2a/5: per alpha, the number of selected dims and F_reg/F_cls on train and test
    (positives weighted like :func:`train_lasso`)."""
    z, logits, design = _checked(z, logits, design, alphas)
    rows = []
    c = design.category
    for alpha in alphas:
        model = fit_lasso(z[design.train_idx], logits[design.train_idx, c], design.train_pos, alpha,
                          positive_factor=positive_factor)
        expl = lasso_explainer(model, c, {})
        rows.append({"alpha": float(alpha), "n_selected": expl.n_features, "converged": converged(model)}
                    | faithfulness_summary(expl, z, logits, design))
    return rows


def train_lasso(
    z: np.ndarray,
    logits: np.ndarray,
    design: SampleDesign,
    alphas: list[float],
    *,
    folds: int = 3,
    max_features: int | None = None,
    seed: int = 0,
    class_name: str | None = None,
    positive_factor: float = 1.0,
) -> Explainer:
    """Pick alpha by k-fold CV (balanced validation MSE) among alphas selecting at most
    ``max_features`` dims on the full training set, refit, and return the explainer."""
    if len(alphas) == 0:  # also a numpy array (np.logspace is the natural notebook input)
        raise InputError("Lasso needs at least one alpha")
    z, logits, design = _checked(z, logits, design, alphas)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 1:
        raise InputError(f"Lasso: folds {folds!r} must be an int >= 1 (1: no cross-validation)")
    if folds > len(design.train_idx):
        raise InputError(f"Lasso: {folds} folds need at least {folds} training rows, "
                         f"category {design.category} has {len(design.train_idx)}")
    c = design.category
    z_tr, y_tr, pos_tr = z[design.train_idx], logits[design.train_idx, c], design.train_pos
    cv = []
    fold_sets = stratified_folds(pos_tr, folds, seed) if folds >= 2 else []
    for alpha in sorted(set(float(a) for a in alphas)):
        full = fit_lasso(z_tr, y_tr, pos_tr, alpha, positive_factor=positive_factor)
        n_sel = int(np.count_nonzero(full.coef_))
        errs = []
        for val in fold_sets:
            tr = np.setdiff1d(np.arange(len(y_tr)), val)
            m = fit_lasso(z_tr[tr], y_tr[tr], pos_tr[tr], alpha, positive_factor=positive_factor)
            w = balanced_weights_np(pos_tr[val], positive_factor)
            errs.append(float(np.sum(w * (m.predict(z_tr[val]) - y_tr[val]) ** 2) / w.sum()))
        cv.append({"alpha": alpha, "n_selected": n_sel, "val_criterion": float(np.mean(errs)) if errs else float("nan"),
                   "model": full})
    allowed = [r for r in cv if max_features is None or r["n_selected"] <= max_features]
    if not allowed:
        allowed = [max(cv, key=lambda r: r["alpha"])]
        log.warning("%s: no alpha selects at most %d dims; using the sparsest, alpha %g with %d (add larger alphas)",
                    class_name or f"category {c}", max_features, allowed[0]["alpha"], allowed[0]["n_selected"])
    best = min(allowed, key=lambda r: r["val_criterion"] if np.isfinite(r["val_criterion"]) else -r["alpha"])
    meta = {
        "class_name": class_name or f"category {c}",
        "hparams": {"alpha": best["alpha"]},
        "cv": [{k: v for k, v in r.items() if k != "model"} for r in cv],
        "cv_criterion": "val_faithfulness_mse",
        "samples": design.counts(),
        "max_features": max_features,
    }
    meta["converged"] = converged(best["model"])
    if not meta["converged"]:
        log.warning("%s: Lasso (alpha %g) stopped at max_iter without converging; its selection may "
                    "be rough (raise max_iter or alpha)", meta["class_name"], best["alpha"])
    expl = lasso_explainer(best["model"], c, meta)
    expl.meta.update(faithfulness_summary(expl, z, logits, design), dead_features=expl.dead_features(z_tr))
    return expl
