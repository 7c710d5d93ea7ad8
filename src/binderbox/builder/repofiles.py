"""The one place that looks at a checked-out repository's files on the host.

A repository comes from anyone. Two rules keep it from reaching the host through the files
binderbox itself touches:

* :func:`check_checkout` runs after every fetch, before detection: a link whose target
  leaves the repository (an absolute target, or ``..`` past the root, also through a
  chain of links) and special files (pipes, devices, sockets) are refused. For the user's
  own folder (``binderbox build/run`` of a local path) a link out is kept, with a warning.
* Configuration files are found with :func:`is_file` / :func:`is_dir` and read with
  :func:`read_text`, which resolve a path inside the repository without ever following a
  link out, open the final file with ``O_NOFOLLOW`` and read at most
  :data:`MAX_CONFIG_BYTES`. :func:`write_new` replaces a file without writing through a
  link.

Resolution is done here, component by component, so that nothing outside the repository
is ever looked at: each step ``lstat``s a path whose folders are all real folders inside
the root.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from binderbox.errors import ConfigError, RepositoryRefused, quoted, shortened

# Largest configuration file binderbox reads (requirements.txt, environment.yml, …).
MAX_CONFIG_BYTES = 1_000_000
# As the kernel: a chain of more links than this does not resolve (ELOOP).
_MAX_HOPS = 40


class _Outside(Exception):
    """The path leaves the root."""


class _Loop(Exception):
    """The path goes through too many links to resolve."""


def _resolve(root: Path, rel: str, *, follow_last: bool = True) -> Path:
    """``root/rel`` with every link inside it replaced by its target, as the kernel would,
    but refusing (``_Outside``) as soon as a step leaves ``root``.

    Missing components are kept as written (the kernel would fail on them; so will the
    caller's ``lstat``).
    """
    pending = list(reversed(PurePosixPath(rel).parts)) if rel else []
    if pending and pending[-1] == "/":
        raise _Outside
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise _Outside
            done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            done.append(part)
            continue
        if stat.S_ISLNK(mode) and (pending or follow_last):
            hops += 1
            if hops > _MAX_HOPS:
                raise _Loop
            target = os.readlink(candidate)
            if target.startswith("/"):
                raise _Outside
            pending.extend(reversed(target.split("/")))
            continue
        done.append(part)
    return root.joinpath(*done)


def resolve_inside(root: Path, rel: str) -> Path | None:
    """Where ``rel`` (relative to ``root``) really is, links followed; None when it leaves
    ``root`` or loops. Nothing outside ``root`` is looked at."""
    try:
        return _resolve(root, rel)
    except (_Outside, _Loop):
        return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def check_checkout(root: Path, *, own_folder: bool = False, label: str = "") -> list[str]:
    """Refuse a checkout with links out of ``root`` or special files; return warnings.

    ``own_folder``: the user's own folder (``binderbox build`` of a local path), where a
    link out is kept (it is copied into the image as a link) and only warned about.
    ``label`` names the root in messages ("the repository" by default).
    Walks without following links, so it costs one directory read per folder.
    """
    where = label or "the repository"
    warnings: list[str] = []
    folders = [""]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(root / folder if folder else root))
        except OSError as err:
            raise RepositoryRefused(
                f"{quoted(folder or '.')} in {where} cannot be read ({err.strerror})."
            ) from None
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_symlink():
                target = os.readlink(entry.path)
                try:
                    _resolve(root, rel)
                    continue
                except _Outside:
                    problem = f"is a link to {quoted(target)}, outside {where}"
                except _Loop:
                    # The kernel gives up after 40 links; other resolvers may not.
                    problem = "is a loop of links (or a chain of more than 40)"
                if not own_folder:
                    raise RepositoryRefused(
                        f"{quoted(rel)} {problem}; binderbox does not build repositories "
                        "with links that leave them."
                    )
                warnings.append(
                    f"{quoted(rel)} {problem}; it is copied into the image as a link and "
                    "binderbox reads nothing through it."
                )
            elif entry.is_dir(follow_symlinks=False):
                folders.append(rel)
            elif not entry.is_file(follow_symlinks=False):
                mode = entry.stat(follow_symlinks=False).st_mode
                raise RepositoryRefused(
                    f"{quoted(rel)} in {where} is a {_kind(mode)}; binderbox does not build "
                    "repositories that contain pipes, devices or sockets."
                )
    return warnings


def real_folder(root: Path, rel: str) -> bool:
    """True when every component of ``rel`` is a folder itself, not a link to one: the
    folder can then be moved out of ``root`` without its meaning changing."""
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except OSError:
            return False
    return True


def _lstat_inside(root: Path, rel: str) -> tuple[Path, os.stat_result | None]:
    """The resolved path of ``rel`` and its ``lstat`` (None when missing); ConfigError
    when it leaves the repository or loops."""
    try:
        path = _resolve(root, rel)
    except _Outside:
        raise ConfigError(
            f"{quoted(rel)} is a link that leaves the repository; binderbox reads "
            "configuration files only from inside it."
        ) from None
    except _Loop:
        raise ConfigError(f"{quoted(rel)} is a loop of links and cannot be read.") from None
    try:
        return path, os.lstat(path)
    except OSError:
        return path, None


def is_file(root: Path, rel: str) -> bool:
    """True when ``rel`` is a regular file inside ``root`` (a link inside to one counts).

    ConfigError when it is a link that leaves ``root``, or a pipe, device or socket: a
    configuration file must be a file in the repository.
    """
    _, found = _lstat_inside(root, rel)
    if found is None or stat.S_ISDIR(found.st_mode):
        return False
    if not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"{quoted(rel)} is a {_kind(found.st_mode)}, not a file.")
    return True


def is_dir(root: Path, rel: str) -> bool:
    """True when ``rel`` is a folder inside ``root`` (a link inside to one counts);
    ConfigError when it is a link that leaves ``root``."""
    _, found = _lstat_inside(root, rel)
    return found is not None and stat.S_ISDIR(found.st_mode)


def read_bytes(root: Path, rel: str, *, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The content of the regular file ``rel`` inside ``root``, at most ``limit`` bytes.

    ConfigError, in one sentence naming the file, when it leaves the repository, is not a
    regular file, or is larger than ``limit``.
    """
    path, found = _lstat_inside(root, rel)
    if found is None:
        raise ConfigError(f"{quoted(rel)} does not exist in the repository.")
    try:
        # O_NOFOLLOW: the last component must be the file itself; the folders above it
        # are real folders inside the root (see _resolve). O_NONBLOCK: a pipe does not
        # hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{quoted(rel)} changed into a link while it was read.") from None
        raise ConfigError(f"{quoted(rel)} cannot be read ({err.strerror}).") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{quoted(rel)} is a {_kind(mode)}, not a file.")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(
            f"{quoted(rel)} is larger than {_size(limit)}, the limit for a configuration file."
        )
    return data


def read_text(root: Path, rel: str, *, limit: int = MAX_CONFIG_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8; ConfigError when it is not UTF-8 text."""
    data = read_bytes(root, rel, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{quoted(rel)} is not a UTF-8 text file.") from None


def write_new(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, replacing what is there without writing through it:
    a link at ``path`` is removed, never followed."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None:
        if stat.S_ISDIR(found.st_mode):
            raise ConfigError(f"{quoted(path.name)} is a folder where binderbox writes a file.")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _size(count: int) -> str:
    return f"{count / 1_000_000:g} MB" if count >= 1_000_000 else f"{count:,} bytes"


def load_toml(text: str, rel: str) -> dict[str, Any]:
    """Parse a repository's TOML file (read through :func:`read_text`, so size-capped);
    ConfigError when it is not valid TOML or nests too deeply to parse."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's reasons name a position, never the file's text.
        raise ConfigError(f"{rel} is not valid TOML: {shortened(str(err).rstrip('.'))}.") from None
    except RecursionError:
        raise ConfigError(f"{rel} nests too deeply to be read.") from None


def load_json(text: str, rel: str) -> Any:
    """Parse a repository's JSON file (size-capped as :func:`load_toml`); ConfigError when
    it is not valid JSON or nests too deeply to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{rel} is not valid JSON: {shortened(err.msg)} (line {err.lineno})."
        ) from None
    except RecursionError:
        raise ConfigError(f"{rel} nests too deeply to be read.") from None
