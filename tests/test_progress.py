"""Occasional progress lines for long loops (explainer training on CUB takes hours on a CPU)."""

from __future__ import annotations

import functools
import logging

import numpy as np

from srae.progress import ProgressLog


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_most_once_per_interval_with_a_remaining_time_estimate(caplog):
    clock = _Clock()
    p = ProgressLog(logging.getLogger("t"), "SRAE refit", 10, "members fitted", every=60.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        for done, now in ((1, 1030.0), (2, 1061.0), (3, 1100.0), (4, 1122.0), (10, 1500.0)):
            clock.now = now
            p.update(done, "x" if done == 4 else "")
    # 61 s for 2 of 10: 8 left at 30.5 s each = 244 s; then 122 s for 4: 6 x 30.5 s = 183 s
    assert [r.getMessage() for r in caplog.records] == [
        "SRAE refit: 2 of 10 members fitted (61 s, about 4.1 min left)",
        "SRAE refit: 4 of 10 members fitted (2.0 min, about 3.0 min left); x",
    ]


def test_nothing_before_the_first_unit_is_done_estimates_nothing(caplog):
    clock = _Clock()
    p = ProgressLog(logging.getLogger("t"), "w", 5, "steps", every=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        clock.now += 5
        p.update(0)
    assert [r.getMessage() for r in caplog.records] == ["w: 0 of 5 steps (5 s)"]


def test_explainer_training_reports_its_progress(monkeypatch, caplog):
    import srae.cv
    import srae.train
    from srae.cv import ExplainerSettings, train_explainers
    from srae.train import TrainSettings

    monkeypatch.setattr(srae.cv, "ProgressLog", functools.partial(ProgressLog, every=0.0))
    monkeypatch.setattr(srae.train, "ProgressLog", functools.partial(ProgressLog, every=0.0))
    g = np.random.default_rng(0)
    z = g.uniform(0, 1, (300, 16)).astype(np.float32)
    labels = g.integers(0, 3, 300)
    logits = (z[:, :3] * 2).astype(np.float32)
    s = ExplainerSettings(n=2, hidden=(8,), n_pos=30, n_neg=60, n_test_neg=20, folds=2, refit_seeds=1,
                          grid={"lr": [1e-2]}, train=TrainSettings(batch_size=32, max_epochs=2, patience=2))
    with caplog.at_level(logging.INFO):
        train_explainers(z, logits, labels, [0, 1, 2], "NN", s)
    lines = [r.getMessage() for r in caplog.records]
    # one category per stack on the CPU: 2 CV members each, then 1 refit member each
    assert [m.split(" (")[0] for m in lines if m.startswith("NN cross-validation:")] == [
        "NN cross-validation: 2 of 6 members fitted", "NN cross-validation: 4 of 6 members fitted"]
    assert [m.split(" (")[0] for m in lines if m.startswith("NN refit:")] == [
        "NN refit: 1 of 3 members fitted", "NN refit: 2 of 3 members fitted"]
    steps = [m for m in lines if m.startswith("NN training (2 members in one stack, class ")]
    assert [m.split(":")[0] for m in steps if ": 0 of " in m] == [
        f"NN training (2 members in one stack, class {c})" for c in (1, 2, 3)]  # CV stacks, 1-based
    assert steps[0].startswith("NN training (2 members in one stack, class 1): 0 of ")
    assert steps[0].endswith("; 2 members still training")
