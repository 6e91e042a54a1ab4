"""Safe archive extraction: every member is checked before anything is written.

A member is refused when its path is absolute, climbs out of the target directory
(``..``), is a link whose target lies outside it, or is a device/FIFO; zip members that
are symlinks are refused outright (the real CUB/ADE20K/Places archives have none, and a
chain of in-bounds links can still point outside). The archive is unpacked into a hidden
staging directory inside the target and moved into place only when every member was
written, so a refused, corrupt or truncated archive leaves the target untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from srae.datasets.staging import merge_into, remove_stale
from srae.errors import SraeError

log = logging.getLogger(__name__)

# Errors of a corrupt or truncated archive (raised by tarfile, zipfile, gzip/bz2/lzma, zlib).
_CORRUPT = (EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile)


class UnsafeArchiveError(SraeError):
    """An archive member would be written (or would point) outside the target directory."""


def _inside(target: Path, candidate: str) -> bool:
    """True when ``candidate`` (a path relative to ``target``) stays inside ``target``."""
    if not candidate or PurePosixPath(candidate).is_absolute() or os.path.isabs(candidate):
        return False
    if len(candidate) > 1 and candidate[1] == ":":  # Windows drive letter
        return False
    full = os.path.normpath(os.path.join(str(target), candidate))
    root = os.path.normpath(str(target))
    return full == root or full.startswith(root + os.sep)


def _check_link(archive: Path, target: Path, name: str, link: str, *, hard: bool) -> None:
    """Refuse a link whose destination resolves outside ``target``."""
    if os.path.isabs(link) or PurePosixPath(link).is_absolute():
        raise UnsafeArchiveError(f"archive {archive}: member {name!r} is a link to the absolute path {link!r}")
    # Symlinks resolve relative to their own directory; tar hard links name an archive member.
    base = "" if hard else str(PurePosixPath(name).parent)
    if not _inside(target, os.path.join(base, link)):
        raise UnsafeArchiveError(f"archive {archive}: member {name!r} links to {link!r} outside {target}")


def _check_tar(archive: Path, tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        if not _inside(target, m.name):
            raise UnsafeArchiveError(f"archive {archive}: member {m.name!r} would be written outside {target}")
        if m.issym() or m.islnk():
            _check_link(archive, target, m.name, m.linkname, hard=m.islnk())
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"archive {archive}: member {m.name!r} is a device or FIFO")
    return members


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_zip(archive: Path, infos: list[zipfile.ZipInfo], target: Path) -> None:
    for info in infos:
        if not _inside(target, info.filename):
            raise UnsafeArchiveError(f"archive {archive}: member {info.filename!r} would be written outside {target}")
        if _zip_is_symlink(info):
            raise UnsafeArchiveError(f"archive {archive}: member {info.filename!r} is a symlink "
                                     "(refused in zip archives)")


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Extract a tar (any compression) or zip ``archive`` into ``target``; return member names.

    Raises :class:`UnsafeArchiveError` when any member escapes ``target`` and
    :class:`SraeError` when the archive is corrupt or truncated; in both cases nothing is
    left in ``target`` (created if missing).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    prefix = f".{archive.name}.extracting-"
    remove_stale(target, prefix)
    staging = target / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            extract = _extract_zip if zipfile.is_zipfile(archive) else _extract_tar
            names = extract(archive, target, staging)
        except tarfile.FilterError as exc:  # tarfile's own 'data' filter caught an escape we did not
            name = getattr(exc.tarinfo, "name", "?")
            raise UnsafeArchiveError(f"archive {archive}: member {name!r} would be written or point outside "
                                     f"{target} ({type(exc).__name__})") from None
        except _CORRUPT as exc:
            raise SraeError(f"archive {archive}: corrupt or truncated ({type(exc).__name__}: {exc}); "
                            "delete it to download it again") from None
        merge_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def _progress(members: list, archive: Path):
    """Members wrapped in a progress bar (shown on a terminal; CUB is 1.1 GB, ADE20K more)."""
    from tqdm import tqdm

    return tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=None, mininterval=1.0,
                leave=False)


def _extract_tar(archive: Path, target: Path, staging: Path) -> list[str]:
    """Check every member against ``target``, then unpack into ``staging``."""
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.ReadError as exc:
        # e.g. an HTML "link expired" page saved under the archive's name
        raise SraeError(f"archive {archive}: not a tar or zip file ({type(exc).__name__}); delete it to download "
                        "it again") from None
    with tar:
        members = _check_tar(archive, tar, target)
        log.info("extracting %s (%d members) into %s", archive.name, len(members), target)
        # The 'data' filter repeats the checks above on the files as written (links chained
        # through other links included) and drops odd modes.
        tar.extractall(staging, members=_progress(members, archive), filter="data")
    return [m.name for m in members]


def _extract_zip(archive: Path, target: Path, staging: Path) -> list[str]:
    """Check every member against ``target``, then unpack into ``staging``."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_zip(archive, infos, target)
        log.info("extracting %s (%d members) into %s", archive.name, len(infos), target)
        root = os.path.realpath(staging)
        for info in _progress(infos, archive):
            # Nothing here is a link, but check what the filesystem says before each write.
            parent = os.path.dirname(os.path.realpath(os.path.join(root, info.filename)))
            if not (parent == root or parent.startswith(root + os.sep)):
                raise UnsafeArchiveError(f"archive {archive}: member {info.filename!r} would be written "
                                         f"outside {target}")
            zf.extract(info, staging)
    return [i.filename for i in infos]
