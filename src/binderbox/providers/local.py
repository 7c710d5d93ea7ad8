"""A repository that is a folder on this machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from binderbox.errors import RepositoryRefused, SourceError, UsageError, quoted
from binderbox.providers.base import Fetched


class LocalSource:
    """A local folder; its identity is a hash of its content (``.git`` excluded)."""

    # The user's own folder: links out of it are kept (with a warning) rather than refused
    # as they are for fetched repositories; nothing is read through them either way.
    own_folder = True

    def __init__(self, path: Path, ref: str = "") -> None:
        if ref:
            raise UsageError("--ref only applies to git URLs, not to a local folder.")
        self.path = path.expanduser().resolve()
        if not self.path.exists():
            raise SourceError(f"The folder '{path}' does not exist.")
        if not self.path.is_dir():
            raise SourceError(f"'{path}' is not a folder; give a repository folder or a git URL.")
        self.repo_url = str(self.path)
        self.ref = ""
        self._content_id = ""

    def slug(self) -> str:
        where = hashlib.sha256(str(self.path).encode()).hexdigest()[:6]
        return f"local-{self.path.name}-{where}"

    def resolve(self) -> str:
        if not self._content_id:
            self._content_id = content_hash(self.path)
        return self._content_id

    def fetch(self, dest: Path) -> Fetched:
        commit = self.resolve()  # first: it refuses pipes and devices, which a copy would read
        try:
            shutil.copytree(self.path, dest, symlinks=True)
        except (OSError, shutil.Error) as err:
            raise SourceError(f"Could not copy the folder '{self.path}': {err}") from None
        return Fetched(path=dest, commit=commit)


def content_hash(folder: Path) -> str:
    """sha256 over every path, mode and content under ``folder``, skipping ``.git``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files + [d for d in dirs if (Path(root) / d).is_symlink()]):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            digest.update(os.fsencode(rel) + b"\0")
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                digest.update(b"link\0" + os.fsencode(os.readlink(path)) + b"\0")
                continue
            if not stat.S_ISREG(mode):
                # Reading a pipe or a device would hang or never end.
                raise RepositoryRefused(
                    f"{quoted(rel)} in '{folder}' is a pipe, device or socket; binderbox builds "
                    "folders of regular files, folders and links."
                )
            digest.update(b"x\0" if os.access(path, os.X_OK) else b"f\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()[:40]
