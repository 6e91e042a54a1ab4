"""Per-category explainers: sample design, k-fold CV over a hyperparameter grid, refit.

One call trains every category of a method together: the CV members (categories x configs x
folds) form one stacked fit, the refits (one per category, best config) another.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from srae.arrays import as_numpy
from srae.errors import InputError
from srae.explainers import Explainer
from srae.metrics.degeneracy import degeneracy_summary, n_eff
from srae.metrics.faithfulness import f_cls, f_reg
from srae.losses import balanced_weights_np
from srae.model import Architecture, method_spec
from srae.progress import ProgressLog
from srae.sampling import SampleDesign, derive_seed, design_samples, stratified_folds
from srae.train import FitResult, Member, TrainSettings, check_finite, fit_stack, stack_groups

log = logging.getLogger(__name__)

DEFAULT_GRID: dict[str, list[float]] = {
    "beta": [1.0],
    "eta": [0.1],
    "q": [1.0],
    "lr": [1e-3],
    "weight_decay": [1e-5],
}


@dataclass
class ExplainerSettings:
    """What to train per category (paper Sec. 4 defaults for CUB)."""

    n: int = 5
    hidden: tuple[int, ...] = (800, 100)
    n_pos: int = 50
    n_neg: int = 8000
    n_test_neg: int = 2000
    use_dataset_split: bool = False
    folds: int = 3
    grid: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    seed: int = 0
    max_members: int = 128  # members per stacked fit (bounds memory: ~27 MB each at D = 4096, x5 with Adam)
    refit_seeds: int = 2  # final fits per category from different inits; the best-fitting one is kept
    cv_rule: str = "best"  # "best": lowest mean CV criterion; "one_se": see select_config
    predictor_bias: bool = False  # y_bar = v . E + bias (the paper has no bias)
    # Whether members of different categories share stacks. Sharing is what makes a GPU fast; on
    # the CPU it gains little, and a multi-threaded CPU matmul or reduction may split its work by
    # stack size, so a category's explainer would depend on its neighbours in the run. None: share
    # on an accelerator only, so CPU runs reproduce category by category (for a given thread count).
    stack_categories: bool | None = None
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class TrainOutcome:
    explainers: dict[int, Explainer]
    failed: dict[int, str]
    designs: dict[int, SampleDesign]


CV_RULES = ("best", "one_se", "spread")
SPREAD_TOLERANCE = 0.1  # "spread": configs within max(1 SE, 10% of the best) count as equally faithful
# From stronger to weaker claims on the x-features (pull-away, sparse reconstruction, L2):
# "one_se" prefers larger values in this order among the configs it finds equally good.
REGULARISERS = ("eta", "beta", "lambda1", "lambda2", "lambda3", "weight_decay")


def select_config(rows: list[dict], rule: str = "best") -> dict:
    """The CV row to refit: ``rows`` have ``hparams``, ``val_criterion`` (mean over folds) and
    ``val_se`` (its standard error).

    "best" (the default) takes the lowest mean. Faithfulness alone always
    favours the weakest regularisation, so "one_se" takes, among the configs whose mean is
    within one standard error of the best, the most regularised one (largest eta, then beta,
    then the L2 weights; the lower mean breaks ties): the usual one-standard-error rule.
    "spread" (against collapse onto one x-feature) takes, among the configs within
    ``max(1 SE, 10%)`` of the best mean, the one with the largest ``val_n_eff``: the effective
    number of x-features the validation positives' contributions spread over
    (:func:`srae.metrics.degeneracy.n_eff`); the refit from several inits is kept by the same
    rule. It uses no labels beyond the class's own."""
    if rule not in CV_RULES:
        raise InputError(f"cv_rule {rule!r}: expected one of {', '.join(CV_RULES)}")
    finite = [r for r in rows if math.isfinite(r["val_criterion"])]
    if not finite:
        return rows[0]
    best = min(finite, key=lambda r: r["val_criterion"])
    if rule == "best":
        return best
    se = best.get("val_se", 0.0)
    se = se if math.isfinite(se) else 0.0
    if rule == "spread":
        limit = best["val_criterion"] + max(se, SPREAD_TOLERANCE * abs(best["val_criterion"]))
        near = [r for r in finite if r["val_criterion"] <= limit]
        return max(near, key=lambda r: (_finite_or(r.get("val_n_eff"), -math.inf), -r["val_criterion"]))
    limit = best["val_criterion"] + se
    near = [r for r in finite if r["val_criterion"] <= limit]
    return max(near, key=lambda r: (tuple(float(r["hparams"].get(k, 0.0)) for k in REGULARISERS),
                                    -r["val_criterion"]))


def _finite_or(v: Any, default: float) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else default


def checked_settings(s: ExplainerSettings) -> ExplainerSettings:
    """``s`` with its training device resolved ("auto" -> cuda or cpu); settings that would
    train nonsense or fail deep inside torch are refused, in one line each."""
    from srae.devices import resolve_device

    counts = {"n": s.n, "n_pos": s.n_pos, "n_neg": s.n_neg, "folds": s.folds, "refit_seeds": s.refit_seeds,
              "train.batch_size": s.train.batch_size, "train.max_epochs": s.train.max_epochs,
              "train.patience": s.train.patience}
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"settings.{name} = {v!r}: must be an integer >= 1")
    if isinstance(s.n_test_neg, bool) or not isinstance(s.n_test_neg, (int, np.integer)) or s.n_test_neg < 0:
        raise InputError(f"settings.n_test_neg = {s.n_test_neg!r}: must be an integer >= 0")
    if not all(isinstance(h, (int, np.integer)) and h >= 1 for h in s.hidden):
        raise InputError(f"settings.hidden = {tuple(s.hidden)!r}: layer sizes must be integers >= 1")
    if s.stack_categories is not None and not isinstance(s.stack_categories, bool):
        raise InputError(f"settings.stack_categories = {s.stack_categories!r}: expected true, false or None")
    if s.cv_rule not in CV_RULES:
        raise InputError(f"settings.cv_rule {s.cv_rule!r}: expected one of {', '.join(CV_RULES)}")
    if not (math.isfinite(s.train.positive_factor) and s.train.positive_factor > 0):
        raise InputError(f"settings.train.positive_factor = {s.train.positive_factor!r}: must be > 0")
    for key, values in s.grid.items():
        if values is None:
            continue
        vals = list(values)
        if not vals or not all(isinstance(v, (int, float, np.number)) and math.isfinite(v) and v >= 0 for v in vals):
            raise InputError(f"settings.grid[{key!r}] = {vals!r}: needs finite values >= 0 (at least one)")
        if key == "lr" and min(vals) <= 0:
            raise InputError(f"settings.grid['lr'] = {vals!r}: learning rates must be > 0")
    try:
        dev = str(resolve_device(s.train.device))
    except InputError as exc:
        raise InputError(f"settings.train.{exc}") from None
    return s if dev == s.train.device else replace(s, train=replace(s.train, device=dev))


def method_configs(method: str, grid: dict[str, list[float]]) -> list[dict[str, float]]:
    """The distinct hyperparameter configs that matter for ``method`` (grid product)."""
    keys = [k for k in method_spec(method).hparams if grid.get(k) is not None]
    values = [sorted(set(float(v) for v in grid[k])) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def stacks_categories(s: ExplainerSettings) -> bool:
    """Whether ``s`` lets members of different categories share a stack (see ``stack_categories``)."""
    from srae.devices import resolve_device

    if s.stack_categories is not None:
        return bool(s.stack_categories)
    dev = resolve_device("auto") if str(s.train.device) == "auto" else s.train.device
    try:
        return torch.device(str(dev)).type != "cpu"
    except RuntimeError:
        raise InputError(f"settings.train.device {str(dev)!r}: expected auto, cpu, cuda, cuda:N or mps") from None


def _fit_chunked(z, y, members: list[Member], method: str, arch: Architecture, s: ExplainerSettings,
                 stage: str) -> list[tuple[FitResult, int]]:
    """Fit members in stacks (shared minibatch size, at most ``max_members``, one category per
    stack unless :func:`stacks_categories`); return (result, index in its stack) per member, in
    the order of ``members``."""
    shared = stacks_categories(s)
    parts: dict[int, list[int]] = {}
    for i, m in enumerate(members):
        parts.setdefault(-1 if shared else m.category, []).append(i)
    out: list[tuple[FitResult, int] | None] = [None] * len(members)
    progress = ProgressLog(log, f"{method} {stage}", len(members), "members fitted")
    done = 0
    for part in parts.values():
        sub = [members[i] for i in part]
        for group in stack_groups(sub, s.train.batch_size, s.max_members):
            res = fit_stack(z, y, [sub[j] for j in group], method, arch, s.train)
            for k, j in enumerate(group):
                out[part[j]] = (res, k)
            done += len(group)
            progress.update(done)
    return out  # type: ignore[return-value]


def pick_refit(candidates: list[tuple[float, Explainer]], rule: str, z_pos: np.ndarray) -> tuple[float, Explainer]:
    """The refit to keep: the best training fit; under ``cv_rule: spread`` the same rule as
    the CV choice, among the fits within 10% of the best one the widest spread of
    contributions on the training positives (so one collapsed init does not undo the choice)."""
    best = min(candidates, key=lambda t: t[0])
    if rule != "spread" or len(candidates) == 1:
        return best
    near = [t for t in candidates if t[0] <= best[0] + SPREAD_TOLERANCE * abs(best[0])]
    with np.errstate(all="ignore"):
        spread = [_finite_or(n_eff(e.contributions(z_pos)), -math.inf) for _, e in near]
    return near[int(np.argmax(spread))]


def _val_n_eff(res: FitResult, b: int, method: str, member: Member, z: np.ndarray) -> float:
    """n_eff of a CV member's contributions on its validation positives (NaN without any)."""
    if member.val_idx is None or member.val_pos is None or not member.val_pos.any():
        return float("nan")
    with np.errstate(all="ignore"):
        return n_eff(_unstack(res, b, method, member.category, {}).contributions(z[member.val_idx[member.val_pos]]))


def _unstack(res: FitResult, b: int, method: str, category: int, meta: dict) -> Explainer:
    m = res.model
    zs, ys = float(res.z_scale[b]), float(res.y_scale[b])
    weights = [w[b].detach().double().cpu().clone() for w in m.enc_w]
    biases = [bb[b].detach().double().cpu().clone() for bb in m.enc_b]
    weights[0] = weights[0] / zs  # fold Z normalisation into the first layer
    v = m.v[b].detach().double().cpu() * ys
    bias = float(m.v_bias[b].detach()) * ys
    return Explainer(method, category, weights, biases, v, bias, meta)


def _least_squares_v(expl: Explainer, z: np.ndarray, y: np.ndarray, is_pos: np.ndarray, factor: float,
                     with_bias: bool = False) -> Explainer:
    """CAE: fit ``v`` (and the bias, ``with_bias``) afterwards by (balanced) weighted least
    squares so faithfulness can be scored."""
    e = expl.features(z)
    if with_bias:
        e = np.column_stack([e, np.ones(len(e))])
    w = balanced_weights_np(is_pos, factor)
    sw = np.sqrt(w)[:, None]
    v, *_ = np.linalg.lstsq(e * sw, y * sw[:, 0], rcond=None)
    if with_bias:
        v, expl.bias = v[:-1], float(v[-1])
    expl.v = torch.as_tensor(v, dtype=torch.float64)
    return expl


def _train_mse(expl: Explainer, z: np.ndarray, logits: np.ndarray, design: SampleDesign, factor: float) -> float:
    """Balanced mean squared faithfulness error on the training rows (refit selection)."""
    y = logits[design.train_idx, design.category].astype(np.float64)
    err = (expl.predict(z[design.train_idx]) - y) ** 2
    w = balanced_weights_np(design.train_pos, factor)
    return float((w * err).sum() / w.sum())


def faithfulness_summary(expl: Explainer, z: np.ndarray, logits: np.ndarray, design: SampleDesign) -> dict[str, Any]:
    """F_reg and F_cls on the train and test rows of ``design``, and how the explanation
    spreads over its x-features on the test positives (:func:`degeneracy_summary`: top_share,
    n_eff and each x-feature's share of y-hat)."""
    out: dict[str, Any] = {}
    for split, idx in (("train", design.train_idx), ("test", design.test_idx)):
        y_bar = expl.predict(z[idx])
        out[f"F_reg_{split}"] = f_reg(y_bar, logits[idx, design.category])
        out[f"F_cls_{split}"] = f_cls(y_bar, logits[idx], design.category)
    pos = design.test_idx[design.test_pos]
    spread = degeneracy_summary(expl.contributions(z[pos]), logits[pos, design.category])
    out.update({f"{k}_test": v for k, v in spread.items()})
    return out


def train_explainers(
    z: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    categories: list[int],
    method: str,
    settings: ExplainerSettings | None = None,
    *,
    image_ids: np.ndarray | None = None,
    splits: np.ndarray | None = None,
    class_names: list[str] | None = None,
    errors: str = "raise",
) -> TrainOutcome:
    """Train ``method`` (SRAE, NN, SAE or CAE) for every category in ``categories``.

    ``errors="collect"`` records a category that cannot be trained (e.g. no positives) in
    ``failed`` instead of raising, so the other categories still get explainers.
    """
    s = settings or ExplainerSettings()
    if errors not in ("raise", "collect"):
        raise InputError(f"errors {errors!r}: expected 'raise' or 'collect'")
    try:
        spec = method_spec(method)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    s = checked_settings(s)
    if isinstance(categories, (int, np.integer, str)):
        raise InputError(f"categories: expected a list of class indices, got {categories!r}")
    z = np.asarray(as_numpy(z, "Z"), dtype=np.float32)
    logits = np.asarray(as_numpy(logits, "logits"), dtype=np.float32)
    labels = as_numpy(labels, "labels")
    if z.ndim != 2 or logits.ndim != 2 or labels.ndim != 1 or len(z) != len(logits) or len(z) != len(labels):
        raise InputError(f"Z {z.shape}, logits {logits.shape} and labels {labels.shape} must share the first dim "
                         "(Z and logits 2-D, labels 1-D)")
    if image_ids is not None and np.shape(image_ids) != (len(z),):
        raise InputError(f"image_ids: shape {np.shape(image_ids)}, expected ({len(z)},)")
    if s.use_dataset_split:
        if splits is None:
            raise InputError("use_dataset_split is set, but no splits array (train/test per row) was given")
        if np.shape(splits) != (len(z),):
            raise InputError(f"splits: shape {np.shape(splits)}, expected ({len(z)},)")
    if class_names is not None and len(class_names) < logits.shape[1]:
        raise InputError(f"class_names: {len(class_names)} names for {logits.shape[1]} logit columns")
    bad = [c for c in categories if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
    if bad:
        raise InputError(f"categories: {bad[0]!r} is not a class index (int)")
    check_finite("Z", z)
    check_finite("logits", logits)
    if s.n > z.shape[1]:
        raise InputError(f"n = {s.n} x-features is larger than the Z dimension D = {z.shape[1]}")
    ids = np.asarray(image_ids) if image_ids is not None else np.arange(len(z))
    name_of = (lambda c: class_names[c]) if class_names else (lambda c: f"category {c}")

    designs: dict[int, SampleDesign] = {}
    failed: dict[int, str] = {}
    for c in categories:
        try:
            if not 0 <= c < logits.shape[1]:
                raise InputError(f"{name_of(c) if class_names and 0 <= c < len(class_names) else f'category {c}'}: "
                                 f"outside 0..{logits.shape[1] - 1}")
            designs[c] = design_samples(labels, c, n_pos=s.n_pos, n_neg=s.n_neg, n_test_neg=s.n_test_neg,
                                        seed=s.seed, splits=splits if s.use_dataset_split else None,
                                        category_name=name_of(c))
        except InputError as exc:
            if errors == "raise":
                raise
            failed[c] = str(exc)
    if not designs:
        return TrainOutcome({}, failed, designs)

    dev = s.train.device
    zt = torch.as_tensor(z, device=dev)
    yt = torch.as_tensor(logits, device=dev)
    arch = Architecture(z.shape[1], s.n, tuple(s.hidden), spec.decoder, s.predictor_bias)
    configs = method_configs(method, s.grid)
    cats = list(designs)

    # 1. k-fold CV on each category's training set over the grid.
    cv_rows: dict[int, list[dict]] = {c: [] for c in cats}
    chosen: dict[int, tuple[dict, int]] = {}
    if s.folds >= 2:
        members, keys = [], []
        for c in cats:
            d = designs[c]
            folds = stratified_folds(d.train_pos, s.folds, seed=derive_seed(s.seed, c, 999_983))
            for ci, cfg in enumerate(configs):
                for f, val_pos_idx in enumerate(folds):
                    tr = np.setdiff1d(np.arange(len(d.train_idx)), val_pos_idx)
                    # Every config of a (category, fold) starts from the same init and sees the same
                    # minibatch order (common random numbers): configs are compared on their
                    # settings, not on init luck, and a config's score does not change when the
                    # grid around it grows.
                    members.append(Member(c, d.train_idx[tr], d.train_pos[tr], cfg, seed=derive_seed(s.seed, c, f),
                                          val_idx=d.train_idx[val_pos_idx], val_pos=d.train_pos[val_pos_idx]))
                    keys.append((c, ci))
        log.info("%s: cross-validating %d members (%d categories x %d configs x %d folds)",
                 method, len(members), len(cats), len(configs), s.folds)
        fits = _fit_chunked(zt, yt, members, method, arch, s, "cross-validation")
        agg: dict[tuple[int, int], list[tuple[float, int, float]]] = {}
        for m, (c, ci), (res, b) in zip(members, keys, fits):
            spread = _val_n_eff(res, b, method, m, z) if s.cv_rule == "spread" else float("nan")
            agg.setdefault((c, ci), []).append((res.best_val[b], res.best_epoch[b], spread))
        for c in cats:
            for ci, cfg in enumerate(configs):
                vals = np.array([v for v, _, _ in agg[(c, ci)]], dtype=np.float64)
                se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
                row = {"hparams": cfg, "val_criterion": float(vals.mean()), "val_se": se,
                       "epochs": max(1, round(float(np.mean([e for _, e, _ in agg[(c, ci)]]))))}
                if s.cv_rule == "spread":
                    row["val_n_eff"] = float(np.nanmean([n for _, _, n in agg[(c, ci)]]))
                cv_rows[c].append(row)
            best = select_config(cv_rows[c], s.cv_rule)
            chosen[c] = (best["hparams"], best["epochs"])
    else:
        chosen = {c: (configs[0], s.train.max_epochs) for c in cats}

    # 2. Refit on the whole training set with the chosen config, from ``refit_seeds`` inits;
    #    keep the one that fits its training set best (a ReLU model can get stuck from one init).
    seeds = 1 if method == "CAE" else max(1, s.refit_seeds)  # CAE's v is fitted afterwards anyway
    refit = [Member(c, designs[c].train_idx, designs[c].train_pos, chosen[c][0],
                    seed=derive_seed(s.seed, c, 1_000_003 + r), epochs=chosen[c][1]) for c in cats for r in range(seeds)]
    fits = _fit_chunked(zt, yt, refit, method, arch, s, "refit")
    shared = stacks_categories(s)
    out: dict[int, Explainer] = {}
    criterion = "val_faithfulness_mse" if spec.faithfulness > 0 else "val_reconstruction_mse"
    for i, c in enumerate(cats):
        d = designs[c]
        meta = {
            "class_name": name_of(c),
            "hparams": chosen[c][0],
            "epochs": chosen[c][1],
            "cv": cv_rows[c],
            "cv_criterion": criterion,
            "cv_rule": s.cv_rule,
            "samples": d.counts(),
            "train_ids": ids[d.train_idx].tolist(),
            "test_ids": ids[d.test_idx].tolist(),
            "settings": {k: v for k, v in asdict(s).items() if k not in ("train", "grid")}
            | {"batch_size": s.train.batch_size, "positive_factor": s.train.positive_factor,
               "stack_categories": shared}  # as in effect (None: by device)
            | ({} if s.train.revive else {"revive": False}),  # recorded when off: default metas unchanged
        }
        candidates = []
        for res, b in fits[i * seeds : (i + 1) * seeds]:
            revived = int(res.revivals[b]) if res.revivals else 0
            expl = _unstack(res, b, method, c, dict(meta, curve=res.curves[b]["train"], revivals=revived))
            if method == "CAE":
                expl = _least_squares_v(expl, z[d.train_idx], logits[d.train_idx, c], d.train_pos,
                                        s.train.positive_factor, s.predictor_bias)
            bias = torch.tensor([float(expl.bias)], dtype=torch.float64)
            params = torch.cat([w.flatten() for w in expl.weights] + [expl.v.flatten(), bias])
            if bool(torch.isfinite(params).all()):
                candidates.append((_train_mse(expl, z, logits, d, s.train.positive_factor), expl))
        if not candidates:
            msg = f"{name_of(c)}: {method} training diverged (non-finite parameters); lower the learning rate"
            if errors == "raise":
                raise InputError(msg)
            failed[c] = msg
            continue
        mse, expl = pick_refit(candidates, s.cv_rule, z[d.train_idx[d.train_pos]])
        dead = expl.dead_features(z[d.train_idx])
        if dead:
            log.warning("%s: %s x-feature(s) %s fire on no training image (dead); they add nothing to "
                        "y_bar there, and reports mark them", name_of(c), method, [i + 1 for i in dead])
        expl.meta.update(faithfulness_summary(expl, z, logits, d), refit_train_mse=mse,
                         refit_candidates=[m for m, _ in candidates], dead_features=dead)
        out[c] = expl
    return TrainOutcome(out, failed, designs)
