"""A temporary Prefect API for one ``srae run`` when no server is configured.

Prefect's own ephemeral server is a child in the terminal's process group: Ctrl-C reaches it
too, it dies at once, and the run then spends minutes retrying a dead API before it stops
with a connection error. The server started here is the same one (Prefect's ephemeral API
app under uvicorn) in a session of its own, so Ctrl-C reaches only ``srae``, which stops the
server on its way out (interrupts, errors and SIGTERM alike).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _launch(port: int) -> subprocess.Popen:
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           # as Prefect launches its ephemeral server: no UI, the lighter ephemeral services
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(dies_with_parent(cmd), env=env, start_new_session=True, stdin=subprocess.DEVNULL)


# Run in the child before it execs the real command: on Linux ask the kernel for SIGTERM when
# the parent (this srae process) dies, even by SIGKILL, when no handler of ours can run; then
# check the parent did not die before that request took effect.
_PARENT_DEATH_BOOT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` (an absolute executable first) wrapped so that its process gets SIGTERM when
    the calling process dies (Linux; elsewhere ``cmd`` unchanged). The temporary server of a
    ``srae run`` that was killed with SIGKILL used to stay up, re-parented to init, for good."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _PARENT_DEATH_BOOT, str(os.getpid()), *cmd]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's session, SIGKILL after 10 s; never raises."""
    if proc.poll() is not None:
        return
    group = hasattr(os, "killpg")  # POSIX: the whole session; elsewhere the process itself
    try:
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate()
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


@contextmanager
def run_api(startup_timeout: float = 120.0) -> Iterator[str | None]:
    """Inside the block the flow talks to a Prefect API: the configured one (``PREFECT_API_URL``:
    a ``prefect server``, Prefect Cloud, a test harness), else a temporary local server that is
    stopped when the block exits. Yields the temporary server's URL (None when configured)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from srae.errors import SraeError

    if get_current_settings().api.url:
        yield None
        return
    proc, url = None, ""
    try:
        for _ in range(3):  # a port taken between choosing and binding: try another
            port = _free_port()
            url = f"http://127.0.0.1:{port}/api"
            log.info("starting a temporary Prefect API on %s", url)
            proc = _launch(port)
            deadline = time.monotonic() + startup_timeout
            while proc.poll() is None and time.monotonic() < deadline and not _healthy(url):
                time.sleep(0.2)
            if proc.poll() is None:
                break
        if proc is None or proc.poll() is not None or not _healthy(url):
            raise SraeError(f"the temporary Prefect API did not start within {startup_timeout:.0f} s "
                            "(set PREFECT_API_URL to use a running `prefect server start`)")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:  # with the settings still pointing at this server
                if proc.poll() is None:
                    _drain_prefect_workers()
    finally:
        if proc is not None:
            log.info("stopping the temporary Prefect API")
            _stop(proc)


def _drain_prefect_workers() -> None:
    """Send the run's queued logs and events while the server still listens (as Prefect's
    test harness does before stopping its server); stopping first leaves the workers retrying
    a dead API at exit for over a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (lambda: APILogWorker.instance().drain(), EventsWorker.drain_all):
        try:
            drain()
        except Exception as exc:  # noqa: BLE001 - best effort: losing run logs must not fail the run
            log.debug("draining Prefect's workers: %s", exc)
