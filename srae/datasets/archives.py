"""Safe archive extraction: every member is checked before anything is written.

A member is refused when its path is absolute, climbs out of the target directory
(``..``), is a link whose target lies outside it, or is a device/FIFO. The whole archive
is checked first, so a refused archive leaves the target untouched.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from srae.errors import SraeError

log = logging.getLogger(__name__)


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


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Extract a tar (any compression) or zip ``archive`` into ``target``; return member names.

    Raises :class:`UnsafeArchiveError` (nothing written) when any member escapes ``target``.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, target)
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise SraeError(f"archive {archive}: not a readable tar or zip file ({exc})") from exc
    with tar:
        members = _check_tar(archive, tar, target)
        log.info("extracting %s (%d members) into %s", archive.name, len(members), target)
        # The 'data' filter repeats the checks above inside tarfile and drops odd modes.
        tar.extractall(target, members=members, filter="data")
    return [m.name for m in members]


def _extract_zip(archive: Path, target: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        links: dict[str, str] = {}
        for info in infos:
            if not _inside(target, info.filename):
                raise UnsafeArchiveError(
                    f"archive {archive}: member {info.filename!r} would be written outside {target}"
                )
            if _zip_is_symlink(info):
                link = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, target, info.filename, link, hard=False)
                links[info.filename] = link
        log.info("extracting %s (%d members) into %s", archive.name, len(infos), target)
        for info in infos:
            if info.filename in links:
                dest = target / info.filename
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.is_symlink() or dest.exists():
                    dest.unlink()
                os.symlink(links[info.filename], dest)
            else:
                zf.extract(info, target)
    return [i.filename for i in infos]
