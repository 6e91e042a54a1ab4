"""Shared machinery of the Prefect tasks: cache policy, work log, artifacts, small helpers.

Caching (docs/design.md, "Layering"): every stage task is cached with ``INPUTS + TASK_SOURCE`` and persisted
(JSON) results, **plus** :class:`StoreMarkers`, which looks at the stores the task is meant
to produce: while any of them lacks its completion marker the key is unique (never a cache
hit), so a deleted or half-written store is recomputed, never trusted from the cache. The
task bodies also check the markers before any heavy work, so the stores stay the record of
what is done even without Prefect's cache.

The work log (``<cache_dir>/work_log.jsonl``) gets one line per unit of heavy work actually
done (a category trained, a heatmap group drawn, ...). Tests read it to check that reruns
do nothing and that incremental runs do only what changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from srae.stores import temp_beside, writer_lock

log = logging.getLogger(__name__)

WORK_LOG = "work_log.jsonl"
# A second run on the same cache (overlapping schedules) waits this long for the first one's
# feature extraction or heatmaps and then reuses them, instead of failing or redoing them.
WAIT_FOR_OTHER_RUN_S = 12 * 3600.0
_LOG_LOCK = threading.Lock()


# ---------------------------------------------------------------------- cache policy
@dataclass
class StoreMarkers(CachePolicy):
    """Cache-key part from the completion state of a task's outputs.

    ``outputs(inputs) -> list[(path, done)]``. All done: the key hashes the paths (a stable
    hit from the second run on). Any not done: a fresh random key, so the task runs."""

    outputs: Callable[[dict[str, Any]], list[tuple[str, bool]]] | None = None

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if self.outputs is None:
            return None
        try:
            states = self.outputs(inputs)
        except Exception as exc:  # never let key computation fail a run: just don't hit
            log.debug("store marker check failed: %s", exc)
            return uuid.uuid4().hex
        if not all(done for _, done in states):
            return uuid.uuid4().hex
        return hash_objects(sorted(p for p, _ in states), raise_on_failure=True)


def stage_cache(outputs: Callable[[dict[str, Any]], list[tuple[str, bool]]]) -> CachePolicy:
    """``INPUTS + TASK_SOURCE + StoreMarkers(outputs)``."""
    return INPUTS + TASK_SOURCE + StoreMarkers(outputs=outputs)


TASK_DEFAULTS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


# ---------------------------------------------------------------------- work log
def record_work(cache_dir: str | Path, stage: str, key: str, seconds: float, **extra: Any) -> None:
    """Append one line to the work log: heavy work of ``stage`` for ``key`` was done."""
    path = Path(cache_dir) / WORK_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"stage": stage, "key": key, "seconds": round(seconds, 3),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}, default=str)
    with _LOG_LOCK, path.open("a") as fh:
        fh.write(line + "\n")


@contextmanager
def claimed_groups(jobs: list[dict[str, Any]], done: Callable[[dict[str, Any]], bool],
                   wait: float = WAIT_FOR_OTHER_RUN_S, what: str = "heatmaps") -> Iterator[list[dict[str, Any]]]:
    """Hold the writer locks of the heatmap groups of the ``jobs`` not ``done`` (the lock that
    drawing a group takes); yield those still not done once held. A result derived from a
    group (scores, the masking test) is thus never computed by two runs at once, nor from maps
    another run is redrawing; what the other run finished is reused."""
    todo = [j for j in jobs if not done(j)]
    with ExitStack() as locks:
        for store in sorted({str(j["heatmaps"]) for j in todo}):  # one order everywhere: no deadlock
            locks.enter_context(writer_lock(Path(store), wait, what=what))
        yield [j for j in todo if not done(j)]


def read_work_log(cache_dir: str | Path) -> list[dict[str, Any]]:
    """All work-log records (empty when nothing was ever computed). A line a killed process cut
    short is skipped."""
    path = Path(cache_dir) / WORK_LOG
    if not path.is_file():
        return []
    out = []
    for x in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(x) if x.strip() else None
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
    return out


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """``with timed() as t: ...; t()`` -> seconds since the block began."""
    t0 = time.perf_counter()
    yield lambda: time.perf_counter() - t0


# ---------------------------------------------------------------------- misc helpers
def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run, the module logger outside."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``; a
    failed write leaves ``path`` as it was and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing there after the rename


def atomic_write_parquet(df: Any, path: Path) -> None:
    """``df.to_parquet(path, index=False)`` the same way as :func:`atomic_write_text`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        df.to_parquet(tmp, index=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_device(device: str) -> str:
    """"auto" -> cuda when available, else cpu; other names checked (srae.devices.resolve_device)."""
    from srae.devices import resolve_device as resolve

    return str(resolve(device))


def short_error(exc: BaseException) -> str:
    """One line: the exception type and its first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ---------------------------------------------------------------------- artifacts
class Progress:
    """A Prefect progress artifact advanced stage by stage (no-op outside a run / on error)."""

    def __init__(self, key: str, total: float, description: str) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.id = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        except Exception as exc:
            log.debug("progress artifact unavailable: %s", exc)

    def advance(self, amount: float, description: str | None = None) -> float:
        self.done = min(self.total, self.done + amount)
        pct = 100.0 * self.done / self.total
        if self.id is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.id, progress=pct, description=description)
            except Exception as exc:
                log.debug("progress update failed: %s", exc)
        return pct


def artifact_key(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(p for p in out.split("-") if p) or "srae"


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never a user error (SraeError)."""
    from srae.errors import SraeError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # result not retrievable: treat as transient
        return True
    return not isinstance(exc, SraeError)
