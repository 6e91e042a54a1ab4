"""Temporary directories that are written in full and only then moved into place.

Dataset generation and archive extraction both write into a hidden sibling named
``<prefix><pid>`` and publish it on success. A run killed before it could clean up
leaves such a directory behind; :func:`remove_stale` deletes the ones whose process is
gone, so the next run starts clean without touching a concurrent live run's directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """True when a process with id ``pid`` exists (signal 0 probes without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Delete ``parent/<prefix><pid>`` entries left by processes that no longer run.

    The current process's own entry and those of live processes are kept. Returns what
    was removed.
    """
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        suffix = entry.name[len(prefix):]
        pid = int(suffix) if suffix.isdigit() else -1
        if pid == os.getpid() or pid_alive(pid):
            continue
        log.info("removing %s left by an interrupted run", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def merge_into(src: Path, dst: Path) -> None:
    """Move every entry of directory ``src`` into ``dst``, merging directories that exist
    on both sides and replacing files; ``src`` is removed afterwards."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        out = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and out.is_dir():
            merge_into(entry, out)
            continue
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        shutil.move(str(entry), str(out))
    src.rmdir()


def ensure_directory(path: Path, what: str) -> None:
    """Create directory ``path`` (and parents); a file in the way, or a directory that cannot
    be created, is a one-line :class:`InputError` naming ``what``."""
    from srae.errors import InputError

    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what}: cannot create {path} ({exc.strerror or exc})") from None
