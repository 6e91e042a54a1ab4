"""Lasso fits in parallel threads (Prefect's task runner) keep sklearn's ConvergenceWarning quiet.

``warnings.catch_warnings`` saves and restores the process-wide filters: when a second fit
entered before the first one left, the first one's exit took the filter away under the second
(whose warning then reached stderr raw), and the second one's exit put the filter back for good.
Any catch_warnings in another thread (sklearn's own input checks) did the same to a refcounted
toggle. srae now keeps one narrow filter for coordinate descent's warning, re-checked per fit.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

import srae.baselines as baselines


def _problem():
    g = np.random.default_rng(0)
    z = g.uniform(0, 1, (200, 40))
    y = z[:, :3] @ np.array([1.0, 2.0, -1.0]) + g.normal(0, 0.1, 200)
    return z, y, np.arange(200) < 50


def _convergence(seen) -> list:
    return [w for w in seen if issubclass(w.category, ConvergenceWarning)]


def test_overlapping_lasso_fits_and_a_filter_restore_elsewhere_keep_the_warning_quiet(monkeypatch):
    z, y, pos = _problem()
    real_fit = Lasso.fit
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def fit(self, *args, **kw):  # the order that broke: A in, B in, A out, B fits
        if threading.current_thread().name == "B":
            b_inside.set()
            assert a_done.wait(10)
        else:
            a_inside.set()
            assert b_inside.wait(10)
        return real_fit(self, *args, **kw)

    monkeypatch.setattr(Lasso, "fit", fit)
    out: dict[str, Lasso] = {}

    def run(name: str, max_iter: int) -> None:
        if name == "B":
            assert a_inside.wait(10)
        out[name] = baselines.fit_lasso(z, y, pos, 0.01, max_iter=max_iter)
        if name == "A":
            a_done.set()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, args=("A", 5000), name="A"),
                   threading.Thread(target=run, args=("B", 1), name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert not baselines.converged(out["B"]) and baselines.converged(out["A"])  # B did hit the warning's cause
        assert not _convergence(seen)
        # another thread's catch_warnings restored a filter list without ours: the next fit re-adds it
        ours = [f for f in warnings.filters if f[0] == "ignore" and f[2] is ConvergenceWarning]
        assert len(ours) == 1 and ours[0][3].pattern == baselines._CD_MODULE
        warnings.filters.remove(ours[0])
        monkeypatch.setattr(Lasso, "fit", real_fit)
        assert not baselines.converged(baselines.fit_lasso(z, y, pos, 0.01, max_iter=1))
        assert not _convergence(seen)
        # narrow: the same warning from elsewhere still shows, and no broad ignore was left
        warnings.warn("from elsewhere", ConvergenceWarning)
        assert [str(w.message) for w in _convergence(seen)] == ["from elsewhere"]
        assert ("ignore", None, ConvergenceWarning, None, 0) not in warnings.filters
