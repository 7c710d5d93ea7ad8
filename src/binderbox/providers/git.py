"""A repository reached with the git CLI at a URL, at a branch, tag or commit.

Anonymous users choose these URLs, so git runs as nobody in particular: no operator
configuration (global or system config, ``insteadOf`` rules, credential helpers, ssh
keys), only the http(s) and git transports, and a clone that stops at a size and file
count. When hosts are checked (the service), git connects only to addresses that passed
the check: the first address of the host is pinned (``http.curloptResolve`` for
http(s), the address itself for ``git://``), redirects are followed here, each one
checked, and submodule URLs pass the same check before they are fetched.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

from binderbox.config import Settings
from binderbox.errors import SourceError, UsageError
from binderbox.providers.base import Fetched
from binderbox.providers.hosts import DEFAULT_PORTS, check_url_form, checked_address

_HEX = re.compile(r"^[0-9a-f]{7,40}$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# Characters git forbids in ref names (git-check-ref-format), plus leading '-'.
_BAD_REF = re.compile(r"^-|[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")
_INFO_REFS = "/info/refs?service=git-upload-pack"
_MAX_REDIRECTS = 5
_CLONE = ("clone", "--quiet", "--no-checkout", "--no-recurse-submodules")
_SUBMODULE_UPDATE = ("submodule", "update", "--init", "--checkout", "--quiet")
_READ_GITMODULES = (
    "config",
    "--blob",
    "HEAD:.gitmodules",
    "-z",
    "--get-regexp",
    r"^submodule\..*\.(path|url)$",
)

# Settings git takes from nowhere but here (global and system config are /dev/null).
_CONFIG = (
    "protocol.allow=never",
    "protocol.https.allow=always",
    "protocol.http.allow=always",
    "protocol.git.allow=always",
    "protocol.file.allow=never",
    "protocol.ssh.allow=never",
    "protocol.ext.allow=never",
    "credential.helper=",
    "core.askPass=",
    "core.hooksPath=/dev/null",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "http.lowSpeedLimit=1000",
)
_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_SYSTEM": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",  # never hang waiting for a password
    "GIT_ASKPASS": "true",
    "GIT_SSH_COMMAND": "false",  # ssh is switched off; if anything asks, it fails
    "LC_ALL": "C",
}
_PROXY_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


@dataclass(frozen=True)
class GitPolicy:
    """Where git may connect and how much one repository may bring."""

    # Hosts trusted although local or private; None: hosts are not checked (the CLI).
    allowed_hosts: tuple[str, ...] | None = None
    max_bytes: int = 2_000_000_000
    max_files: int = 100_000
    # The whole fetch (clone, checkout, submodules), and a transfer slower than 1 kB/s.
    timeout: float = 600
    low_speed_seconds: int = 60
    submodule_depth: int = 5
    ca_bundle: str = ""

    @classmethod
    def from_settings(
        cls, settings: Settings, allowed_hosts: Iterable[str] | None = None
    ) -> GitPolicy:
        """The settings' limits; hosts are checked when ``allowed_hosts`` is given."""
        return cls(
            allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
            max_bytes=settings.git_max_bytes,
            max_files=settings.git_max_files,
            timeout=settings.git_timeout,
            low_speed_seconds=settings.git_low_speed_seconds,
            ca_bundle=settings.ca_bundle,
        )

    @property
    def checks_hosts(self) -> bool:
        return self.allowed_hosts is not None


@dataclass(frozen=True)
class Remote:
    """A URL as git is to reach it: ``url`` for git (maybe an address), ``named`` with
    the host name (relative submodules resolve against it), ``config`` pinning it."""

    url: str
    named: str
    config: tuple[str, ...] = ()


class GitSource:
    """A git URL plus ref; every user value is passed after ``--`` or validated first."""

    def __init__(
        self, url: str, ref: str = "HEAD", commit: str = "", policy: GitPolicy | None = None
    ) -> None:
        """``commit``, when given, is what ``ref`` is already known to point to."""
        if url.startswith("-") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", url):
            raise UsageError(f"'{url}' is not a git URL binderbox will fetch.")
        if _BAD_REF.search(ref):
            raise UsageError(f"'{ref}' is not a valid git ref (branch, tag or commit).")
        self.repo_url = url
        self.ref = ref
        self.policy = policy or GitPolicy()
        self._commit = commit if _FULL_SHA.match(commit) else ""
        self._remote: Remote | None = None

    def slug(self) -> str:
        url = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", self.repo_url)
        url = re.sub(r"^[^@/]+@", "", url)  # drop credentials or the git@ user
        return url.removesuffix("/").removesuffix(".git")

    def remote(self) -> Remote:
        """Check the repository's host once; every later connection goes where it said."""
        if self._remote is None:
            self._remote = connect(self.repo_url, self.policy)
        return self._remote

    def resolve(self) -> str:
        if self._commit:
            return self._commit
        if _FULL_SHA.match(self.ref):
            self._commit = self.ref
            return self._commit
        remote = self.remote()
        deadline = time.monotonic() + self.policy.timeout
        listing = _git(
            ["ls-remote", "--", remote.url], self._unreachable, self.policy, deadline, remote
        )
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
        remote = self.remote()
        policy = self.policy
        deadline = time.monotonic() + policy.timeout
        too_big = self._too_big
        _git(
            [*_CLONE, "--", remote.url, str(dest)],
            self._unreachable,
            policy,
            deadline,
            remote,
            watch=(dest, too_big),
        )
        wanted = commit or self.ref
        full = _git(
            ["-C", str(dest), "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"],
            self._unknown_ref,
            policy,
            deadline,
        ).strip()
        if not _FULL_SHA.match(full):
            raise SourceError(self._unknown_ref())
        _check_tree(dest, full, policy, deadline, too_big)
        _git(
            ["-C", str(dest), "checkout", "--quiet", "--detach", full],
            self._checkout_failed,
            policy,
            deadline,
        )
        _update_submodules(dest, dest, remote.named, policy, deadline, too_big, depth=1)
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

    def _too_big(self, files: bool) -> str:
        if files:
            return (
                f"The repository '{self.repo_url}' has more than {self.policy.max_files:,} "
                "files, more than binderbox fetches (the git_max_files setting)."
            )
        return (
            f"The repository '{self.repo_url}' is larger than the "
            f"{_size(self.policy.max_bytes)} binderbox fetches (the git_max_bytes setting)."
        )


# --- where git connects ----------------------------------------------------------------------


def connect(url: str, policy: GitPolicy) -> Remote:
    """The remote git is to use for ``url``: checked and pinned when the policy checks
    hosts (redirects of http(s) followed here, each hop checked), else as it is."""
    check_url_form(url)
    if not policy.checks_hosts:
        return Remote(url, url)
    allowed = policy.allowed_hosts or ()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "git":
        host, address = checked_address(url, None, allowed)
        return Remote(_with_host(url, address), _with_host(url, host))
    for _ in range(_MAX_REDIRECTS + 1):
        host, address = checked_address(url, None, allowed)
        url = _with_host(url, host)
        port = urlsplit(url).port or DEFAULT_PORTS[urlsplit(url).scheme.lower()]
        pins = ("http.followRedirects=false",)
        if host != address:
            pins += (f"http.curloptResolve={host}:{port}:{_bracketed(address)}",)
        target = _redirect(url, host, address, port, policy)
        if not target:
            return Remote(url, url, pins)
        if not target.endswith(_INFO_REFS) or "#" in target:
            raise SourceError(
                f"The git server at '{url}' redirects to '{target}', which is not a git "
                "repository address."
            )
        following = target.removesuffix(_INFO_REFS)
        try:
            check_url_form(following)
            checked_address(following, None, allowed)
        except SourceError as refused:
            raise SourceError(
                f"The git server at '{url}' redirects to '{following}', and "
                f"{_lower_first(refused.message)}"
            ) from None
        url = following
    raise SourceError(f"The git server at '{url}' redirects more than {_MAX_REDIRECTS} times.")


def _redirect(url: str, host: str, address: str, port: int, policy: GitPolicy) -> str:
    """Ask ``url``'s /info/refs at the checked address, as git's first request does; the
    absolute URL it redirects to, or "" (answers and failures are git's to handle)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + _INFO_REFS
    connection: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        connection = _PinnedHTTPS(address, port, host, _tls(policy.ca_bundle), timeout=30)
    else:
        connection = http.client.HTTPConnection(address, port, timeout=30)
    netloc = _bracketed(host) + (f":{parts.port}" if parts.port else "")
    try:
        connection.request(
            "GET", path, headers={"Host": netloc, "User-Agent": "git/binderbox", "Accept": "*/*"}
        )
        response = connection.getresponse()
        location = response.getheader("Location", "")
        if response.status in {301, 302, 303, 307, 308} and location:
            return urljoin(urlunsplit(parts._replace(path=path, query="", fragment="")), location)
        return ""
    except ssl.SSLError as err:
        raise SourceError(
            f"Could not fetch the git repository '{url}': its TLS certificate is not trusted "
            f"({err.reason or err})."
        ) from None
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        connection.close()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to a fixed address, with the host name for SNI and the certificate check."""

    def __init__(
        self, address: str, port: int, host: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = host
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self._server_name)


def _tls(ca_bundle: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def _with_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + _bracketed(host)
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# --- submodules ------------------------------------------------------------------------------


def _update_submodules(
    top: Path,
    work: Path,
    parent_url: str,
    policy: GitPolicy,
    deadline: float,
    too_big: Callable[[bool], str],
    depth: int,
) -> None:
    """Fetch the submodules of the checkout ``work`` (one level), each URL checked first
    with the repository's own policy, then their submodules, up to the depth limit."""
    for name, path, url in _submodules(work, policy, deadline):
        if depth > policy.submodule_depth:
            raise SourceError(
                f"The submodule '{name}' is nested more than {policy.submodule_depth} "
                "levels deep; binderbox fetches no deeper."
            )
        absolute = _absolute_submodule_url(url, parent_url)
        try:
            if not absolute:
                raise SourceError("relative URLs may not climb above the host")
            remote = connect(absolute, policy)
        except SourceError as refused:
            detail = refused.message
            raise SourceError(
                f"The submodule '{name}' points to '{absolute or url}', which binderbox "
                f"does not fetch: {_lower_first(detail.rstrip('.'))}."
            ) from None

        def failed(detail: str, name: str = name, url: str = absolute) -> str:
            return f"Fetching the submodule '{name}' from '{url}' failed: {detail}"

        _git(
            ["-C", str(work), "config", f"submodule.{name}.url", remote.url],
            failed,
            policy,
            deadline,
        )
        _git(
            ["-C", str(work), *_SUBMODULE_UPDATE, "--", path],
            failed,
            policy,
            deadline,
            remote,
            watch=(top, too_big),
        )
        _update_submodules(top, work / path, remote.named, policy, deadline, too_big, depth + 1)
    _check_size(top, policy, too_big)


def _submodules(work: Path, policy: GitPolicy, deadline: float) -> list[tuple[str, str, str]]:
    """(name, path, url) of each submodule the checkout records, read from HEAD's
    .gitmodules in the object database (nothing runs, the work tree is not read)."""
    staged = _git(["-C", str(work), "ls-files", "--stage", "-z"], str, policy, deadline)
    links = {
        entry.partition("\t")[2] for entry in staged.split("\0") if entry.startswith("160000 ")
    }
    if not links:
        return []
    try:
        listing = _git(
            ["-C", str(work), *_READ_GITMODULES],
            str,
            policy,
            deadline,
        )
    except SourceError:
        listing = ""  # no .gitmodules: git has no URL for the links either
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for item in listing.split("\0"):
        key, _, value = item.partition("\n")
        if not key.startswith("submodule."):
            continue
        name, _, field = key.removeprefix("submodule.").rpartition(".")
        (paths if field == "path" else urls)[name] = value
    found = []
    for name, path in paths.items():
        if path in links:
            if name not in urls:
                raise SourceError(f"The submodule '{name}' has no URL in .gitmodules.")
            found.append((name, path, urls[name]))
    return found


def _absolute_submodule_url(url: str, parent: str) -> str:
    """A submodule URL made absolute the way git does (relative to the superproject's
    URL); "" when a relative one climbs above the host."""
    if not url.startswith(("./", "../")):
        return url
    parts = urlsplit(parent)
    segments = [s for s in parts.path.split("/") if s]
    rest = url
    while rest.startswith(("./", "../")):
        if rest.startswith("../"):
            if not segments:
                return ""
            segments.pop()
            rest = rest[3:]
        else:
            rest = rest[2:]
    path = "/" + "/".join([*segments, *(s for s in rest.split("/") if s)])
    return urlunsplit(parts._replace(path=path, query="", fragment=""))


# --- limits ----------------------------------------------------------------------------------


def _check_tree(
    dest: Path, commit: str, policy: GitPolicy, deadline: float, too_big: Callable[[bool], str]
) -> None:
    """Refuse a commit whose files add up to more than the limits, before checking out."""
    listing = _git(
        ["-C", str(dest), "ls-tree", "-r", "-l", "-z", "--full-tree", commit], str, policy, deadline
    )
    files = 0
    size = 0
    for entry in listing.split("\0"):
        meta = entry.partition("\t")[0].split()
        if len(meta) != 4:
            continue
        files += 1
        if meta[3].isdigit():
            size += int(meta[3])
    if files > policy.max_files:
        raise SourceError(too_big(True))
    if size > policy.max_bytes:
        raise SourceError(too_big(False))


def _check_size(top: Path, policy: GitPolicy, too_big: Callable[[bool], str]) -> None:
    size, files = _usage(top, policy.max_files)
    if files > policy.max_files:
        raise SourceError(too_big(True))
    if size > policy.max_bytes:
        raise SourceError(too_big(False))


def _usage(top: Path, max_files: int) -> tuple[int, int]:
    """Bytes and files under ``top``, counting stops a little past ``max_files``."""
    size = files = 0
    stack = [top]
    while stack and files <= max_files:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # git moved or removed it meanwhile
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return size, files


def _size(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


# --- running git -----------------------------------------------------------------------------


def _git(
    args: list[str],
    explain: Callable[[str], str],
    policy: GitPolicy,
    deadline: float,
    remote: Remote | None = None,
    watch: tuple[Path, Callable[[bool], str]] | None = None,
) -> str:
    """Run git isolated from the operator's configuration; on failure raise SourceError
    with ``explain(last stderr line)``. ``watch``: a folder kept within the limits while
    git runs (git is stopped when it outgrows them)."""
    options = [*_CONFIG, f"http.lowSpeedTime={policy.low_speed_seconds}"]
    if policy.checks_hosts:
        options.append("http.proxy=")  # a proxy would resolve the host itself
    if remote is not None:
        options.extend(remote.config)
    command = ["git"]
    for option in options:
        command += ["-c", option]
    command += args
    with tempfile.TemporaryDirectory(prefix="binderbox-git-home-") as home:
        env = _environment(home, policy)
        if policy.ca_bundle:
            command[1:1] = ["-c", f"http.sslCAInfo={_ca_file(home, policy.ca_bundle)}"]
        try:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # git's helpers (remote-http, index-pack) go with it
            )
        except FileNotFoundError:
            raise SourceError(
                "git is not installed; run the setup command from the README."
            ) from None
        stdout, stderr = _wait(process, explain, policy, deadline, watch)
    if process.returncode != 0:
        text = stderr.decode(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"git exited with code {process.returncode}"
        detail = detail.removeprefix("fatal: ").removeprefix("error: ").rstrip(".") + "."
        raise SourceError(explain(detail))
    return stdout.decode(errors="replace")


def _wait(
    process: subprocess.Popen[bytes],
    explain: Callable[[str], str],
    policy: GitPolicy,
    deadline: float,
    watch: tuple[Path, Callable[[bool], str]] | None,
) -> tuple[bytes, bytes]:
    """Wait for git, stopping it at the deadline or when the watched folder is too big."""
    while True:
        try:
            return process.communicate(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        problem = ""
        if time.monotonic() > deadline:
            problem = explain(f"git did not finish within {policy.timeout:g} seconds.")
        elif watch is not None:
            size, files = _usage(watch[0], policy.max_files)
            if files > policy.max_files or size > policy.max_bytes:
                problem = watch[1](files > policy.max_files)
        if problem:
            _stop(process)
            raise SourceError(problem)


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def _ca_file(home: str, ca_bundle: str) -> str:
    """The system's CAs plus the extra bundle, in one file (git takes one or the other)."""
    combined = os.path.join(home, "ca-certificates.pem")
    system = ssl.get_default_verify_paths().cafile
    with open(combined, "wb") as out:
        for name in (system, ca_bundle):
            if name and os.path.isfile(name):
                with open(name, "rb") as part:
                    out.write(part.read() + b"\n")
    return combined


def _environment(home: str, policy: GitPolicy) -> dict[str, str]:
    """The service's environment without anything that configures git, ssh or (when
    hosts are checked) a proxy; HOME is an empty folder."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GIT_", "SSH_", "XDG_"))
        and not (policy.checks_hosts and name.lower() in _PROXY_ENV)
    }
    env.update(_ENV)
    env["HOME"] = home
    env["XDG_CONFIG_HOME"] = os.path.join(home, ".config")
    return env
