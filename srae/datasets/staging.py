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
    on both sides and replacing files; ``src`` is removed afterwards.

    A symlink inside ``dst`` is never followed (``dst`` itself may be one: that is the
    caller's choice). Where ``src`` has a directory and ``dst`` a symlink (to a directory or
    not), merging would write wherever the link points, so this is refused with a one-line
    :class:`~srae.errors.InputError` naming the link; refusing is safer than replacing, which
    would silently delete a link the user may have placed on purpose. The whole tree is
    checked before anything moves, so a refusal leaves ``dst`` untouched. A file or a link
    in ``src`` replaces a symlink in ``dst`` (the link is removed, not written through).
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _check_merge(src, dst)
    _merge(src, dst)


def _check_merge(src: Path, dst: Path) -> None:
    """Refuse (InputError) a directory of ``src`` that would be merged through a symlink in ``dst``."""
    from srae.errors import InputError

    for entry in src.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        out = dst / entry.name
        if out.is_symlink():
            raise InputError(f"cannot merge {entry.name!r} into {dst}: {out} is a symlink, which is not followed "
                             "(remove it or move what it points to into its place, then retry)")
        if out.is_dir():
            _check_merge(entry, out)


def _merge(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        out = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and out.is_dir() and not out.is_symlink():
            _merge(entry, out)
            continue
        if out.is_symlink():
            if entry.is_dir() and not entry.is_symlink():  # checked above; the tree changed since
                from srae.errors import InputError

                raise InputError(f"cannot merge {entry.name!r} into {dst}: {out} is a symlink, which is not "
                                 "followed")
            out.unlink()
        elif out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
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
