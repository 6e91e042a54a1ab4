"""Cooperative stop for long loops when the command is interrupted.

Ctrl-C and SIGTERM raise in the main thread only; the pipeline's work runs in Prefect's
worker threads, and Python waits for those threads before it exits, so an interrupted
``srae run`` used to stop only when the running training task had finished (minutes). The
CLI's signal handlers call :func:`request_stop`; the long loops (explainer training, backbone
fit, feature extraction, heatmaps, scoring) call :func:`check` once per step and end with
:class:`Stopped`. Nothing finished is lost: every store resumes or is rebuilt on the next run.
"""

from __future__ import annotations

import threading

from srae.errors import SraeError

# One flag per process: a signal stops the whole process. Set only by request_stop (the CLI's
# signal handlers) and cleared by reset (tests, or a library user continuing after a stop).
_STOP = threading.Event()


class Stopped(SraeError):
    """The command was interrupted while this work ran."""


def request_stop() -> None:
    """Ask every long loop of this process to stop at its next step."""
    _STOP.set()


def reset() -> None:
    """Clear a stop request (a process that keeps going after an interrupted command)."""
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def check(what: str) -> None:
    """Raise :class:`Stopped` (naming ``what``) when a stop was requested."""
    if _STOP.is_set():
        raise Stopped(f"{what}: stopped (the command was interrupted)")
