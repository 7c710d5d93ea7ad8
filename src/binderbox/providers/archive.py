"""Safe handling of downloaded content: size and file-count limits, file names that come
from APIs, and unpacking zip and tar archives without letting them write outside a folder.

Every refusal is a :class:`ContentRefused` whose message is the cause alone ("the archive
data.zip contains a path outside the repository: ../../etc/passwd"); the record source
turns it into a sentence that names the record.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from binderbox.errors import SourceError

ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz2",
    ".tbz",
    ".tar.xz",
    ".txz",
)
# Finder adds this folder of resource forks to zips made on macOS; it is never content.
_IGNORED_TOP = {"__MACOSX"}
_CHUNK = 1 << 20
_MAX_LINK_TARGET = 4096


class ContentRefused(SourceError):
    """Downloaded content that binderbox will not place on disk; the message is the cause."""


def human_size(count: int) -> str:
    """Bytes as people read them: 2 GB, 1.5 MB, 300 bytes."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


@dataclass
class Budget:
    """Bytes and files still allowed; counted as data arrives, never taken from headers."""

    max_bytes: int
    max_files: int
    # What is being counted, for messages: "the record" or "the archive data.zip".
    subject: str = "the record"
    bytes: int = 0
    files: int = 0

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise ContentRefused(
                f"{self.subject} is larger than the limit of {human_size(self.max_bytes)} "
                "(setting content_max_bytes)"
            )

    def add_file(self) -> None:
        self.files += 1
        self.check_files(0)

    def check_files(self, more: int) -> None:
        """Refuse when ``more`` entries would go over the limit (0: check the count so far)."""
        if self.files + more > self.max_files:
            raise ContentRefused(
                f"{self.subject} has more than {self.max_files} files (setting content_max_files)"
            )

    def fresh(self, subject: str) -> Budget:
        """The same limits, counted again from zero for ``subject``."""
        return Budget(self.max_bytes, self.max_files, subject)


def is_archive_name(name: str) -> bool:
    """Whether a file name says zip or tar (compressed or not)."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_file_name(name: str, where: str = "the record") -> str:
    """A single file name from an API, refused when it could name another place."""
    if (
        not name.strip()
        or name in {".", ".."}
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name.encode()) > 255
    ):
        raise ContentRefused(f"{where} lists a file whose name is not a plain file name: {name!r}")
    return name


def safe_relative_path(path: str, where: str = "the record") -> PurePosixPath:
    """A relative path from an API or an archive, refused when it leaves its folder.

    Empty and ``.`` components are dropped (so ``""`` and ``./`` give the empty path);
    ``..``, absolute paths and NUL are refused. ``where`` starts the message.
    """
    if "\0" in path:
        raise ContentRefused(f"{where} contains a path with a NUL character: {path!r}")
    # Zips made on Windows sometimes use backslashes; treat them as separators.
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise ContentRefused(f"{where} contains a path outside the repository: {path}")
    parts = [p for p in posix.parts if p not in {"", "."}]
    for part in parts:
        if len(part.encode()) > 255:
            raise ContentRefused(f"{where} contains a name longer than 255 bytes: {path}")
    return PurePosixPath(*parts) if parts else PurePosixPath()


def copy_counted(source: IO[bytes], target: Path, budget: Budget) -> None:
    """Copy a stream into a new file, counting every byte against ``budget``."""
    with open(target, "xb") as out:
        while block := source.read(_CHUNK):
            budget.add_bytes(len(block))
            out.write(block)


# --- unpacking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """One archive entry, reduced to what binderbox acts on."""

    path: PurePosixPath
    kind: str  # "file", "dir", "symlink", "hardlink"
    mode: int = 0o644
    # The link target for links (a member path for hard links).
    target: str = ""


def unpack(archive: Path, into: Path, budget: Budget, name: str) -> Path:
    """Unpack ``archive`` into the new folder ``into``; return the content root.

    The root is ``into``, or its only top-level folder when there is exactly one (the
    usual shape of a zipped repository). Links are kept only when they stay inside.
    ``name`` is the archive's name in messages.
    """
    label = f"the archive {name}"
    into.mkdir()
    try:
        return _unpack_into(archive, into, budget, label)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise


def _unpack_into(archive: Path, into: Path, budget: Budget, label: str) -> Path:
    if zipfile.is_zipfile(archive):
        _unpack_zip(archive, into, budget, label)
    elif _is_tar(archive):
        _unpack_tar(archive, into, budget, label)
    else:
        raise ContentRefused(f"{label} is not a readable zip or tar archive")
    for ignored in _IGNORED_TOP:
        extra = into / ignored
        if extra.is_dir() and not extra.is_symlink():
            shutil.rmtree(extra)
    entries = list(into.iterdir())
    root = into
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        root = entries[0]
    # Flattening moves the root down a level: a link to "../x" may now leave it.
    check_links(root, label)
    return root


def check_links(root: Path, label: str) -> None:
    """Refuse when any symbolic link under ``root`` resolves to a place outside it."""
    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), real_root):
                shown = os.path.relpath(path, root)
                raise ContentRefused(
                    f"{label} contains a link that points outside the repository: "
                    f"{shown} -> {os.readlink(path)}"
                )


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError):
        return False


def _unpack_zip(archive: Path, into: Path, budget: Budget, label: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            budget.check_files(len(infos))

            def members() -> Iterator[tuple[_Member, IO[bytes] | None]]:
                for info in infos:
                    member = _zip_member(zf, info, label)
                    if member is None:
                        continue
                    if member.kind == "file":
                        with zf.open(info) as stream:
                            yield member, stream
                    else:
                        yield member, None

            _place(members(), into, budget, label)
    except zipfile.BadZipFile as err:
        raise ContentRefused(f"{label} is damaged ({err})") from None
    except (OSError, EOFError, zlib.error, NotImplementedError) as err:
        raise ContentRefused(f"{label} could not be unpacked ({err})") from None


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> _Member | None:
    raw = info.filename
    path = safe_relative_path(raw, label)
    if not path.parts:
        return None
    if info.flag_bits & 0x1:
        raise ContentRefused(f"{label} is encrypted ({raw})")
    # Unix permissions live in the high 16 bits when the zip was made on Unix.
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        if info.file_size > _MAX_LINK_TARGET:
            raise ContentRefused(f"{label} has a link with an overlong target: {raw}")
        target = zf.read(info).decode("utf-8", "surrogateescape")
        return _Member(path, "symlink", target=target)
    if kind not in {0, stat.S_IFREG, stat.S_IFDIR}:
        raise ContentRefused(f"{label} contains a device file or pipe: {raw}")
    if info.is_dir() or kind == stat.S_IFDIR:
        return _Member(path, "dir")
    _check_special_bits(mode, raw, label)
    return _Member(path, "file", mode=_file_mode(mode))


def _unpack_tar(archive: Path, into: Path, budget: Budget, label: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:

            def members() -> Iterator[tuple[_Member, IO[bytes] | None]]:
                for info in tar:
                    member = _tar_member(info, label)
                    if member is None:
                        continue
                    if member.kind == "file":
                        stream = tar.extractfile(info)
                        if stream is None:
                            raise ContentRefused(f"{label} has an unreadable entry: {info.name}")
                        with stream:
                            yield member, stream
                    else:
                        yield member, None

            _place(members(), into, budget, label)
    except tarfile.TarError as err:
        raise ContentRefused(f"{label} is damaged ({err})") from None
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise ContentRefused(f"{label} could not be unpacked ({err})") from None


def _tar_member(info: tarfile.TarInfo, label: str) -> _Member | None:
    raw = info.name
    path = safe_relative_path(raw, label)
    if not path.parts:
        return None
    if info.issym():
        return _Member(path, "symlink", target=info.linkname)
    if info.islnk():
        target = safe_relative_path(info.linkname, label)
        return _Member(path, "hardlink", target=target.as_posix())
    if info.isdir():
        return _Member(path, "dir")
    if info.isreg():
        _check_special_bits(info.mode, raw, label)
        return _Member(path, "file", mode=_file_mode(info.mode))
    raise ContentRefused(f"{label} contains a device file or pipe: {raw}")


def _check_special_bits(mode: int, raw: str, label: str) -> None:
    if mode & (stat.S_ISUID | stat.S_ISGID):
        raise ContentRefused(f"{label} contains a setuid or setgid file: {raw}")


def _file_mode(mode: int) -> int:
    # Keep only "executable or not"; owners, groups and special bits are not carried over.
    return 0o755 if mode & 0o111 else 0o644


def _place(
    members: Iterator[tuple[_Member, IO[bytes] | None]],
    into: Path,
    budget: Budget,
    label: str,
) -> None:
    """Write files and folders in archive order; links last, once nothing else is written.

    Because no member path contains ``..`` and links only appear at the end, no file is
    ever written through a link; each link is then checked where it really points.
    """
    links: list[_Member] = []
    placed_files: set[PurePosixPath] = set()
    for member, stream in members:
        budget.add_file()
        if member.path.parts[0] in _IGNORED_TOP:
            continue
        target = into.joinpath(*member.path.parts)
        try:
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif member.kind == "file":
                assert stream is not None
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_file() and not target.is_symlink():
                    target.unlink()  # a later entry with the same name wins, as with unzip
                copy_counted(stream, target, budget)
                target.chmod(member.mode)
                placed_files.add(member.path)
            else:
                links.append(member)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise ContentRefused(
                f"{label} has conflicting entries for {member.path.as_posix()}"
            ) from None
    root = os.path.realpath(into)
    for link in links:
        _make_link(link, into, root, placed_files, budget, label)
    for link in links:
        # Checked again once every link exists: one link can redirect another's target.
        where = into.joinpath(*link.path.parts)
        if link.kind == "symlink" and not _inside(os.path.realpath(where), root):
            raise ContentRefused(
                f"{label} contains a link that points outside the repository: "
                f"{link.path.as_posix()} -> {link.target}"
            )


def _make_link(
    link: _Member,
    into: Path,
    root: str,
    placed_files: set[PurePosixPath],
    budget: Budget,
    label: str,
) -> None:
    where = into.joinpath(*link.path.parts)
    shown = f"{link.path.as_posix()} -> {link.target}"
    parent = os.path.realpath(where.parent)
    if not _inside(parent, root):
        raise ContentRefused(f"{label} contains a path that points outside the repository: {shown}")
    if link.kind == "hardlink":
        # Hard links become copies of a file the archive already holds.
        source = PurePosixPath(link.target)
        if source not in placed_files:
            raise ContentRefused(f"{label} contains a hard link to a file outside it: {shown}")
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(into.joinpath(*source.parts), "rb") as stream:
            try:
                copy_counted(stream, where, budget)
            except FileExistsError:
                raise ContentRefused(f"{label} has conflicting entries for {shown}") from None
        shutil.copymode(into.joinpath(*source.parts), where)
        return
    target = link.target
    if not target or target.startswith("/") or "\0" in target:
        raise ContentRefused(f"{label} contains a link that points outside the repository: {shown}")
    if not _inside(os.path.normpath(os.path.join(parent, target)), root):
        raise ContentRefused(f"{label} contains a link that points outside the repository: {shown}")
    where.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, where)
    except FileExistsError:
        raise ContentRefused(f"{label} has conflicting entries for {shown}") from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
