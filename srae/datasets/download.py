"""Fetch dataset archives and pretrained weights: resumable, verified, atomic, safe to unpack.

Every file is streamed to ``<name>.part``. An interrupted transfer resumes with an HTTP
``Range`` request when the server honours it and restarts from byte 0 when it does not.
The finished file is checked (size, MD5 or SHA-256 prefix) and only then renamed into
place, so a file under its final name is always a verified one; a present verified copy
is never fetched again. Transient errors (dropped connections, timeouts, 5xx, 429) are
retried with exponential backoff; permanent ones (404, 403) are not. A checksum mismatch
removes the bad file and says so. Without network the error names the URL, the expected
checksum and the path where a hand-placed copy is picked up.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srae import __version__
from srae.datasets.archives import safe_extract
from srae.errors import SraeError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_SIZE = 1_150_585_339

PLACES_BASE = "http://data.csail.mit.edu/places/places365/"
PLACES_FILELIST_MD5 = "35a0585fee1fa656440f3ab298f8479c"  # filelist_places365-standard.tar
PLACES_CATEGORIES_MD5 = "06c963b85866bd0649f97cb43dd16673"  # categories_places365.txt inside it
PLACES_VAL_256_MD5 = "e27b17d8d44f4af9a78502beb927f808"  # val_256.tar
PLACES_TRAIN_256_MD5 = "53ca1c756c3d1e7809517cc47c5561c5"  # train_256_places365standard.tar

ADE20K_NAME = "ADE20K_2021_17_01"
ADE20K_REQUEST_PAGE = "http://groups.csail.mit.edu/vision/datasets/ADE20K/request_data/"

# torchvision's ImageNet weights; the hex in the name is the start of the file's SHA-256.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

DATASETS: tuple[str, ...] = ("cub", "places", "ade20k", "vgg16", "vgg19")


class DownloadError(SraeError):
    """A file could not be fetched; the message says how to place it by hand."""


class ChecksumError(DownloadError):
    """A fetched or hand-placed file does not match its published size/checksum."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, server hiccup)."""


class _Permanent(Exception):
    """A failure retrying cannot fix (404, 403)."""


@dataclass(frozen=True)
class Resource:
    """One file to fetch: mirrors, the checks it must pass, and whether to unpack it."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    extract: bool = False
    manual: str | None = None  # where a person gets it when there is no public URL


CUB = Resource("CUB_200_2011.tgz", (CUB_URL,), md5=CUB_MD5, size=CUB_SIZE, extract=True)
PLACES_FILELIST = Resource(
    "filelist_places365-standard.tar", (PLACES_BASE + "filelist_places365-standard.tar",),
    md5=PLACES_FILELIST_MD5, extract=True,
)
PLACES_VAL_256 = Resource("val_256.tar", (PLACES_BASE + "val_256.tar",), md5=PLACES_VAL_256_MD5, extract=True)
PLACES_TRAIN_256 = Resource(
    "train_256_places365standard.tar", (PLACES_BASE + "train_256_places365standard.tar",),
    md5=PLACES_TRAIN_256_MD5, extract=True,
)
ADE20K = Resource(
    f"{ADE20K_NAME}.zip", (), extract=True,
    manual=f"the full ADE20K release needs a (free) registration at {ADE20K_REQUEST_PAGE}",
)
VGG16 = Resource("vgg16-397923af.pth", (VGG16_URL,), sha256_prefix="397923af")
VGG19 = Resource("vgg19-dcbb9e9d.pth", (VGG19_URL,), sha256_prefix="dcbb9e9d")


# --------------------------------------------------------------------------- verification
def file_digests(path: Path, chunk_size: int = 1 << 20) -> tuple[str, str]:
    """(md5, sha256) hex digests of a file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        while buf := fh.read(chunk_size):
            md5.update(buf)
            sha.update(buf)
    return md5.hexdigest(), sha.hexdigest()


def verify_file(path: Path, *, size: int | None = None, md5: str | None = None,
                sha256_prefix: str | None = None) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the expected size and checksums."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ChecksumError(f"{path} has {actual:,} bytes, expected {size:,}")
    if md5 is None and sha256_prefix is None:
        return
    got_md5, got_sha = file_digests(path)
    if md5 is not None and got_md5 != md5.lower():
        raise ChecksumError(f"{path} has md5 {got_md5}, expected {md5}")
    if sha256_prefix is not None and not got_sha.startswith(sha256_prefix.lower()):
        raise ChecksumError(f"{path} has sha256 {got_sha[:16]}..., expected a hash starting {sha256_prefix}")


def _describe_check(size: int | None, md5: str | None, sha256_prefix: str | None) -> str:
    parts = []
    if md5:
        parts.append(f"md5 {md5}")
    if sha256_prefix:
        parts.append(f"sha256 starting {sha256_prefix}")
    if size:
        parts.append(f"{size:,} bytes")
    return ", ".join(parts) if parts else "no published checksum"


# --------------------------------------------------------------------------- transfer
def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _stream(url: str, part: Path, *, timeout: float, chunk_size: int) -> bool:
    """Append the rest of ``url`` to ``part`` (or rewrite it); True if bytes were resumed."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"srae/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            part.unlink(missing_ok=True)
            raise _Transient("server refused the resume range; restarting from byte 0") from exc
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
    with response:
        resumed = False
        if have and response.status == 206 and _content_range_start(response.headers.get("Content-Range")) == have:
            resumed = True
            log.info("resuming %s at byte %d", part.name, have)
        elif have:
            log.info("server ignored the Range request for %s; restarting from byte 0", part.name)
            have = 0
        length = response.headers.get("Content-Length")
        expected_end = have + int(length) if length and length.isdigit() else None
        written, next_report = have, have + (64 << 20)
        with open(part, "ab" if resumed else "wb") as fh:
            while buf := response.read(chunk_size):
                fh.write(buf)
                written += len(buf)
                if written >= next_report:
                    total = f" of {expected_end:,}" if expected_end else ""
                    log.info("%s: %d MiB%s bytes", part.name, written >> 20, total)
                    next_report += 64 << 20
    if expected_end is not None and written < expected_end:
        raise _Transient(f"connection closed after {written:,} of {expected_end:,} bytes")
    return resumed


_TRANSIENT = (_Transient, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def fetch(urls: str | Sequence[str], dest: Path, *, size: int | None = None, md5: str | None = None,
          sha256_prefix: str | None = None, retries: int = 4, backoff: float = 1.0,
          timeout: float = 60.0, chunk_size: int = 1 << 20, manual: str | None = None) -> Path:
    """Download ``dest`` from the first working URL of ``urls``; return ``dest``.

    A verified file already at ``dest`` (downloaded before or placed by hand) is used as is.
    ``retries`` transient failures per URL are retried after ``backoff * 2**k`` seconds.
    """
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check = {"size": size, "md5": md5, "sha256_prefix": sha256_prefix}
    notes: list[str] = []
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and not dest.is_symlink() and size is not None and dest.stat().st_size < size \
            and (not part.exists() or part.stat().st_size < dest.stat().st_size):
        # A short copy (e.g. a browser download placed by hand before it finished) is resumed
        # from where it stops; the checksum of the whole file still decides.
        log.info("%s has %d of %d bytes; resuming it", dest, dest.stat().st_size, size)
        os.replace(dest, part)
    if dest.exists():
        try:
            verify_file(dest, **check)
        except ChecksumError as exc:
            dest.unlink()
            notes.append(f"removed the bad copy ({exc})")
            log.warning("checksum mismatch: %s; removed it", exc)
        else:
            log.info("%s present and %s; skipping download", dest,
                     "verified" if md5 or sha256_prefix or size else "unverified (no published checksum)")
            return dest
    if part.exists() and size is not None and part.stat().st_size >= size:
        part.unlink()  # complete-looking leftovers are re-fetched rather than trusted
    for url in urls:
        attempt, restarted = 0, False
        while True:
            try:
                resumed = _stream(url, part, timeout=timeout, chunk_size=chunk_size)
            except _Permanent as exc:
                notes.append(f"{url}: {exc}")
                break
            except _TRANSIENT as exc:
                attempt += 1
                reason = getattr(exc, "reason", None) or exc
                if attempt > retries:
                    notes.append(f"{url}: {reason}")
                    break
                delay = backoff * 2 ** (attempt - 1)
                log.warning("%s: %s; retry %d/%d in %.1f s", url, reason, attempt, retries, delay)
                time.sleep(delay)
                continue
            try:
                verify_file(part, **check)
            except ChecksumError as exc:
                part.unlink(missing_ok=True)
                if resumed and not restarted:  # a bad splice: try one clean transfer
                    restarted = True
                    log.warning("resumed download failed its check (%s); fetching again from byte 0", exc)
                    continue
                raise ChecksumError(f"checksum mismatch for {url}: {exc}; removed the bad file") from exc
            os.replace(part, dest)
            if md5 is None and sha256_prefix is None:
                log.info("downloaded %s (sha256 %s; no published checksum to compare)", dest, file_digests(dest)[1])
            else:
                log.info("downloaded and verified %s", dest)
            return dest
    where = ", ".join(urls) if urls else "no public URL"
    how = f"; {manual}" if manual else ""
    tried = f" ({'; '.join(notes)})" if notes else ""
    if part.exists():
        tried += f" ({part.stat().st_size:,} bytes kept in {part.name}; the next try resumes from there)"
    raise DownloadError(
        f"could not download {dest.name} from {where}{tried}{how}. Without network, fetch it by hand "
        f"({_describe_check(size, md5, sha256_prefix)}) and place it at {dest}; it is picked up from there"
    )


def fetch_resource(res: Resource, directory: Path, *, url: str | None = None, md5: str | None = None,
                   **kwargs: object) -> Path:
    """Fetch one :class:`Resource` into ``directory`` (``url`` overrides its mirrors; ``md5``
    its checksum, for a mirror that is not byte-identical: the published size and sha256 are
    then not checked either)."""
    urls = (url,) if url else res.urls
    check = ({"size": None, "md5": md5, "sha256_prefix": None} if md5 else
             {"size": res.size, "md5": res.md5, "sha256_prefix": res.sha256_prefix})
    return fetch(urls, Path(directory) / res.filename, manual=res.manual, **check, **kwargs)  # type: ignore[arg-type]


def extract_once(archive: Path, target: Path) -> Path:
    """Safely unpack ``archive`` into ``target`` unless a marker says it already was and the
    archive's top-level entries are still there (a deleted dataset folder is extracted again)."""
    archive, target = Path(archive), Path(target)
    marker = target / f".{archive.name}.extracted"
    stamp = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    if marker.exists():
        first, *tops = marker.read_text().splitlines() or [""]
        if first == stamp and all((target / t).exists() for t in tops):
            log.info("%s already extracted into %s", archive.name, target)
            return target
    names = safe_extract(archive, target)
    tops = sorted({n.replace("\\", "/").strip("/").split("/")[0] for n in names} - {"", "."})
    marker.write_text("\n".join([stamp, *tops]))
    return target


# --------------------------------------------------------------------------- datasets
def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``), where torchvision looks."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def download(name: str, root: Path, *, url: str | None = None, md5: str | None = None, images: bool = False,
             **kwargs: object) -> Path:
    """Fetch and unpack dataset ``name`` under ``root``; return the directory a reader takes.

    ``cub`` -> ``root/CUB_200_2011``; ``places`` -> ``root/places365`` (categories and file
    lists; ``images=True`` adds the 256 px images); ``ade20k`` -> ``root/ADE20K_2021_17_01``
    (registration needed: pass the URL you were given, or place the zip in ``root``);
    ``vgg16``/``vgg19`` -> the torchvision checkpoint in :func:`torch_hub_checkpoints`.
    ``md5`` replaces the checksum of the file ``url`` names (see :func:`fetch_resource`).
    """
    root = Path(root)
    if name == "cub":
        archive = fetch_resource(CUB, root, url=url, md5=md5, **kwargs)
        extract_once(archive, root)
        out = root / "CUB_200_2011"
    elif name == "places":
        out = root / "places365"
        extract_once(fetch_resource(PLACES_FILELIST, out, url=url, md5=md5, **kwargs), out)
        verify_file(out / "categories_places365.txt", md5=PLACES_CATEGORIES_MD5)
        if images:
            for res in (PLACES_VAL_256, PLACES_TRAIN_256):
                extract_once(fetch_resource(res, out, **kwargs), out)
    elif name == "ade20k":
        archive = fetch_resource(ADE20K, root, url=url, md5=md5, **kwargs)
        extract_once(archive, root)
        out = root / ADE20K_NAME
    elif name in ("vgg16", "vgg19"):
        res = VGG16 if name == "vgg16" else VGG19
        out = fetch_resource(res, torch_hub_checkpoints(), url=url, md5=md5, **kwargs)
    else:
        raise SraeError(f"unknown download {name!r}; choose one of {', '.join(DATASETS)}")
    if not out.exists():
        raise DownloadError(f"{name}: the archive did not contain {out.name} (looked in {out.parent})")
    return out
