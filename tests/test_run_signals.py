"""`srae run` under Ctrl-C and SIGTERM, as real subprocesses with their own temporary API.

Ctrl-C in a terminal reaches the whole foreground process group. Prefect's own ephemeral
server was in that group: it died at once, and the run then retried a dead API for minutes
before ending with a connection error. The run's server now lives in its own session: the
run stops quickly with its own message and status, stops the server, and a rerun resumes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from srae.tiny import tiny_experiment

STARTED = re.compile(r"starting a temporary Prefect API on http://127\.0\.0\.1:(\d+)/api")


def _start(cfg: Path, home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "srae.cli", "run", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: the test plays the terminal


def _wait_for(proc: subprocess.Popen, pattern: str, lines: list[str], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if pattern in line:
            return
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s"
    raise AssertionError(f"run ended before {pattern!r}:\n{''.join(lines[-20:])}")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_ctrl_c_and_sigterm_stop_the_run_and_its_server_and_a_rerun_finishes(tmp_path: Path) -> None:
    # long explainer training, so the signals land while the run works
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(tiny_experiment(tmp_path / "run", **{"explainer.max_epochs": 3000,
                                                                       "explainer.patience": 3000})))
    home = tmp_path / "prefect-home"
    for sig, code, word, group in ((signal.SIGINT, 130, "interrupted", True),
                                   (signal.SIGTERM, 143, "terminated", False)):
        proc = _start(cfg, home)
        lines: list[str] = []
        try:
            _wait_for(proc, "methods [", lines)  # the flow is past its first stages
            port = int(next(m.group(1) for m in map(STARTED.search, lines) if m))
            t0 = time.monotonic()
            if group:
                os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does
            else:
                proc.send_signal(sig)  # `kill PID`
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        lines.append(out)
        text = "".join(lines)
        assert proc.returncode == code, text[-2000:]
        assert time.monotonic() - t0 < 60, "the run took too long to stop"
        assert text.rstrip().endswith(f"srae run: {word}"), text[-500:]
        assert "Connection refused" not in text and "connection attempts failed" not in text.lower()
        assert _port_closed(port), "the temporary server outlived the run"
    # nothing lost: the rerun (short training now) reuses dataset, backbone and features,
    # completes and prints the report
    from tasks.common import read_work_log

    cache = tiny_experiment(tmp_path / "run")["cache_dir"]
    before = len(read_work_log(cache))
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(tiny_experiment(tmp_path / "run")))
    done = subprocess.run([sys.executable, "-m", "srae.cli", "run", str(short)], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
                               "PREFECT_HOME": str(home)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip().splitlines()[-1]).name == "report.html"
    redone = {r["stage"] for r in read_work_log(cache)[before:]}
    assert redone and not redone & {"dataset", "backbone", "features"}, redone


def test_the_temporary_server_dies_with_a_killed_run():
    """SIGKILL leaves no handler to run: the temporary server used to stay up, re-parented to
    init, for good. It is started so that the kernel stops it when its parent dies (Linux)."""
    from flows.server import dies_with_parent

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"p = subprocess.Popen({dies_with_parent(sleeper)!r}, start_new_session=True)\n"
         "print(p.pid, flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    child = int(parent.stdout.readline())
    try:
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as fh:  # a zombie waiting for init counts as gone
                if fh.read().split(") ")[1].startswith("Z"):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the child outlived its killed parent")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cli_running(monkeypatch, command) -> None:
    """Make ``srae.cli.main`` run ``command`` as a subcommand named "work"."""
    import argparse

    from srae import cli

    def fake_parser():
        parser = argparse.ArgumentParser(prog="srae")
        parser.add_argument("-v", "--verbose", action="store_true")
        parser.set_defaults(func=command, command="work")
        return parser

    monkeypatch.setattr(cli, "build_parser", fake_parser)


def test_sighup_stops_a_command_like_sigterm(monkeypatch, capsys):
    """Closing the terminal (SIGHUP) ends the command through the same clean-up as SIGTERM:
    the handler raises Terminated in the main thread and asks worker threads to stop."""
    from srae import cancel, cli
    from srae.errors import Terminated

    cleaned = []

    def command(_args):
        try:
            os.kill(os.getpid(), signal.SIGHUP)  # handled in this (main) thread
            time.sleep(5)
        finally:
            cleaned.append(cancel.stop_requested())
        return 0

    _cli_running(monkeypatch, command)
    before = signal.getsignal(signal.SIGHUP)
    try:
        t0 = time.monotonic()
        assert cli.main([]) == 129 and time.monotonic() - t0 < 4
    finally:
        cancel.reset()
    assert cleaned == [True]  # finally blocks ran, with the stop requested for other threads
    assert capsys.readouterr().err.strip().splitlines()[-1] == "srae work: hung up"
    assert signal.getsignal(signal.SIGHUP) is before  # handlers restored
    assert issubclass(Terminated, KeyboardInterrupt)


def test_ignored_signals_stay_ignored_and_an_old_stop_request_is_cleared(monkeypatch, capsys):
    """`nohup srae run` (SIGHUP ignored) must survive a closed terminal; a stop requested by an
    earlier interrupted command in the same process must not stop the next one."""
    from srae import cancel, cli

    seen = []

    def command(_args):
        seen.append(cancel.stop_requested())
        os.kill(os.getpid(), signal.SIGHUP)  # ignored: the command goes on
        time.sleep(0.05)
        return 0

    _cli_running(monkeypatch, command)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cancel.request_stop()  # left over from an earlier interrupted command
        assert cli.main([]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
        cancel.reset()
    assert seen == [False]


_STOPPED = """
import logging, sys, threading, time
from srae import cli

def late(seconds):
    time.sleep(seconds)
    print("late noise on stderr", file=sys.stderr, flush=True)
    logging.getLogger("prefect.events").error("late noise in the log")

logging.basicConfig()
cli.STOP_GRACE_S = 1.0
threading.Thread(target=late, args=(float(sys.argv[1]),)).start()

def stopped(argv=None):
    print("srae run: interrupted", file=sys.stderr, flush=True)
    return 130

cli.main = stopped
cli.entry()
"""


def test_a_stopped_command_ends_on_its_own_last_line():
    """Ctrl-C twice in a demo run: a Lasso task thread (it checks no stop flag) finished after
    the command had printed "interrupted", and its Prefect events, meeting the stopped API,
    printed a wall of tracebacks; the interpreter also waited for such threads however long
    they ran. Now: silent grace period, then the process ends."""
    for thread_runs in (0.3, 60.0):  # a thread that ends within the grace period, one that does not
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", _STOPPED, str(thread_runs)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 130, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "srae run: interrupted", done.stderr
        assert "late noise" not in done.stderr + done.stdout
        assert time.monotonic() - t0 < 30  # not the 60 s the thread would run
