"""BinderHub's ``<provider>/<spec>`` syntax for git hosts, parsed into a repository URL and ref.

Pure: no network. The providers and their spec shapes are the ones existing Binder links
use, so ``/v2/gh/org/repo/HEAD`` means what it means on mybinder.org.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from binderbox.errors import BinderboxError


class SpecError(BinderboxError):
    """A launch spec that does not name a repository in its provider's syntax."""


@dataclass(frozen=True)
class RepoSpec:
    """A parsed spec: which provider, which repository, which ref."""

    provider: str
    repo_url: str
    ref: str

    # The spec with the ref replaced by the resolved commit, for persistent links.
    def persistent(self, commit: str) -> str:
        return PROVIDERS[self.provider].persistent(self, commit)


@dataclass(frozen=True)
class GitProvider:
    """One git-hosting provider: its name, label and how its specs look."""

    name: str
    display_name: str
    # What /api/repoproviders shows, so launch forms can validate input.
    regex: str
    repo_label: str
    ref_label: str

    def parse(self, spec: str) -> RepoSpec:
        raise NotImplementedError

    def persistent(self, parsed: RepoSpec, commit: str) -> str:
        raise NotImplementedError


# "scheme://user[:password]@" and scp-like "user@host:" addresses: user-info that must
# never be stored, logged or shown (it is often a password or an access token).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@|^[^/:@\s]+@(?=[^/:\s]+:)")


def _fully_unquoted(text: str) -> str:
    # Specs are URL-escaped once (git, gl) and people escape twice by mistake; an
    # address hidden under more layers still counts.
    for _ in range(5):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def has_userinfo(spec: str) -> bool:
    """Whether ``spec`` (as sent, escaped or not) holds a repository address with a user
    name or password in it."""
    return bool(_USERINFO.search(_fully_unquoted(spec)))


def without_userinfo(spec: str) -> str:
    """``spec`` with any user-info removed, escaped like a spec (for records and pages)."""
    if not has_userinfo(spec):
        return spec
    return quote(_USERINFO.sub(r"\1", _fully_unquoted(spec)), safe="/:")


USERINFO_REFUSED = (
    "Repository addresses with a user name or password in them (user:password@host) are "
    "not accepted: binderbox launches public repositories only, and the address would be "
    "shown to everyone."
)


def check_no_userinfo(spec: str) -> None:
    """Refuse a spec whose repository address carries a user name or password."""
    if has_userinfo(spec):
        raise SpecError(USERINFO_REFUSED)


_SEGMENT = r"[A-Za-z0-9_.-]+"
_REF = re.compile(r"^[^\x00-\x20~^:?*\[\\]+$")


def _check_ref(ref: str, spec: str) -> str:
    ref = unquote(ref)
    if not ref or ref.startswith("-") or ".." in ref or not _REF.match(ref):
        raise SpecError(f"'{ref}' in '{spec}' is not a valid branch, tag or commit.")
    return ref


class GitHub(GitProvider):
    def parse(self, spec: str) -> RepoSpec:
        match = re.fullmatch(rf"({_SEGMENT})/({_SEGMENT})/(.+)", spec)
        if not match:
            raise SpecError(
                f"'{spec}' is not a GitHub spec; use <user>/<repository>/<branch, tag or commit>."
            )
        org, repo, ref = match.groups()
        repo = repo.removesuffix(".git")
        return RepoSpec(self.name, f"https://github.com/{org}/{repo}", _check_ref(ref, spec))

    def persistent(self, parsed: RepoSpec, commit: str) -> str:
        return parsed.repo_url.removeprefix("https://github.com/") + f"/{commit}"


class GitLab(GitProvider):
    def parse(self, spec: str) -> RepoSpec:
        path, sep, ref = spec.rpartition("/")
        path = unquote(path)
        if not sep or not re.fullmatch(rf"{_SEGMENT}(/{_SEGMENT})+", path):
            raise SpecError(
                f"'{spec}' is not a GitLab spec; use <url-escaped group/project>/<ref>, "
                "for example gitlab-org%2Fgitlab/master."
            )
        repo_url = "https://gitlab.com/" + path.removesuffix(".git")
        return RepoSpec(self.name, repo_url, _check_ref(ref, spec))

    def persistent(self, parsed: RepoSpec, commit: str) -> str:
        path = parsed.repo_url.removeprefix("https://gitlab.com/")
        return f"{quote(path, safe='')}/{commit}"


class Gist(GitProvider):
    def parse(self, spec: str) -> RepoSpec:
        match = re.fullmatch(rf"({_SEGMENT})/([0-9a-fA-F]+)(?:/(.+))?", spec)
        if not match:
            raise SpecError(f"'{spec}' is not a gist spec; use <user>/<gist id>[/<ref>].")
        user, gist, ref = match.groups()
        ref = _check_ref(ref, spec) if ref else "HEAD"
        return RepoSpec(self.name, f"https://gist.github.com/{user}/{gist}.git", ref)

    def persistent(self, parsed: RepoSpec, commit: str) -> str:
        path = parsed.repo_url.removeprefix("https://gist.github.com/").removesuffix(".git")
        return f"{path}/{commit}"


class AnyGit(GitProvider):
    def parse(self, spec: str) -> RepoSpec:
        escaped, sep, ref = spec.rpartition("/")
        if not sep or not escaped:
            raise SpecError(f"'{spec}' is not a git spec; use <url-escaped repository URL>/<ref>.")
        url = unquote(escaped)
        if url.startswith("-"):
            raise SpecError(f"'{url}' is not a repository URL.")
        return RepoSpec(self.name, url, _check_ref(ref, spec))

    def persistent(self, parsed: RepoSpec, commit: str) -> str:
        return f"{quote(parsed.repo_url, safe='')}/{commit}"


PROVIDERS: dict[str, GitProvider] = {
    p.name: p
    for p in (
        GitHub(
            "gh",
            "GitHub",
            r"^([^/]+)/([^/]+)/(.+)$",
            "GitHub repository name or URL",
            "Git ref (branch, tag, or commit)",
        ),
        GitLab(
            "gl",
            "GitLab.com",
            r"^(.+)/([^/]+)$",
            "GitLab.com repository or URL",
            "Git ref (branch, tag, or commit)",
        ),
        Gist(
            "gist",
            "Gist",
            r"^([^/]+)/([0-9a-fA-F]+)(/.*)?$",
            "Gist ID (username/gistId) or URL",
            "Git commit SHA",
        ),
        AnyGit(
            "git",
            "Git repository",
            r"^(.+)/([^/]+)$",
            "Arbitrary git repository URL",
            "Git ref (branch, tag, or commit)",
        ),
    )
}


def parse_spec(provider: str, spec: str) -> RepoSpec:
    """Parse ``spec`` for a git ``provider``; SpecError (one sentence) when it does not fit."""
    try:
        chosen = PROVIDERS[provider]
    except KeyError:
        known = ", ".join(PROVIDERS)
        raise SpecError(f"Unknown provider '{provider}'; known providers: {known}.") from None
    check_no_userinfo(spec)
    return chosen.parse(spec.strip("/"))
