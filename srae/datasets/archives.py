"""Safe archive extraction: every member is checked before anything is written.

The checks model what the target directory will hold: the directory as it is on disk
(earlier archives included; Places unpacks several into one folder) overlaid, in member
order, with what the archive creates. Against that model a member is refused
(:class:`UnsafeArchiveError`, an :class:`~srae.errors.InputError` with one line naming the
archive and the member) when

* its path is absolute or has a ``..`` component (a ``..`` in a path that escapes says
  "outside"; any other ``..`` could pass through a link, so it is refused too);
* a directory on its path is a symlink (on disk or created by an earlier member) or not a
  directory: nothing is ever written through a link;
* it is a symlink whose target, resolved component by component through the links that
  exist on disk or were created earlier (chains included), leaves the target, is absolute,
  loops, or has a ``..`` after a component that does not exist yet (a later member could
  make that component a link and move the ``..``);
* it would replace an existing symlink (unless it is the same link again), replace a
  directory with a non-directory, or replace a file with a directory or a link; so a link,
  once checked, keeps its meaning;
* it is a hard link whose target is not a regular file extracted earlier from the same
  archive (path checked like a member path: no links, no ``..``);
* it is a device or FIFO, or a zip member flagged as a symlink (``S_IFLNK`` in
  ``external_attr``): :mod:`zipfile` would write the link text as a plain file, which is
  not what the archive means, and the CUB/ADE20K/Places zips have none.

The archive is unpacked into a hidden staging directory inside the target and moved into
place (:func:`~srae.datasets.staging.merge_into`, which never follows a symlink in the
target either) only when every member was written, so a refused, corrupt or truncated
archive leaves the target untouched. tarfile's ``data`` filter repeats its own checks on
what is written, as a second line of defence.
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
from srae.errors import InputError, SraeError

log = logging.getLogger(__name__)

# Errors of a corrupt or truncated archive (raised by tarfile, zipfile, gzip/bz2/lzma, zlib).
_CORRUPT = (EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile)

# Kinds of entries in the model of the target.
_DIR, _FILE, _LINK, _HARD, _OTHER = "directory", "file", "symlink", "hard link", "special file"
_MAX_HOPS = 40  # symlinks followed while resolving one target, as Linux allows


class UnsafeArchiveError(InputError):
    """An archive member would be written (or would point) outside the target directory,
    or through or over a link."""


class _Refused(Exception):
    """Why a member is refused; :class:`_Tree` users turn it into :class:`UnsafeArchiveError`."""


def _is_absolute(path: str) -> bool:
    return (PurePosixPath(path).is_absolute() or os.path.isabs(path)
            or (len(path) > 1 and path[1] == ":"))  # Windows drive letter


def _parts(path: str, target: Path, subject: str = "is") -> list[str]:
    """Components of a member path (or a hard link's source), relative to ``target``."""
    if _is_absolute(path):
        raise _Refused(f"{subject} the absolute path {path!r}, outside {target}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        depth = 0
        for p in parts:
            depth += -1 if p == ".." else 1
            if depth < 0:
                raise _Refused(f"{subject} {path!r}, outside {target}")
        raise _Refused(f"{subject} {path!r}, which has a '..' component (refused: it could pass through a link)")
    return parts


class _Tree:
    """The target directory as it will be: what is on disk, overlaid with the members
    checked so far, in archive order. Nothing here writes."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.added: dict[str, tuple[str, str | None]] = {"": (_DIR, None)}
        self.disk: dict[str, tuple[str, str | None] | None] = {}
        self.fresh: set[str] = set()  # directories the archive creates that are not on disk

    def entry(self, key: str) -> tuple[str, str | None] | None:
        """(kind, link text) at ``key`` ("a/b"; every parent a real directory), None if absent."""
        found = self.added.get(key)
        if found is not None:
            return found
        if key in self.disk:
            return self.disk[key]
        if key.rpartition("/")[0] in self.fresh:
            return None  # nothing on disk below a directory that is not there (saves an lstat)
        path = os.path.join(self.target, key)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            found = None
        except OSError:
            found = (_OTHER, None)
        else:
            if stat.S_ISLNK(st.st_mode):
                found = (_LINK, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found = (_DIR, None)
            elif stat.S_ISREG(st.st_mode):
                found = (_FILE, None)
            else:
                found = (_OTHER, None)
        self.disk[key] = found
        return found

    def resolve(self, base: list[str], link: str, hops: list[int]) -> tuple[list[str], bool]:
        """Where symlink text ``link`` in directory ``base`` leads, following every link on the
        way (on disk or added): (its components, True when a component on the way does not
        exist or is not a directory). Raises :class:`_Refused` (a reason) when it leaves."""
        if _is_absolute(link):
            raise _Refused(f"is an absolute path, outside {self.target}")
        cur, dead = list(base), False
        for comp in link.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if dead:  # a later member could make that component a link and move the '..'
                    raise _Refused(f"has a '..' after {'/'.join(cur)!r}, which is not a directory (yet)")
                if not cur:
                    raise _Refused(f"leads outside {self.target}")
                cur.pop()
                continue
            cur.append(comp)
            if dead:
                continue
            found = self.entry("/".join(cur))
            if found is None or found[0] not in (_DIR, _LINK):
                dead = True
            elif found[0] == _LINK:
                hops[0] += 1
                if hops[0] > _MAX_HOPS:
                    raise _Refused("is a symlink loop")
                cur, dead = self.resolve(cur[:-1], str(found[1]), hops)
        return cur, dead

    def _parents(self, parts: list[str]) -> None:
        """Every directory above ``parts`` must be a real directory or absent (then tar and
        zip create it, and so does the tree)."""
        parent = "/".join(parts[:-1])
        if (self.added.get(parent) or self.disk.get(parent)) == (_DIR, None):
            return  # checked for an earlier member, and a directory never turns into anything else
        for i in range(1, len(parts)):
            key = "/".join(parts[:i])
            found = self.entry(key)
            if found is None:
                self.added[key] = (_DIR, None)
                self.fresh.add(key)
            elif found[0] == _LINK:
                raise _Refused(f"would be written through the symlink {key!r}")
            elif found[0] != _DIR:
                raise _Refused(f"would be written below {key!r}, which is a {found[0]}")

    def add(self, name: str, kind: str, link: str | None = None) -> None:
        """Check member ``name`` of ``kind`` (``_DIR``, ``_FILE``, ``_LINK`` to ``link``, or
        ``_HARD``: a hard link to archive member ``link``) against the tree, then record it."""
        parts = _parts(name, self.target)
        if not parts:
            if kind == _DIR:
                return
            raise _Refused("names the target directory itself")
        self._parents(parts)
        key = "/".join(parts)
        found = self.entry(key)
        if found is not None and not (found[0] == kind == _DIR
                                      or found[0] == _FILE and kind == _FILE
                                      or found[0] == _FILE and kind == _HARD and key not in self.added
                                      or found[0] == kind == _LINK and found[1] == link):
            raise _Refused(f"would replace the {found[0]} {key!r} with a {kind}")
        if kind == _HARD:
            source = _parts(str(link), self.target, "is a hard link to")
            keys = ["/".join(source[:i]) for i in range(1, len(source) + 1)]
            if not source or any(self.entry(k) != (_DIR, None) for k in keys[:-1]) \
                    or self.added.get(keys[-1]) != (_FILE, None):
                raise _Refused(f"is a hard link to {link!r}, which is not a regular file extracted earlier "
                               "(or is reached through a link)")
            kind = _FILE
        elif kind == _LINK:
            try:
                self.resolve(parts[:-1], str(link), [0])
            except _Refused as exc:
                raise _Refused(f"links to {link!r}, which {exc}") from None
        if found is None and kind == _DIR:
            self.fresh.add(key)
        self.added[key] = (kind, link if kind == _LINK else None)


def _refuse(archive: Path, name: str, exc: _Refused) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"archive {archive}: member {name!r} {exc}")


def _check_tar(archive: Path, tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    tree = _Tree(target)
    for m in members:
        try:
            if m.issym():
                tree.add(m.name, _LINK, m.linkname)
            elif m.islnk():
                tree.add(m.name, _HARD, m.linkname)
            elif m.isdir():
                tree.add(m.name, _DIR)
            elif m.isfile():
                tree.add(m.name, _FILE)
            else:
                raise _Refused("is a device or FIFO")
        except _Refused as exc:
            raise _refuse(archive, m.name, exc) from None
    return members


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_zip(archive: Path, infos: list[zipfile.ZipInfo], target: Path) -> None:
    tree = _Tree(target)
    for info in infos:
        try:
            if _zip_is_symlink(info):
                raise _Refused("is a symlink (refused in zip archives: zipfile would write its text as a file)")
            tree.add(info.filename, _DIR if info.is_dir() else _FILE)
        except _Refused as exc:
            raise _refuse(archive, info.filename, exc) from None


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Extract a tar (any compression) or zip ``archive`` into ``target``; return member names.

    Raises :class:`UnsafeArchiveError` (an :class:`~srae.errors.InputError`) when any member
    escapes ``target`` or would be written through or over a link (see the module
    docstring), and :class:`SraeError` when the archive is corrupt or truncated; in both
    cases nothing is left in ``target`` (created if missing).
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
            # Nothing in staging is a link (zip symlinks are refused), but check what the
            # filesystem says before each write.
            parent = os.path.dirname(os.path.realpath(os.path.join(root, info.filename)))
            if not (parent == root or parent.startswith(root + os.sep)):
                raise UnsafeArchiveError(f"archive {archive}: member {info.filename!r} would be written "
                                         f"outside {target}")
            zf.extract(info, staging)
    return [i.filename for i in infos]
