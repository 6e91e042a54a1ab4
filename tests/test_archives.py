"""Archive extraction against links: chains resolved through what exists on disk and what the
archive creates, nothing written through a link, merge_into never following a symlink.

Everything is built with tarfile/zipfile in tmp_path; a file "outside" the extraction root
stands in for /etc/hostname. No network.
"""

from __future__ import annotations

import os
import tarfile
import zipfile

import pytest

from srae.datasets.archives import UnsafeArchiveError, safe_extract
from srae.datasets.staging import merge_into
from srae.errors import InputError
from tests.conftest import tar_bytes


def _tar(path, members, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members, mode))
    return path


def _sym(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hard(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _zip_symlink(zf, name, link):
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK | rwx
    zf.writestr(info, link)


def _tree(path):
    """Every entry under path (links not followed), with link targets."""
    out = []
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, path)
            out.append(f"{rel} -> {os.readlink(p)}" if os.path.islink(p) else rel)
    return sorted(out)


@pytest.fixture
def box(tmp_path):
    """tmp_path/secret.txt outside, tmp_path/box/out the target (with a file of the user's)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    out = tmp_path / "box" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    return secret, out


def _assert_untouched(tmp_path, secret, out, extra=()):
    assert secret.read_text() == "SECRET"
    assert _tree(tmp_path / "box") == sorted(["out", "out/keep.txt", *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc", "box", "secret.txt"]


# ----------------------------------------------------------------------------------- tar chains
@pytest.mark.parametrize("order", ["l1 first", "l3 first"])
def test_tar_chained_symlink_out_of_the_target_is_refused(tmp_path, box, order):
    # l3 -> ../.. is the target itself and l1 -> l3/../../secret.txt looks like d1/secret.txt,
    # but through l3 it is tmp_path/secret.txt (the l1 -> l3/../../../../etc/hostname).
    secret, out = box
    (tmp_path / "arc").mkdir()
    l1, l3 = _sym("d1/d2/l1", "l3/../../secret.txt"), _sym("d1/d2/l3", "../..")
    arc = _tar(tmp_path / "arc" / "chain.tar", [("d1/a.txt", b"a"), *([l1, l3] if order == "l1 first" else [l3, l1])])
    with pytest.raises(UnsafeArchiveError, match=r"chain\.tar: member 'd1/d2/l1' links to 'l3/\.\./\.\./secret\.txt'") \
            as exc:
        safe_extract(arc, out)
    assert "\n" not in str(exc.value) and isinstance(exc.value, InputError)
    _assert_untouched(tmp_path, secret, out)


def test_tar_chain_through_a_link_left_by_an_earlier_archive_is_refused(tmp_path, box):
    # Places: several archives share one folder. The first one's link stays inside ...
    secret, out = box
    (tmp_path / "arc").mkdir()
    safe_extract(_tar(tmp_path / "arc" / "a.tar", [_sym("d1/d2/l3", "../..")]), out)
    # ... and the second one's looks inside on paper, but goes through it.
    arc = _tar(tmp_path / "arc" / "b.tar", [_sym("d1/d2/l1", "l3/../../secret.txt")])
    with pytest.raises(UnsafeArchiveError, match=r"member 'd1/d2/l1' .*outside"):
        safe_extract(arc, out)
    _assert_untouched(tmp_path, secret, out, ["out/d1", "out/d1/d2", "out/d1/d2/l3 -> ../.."])


def test_tar_link_through_a_symlink_already_in_the_target_is_refused(tmp_path, box):
    secret, out = box
    (tmp_path / "arc").mkdir()
    os.symlink("../..", out / "up")  # placed by someone else; leads out
    arc = _tar(tmp_path / "arc" / "a.tar", [_sym("l", "up/secret.txt")])
    with pytest.raises(UnsafeArchiveError, match=r"member 'l' links to 'up/secret\.txt', which leads outside"):
        safe_extract(arc, out)
    _assert_untouched(tmp_path, secret, out, ["out/up -> ../.."])


def test_tar_member_written_through_a_link_to_a_directory_is_refused(tmp_path, box):
    secret, out = box
    (tmp_path / "arc").mkdir()
    arc = _tar(tmp_path / "arc" / "a.tar", [_dir("d/sub"), _sym("d/l", "sub"), ("d/l/x.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"member 'd/l/x\.txt' would be written through the symlink 'd/l'"):
        safe_extract(arc, out)
    _assert_untouched(tmp_path, secret, out)


def test_tar_member_written_through_a_symlink_already_in_the_target_is_refused(tmp_path, box):
    secret, out = box
    (tmp_path / "arc").mkdir()
    elsewhere = tmp_path / "box" / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "ext")
    arc = _tar(tmp_path / "arc" / "a.tar", [("ext/x.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"member 'ext/x\.txt' would be written through the symlink 'ext'"):
        safe_extract(arc, out)
    assert list(elsewhere.iterdir()) == []
    _assert_untouched(tmp_path, secret, out, ["elsewhere", f"out/ext -> {elsewhere}"])


@pytest.mark.parametrize("members, match", [
    ([_sym("a", "b"), _sym("b", "a"), _sym("c", "a/x")], r"member 'c' .*symlink loop"),
    ([_sym("a", "sub"), ("a", b"x")], r"member 'a' would replace the symlink 'a' with a file"),
    ([_sym("a", "x"), _sym("a", "../..")], r"member 'a' would replace the symlink 'a'"),
    ([_dir("a"), _sym("a", ".")], r"member 'a' would replace the directory 'a' with a symlink"),
    ([("a", b"x"), _sym("a", "..")], r"member 'a' would replace the file 'a'"),
    ([("f", b"x"), ("f/g", b"y")], r"member 'f/g' would be written below 'f', which is a file"),
    ([_sym("l", "missing/../..")], r"member 'l' .*'\.\.' after 'missing'"),
    ([("d/../x", b"x")], r"member 'd/\.\./x' is 'd/\.\./x', which has a '\.\.' component"),
    ([_dir("sub"), ("sub/f", b"x"), _sym("l", "sub"), _hard("h", "l/f")], r"member 'h' is a hard link to 'l/f'"),
    ([_hard("h", "keep.txt")], r"member 'h' is a hard link to 'keep\.txt', which is not a regular file extracted"),
    ([_hard("h", "../secret.txt")], r"member 'h' is a hard link to '\.\./secret\.txt', outside"),
    ([("f", b"x"), ("g", b"y"), _hard("f", "g")], r"member 'f' would replace the file 'f' with a hard link"),
])
def test_tar_other_link_tricks_are_refused(tmp_path, box, members, match):
    secret, out = box
    (tmp_path / "arc").mkdir()
    with pytest.raises(UnsafeArchiveError, match=match) as exc:
        safe_extract(_tar(tmp_path / "arc" / "a.tar", members), out)
    assert "\n" not in str(exc.value)
    _assert_untouched(tmp_path, secret, out)


# ------------------------------------------------------------------------------------------ zip
def test_zip_chained_symlink_is_refused_at_the_first_link(tmp_path, box):
    # zipfile never creates links (it would write the link text as a plain file), so a zip
    # symlink is refused outright, whatever it points to.
    secret, out = box
    (tmp_path / "arc").mkdir()
    arc = tmp_path / "arc" / "chain.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("d1/a.txt", "a")
        _zip_symlink(zf, "d1/d2/l1", "l3/../../secret.txt")
        _zip_symlink(zf, "d1/d2/l3", "../..")
    with pytest.raises(UnsafeArchiveError, match=r"chain\.zip: member 'd1/d2/l1' is a symlink") as exc:
        safe_extract(arc, out)
    assert "\n" not in str(exc.value)
    _assert_untouched(tmp_path, secret, out)


def test_zip_member_written_through_a_symlink_already_in_the_target_is_refused(tmp_path, box):
    secret, out = box
    (tmp_path / "arc").mkdir()
    elsewhere = tmp_path / "box" / "elsewhere"
    elsewhere.mkdir()
    os.symlink("../elsewhere", out / "ADE")
    arc = tmp_path / "arc" / "a.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ADE/index.txt", "1")
    with pytest.raises(UnsafeArchiveError, match=r"member 'ADE/index\.txt' would be written through the symlink 'ADE'"):
        safe_extract(arc, out)
    assert list(elsewhere.iterdir()) == []
    _assert_untouched(tmp_path, secret, out, ["elsewhere", "out/ADE -> ../elsewhere"])


# ----------------------------------------------------------------------------------- merge_into
def test_merge_into_does_not_follow_a_directory_symlink_in_the_destination(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    src, dst = tmp_path / "dst" / ".staging", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "d" / "x.txt").write_text("x")
    os.symlink(outside, dst / "d")
    with pytest.raises(InputError, match=r"cannot merge 'd' into .*: .*/d is a symlink, which is not followed") as exc:
        merge_into(src, dst)
    assert "\n" not in str(exc.value)
    assert list(outside.iterdir()) == []
    assert os.readlink(dst / "d") == str(outside)
    assert not (dst / "a.txt").exists()  # checked before anything moved


def test_merge_into_replaces_a_symlink_with_a_file_without_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    src, dst = tmp_path / "dst" / ".staging", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("new")
    (dst / "sub").mkdir()
    os.symlink(outside, dst / "sub" / "f")
    merge_into(src, dst)
    assert outside.read_text() == "outside"
    assert not (dst / "sub" / "f").is_symlink() and (dst / "sub" / "f").read_text() == "new"
    assert not src.exists()


# ------------------------------------------------------------------------------ benign archives
def test_benign_archive_with_internal_relative_symlinks_extracts(tmp_path):
    members = [
        _dir("."), _dir("./pkg"),
        _sym("pkg/early", "late.txt"),                # stored before what it names
        ("pkg/lib/libx.so.1", b"lib"),
        _sym("pkg/lib/libx.so", "libx.so.1"),
        _sym("pkg/bin/tool", "../lib/libx.so"),       # a chain, climbing one level
        _sym("pkg/current", "lib"),                   # a link to a directory ...
        _sym("pkg/alias", "current/libx.so"),         # ... that another link resolves through
        _sym("pkg/lib/self", "../lib/./libx.so.1"),
        _hard("pkg/hard", "pkg/lib/libx.so.1"),
        ("pkg/late.txt", b"late"),
    ]
    arc = _tar(tmp_path / "benign.tgz", members, mode="w:gz")
    out = tmp_path / "out"
    for _ in range(2):  # extracting again over the same links (extract_once after a deleted folder)
        names = safe_extract(arc, out)
        assert len(names) == len(members)
        for link in ("early", "lib/libx.so", "bin/tool", "alias", "lib/self", "hard"):
            assert (out / "pkg" / link).read_bytes() == (b"late" if link == "early" else b"lib"), link
        assert os.readlink(out / "pkg/bin/tool") == "../lib/libx.so"
        assert (out / "pkg/current/libx.so.1").read_bytes() == b"lib"
    assert [p.name for p in out.iterdir()] == ["pkg"]


def test_second_archive_beside_a_first_ones_links_extracts(tmp_path):
    out = tmp_path / "out"
    safe_extract(_tar(tmp_path / "a.tar", [("data/v1/x.txt", b"1"), _sym("data/latest", "v1")]), out)
    # a later archive links through the first one's link (inside) and adds files beside it
    safe_extract(_tar(tmp_path / "b.tar", [_sym("data/x", "latest/x.txt"), ("data/v2/y.txt", b"2")]), out)
    assert (out / "data/x").read_text() == "1" and (out / "data/v2/y.txt").read_text() == "2"
