"""Downloads against a loopback HTTP server: normal, dropped, Range-ignoring, corrupt, 404, offline.

The server runs in a daemon thread on 127.0.0.1, serves in-memory files and stops by
itself (fixture teardown, plus a watchdog timer). Nothing here touches the internet.
"""

from __future__ import annotations

import hashlib
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from srae.datasets import download as dl
from srae.datasets.archives import UnsafeArchiveError, safe_extract
from srae.datasets.download import ChecksumError, DownloadError, extract_once, fetch
from srae.errors import SraeError
from tests.conftest import tar_bytes


class _Handler(BaseHTTPRequestHandler):
    """``/<mode>/<name>``: normal | drop (first reply cut midway) | norange (drop, then Range ignored)
    | corrupt (bytes flipped) | flaky (first reply 503) | missing (404)."""

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        mode, _, name = self.path.strip("/").partition("/")
        with srv.lock:  # type: ignore[attr-defined]
            srv.requests.append((mode, name, self.headers.get("Range")))  # type: ignore[attr-defined]
            first = srv.seen.get((mode, name), 0) == 0  # type: ignore[attr-defined]
            srv.seen[(mode, name)] = srv.seen.get((mode, name), 0) + 1  # type: ignore[attr-defined]
        data = srv.files.get(name)  # type: ignore[attr-defined]
        if mode == "missing" or data is None:
            self.send_error(404, "Not Found")
            return
        if mode == "flaky" and first:
            self.send_error(503, "Service Unavailable")
            return
        if mode == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, status = 0, 200
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and mode in ("normal", "drop", "corrupt", "flaky"):
            start, status = int(match.group(1)), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if mode in ("drop", "norange") and first:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.seen, srv.lock = {}, [], {}, threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120.0, srv.shutdown)  # never outlive a hung test
    watchdog.daemon = True
    watchdog.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def payload(server) -> bytes:
    data = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    server.files["blob.bin"] = data
    return data


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/CUB_200_2011.tgz"


FAST = {"backoff": 0.0, "timeout": 5.0, "chunk_size": 16_384}


def test_normal_download_verifies_and_renames(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    out = fetch(f"{server.url}/normal/blob.bin", dest, size=len(payload), md5=_md5(payload), **FAST)
    assert out == dest and dest.read_bytes() == payload
    assert not (tmp_path / "blob.bin.part").exists()
    # A verified copy is never fetched again.
    fetch(f"{server.url}/normal/blob.bin", dest, size=len(payload), md5=_md5(payload), **FAST)
    assert len(server.requests) == 1


def test_sha256_prefix_checked(server, payload, tmp_path):
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    fetch(f"{server.url}/normal/blob.bin", tmp_path / "w.pth", sha256_prefix=prefix, **FAST)
    with pytest.raises(ChecksumError, match="sha256"):
        fetch(f"{server.url}/normal/blob.bin", tmp_path / "v.pth", sha256_prefix="00000000", **FAST)
    assert not (tmp_path / "v.pth").exists() and not (tmp_path / "v.pth.part").exists()


def test_dropped_connection_resumes_with_range(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    fetch(f"{server.url}/drop/blob.bin", dest, size=len(payload), md5=_md5(payload), retries=2, **FAST)
    assert dest.read_bytes() == payload
    assert [r[2] for r in server.requests] == [None, f"bytes={len(payload) // 2}-"]


def test_interrupted_then_resumed_is_byte_identical(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/drop/blob.bin"
    with pytest.raises(DownloadError, match="connection closed after 150,000 of 300,000 bytes"):
        fetch(url, dest, size=len(payload), md5=_md5(payload), retries=0, **FAST)
    part = tmp_path / "blob.bin.part"
    assert part.read_bytes() == payload[: len(payload) // 2] and not dest.exists()
    fetch(url, dest, size=len(payload), md5=_md5(payload), retries=0, **FAST)
    assert dest.read_bytes() == payload and not part.exists()
    assert server.requests[-1][2] == f"bytes={len(payload) // 2}-"


def test_server_ignoring_range_restarts_from_zero(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    fetch(f"{server.url}/norange/blob.bin", dest, size=len(payload), md5=_md5(payload), retries=2, **FAST)
    assert dest.read_bytes() == payload
    assert server.requests[1][2] == f"bytes={len(payload) // 2}-"  # asked to resume, got the whole file


def test_corrupt_bytes_remove_the_file_and_say_so(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError, match=rf"md5 .*expected {_md5(payload)}.*removed the bad file"):
        fetch(f"{server.url}/corrupt/blob.bin", dest, size=len(payload), md5=_md5(payload), **FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried_and_names_url_and_path(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/missing/blob.bin"
    with pytest.raises(DownloadError) as exc:
        fetch(url, dest, md5=_md5(payload), retries=3, **FAST)
    msg = str(exc.value)
    assert "HTTP 404" in msg and url in msg and str(dest) in msg and _md5(payload) in msg
    assert len(server.requests) == 1


def test_transient_503_is_retried(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    fetch(f"{server.url}/flaky/blob.bin", dest, md5=_md5(payload), retries=2, **FAST)
    assert dest.read_bytes() == payload and len(server.requests) == 2


def test_mirrors_are_tried_in_order(server, payload, tmp_path):
    urls = [f"{server.url}/missing/blob.bin", f"{server.url}/normal/blob.bin"]
    fetch(urls, tmp_path / "blob.bin", md5=_md5(payload), **FAST)
    assert [r[0] for r in server.requests] == ["missing", "normal"]


def test_offline_gives_one_clear_message(tmp_path):
    url = _closed_port_url()
    dest = tmp_path / "CUB_200_2011.tgz"
    with pytest.raises(DownloadError) as exc:
        fetch(url, dest, size=dl.CUB_SIZE, md5=dl.CUB_MD5, retries=1, **FAST)
    msg = str(exc.value)
    assert "\n" not in msg
    assert url in msg and dl.CUB_MD5 in msg and "1,150,585,339 bytes" in msg and f"place it at {dest}" in msg


def test_hand_placed_file_is_picked_up_without_network(payload, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(payload)
    assert fetch(_closed_port_url(), dest, size=len(payload), md5=_md5(payload), retries=0, **FAST) == dest


def test_hand_placed_short_copy_is_resumed_not_deleted(server, payload, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(payload[:100_000])  # an unfinished download placed by hand
    fetch(f"{server.url}/normal/blob.bin", dest, size=len(payload), md5=_md5(payload), retries=0, **FAST)
    assert dest.read_bytes() == payload and not (tmp_path / "blob.bin.part").exists()
    assert server.requests == [("normal", "blob.bin", "bytes=100000-")]


def test_hand_placed_bad_file_is_removed(payload, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(payload[:-1] + b"x")
    with pytest.raises(DownloadError, match="removed the bad copy"):
        fetch(_closed_port_url(), dest, md5=_md5(payload), retries=0, **FAST)
    assert not dest.exists()


# ---------------------------------------------------------------------------- archives
def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    return tar_bytes(members, mode)


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def test_safe_extract_normal_tgz(tmp_path):
    arc = tmp_path / "a.tgz"
    arc.write_bytes(_tar([("d/x.txt", b"hello"), ("d/sub/y.txt", b"!"), _link("d/l", "x.txt")]))
    names = safe_extract(arc, tmp_path / "out")
    assert sorted(names) == ["d/l", "d/sub/y.txt", "d/x.txt"]
    assert (tmp_path / "out/d/x.txt").read_bytes() == b"hello"
    assert (tmp_path / "out/d/l").read_bytes() == b"hello"


@pytest.mark.parametrize("member", [
    ("../evil.txt", b"x"),
    ("/tmp/abs_evil.txt", b"x"),
    ("d/../../evil.txt", b"x"),
    _link("d/esc", "../../outside"),
    _link("d/abs", "/etc/passwd"),
    _link("d/hard", "../outside", hard=True),
])
def test_safe_extract_refuses_escaping_members(tmp_path, member):
    arc = tmp_path / "bad.tar"
    arc.write_bytes(_tar([("ok.txt", b"fine"), member], mode="w"))
    with pytest.raises(UnsafeArchiveError, match="outside|absolute"):
        safe_extract(arc, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # nothing written, not even the good member


def test_safe_extract_zip(tmp_path):
    good, bad = tmp_path / "g.zip", tmp_path / "b.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("ADE/index.txt", "1")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ok.txt", "1")
        zf.writestr("../../evil.txt", "2")
    assert safe_extract(good, tmp_path / "g") == ["ADE/index.txt"]
    assert (tmp_path / "g/ADE/index.txt").read_text() == "1"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(bad, tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


def test_extract_once_skips_second_time(tmp_path):
    arc = tmp_path / "a.tgz"
    arc.write_bytes(_tar([("d/x.txt", b"1")]))
    extract_once(arc, tmp_path / "out")
    (tmp_path / "out/d/x.txt").write_bytes(b"changed")
    extract_once(arc, tmp_path / "out")
    assert (tmp_path / "out/d/x.txt").read_bytes() == b"changed"
    # a deleted dataset folder is extracted again (the marker used to say "already extracted",
    # and the reader then failed with "the archive did not contain ...")
    import shutil

    shutil.rmtree(tmp_path / "out/d")
    extract_once(arc, tmp_path / "out")
    assert (tmp_path / "out/d/x.txt").read_bytes() == b"1"


def test_download_cub_end_to_end(server, tmp_path, monkeypatch):
    tgz = _tar([("CUB_200_2011/images.txt", b"1 001.A/a.jpg\n"), ("attributes.txt", b"")])
    server.files["CUB_200_2011.tgz"] = tgz
    fake = dl.Resource("CUB_200_2011.tgz", (f"{server.url}/normal/CUB_200_2011.tgz",), md5=_md5(tgz),
                       size=len(tgz), extract=True)
    monkeypatch.setattr(dl, "CUB", fake)
    out = dl.download("cub", tmp_path, backoff=0.0, timeout=5.0)
    assert out == tmp_path / "CUB_200_2011"
    assert (out / "images.txt").read_bytes() == b"1 001.A/a.jpg\n"
    assert dl.download("cub", tmp_path) == out and len(server.requests) == 1  # verified copy reused


def test_a_repackaged_mirror_needs_and_gets_its_own_md5(server, tmp_path):
    """dataset.url / --url to a mirror whose archive is not the official file: the official
    size and md5 refuse it; dataset.md5 / --md5 names its checksum instead."""
    tgz = _tar([("CUB_200_2011/images.txt", b"1 001.A/a.jpg\n")])
    server.files["CUB_200_2011.tgz"] = tgz
    url = f"{server.url}/normal/CUB_200_2011.tgz"
    with pytest.raises(ChecksumError, match="removed the bad file"):
        dl.download("cub", tmp_path / "a", url=url, retries=0, backoff=0.0)
    with pytest.raises(ChecksumError, match=f"expected {'0' * 32}"):
        dl.download("cub", tmp_path / "b", url=url, md5="0" * 32, retries=0, backoff=0.0)
    out = dl.download("cub", tmp_path / "c", url=url, md5=_md5(tgz).upper(), retries=0, backoff=0.0)
    assert (out / "images.txt").read_bytes() == b"1 001.A/a.jpg\n"


def test_md5_settings_are_checked_before_anything_runs(tmp_path, capsys):
    from srae.cli import main
    from srae.config import config_from_dict
    from srae.errors import SraeError

    url = "http://127.0.0.1:9/CUB_200_2011.tgz"
    assert config_from_dict({"dataset": {"kind": "cub", "url": url, "md5": "AB" * 16}}).dataset.md5 == "ab" * 16
    with pytest.raises(SraeError, match="dataset.md5: .*32 hex digits"):
        config_from_dict({"dataset": {"kind": "cub", "url": url, "md5": "not-an-md5"}})
    # without a mirror it could only fail (and delete) a good official archive
    with pytest.raises(SraeError, match="dataset: md5: set only with url"):
        config_from_dict({"dataset": {"kind": "cub", "md5": "ab" * 16}})
    assert config_from_dict({"dataset": {"kind": "places", "md5": "ab" * 16}}).dataset.md5  # a hand-placed ADE20K zip
    with pytest.raises(SystemExit) as exc:
        main(["download", "cub", "--root", str(tmp_path), "--md5", "123"])
    assert exc.value.code == 2 and "--md5: '123' is not an md5" in capsys.readouterr().err
    assert main(["download", "cub", "--root", str(tmp_path), "--md5", "ab" * 16]) == 2
    assert "--md5 is for a file --url names" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was fetched


def test_ade20k_without_url_explains_registration(tmp_path):
    with pytest.raises(DownloadError, match="registration.*place it at .*ADE20K_2021_17_01.zip"):
        dl.download("ade20k", tmp_path, retries=0)


def test_vgg_weights_go_to_torch_hub(tmp_path, monkeypatch, server, payload):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert dl.torch_hub_checkpoints() == tmp_path / "th" / "hub" / "checkpoints"
    server.files["vgg19-dcbb9e9d.pth"] = payload
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setattr(dl, "VGG19", dl.Resource("vgg19-dcbb9e9d.pth", (), sha256_prefix=prefix))
    out = dl.download("vgg19", tmp_path / "ignored", url=f"{server.url}/normal/vgg19-dcbb9e9d.pth", backoff=0.0)
    assert out == tmp_path / "th/hub/checkpoints/vgg19-dcbb9e9d.pth" and out.read_bytes() == payload


def test_constants_are_the_published_ones():
    assert dl.CUB.md5 == "97eceeb196236b17998738112f37df78" and dl.CUB.size == 1_150_585_339
    assert dl.CUB.urls[0].startswith("https://data.caltech.edu/records/") and "CUB_200_2011.tgz" in dl.CUB.urls[0]
    assert dl.VGG19.urls == ("https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",)
    assert dl.VGG19.sha256_prefix == "dcbb9e9d" and dl.VGG16.sha256_prefix == "397923af"


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(SraeError, match="unknown download 'imagenet'"):
        dl.download("imagenet", tmp_path)


def test_cli_parses_download_and_synth():
    import argparse

    from srae.datasets.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download", "cub", "--root", "/data", "--retries", "2"])
    assert (args.name, args.root, args.retries, args.url) == ("cub", "/data", 2, None)
    args = parser.parse_args(["synth", "rooms", "--out", "o", "--classes", "3", "--per-class", "5", "--size", "40"])
    assert (args.kind, args.out, args.classes, args.per_class, args.size, args.seed) == ("rooms", "o", 3, 5, 40, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "imagenet"])


# ------------------------------------------------------------- chained links, corrupt archives
def _zip_symlink(zf: zipfile.ZipFile, name: str, link: str) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)  # S_IFLNK | rwx
    zf.writestr(info, link)


def _files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_zip_chained_symlinks_are_refused_and_nothing_escapes(tmp_path):
    # q -> "." and p -> "q/.." each look inside, but p resolves to the target's parent.
    arc = tmp_path / "arc" / "chain.zip"
    arc.parent.mkdir()
    with zipfile.ZipFile(arc, "w") as zf:
        _zip_symlink(zf, "q", ".")
        _zip_symlink(zf, "p", "q/..")
        zf.writestr("p/escaped.txt", "pwned")
    out = tmp_path / "box" / "out"
    with pytest.raises(UnsafeArchiveError, match=r"member 'q' is a symlink"):
        safe_extract(arc, out)
    assert _files_under(tmp_path / "box") == ["out"]  # nothing in the target, nothing beside it
    assert not list(tmp_path.rglob("escaped.txt"))


def test_tar_chained_symlinks_are_refused_and_target_untouched(tmp_path):
    arc = tmp_path / "arc" / "chain.tar"
    arc.parent.mkdir()
    arc.write_bytes(_tar([("first.txt", b"1"), _link("q", "."), _link("p", "q/.."), ("p/escaped.txt", b"x")],
                         mode="w"))
    out = tmp_path / "box" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UnsafeArchiveError, match="member 'p'") as exc:
        safe_extract(arc, out)
    assert "\n" not in str(exc.value)
    assert _files_under(tmp_path / "box") == ["out", "out/keep.txt"]
    assert not list(tmp_path.rglob("escaped.txt"))


def test_truncated_tgz_is_one_line_error_and_leaves_no_files(tmp_path):
    data = _tar([("d/a.bin", np.random.default_rng(0).bytes(200_000)), ("d/b.bin", b"x" * 50_000)])
    arc = tmp_path / "t.tgz"
    arc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SraeError, match=r"archive .*t\.tgz: corrupt or truncated") as exc:
        safe_extract(arc, tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_corrupt_zip_data_is_one_line_error_and_leaves_no_files(tmp_path):
    arc = tmp_path / "c.zip"
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("big.bin", np.random.default_rng(1).bytes(100_000))
    raw = bytearray(arc.read_bytes())
    start = raw.index(b"big.bin") + 7 + 1000  # inside big.bin's compressed data
    raw[start:start + 64] = bytes(64)
    arc.write_bytes(bytes(raw))
    with pytest.raises(SraeError, match=r"archive .*c\.zip: corrupt or truncated"):
        safe_extract(arc, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extraction_merges_into_an_existing_target_and_drops_stale_staging(tmp_path):
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    (out / "d" / "old.txt").write_text("old")
    (out / "d" / "x.txt").write_text("stale")
    stale = out / ".a.tgz.extracting-999999999"  # a pid no process has
    stale.mkdir()
    arc = tmp_path / "a.tgz"
    arc.write_bytes(_tar([("d/x.txt", b"new"), ("d/s/y.txt", b"y")]))
    safe_extract(arc, out)
    assert _files_under(out) == ["d", "d/old.txt", "d/s", "d/s/y.txt", "d/x.txt"]
    assert (out / "d/x.txt").read_text() == "new"


def test_a_saved_html_page_is_named_not_an_archive_with_what_to_do(tmp_path):
    arc = tmp_path / "ADE20K.zip.tgz"
    arc.write_bytes(b"<html><body>This link has expired</body></html>")
    with pytest.raises(SraeError, match=r"not a tar or zip file \(ReadError\); delete it to download it again") as e:
        safe_extract(arc, tmp_path / "out")
    assert "\n" not in str(e.value)
