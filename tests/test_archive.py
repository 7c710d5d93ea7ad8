"""Unpacking downloaded archives safely (pure: files on disk only, no network)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from binderbox.providers.archive import (
    Budget,
    ContentRefused,
    is_archive_name,
    safe_file_name,
    safe_relative_path,
    unpack,
)

LIMITS = Budget(max_bytes=1_000_000, max_files=100)


def budget(max_bytes: int = 1_000_000, max_files: int = 100) -> Budget:
    return Budget(max_bytes, max_files, "the archive test")


def write_zip(path: Path, entries: dict[str, bytes | str], links: dict[str, str] | None = None):
    """A zip of files, plus symbolic links stored the way Info-ZIP stores them."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def tar_entry(
    tar: tarfile.TarFile,
    name: str,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    mode: int = 0o644,
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path: Path, build, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


def tree(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = path.read_text()
    return found


def refused(archive: Path, into: Path, match: str, limits: Budget | None = None) -> None:
    """Unpacking is refused with ``match``, and leaves no partial folder behind."""
    with pytest.raises(ContentRefused, match=match):
        unpack(archive, into, limits or budget(), archive.name)
    assert not into.exists()


# --- paths outside the repository -----------------------------------------------------------


def test_zip_slip_member_is_refused(tmp_path):
    archive = write_zip(tmp_path / "data.zip", {"ok.txt": "x", "../../etc/passwd": "root"})
    refused(
        archive,
        tmp_path / "out",
        r"^the archive data\.zip contains a path outside the repository: \.\./\.\./etc/passwd$",
    )
    assert not (tmp_path.parent / "etc").exists()


def test_zip_slip_with_backslashes_is_refused(tmp_path):
    archive = write_zip(tmp_path / "data.zip", {"..\\..\\evil.txt": "x"})
    refused(archive, tmp_path / "out", "path outside the repository")


@pytest.mark.parametrize("name", ["/etc/passwd", "a/../../b", "./../x"])
def test_absolute_and_parent_paths_in_tar_are_refused(tmp_path, name):
    archive = write_tar(tmp_path / "data.tar", lambda t: tar_entry(t, name, b"x"))
    refused(archive, tmp_path / "out", f"contains a path outside the repository: {name}")


def test_absolute_path_in_zip_is_refused(tmp_path):
    archive = write_zip(tmp_path / "data.zip", {"/tmp/evil": "x"})
    refused(archive, tmp_path / "out", "path outside the repository: /tmp/evil")


# --- links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc", "../outside", "sub/../../outside", "../../.."])
def test_symlink_pointing_outside_is_refused(tmp_path, target):
    archive = write_tar(
        tmp_path / "data.tar",
        lambda t: tar_entry(t, "repo/link", kind=tarfile.SYMTYPE, linkname=target),
    )
    refused(archive, tmp_path / "out", "link that points outside the repository")


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    archive = write_zip(tmp_path / "data.zip", {"a.txt": "x"}, links={"link": "../../etc/passwd"})
    refused(
        archive,
        tmp_path / "out",
        r"link that points outside the repository: link -> \.\./\.\./etc/passwd",
    )


def test_a_link_cannot_redirect_another_link_outside(tmp_path):
    # "d" -> "." is harmless alone, but "d/e" -> ".." would then be the folder above.
    def build(tar):
        tar_entry(tar, "d", kind=tarfile.SYMTYPE, linkname=".")
        tar_entry(tar, "d/e", kind=tarfile.SYMTYPE, linkname="..")

    refused(write_tar(tmp_path / "data.tar", build), tmp_path / "out", "outside the repository")


def test_files_are_never_written_through_a_link(tmp_path):
    # A link to the outside followed by a file below it: the link is refused, and the file
    # lands in a real folder inside, never where the link points.
    outside = tmp_path / "outside"
    outside.mkdir()

    def build(tar):
        tar_entry(tar, "x", kind=tarfile.SYMTYPE, linkname=str(outside))
        tar_entry(tar, "x/planted.txt", b"gotcha")

    refused(write_tar(tmp_path / "data.tar", build), tmp_path / "out", "outside the repository")
    assert list(outside.iterdir()) == []


def test_links_that_stay_inside_are_kept(tmp_path):
    def build(tar):
        tar_entry(tar, "repo/README.md", b"readme")
        tar_entry(tar, "repo/docs/index.md", kind=tarfile.SYMTYPE, linkname="../README.md")
        tar_entry(tar, "repo/copy.md", kind=tarfile.LNKTYPE, linkname="repo/README.md")

    root = unpack(write_tar(tmp_path / "data.tar", build), tmp_path / "out", budget(), "data.tar")
    assert tree(root) == {
        "README.md": "readme",
        "copy.md": "readme",
        "docs/index.md": "-> ../README.md",
    }
    assert not (root / "copy.md").is_symlink()


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "not/in/archive"])
def test_hard_links_to_anything_but_an_earlier_member_are_refused(tmp_path, target):
    archive = write_tar(
        tmp_path / "data.tar", lambda t: tar_entry(t, "h", kind=tarfile.LNKTYPE, linkname=target)
    )
    refused(archive, tmp_path / "out", "outside")


# --- special files ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_files_and_pipes_are_refused(tmp_path, kind):
    archive = write_tar(tmp_path / "data.tar", lambda t: tar_entry(t, "dev/null", kind=kind))
    refused(archive, tmp_path / "out", "contains a device file or pipe: dev/null")


@pytest.mark.parametrize("bits", [stat.S_ISUID, stat.S_ISGID])
def test_setuid_and_setgid_files_are_refused(tmp_path, bits):
    archive = write_tar(
        tmp_path / "data.tar", lambda t: tar_entry(t, "bin/tool", b"#!/bin/sh\n", mode=0o755 | bits)
    )
    refused(archive, tmp_path / "out", "setuid or setgid file: bin/tool")


def test_executable_bits_are_kept_and_nothing_else(tmp_path):
    def build(tar):
        tar_entry(tar, "postBuild", b"#!/bin/sh\n", mode=0o777)
        tar_entry(tar, "data.txt", b"x", mode=0o666)

    root = unpack(write_tar(tmp_path / "data.tar", build), tmp_path / "out", budget(), "data.tar")
    assert stat.S_IMODE((root / "postBuild").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "data.txt").stat().st_mode) == 0o644


# --- limits -----------------------------------------------------------------------------------


def test_archive_over_the_size_limit_is_refused(tmp_path):
    # 200 kB of zeros compress to almost nothing: the limit counts what is unpacked.
    archive = write_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 200_000})
    assert archive.stat().st_size < 2_000
    refused(
        archive,
        tmp_path / "out",
        r"the archive test is larger than the limit of 100 kB \(setting content_max_bytes\)",
        budget(max_bytes=100_000),
    )


def test_archive_with_too_many_files_is_refused(tmp_path):
    archive = write_zip(tmp_path / "many.zip", {f"f{i}.txt": "x" for i in range(30)})
    refused(
        archive,
        tmp_path / "out",
        r"more than 20 files \(setting content_max_files\)",
        budget(max_files=20),
    )


def test_tar_with_too_many_files_is_refused_while_reading(tmp_path):
    def build(tar):
        for i in range(30):
            tar_entry(tar, f"f{i}.txt", b"x")

    refused(
        write_tar(tmp_path / "many.tar.gz", build, "w:gz"),
        tmp_path / "out",
        "more than 20 files",
        budget(max_files=20),
    )


# --- shapes -----------------------------------------------------------------------------------


def test_single_top_folder_is_flattened(tmp_path):
    archive = write_zip(
        tmp_path / "repo.zip",
        {"org-repo-abc123/requirements.txt": "six\n", "org-repo-abc123/src/main.py": "print()\n"},
    )
    root = unpack(archive, tmp_path / "out", budget(), "repo.zip")
    assert root == tmp_path / "out" / "org-repo-abc123"
    assert tree(root) == {"requirements.txt": "six\n", "src/main.py": "print()\n"}


def test_macos_resource_folder_does_not_prevent_flattening(tmp_path):
    archive = write_zip(
        tmp_path / "repo.zip",
        {"repo/requirements.txt": "six\n", "__MACOSX/repo/._requirements.txt": "junk"},
    )
    root = unpack(archive, tmp_path / "out", budget(), "repo.zip")
    assert tree(root) == {"requirements.txt": "six\n"}


def test_several_top_level_entries_stay_as_they_are(tmp_path):
    archive = write_zip(tmp_path / "repo.zip", {"a/x.txt": "1", "b.txt": "2"})
    root = unpack(archive, tmp_path / "out", budget(), "repo.zip")
    assert root == tmp_path / "out"
    assert tree(root) == {"a/x.txt": "1", "b.txt": "2"}


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")],
)
def test_every_tar_compression_unpacks(tmp_path, suffix, mode):
    archive = write_tar(
        tmp_path / f"repo{suffix}", lambda t: tar_entry(t, "./repo/apt.txt", b"curl\n"), mode
    )
    root = unpack(archive, tmp_path / "out", budget(), archive.name)
    assert tree(root) == {"apt.txt": "curl\n"}


def test_damaged_archives_are_refused(tmp_path):
    good = write_zip(tmp_path / "good.zip", {"a.txt": "hello " * 1000})
    data = bytearray(good.read_bytes())
    data[60:90] = b"\xff" * 30  # inside the compressed data
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    refused(damaged, tmp_path / "out", "the archive damaged.zip (is damaged|could not be unpacked)")
    not_archive = tmp_path / "fake.zip"
    not_archive.write_text("just text")
    refused(not_archive, tmp_path / "out2", "is not a readable zip or tar archive")


def test_conflicting_entries_are_refused(tmp_path):
    archive = write_zip(tmp_path / "c.zip", {"a": "file", "a/b": "file below a file"})
    refused(archive, tmp_path / "out", "conflicting entries for a/b")


# --- names from APIs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["requirements.txt", "data 2019.csv", "ünïcode.txt", ".binder"])
def test_plain_file_names_are_accepted(name):
    assert safe_file_name(name) == name


@pytest.mark.parametrize(
    "name", ["", " ", ".", "..", "a/b", "../x", "a\\b", "nul\0byte", "x" * 300]
)
def test_file_names_that_name_other_places_are_refused(name):
    with pytest.raises(ContentRefused, match="not a plain file name"):
        safe_file_name(name)


def test_relative_paths():
    assert safe_relative_path("./code//analysis.py").as_posix() == "code/analysis.py"
    assert safe_relative_path("").parts == ()
    for bad in ["../x", "/abs", "a/../../b"]:
        with pytest.raises(ContentRefused, match="outside the repository"):
            safe_relative_path(bad)


def test_archive_names():
    for name in ["a.zip", "A.ZIP", "a.tar", "a.tar.gz", "a.tgz", "a.tar.bz2", "a.tar.xz"]:
        assert is_archive_name(name), name
    for name in ["a.gz", "a.ipynb", "zip", "a.zip.txt"]:
        assert not is_archive_name(name), name


def test_limits_count_what_arrives():
    counted = Budget(max_bytes=10, max_files=2, subject="the record")
    counted.add_bytes(10)
    with pytest.raises(ContentRefused, match="the record is larger than the limit of 10 bytes"):
        counted.add_bytes(1)
    counted.add_file()
    counted.add_file()
    with pytest.raises(ContentRefused, match="the record has more than 2 files"):
        counted.add_file()
    assert LIMITS.fresh("the archive a.zip").subject == "the archive a.zip"
