"""Lasso fits in parallel threads (Prefect's task runner) keep sklearn's ConvergenceWarning quiet.

``warnings.catch_warnings`` saves and restores the process-wide filters: when a second fit
entered before the first one left, the first one's exit took the filter away under the second
(whose warning then reached stderr raw), and the second one's exit put the filter back for good.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

import srae.baselines as baselines


def test_overlapping_lasso_fits_keep_convergence_warnings_quiet_and_leave_no_filter(monkeypatch):
    g = np.random.default_rng(0)
    z = g.uniform(0, 1, (200, 40))
    y = z[:, :3] @ np.array([1.0, 2.0, -1.0]) + g.normal(0, 0.1, 200)
    pos = np.arange(200) < 50
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
        assert not [w for w in seen if issubclass(w.category, ConvergenceWarning)]
        assert baselines._QUIET not in warnings.filters  # nothing left behind
        Lasso(alpha=0.01, max_iter=1).fit(z, y)  # outside the fits, sklearn warns as usual
        assert [w for w in seen if issubclass(w.category, ConvergenceWarning)]
