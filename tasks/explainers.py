"""Stage 4: per-category explainers (SRAE, NN, SAE, CAE, Lasso), one task per category group.

A task trains one method for a group of categories (the lead's batched trainer fits them
together). Each category's explainer lands in its own directory
(:func:`srae.explainers.explainer_dir`: feature fingerprint / method / settings hash /
category) and a category whose directory is complete is never trained again. A category
that cannot be trained is returned in ``failed``; it never sinks the others.

``settings`` holds only what the method depends on (its grid axes, sizes, sample counts,
seed), so changing e.g. SRAE's ``eta`` leaves NN, SAE, CAE and Lasso untouched.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from srae.config import ExplainerConfig
from srae.errors import SraeError
from srae.stores import writer_lock
from tasks.common import (TASK_DEFAULTS, WAIT_FOR_OTHER_RUN_S, record_work, resolve_device, run_logger, short_error,
                          stage_cache, timed)

SAMPLE_KEYS = ("n_pos", "n_neg", "n_test_neg", "use_dataset_split", "seed")


def method_settings(x: ExplainerConfig, method: str) -> list[dict[str, Any]]:
    """The settings dicts (one per explainer variant) that ``method``'s explainers depend on.

    Neural methods: one dict. Lasso: the headline variant (a fixed ``lasso_alpha``, or CV
    over ``lasso_alphas`` limited to ``n`` selected dims), then one per sweep alpha."""
    common = {k: getattr(x, k) for k in SAMPLE_KEYS}
    if method == "Lasso":
        common["positive_factor"] = x.positive_factor
        if x.lasso_alpha is not None:
            head = dict(common, alpha=float(x.lasso_alpha), sweep=False)
        else:
            head = dict(common, alphas=sorted(float(a) for a in x.lasso_alphas), max_features=x.n,
                        folds=x.folds, sweep=False)
        return [head] + [dict(common, alpha=float(a), sweep=True) for a in x.lasso_alphas]
    from srae.model import method_spec

    keys = method_spec(method).hparams
    # unset axes (the per-term lambdas by default) stay out, so they change no cache key
    grid = {k: list(getattr(x.grid, k)) for k in keys if getattr(x.grid, k) is not None}
    # cv_rule only when not the default, so existing explainer directories keep their keys
    rule = {} if x.cv_rule == "best" else {"cv_rule": x.cv_rule}
    if x.predictor_bias:  # likewise only when on
        rule["predictor_bias"] = True
    if not x.revive:  # likewise only when off
        rule["revive"] = False
    return [dict(common, n=x.n, hidden=list(x.hidden), folds=x.folds, grid=grid, max_epochs=x.max_epochs,
                 patience=x.patience, batch_size=x.batch_size, positive_factor=x.positive_factor,
                 refit_seeds=x.refit_seeds, **rule)]


def _dir_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What names the directory: everything but the sweep flag (a sweep alpha may become headline)."""
    return {k: v for k, v in settings.items() if k != "sweep"}


def shared_variants(variants: list[dict[str, Any]]) -> dict[int, int]:
    """``{i: j}`` for each variant ``i`` whose explainers are those of an earlier variant ``j``.

    A fixed ``lasso_alpha`` that is also a sweep alpha (configs/cub.yaml) names the same
    directories as that sweep variant: the flow trains it once (variant ``j``) and reports the
    result under both settings, so its rows stay headline (sweep=False) and sweep (sweep=True)."""
    from srae.explainers import hparams_key

    first: dict[str, int] = {}
    out: dict[int, int] = {}
    for i, settings in enumerate(variants):
        key = hparams_key(_dir_settings(settings))
        if key in first:
            out[i] = first[key]
        else:
            first[key] = i
    return out


def row_hparams(method: str, settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``hparams`` of an explainer's metric rows: the CV-chosen values; Lasso adds the sweep flag."""
    hp = dict(meta.get("hparams", {}))
    if method == "Lasso":
        hp = {"alpha": hp.get("alpha", settings.get("alpha")), "sweep": bool(settings.get("sweep", False))}
    return hp


def explainer_path(out_root: str, features_fp: str, method: str, settings: dict[str, Any], category: int) -> Path:
    from srae.explainers import explainer_dir

    return explainer_dir(Path(out_root), features_fp, method, _dir_settings(settings), int(category))


@functools.lru_cache(maxsize=2)
def _feature_set(path: str):
    from srae.features import open_features

    return open_features(path)


def load_feature_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(z, logits, labels, image_id) of a feature store (valid rows), memoised per process."""
    fs = _feature_set(str(path))
    return fs.z, fs.logits, fs.labels, fs.image_id


def feature_splits(path: str) -> np.ndarray:
    """The dataset split ("train"/"test") of each row of :func:`load_feature_arrays`."""
    return _feature_set(str(path)).split


def category_design(labels: np.ndarray, category: int, settings: dict[str, Any],
                    splits: np.ndarray | None = None, name: str | None = None):
    """The sample design every method shares for ``category`` (same seed, same rows)."""
    from srae.sampling import design_samples

    return design_samples(labels, int(category), n_pos=settings["n_pos"], n_neg=settings["n_neg"],
                          n_test_neg=settings["n_test_neg"], seed=settings["seed"],
                          splits=splits if settings.get("use_dataset_split") else None, category_name=name)


def _outputs(inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    from srae.explainers import is_complete

    out = []
    for c in inputs["categories"]:
        d = explainer_path(inputs["out_root"], inputs["features"]["fingerprint"], inputs["method"],
                           inputs["settings"], c)
        out.append((str(d), is_complete(d)))
    return out


def _train_neural(method, cats, settings, z, logits, labels, ids, splits, names, device, stack_categories=None):
    from srae.cv import ExplainerSettings, train_explainers
    from srae.train import TrainSettings

    s = ExplainerSettings(
        n=settings["n"], hidden=tuple(settings["hidden"]), n_pos=settings["n_pos"], n_neg=settings["n_neg"],
        n_test_neg=settings["n_test_neg"], use_dataset_split=settings["use_dataset_split"],
        folds=settings["folds"], grid=settings["grid"], seed=settings["seed"],
        refit_seeds=settings.get("refit_seeds", 2), cv_rule=settings.get("cv_rule", "best"),
        predictor_bias=bool(settings.get("predictor_bias", False)), stack_categories=stack_categories,
        train=TrainSettings(batch_size=settings["batch_size"], max_epochs=settings["max_epochs"],
                            patience=settings["patience"], positive_factor=settings["positive_factor"],
                            revive=bool(settings.get("revive", True)), device=device))
    res = train_explainers(z, logits, labels, cats, method, s, image_ids=ids, splits=splits,
                           class_names=names, errors="collect")
    return res.explainers, dict(res.failed)


def _train_lasso(cats, settings, z, logits, labels, ids, splits, names):
    from srae.baselines import train_lasso

    out, failed = {}, {}
    for c in cats:
        try:
            d = category_design(labels, c, settings, splits, names[c] if names else None)
            if "alphas" in settings:  # headline: CV over the alphas, at most max_features dims
                expl = train_lasso(z, logits, d, settings["alphas"], folds=settings["folds"],
                                   max_features=settings["max_features"], seed=settings["seed"],
                                   class_name=names[c] if names else None,
                                   positive_factor=settings.get("positive_factor", 1.0))
            else:
                expl = train_lasso(z, logits, d, [settings["alpha"]], folds=1, seed=settings["seed"],
                                   class_name=names[c] if names else None,
                                   positive_factor=settings.get("positive_factor", 1.0))
            expl.meta.update(train_ids=ids[d.train_idx].tolist(), test_ids=ids[d.test_idx].tolist())
            out[c] = expl
        except Exception as exc:  # one category's failure must not stop the others
            failed[c] = short_error(exc)
    return out, failed


@task(name="explainers", cache_policy=stage_cache(_outputs), **TASK_DEFAULTS)
def train_explainer_group(method: str, categories: list[int], settings: dict[str, Any],
                          features: dict[str, Any], dataset: dict[str, Any], out_root: str,
                          cache_dir: str, device: str = "auto",
                          stack_categories: bool | None = None) -> dict[str, Any]:
    """Train ``method`` for the not-yet-done ``categories``; return dirs and failures.

    ``stack_categories``: see :class:`srae.cv.ExplainerSettings` (None: share stacks on a GPU only)."""
    from srae.explainers import is_complete

    logger = run_logger()
    dirs = {c: explainer_path(out_root, features["fingerprint"], method, settings, c) for c in categories}
    todo = [c for c in categories if not is_complete(dirs[c])]
    with contextlib.ExitStack() as locks:
        # Another run training the same categories (overlapping schedules on one cache) is
        # waited for, and what it finished is reused rather than trained a second time.
        for c in sorted(todo):
            dirs[c].parent.mkdir(parents=True, exist_ok=True)
            locks.enter_context(writer_lock(dirs[c], WAIT_FOR_OTHER_RUN_S, what=f"{method} explainer"))
        todo = [c for c in todo if not is_complete(dirs[c])]
        failed = _train_and_save(method, todo, dirs, settings, features, dataset, cache_dir, device,
                                 stack_categories)
    variant = (f" alpha {settings['alpha']:g}" if "alpha" in settings
               else " (alpha by CV)" if method == "Lasso" else "")
    logger.info("%s%s: trained %d, failed %d, reused %d", method, variant, len(todo) - len(failed), len(failed),
                len(categories) - len(todo))
    return {"method": method, "settings": settings,
            "explainers": {str(c): str(d) for c, d in dirs.items() if is_complete(d)},
            "failed": {str(c): msg for c, msg in failed.items()}}


def _train_and_save(method: str, todo: list[int], dirs: dict[int, Path], settings: dict[str, Any],
                    features: dict[str, Any], dataset: dict[str, Any], cache_dir: str,
                    device: str, stack_categories: bool | None = None) -> dict[int, str]:
    """Train ``method`` for ``todo`` and save each explainer; returns {category: error}."""
    failed: dict[int, str] = {}
    if todo:
        z, logits, labels, ids = load_feature_arrays(features["path"])
        names = list(dataset.get("class_names") or [])
        splits = feature_splits(features["path"]) if settings.get("use_dataset_split") else None
        with timed() as t:
            try:
                if method == "Lasso":
                    trained, failed = _train_lasso(todo, settings, z, logits, labels, ids, splits, names)
                else:
                    trained, failed = _train_neural(method, todo, settings, z, logits, labels, ids, splits, names,
                                                    resolve_device(device), stack_categories)
            except SraeError as exc:
                trained, failed = {}, {c: str(exc) for c in todo}
            seconds = t()
        for c, expl in trained.items():
            expl.meta.setdefault("settings_key", _dir_settings(settings))
            expl.save(dirs[c])
            record_work(cache_dir, "explainers", f"{method}/{c}", seconds / max(1, len(trained)),
                        method=method, category=int(c), alpha=settings.get("alpha"))
    return failed
