"""The ``srae`` command. Each subcommand lives in its own module exposing
``register(subparsers)``; this file wires them and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from srae import __version__
from srae.errors import SraeError, Terminated

log = logging.getLogger(__name__)

# Seconds that work still running in other threads gets, after a stop, to notice it and end.
STOP_GRACE_S = 10.0

# Modules that add subcommands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "srae.run_cli",
    "srae.datasets.commands",
    "srae.features_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srae",
        description=(
            "Explain a CNN classifier with a few faithful x-features per class (SRAE), "
            "draw them as contrastive Excitation Backprop heatmaps, and score them for "
            "faithfulness, orthogonality and locality."
        ),
    )
    parser.add_argument("--version", action="version", version=f"srae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for subparser in sub.choices.values():
        # `srae run -v` as well as `srae -v run`: SUPPRESS keeps the subcommand from
        # resetting a -v given before it.
        if "-v" not in subparser._option_string_actions:
            subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="debug logging (same as srae -v)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's usage and prog name, not the top level's (`srae run X --bogus`)
        sub = next((a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)), None)
        owner = sub.choices.get(args.command) if sub is not None and args.command else None
        (owner or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    previous = _on_sigterm_raise()
    try:
        result = args.func(args)
    except (SraeError, OSError, UnicodeDecodeError) as exc:
        # SraeError is the user error proper; the others are last resorts (a file that
        # cannot be read or written), reported the same way. `srae -v` shows the traceback.
        log.debug("srae %s failed", args.command, exc_info=True)
        print(f"srae {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return _exit_status(exc)
    except Terminated as exc:
        word = "hung up" if exc.signum == getattr(signal, "SIGHUP", None) else "terminated"
        print(f"srae {args.command}: {word}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"srae {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return int(result or 0)


def _on_sigterm_raise() -> dict[int, object]:
    """Make SIGTERM and SIGHUP (a closed terminal) raise :class:`Terminated` in the main thread,
    so a pipeline's temporary server and other resources are released, and Ctrl-C raise
    KeyboardInterrupt as usual; each also asks the work running in other threads to stop
    (:mod:`srae.cancel`). Returns the previous handlers (none when handlers cannot be set
    here: not the main thread)."""
    from srae import cancel

    def handler(signum, _frame):
        cancel.request_stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    cancel.reset()  # a stop requested in an earlier command of this process is over
    previous = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is None:  # no SIGHUP on Windows
            continue
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored on purpose (nohup, a shell's background job): keep it so
            previous[signum] = signal.signal(signum, handler)
        except ValueError:
            break
    return previous


def entry() -> None:
    """The ``srae`` console command: :func:`main`, then exit with its status."""
    code = main()
    if code >= 128:  # interrupted, terminated or hung up: the last line has been printed
        _leave_after_stop(code)
    sys.exit(code)


def _leave_after_stop(code: int, grace: float | None = None) -> None:
    """End a stopped command quietly. Work in other threads that checks no stop flag (a Prefect
    task in a scikit-learn fit) may still run, and the interpreter would wait for it; its
    Prefect bookkeeping then meets the temporary API server already stopped and prints
    tracebacks after the command's last line. The exit goes on as usual (idle worker threads
    end, exit handlers run) with stdout, stderr and logging silenced, but ends the process
    after ``grace`` seconds (default :data:`STOP_GRACE_S`) whatever still runs. The stores,
    explainers and result tables are written temp-then-rename, so a kill leaves each whole or
    absent; Prefect's own result files and a work-log line being written may be cut (both
    only cost recomputation). Another signal in the meantime ends it at once."""
    seconds = STOP_GRACE_S if grace is None else grace

    def watchdog() -> None:  # the interpreter's exit joins busy threads however long they run
        time.sleep(seconds)
        try:
            _flush(sys.stdout)
        finally:
            os._exit(code)

    # first, so that nothing below (a flush into a closed or full pipe) can keep it from running
    threading.Thread(target=watchdog, name="srae-stop-watchdog", daemon=True).start()
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, lambda *_: os._exit(code))
    _flush(sys.stdout)
    _flush(sys.stderr)
    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    # stdout too: a reader that went away with the Ctrl-C (`srae run | tee log`) must not turn
    # the exit into a BrokenPipeError
    os.dup2(devnull, 1)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):  # a pipe whose reader is gone, a closed stream
        pass


def _exit_status(exc: BaseException) -> int:
    """2 for a user error (bad config, option or input: nothing or little ran); an error may
    carry its own ``exit_status`` in 1..125, e.g. 1 for a run that finished and wrote its report
    but had failed categories (``flows.pipeline.RunFailures``)."""
    code = getattr(exc, "exit_status", 2)
    return code if isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 125 else 2


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (the type name added for OS-level errors)."""
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text if isinstance(exc, SraeError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":  # pragma: no cover
    entry()
