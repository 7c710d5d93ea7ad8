"""A repository reached with the git CLI at a URL, at a branch, tag or commit."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from binderbox.errors import SourceError, UsageError
from binderbox.providers.base import Fetched

_HEX = re.compile(r"^[0-9a-f]{7,40}$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# Characters git forbids in ref names (git-check-ref-format), plus leading '-'.
_BAD_REF = re.compile(r"^-|[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")

GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",  # never hang waiting for a password
    "GIT_ASKPASS": "true",
    "GIT_CONFIG_NOSYSTEM": "1",
}


class GitSource:
    """A git URL plus ref; every user value is passed after ``--`` or validated first."""

    def __init__(self, url: str, ref: str = "HEAD", commit: str = "") -> None:
        """``commit``, when given, is what ``ref`` is already known to point to."""
        if url.startswith("-") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", url):
            raise UsageError(f"'{url}' is not a git URL binderbox will fetch.")
        if _BAD_REF.search(ref):
            raise UsageError(f"'{ref}' is not a valid git ref (branch, tag or commit).")
        self.repo_url = url
        self.ref = ref
        self._commit = commit if _FULL_SHA.match(commit) else ""

    def slug(self) -> str:
        url = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", self.repo_url)
        url = re.sub(r"^[^@/]+@", "", url)  # drop credentials or the git@ user
        return url.removesuffix("/").removesuffix(".git")

    def resolve(self) -> str:
        if self._commit:
            return self._commit
        if _FULL_SHA.match(self.ref):
            self._commit = self.ref
            return self._commit
        listing = _git(["ls-remote", "--", self.repo_url], self._unreachable)
        refs: dict[str, str] = {}
        for line in listing.splitlines():
            sha, _, name = line.partition("\t")
            refs[name] = sha
        for name in (
            self.ref,
            f"refs/heads/{self.ref}",
            f"refs/tags/{self.ref}^{{}}",
            f"refs/tags/{self.ref}",
        ):
            if name in refs:
                self._commit = refs[name]
                return self._commit
        if _HEX.match(self.ref):
            return ""  # an abbreviated commit: known once fetched
        raise SourceError(self._unknown_ref())

    def fetch(self, dest: Path) -> Fetched:
        commit = self.resolve()
        _git(
            ["clone", "--quiet", "--no-checkout", "--", self.repo_url, str(dest)], self._unreachable
        )
        wanted = commit or self.ref
        try:
            full = _git(
                ["-C", str(dest), "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"],
                lambda _: self._unknown_ref(),
            ).strip()
        except SourceError:
            raise
        if not _FULL_SHA.match(full):
            raise SourceError(self._unknown_ref())
        _git(["-C", str(dest), "checkout", "--quiet", "--detach", full], self._checkout_failed)
        _git(
            ["-C", str(dest), "submodule", "update", "--init", "--recursive", "--quiet"],
            lambda err: f"Fetching the submodules of {self.repo_url} failed: {err}",
        )
        self._commit = full
        return Fetched(path=dest, commit=full)

    def _unreachable(self, detail: str) -> str:
        return f"Could not fetch the git repository '{self.repo_url}': {detail}"

    def _unknown_ref(self, _detail: str = "") -> str:
        return (
            f"The ref '{self.ref}' was not found in '{self.repo_url}' "
            "(no such branch, tag or commit)."
        )

    def _checkout_failed(self, detail: str) -> str:
        return f"Checking out '{self.ref}' from '{self.repo_url}' failed: {detail}"


def _git(args: list[str], explain, timeout: float = 600) -> str:
    """Run git; on failure raise SourceError with ``explain(last stderr line)``."""
    command = ["git", "-c", "protocol.ext.allow=never", *args]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            env={**os.environ, **GIT_ENV},
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise SourceError("git is not installed; run the setup command from the README.") from None
    except subprocess.TimeoutExpired:
        raise SourceError(explain(f"git did not finish within {timeout:g} seconds")) from None
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"git exited with code {result.returncode}"
        detail = detail.removeprefix("fatal: ").rstrip(".") + "."
        raise SourceError(explain(detail))
    return result.stdout
