"""The lock of a build: what it resolved, in a file that can rebuild the same environment.

Every rendered build ends with a step that writes what the image holds to
``ENVIRONMENT_FILE`` (the Debian packages added to the base, ``uv pip freeze`` of the
Python environment, R's packages); the builder adds what only the host knows (the
base image's digest, the repository and its commit) from the image's labels. Together
they are the lock, a JSON document:

    {"format": "binderbox-lock", "version": 1, "created": …, "binderbox_version": …,
     "image": …,
     "repository": {"provider", "url", "ref", "commit", "subdir"},
     "user": {"id", "name", "target_repo_dir"},
     "base": {"image", "id", "repo_digests", "binderbox_base", "os"},
     "python": {"version", "packages": [{"name", "version"}], "unpinned": [line, …]} | null,
     "debian": {"packages": [{"name", "version", "architecture"}]} | null,
     "r": {"version", "cran_mirror", "packages": [{"name", "version", "library"}]} | null}

``debian.packages`` are the packages the build installed or changed beyond the base
image; ``python.unpinned`` are freeze lines that do not come from the package index
(the repository itself, a URL), which the rebuild gets from the repository again.
A lock file is input from anywhere: ``parse_lock`` checks every field (types, name and
version patterns that leave no room for shell or requirement-file syntax, a size bound)
and says what is wrong in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from binderbox.builder import r_support
from binderbox.errors import UsageError, quoted

LOCK_FORMAT = "binderbox-lock"
LOCK_VERSION = 1
# Where the build's last step writes what the image holds, and its format's version.
ENVIRONMENT_FILE = "/srv/binderbox/environment.json"
ENVIRONMENT_FORMAT = "binderbox-environment"
# The collector in the build context, and where the base's dpkg status is mounted for it.
COLLECTOR = "collect-environment.py"
# A lock (or an image's environment file) larger than this is refused unread.
MAX_LOCK_BYTES = 4_000_000
MAX_PACKAGES = 20_000
MAX_TEXT = 2000

# Image labels the builder sets for the lock (beside binderbox.repo, .ref, .commit, .subdir).
LABEL_PROVIDER = "binderbox.provider"
LABEL_BASE_IMAGE = "binderbox.base-image"
LABEL_BASE_ID = "binderbox.base-id"
LABEL_BASE_DIGESTS = "binderbox.base-digests"
LABEL_BASE_KIND = "binderbox.base-kind"
LABEL_FROM_LOCK = "binderbox.from-lock"

# PEP 508 project names; PEP 440 versions are also parsed by packaging.
_PYTHON_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?")
_PYTHON_VERSION = re.compile(r"[A-Za-z0-9.+!_-]{1,64}")
_FREEZE_PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#@]+)")
# Debian policy 5.6.1 (names) and 5.6.12 (versions: [epoch:]upstream[-revision]).
_DEBIAN_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{1,127}")
_DEBIAN_VERSION = re.compile(r"(?:[0-9]{1,9}:)?[0-9A-Za-z][A-Za-z0-9.+~-]{0,127}")
_ARCHITECTURE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_R_NAME = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,99}")
_R_VERSION = re.compile(r"[0-9][0-9.-]{0,63}")
_LIBRARY = re.compile(r"/[A-Za-z0-9._/+-]{0,255}")
_RUNTIME_VERSION = re.compile(
    r"[0-9]{1,3}\.[0-9]{1,3}(?:\.[0-9]{1,4})?(?:(?:a|b|rc)[0-9]{1,4})?\+?"
)
_PROVIDER = re.compile(r"[a-z]{2,20}")
# A commit (40 or 64 hex digits), a folder's content hash or a record's content id.
_COMMIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}")
_REPO_DIGEST = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}@sha256:[0-9a-f]{64}")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_REPO_DIR = re.compile(r"/[A-Za-z0-9._/-]{1,255}")


class LockError(UsageError):
    """A lock file that cannot be used, said in one sentence."""


@dataclass(frozen=True)
class LockedRepository:
    """Where the repository came from and the commit (or content id) that was built."""

    provider: str  # "git", "local", or a record provider such as "zenodo"
    url: str
    commit: str
    ref: str = ""
    subdir: str = ""


@dataclass(frozen=True)
class LockedBase:
    """The image the build started from; ``id`` is its content digest (image id)."""

    image: str
    id: str
    repo_digests: tuple[str, ...] = ()
    # Made by `binderbox base` (it has the server stack) or any other Debian/Ubuntu image.
    binderbox_base: bool = True
    os: str = ""


@dataclass(frozen=True)
class LockedUser:
    id: int = 1000
    name: str = "jovyan"
    target_repo_dir: str = ""  # "" for the user's home


@dataclass(frozen=True)
class PythonPackage:
    name: str
    version: str

    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class LockedPython:
    version: str
    packages: tuple[PythonPackage, ...]
    # Freeze lines that do not name an index version (the repository itself, a URL).
    unpinned: tuple[str, ...] = ()


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    architecture: str = ""


@dataclass(frozen=True)
class RPackage:
    name: str
    version: str
    library: str = ""


@dataclass(frozen=True)
class LockedR:
    version: str
    cran_mirror: str = ""
    packages: tuple[RPackage, ...] = ()


@dataclass(frozen=True)
class Lock:
    """A build's lock (see the module docstring for the file)."""

    repository: LockedRepository
    base: LockedBase
    user: LockedUser = field(default_factory=LockedUser)
    python: LockedPython | None = None
    debian: tuple[DebianPackage, ...] | None = None
    r: LockedR | None = None
    image: str = ""
    created: str = ""
    binderbox_version: str = ""

    def as_json(self) -> dict[str, Any]:
        """The lock as the JSON object of the file."""
        return {
            "format": LOCK_FORMAT,
            "version": LOCK_VERSION,
            "created": self.created,
            "binderbox_version": self.binderbox_version,
            "image": self.image,
            "repository": asdict(self.repository),
            "user": asdict(self.user),
            "base": {**asdict(self.base), "repo_digests": list(self.base.repo_digests)},
            "python": None
            if self.python is None
            else {
                "version": self.python.version,
                "packages": [asdict(p) for p in self.python.packages],
                "unpinned": list(self.python.unpinned),
            },
            "debian": None
            if self.debian is None
            else {"packages": [asdict(p) for p in self.debian]},
            "r": None
            if self.r is None
            else {
                "version": self.r.version,
                "cran_mirror": self.r.cran_mirror,
                "packages": [asdict(p) for p in self.r.packages],
            },
        }

    def text(self) -> str:
        """The lock file's text: indented, one package to a line (so two locks diff well)."""
        return _dump(self.as_json(), "") + "\n"

    def digest(self) -> str:
        """A short digest of the environment (base, packages, repository): a rebuild from
        this lock is named after it, so it never reuses an image built another way."""
        whole = self.as_json()
        kept = {k: whole[k] for k in ("repository", "user", "base", "python", "debian", "r")}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def has_environment(self) -> bool:
        """False for an image built from a repository's own Dockerfile: only the
        repository and its commit were recorded."""
        return self.python is not None or self.debian is not None


def _dump(value: Any, indent: str) -> str:
    """JSON with objects and lists of objects spread over lines, everything else (and
    each package's object) on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value)


# --- reading a lock file ------------------------------------------------------------------


class _Reader:
    """Checks one JSON value after another, naming where a bad one sits."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, where: str, problem: str) -> LockError:
        return LockError(f"{self.what} is not a usable lock: {where} {problem}.")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be an object")
        return value

    def text(
        self,
        data: dict[str, Any],
        key: str,
        where: str,
        pattern: re.Pattern[str] | None = None,
        *,
        empty: bool = False,
        describe: str = "",
    ) -> str:
        value = data.get(key, "" if empty else None)
        here = f"{where}.{key}"
        if not isinstance(value, str):
            raise self.fail(here, "must be a string")
        if not value and empty:
            return ""
        if len(value) > MAX_TEXT or not value.isprintable():
            raise self.fail(here, f"{quoted(value)} is too long or holds control characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(here, f"{quoted(value)} is not {describe or 'valid'}")
        return value

    def items(self, value: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise self.fail(where, "must be a list")
        if len(value) > MAX_PACKAGES:
            raise self.fail(where, f"has more than {MAX_PACKAGES} entries")
        return [self.obj(item, f"{where}[{i}]") for i, item in enumerate(value)]


def parse_lock(raw: bytes | str, what: str = "The lock file") -> Lock:
    """Read and check a lock file; LockError (one sentence) when it cannot be used."""
    if len(raw) > MAX_LOCK_BYTES:
        raise LockError(f"{what} is larger than {MAX_LOCK_BYTES // 1_000_000} MB; no lock is.")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except UnicodeDecodeError:
        raise LockError(f"{what} is not UTF-8 text.") from None
    except RecursionError:
        raise LockError(f"{what} is nested too deeply to be a lock.") from None
    except ValueError as error:
        raise LockError(f"{what} is not JSON ({error}).") from None
    r = _Reader(what)
    top = r.obj(data, "the file")
    if top.get("format") != LOCK_FORMAT:
        raise LockError(f'{what} is not a binderbox lock (its "format" is not {LOCK_FORMAT!r}).')
    version = top.get("version")
    if type(version) is not int:
        raise r.fail("version", "must be a whole number")
    if version > LOCK_VERSION:
        raise LockError(
            f"{what} is a lock of version {version}, written by a newer binderbox; this one "
            f"reads version {LOCK_VERSION}: upgrade binderbox."
        )
    if version < 1:
        raise r.fail("version", f"{version} is not a lock version")

    repo = r.obj(top.get("repository"), "repository")
    provider = r.text(repo, "provider", "repository", _PROVIDER, describe="a provider name")
    repository = LockedRepository(
        provider=provider,
        url=r.text(repo, "url", "repository"),
        commit=r.text(repo, "commit", "repository", _COMMIT, describe="a commit or content id"),
        ref=r.text(repo, "ref", "repository", empty=True),
        subdir=_subdir(r, repo),
    )

    base_data = r.obj(top.get("base"), "base")
    digests = base_data.get("repo_digests", [])
    if not isinstance(digests, list) or len(digests) > 100:
        raise r.fail("base.repo_digests", "must be a short list")
    for i, digest in enumerate(digests):
        if not isinstance(digest, str) or not _REPO_DIGEST.fullmatch(digest):
            raise r.fail(f"base.repo_digests[{i}]", f"{quoted(digest)} is not NAME@sha256:DIGEST")
    binderbox_base = base_data.get("binderbox_base", True)
    if not isinstance(binderbox_base, bool):
        raise r.fail("base.binderbox_base", "must be true or false")
    base = LockedBase(
        image=r.text(base_data, "image", "base", _IMAGE_NAME, empty=True, describe="an image name"),
        id=r.text(base_data, "id", "base", _IMAGE_ID, empty=True, describe="sha256:<64 hex>"),
        repo_digests=tuple(digests),
        binderbox_base=binderbox_base,
        os=r.text(base_data, "os", "base", empty=True),
    )

    user_data = r.obj(top.get("user", {}), "user")
    user_id = user_data.get("id", 1000)
    if type(user_id) is not int or not 1 <= user_id <= 65534:
        raise r.fail("user.id", "must be a number from 1 to 65534")
    user = LockedUser(
        id=user_id,
        name=r.text(user_data, "name", "user", _USER_NAME, describe="a user name")
        if "name" in user_data
        else "jovyan",
        target_repo_dir=r.text(
            user_data, "target_repo_dir", "user", _REPO_DIR, empty=True, describe="a path"
        ),
    )
    if user.name == "root" or ".." in user.target_repo_dir.split("/"):
        raise r.fail("user", "names root or a path with '..'")

    return Lock(
        repository=repository,
        base=base,
        user=user,
        python=_python(r, top.get("python")),
        debian=_debian(r, top.get("debian")),
        r=_r(r, top.get("r")),
        image=r.text(top, "image", "the file", empty=True),
        created=r.text(top, "created", "the file", empty=True),
        binderbox_version=r.text(top, "binderbox_version", "the file", empty=True),
    )


def _subdir(r: _Reader, repo: dict[str, Any]) -> str:
    subdir = r.text(repo, "subdir", "repository", empty=True)
    parts = subdir.split("/")
    if subdir and (subdir.startswith("/") or ".." in parts or "\\" in subdir):
        raise r.fail("repository.subdir", f"{quoted(subdir)} is not a folder in the repository")
    return subdir


def _python(r: _Reader, value: Any) -> LockedPython | None:
    if value is None:
        return None
    data = r.obj(value, "python")
    packages: list[PythonPackage] = []
    seen: set[str] = set()
    for i, item in enumerate(r.items(data.get("packages"), "python.packages")):
        where = f"python.packages[{i}]"
        name = r.text(item, "name", where, _PYTHON_NAME, describe="a Python package name")
        version = r.text(item, "version", where, _PYTHON_VERSION, describe="a package version")
        try:
            Version(version)
        except InvalidVersion:
            problem = f"{quoted(version)} is not a package version"
            raise r.fail(f"{where}.version", problem) from None
        key = canonicalize_name(name)
        if key in seen:
            raise r.fail(where, f"names {quoted(name)} twice")
        seen.add(key)
        packages.append(PythonPackage(name, version))
    unpinned = data.get("unpinned", [])
    if not isinstance(unpinned, list) or len(unpinned) > MAX_PACKAGES:
        raise r.fail("python.unpinned", "must be a list")
    for i, line in enumerate(unpinned):
        if not isinstance(line, str) or len(line) > MAX_TEXT or not line.isprintable():
            raise r.fail(f"python.unpinned[{i}]", "must be one printable line")
    return LockedPython(
        version=r.text(data, "version", "python", _RUNTIME_VERSION, describe="a Python version"),
        packages=tuple(packages),
        unpinned=tuple(unpinned),
    )


def _debian(r: _Reader, value: Any) -> tuple[DebianPackage, ...] | None:
    if value is None:
        return None
    data = r.obj(value, "debian")
    packages: list[DebianPackage] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(r.items(data.get("packages"), "debian.packages")):
        where = f"debian.packages[{i}]"
        package = DebianPackage(
            name=r.text(item, "name", where, _DEBIAN_NAME, describe="a Debian package name"),
            version=r.text(item, "version", where, _DEBIAN_VERSION, describe="a Debian version"),
            architecture=r.text(
                item, "architecture", where, _ARCHITECTURE, empty=True, describe="an architecture"
            ),
        )
        if (package.name, package.architecture) in seen:
            raise r.fail(where, f"names {quoted(package.name)} twice")
        seen.add((package.name, package.architecture))
        packages.append(package)
    return tuple(packages)


def _r(r: _Reader, value: Any) -> LockedR | None:
    if value is None:
        return None
    data = r.obj(value, "r")
    mirror = r.text(data, "cran_mirror", "r", empty=True)
    if mirror and not r_support.check_mirror(mirror):
        raise r.fail("r.cran_mirror", f"{quoted(mirror)} is not an http(s) address")
    packages = tuple(
        RPackage(
            name=r.text(item, "name", f"r.packages[{i}]", _R_NAME, describe="an R package name"),
            version=r.text(
                item, "version", f"r.packages[{i}]", _R_VERSION, describe="an R package version"
            ),
            library=r.text(item, "library", f"r.packages[{i}]", _LIBRARY, empty=True),
        )
        for i, item in enumerate(r.items(data.get("packages", []), "r.packages"))
    )
    return LockedR(
        version=r.text(data, "version", "r", _RUNTIME_VERSION, describe="an R version"),
        cran_mirror=mirror,
        packages=packages,
    )


# --- making a lock from an image -----------------------------------------------------------


def lock_from_image(
    labels: dict[str, str],
    environment_variables: dict[str, str],
    environment: bytes | None,
    *,
    image: str,
    created: str,
) -> Lock:
    """The lock of an image from its labels, its environment variables and the file its
    build's last step wrote (None for an image built from a Dockerfile). The result is
    checked as any lock file is (LockError when the image holds something unusable)."""
    found: dict[str, Any] = {}
    if environment is not None:
        found = parse_environment(environment)
    home = environment_variables.get("HOME", "")
    repo_dir = environment_variables.get("REPO_DIR", home)
    digests = [d for d in labels.get(LABEL_BASE_DIGESTS, "").split(",") if d]
    document = {
        "format": LOCK_FORMAT,
        "version": LOCK_VERSION,
        "created": created,
        "binderbox_version": labels.get("binderbox.version", ""),
        "image": image,
        "repository": {
            "provider": labels.get(LABEL_PROVIDER, "git"),
            "url": labels.get("binderbox.repo", ""),
            "ref": labels.get("binderbox.ref", ""),
            "commit": labels.get("binderbox.commit", ""),
            "subdir": labels.get("binderbox.subdir", ""),
        },
        "user": {
            "id": _int(environment_variables.get("NB_UID", "1000")),
            "name": environment_variables.get("NB_USER", "jovyan"),
            "target_repo_dir": "" if repo_dir == home else repo_dir,
        },
        "base": {
            "image": labels.get(LABEL_BASE_IMAGE, ""),
            "id": labels.get(LABEL_BASE_ID, ""),
            "repo_digests": digests,
            "binderbox_base": labels.get(LABEL_BASE_KIND, "binderbox") == "binderbox",
            "os": found.get("os", ""),
        },
        "python": found.get("python"),
        "debian": found.get("debian"),
        "r": found.get("r"),
    }
    return parse_lock(json.dumps(document), f"The lock of {image}")


def _int(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def parse_environment(raw: bytes) -> dict[str, Any]:
    """What the build's last step recorded, turned into the lock's sections (unchecked
    here: lock_from_image checks the whole lock)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LockError("The environment file the build wrote is not JSON.") from None
    if not isinstance(data, dict) or data.get("format") != ENVIRONMENT_FORMAT:
        raise LockError("The environment file the build wrote is not binderbox's.")
    if data.get("error"):
        raise LockError(f"The build could not record its environment: {quoted(data['error'])}.")
    found: dict[str, Any] = {"os": data.get("os", "")}
    python = data.get("python")
    if isinstance(python, dict):
        packages, unpinned = [], []
        for line in python.get("freeze", []):
            pin = _FREEZE_PIN.fullmatch(line.strip()) if isinstance(line, str) else None
            if pin:
                packages.append({"name": pin["name"], "version": pin["version"]})
            elif isinstance(line, str) and line.strip():
                unpinned.append(line.strip())
        found["python"] = {
            "version": python.get("version", ""),
            "packages": sorted(packages, key=lambda p: canonicalize_name(p["name"])),
            "unpinned": unpinned,
        }
    if isinstance(data.get("debian"), list):
        found["debian"] = {"packages": sorted(data["debian"], key=lambda p: str(p.get("name")))}
    if isinstance(data.get("r"), dict):
        found["r"] = data["r"]
    return found


# --- comparing two locks -----------------------------------------------------------------


def differences(wanted: Lock, got: Lock, limit: int = 10) -> list[str]:
    """How the environment ``got`` differs from the locked one, for people: at most
    ``limit`` entries such as "Python six: 1.16.0 locked, 1.17.0 built"."""
    found: list[str] = []

    def compare(kind: str, locked: dict[str, str], built: dict[str, str]) -> None:
        for name in sorted(set(locked) | set(built)):
            if locked.get(name) != built.get(name):
                found.append(
                    f"{kind} {name}: {locked.get(name) or 'absent'} locked, "
                    f"{built.get(name) or 'absent'} built"
                )

    if wanted.base.id != got.base.id:
        found.append(f"base image: {wanted.base.id} locked, {got.base.id} built")
    if wanted.python and got.python:
        compare(
            "Python",
            {canonicalize_name(p.name): p.version for p in wanted.python.packages},
            {canonicalize_name(p.name): p.version for p in got.python.packages},
        )
    if wanted.debian is not None and got.debian is not None:
        compare(
            "Debian",
            {f"{p.name}:{p.architecture}": p.version for p in wanted.debian},
            {f"{p.name}:{p.architecture}": p.version for p in got.debian},
        )
    if wanted.r and got.r:
        compare(
            "R",
            {p.name: p.version for p in wanted.r.packages},
            {p.name: p.version for p in got.r.packages},
        )
    return found[:limit] + ([f"and {len(found) - limit} more"] if len(found) > limit else [])


# --- the collector: the build's last step --------------------------------------------------

# Runs in the image as its last build step with the image's own /usr/bin/python3 (stdlib
# only); the base's dpkg status is mounted at argv[1]. It never fails the build: a
# problem is written into the file, and the builder says so.
COLLECTOR_SCRIPT = r'''"""binderbox: record what this image holds (binderbox/builder/lock.py)."""
import json
import os
import shutil
import subprocess
import sys

OUT = "/srv/binderbox/environment.json"
VENV_PYTHON = "/srv/venv/bin/python"
R_CODE = (
    'r <- getOption("repos"); cat(R.version$major, ".", R.version$minor, "\\n", sep = ""); '
    'cat(if ("CRAN" %in% names(r)) r[["CRAN"]] else "", "\\n", sep = ""); '
    'ip <- installed.packages(); write.table(ip[, c("Package", "Version", "LibPath"), '
    'drop = FALSE], sep = "\\t", quote = FALSE, row.names = FALSE, col.names = FALSE)'
)


def dpkg(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return {}
    packages = {}
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and fields.get("Package"):
            key = (fields["Package"], fields.get("Architecture", ""))
            packages[key] = fields.get("Version", "")
    return packages


def output(*command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()[-300:]}")
    return result.stdout


def venv_version():
    """The venv's Python version from its pyvenv.cfg (no Python started for it)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(VENV_PYTHON)), "pyvenv.cfg")) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() in ("version_info", "version"):
                    return value.strip()
    except OSError:
        pass
    return ""


def os_release():
    fields = {}
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                fields[key] = value.strip('"')
    except OSError:
        pass
    name = " ".join(v for v in (fields.get("ID", ""), fields.get("VERSION_ID", "")) if v)
    codename = fields.get("VERSION_CODENAME", "")
    return f"{name} ({codename})" if codename else name


def collect(base_status):
    found = {"format": "binderbox-environment", "version": 1, "os": os_release()}
    base = dpkg(base_status)
    found["debian"] = [
        {"name": name, "version": version, "architecture": arch}
        for (name, arch), version in sorted(dpkg("/var/lib/dpkg/status").items())
        if base.get((name, arch)) != version
    ]
    if os.path.exists(VENV_PYTHON):
        version = venv_version() or output(
            VENV_PYTHON, "-c", "import platform; print(platform.python_version())"
        )
        # No cache: UV_CACHE_DIR is the user's by now, which root must neither take over
        # nor leave its own cache in.
        freeze = output("uv", "pip", "freeze", "--no-cache", "--python", VENV_PYTHON)
        found["python"] = {"version": version.strip(), "freeze": freeze.splitlines()}
    if shutil.which("Rscript"):
        lines = output("Rscript", "-e", R_CODE).splitlines()
        packages = []
        for line in lines[2:]:
            parts = line.split("\t")
            if len(parts) == 3:
                packages.append({"name": parts[0], "version": parts[1], "library": parts[2]})
        found["r"] = {
            "version": lines[0].strip() if lines else "",
            "cran_mirror": lines[1].strip() if len(lines) > 1 and "@" not in lines[1] else "",
            "packages": sorted(packages, key=lambda p: (p["name"], p["library"])),
        }
    return found


def main():
    try:
        found = collect(sys.argv[1])
    except Exception as error:  # recorded, never a failed build
        found = {"format": "binderbox-environment", "version": 1, "error": str(error)[:500]}
    os.makedirs(os.path.dirname(OUT), mode=0o755, exist_ok=True)
    with open(OUT + ".new", "w", encoding="utf-8") as handle:
        json.dump(found, handle, indent=1)
    os.chmod(OUT + ".new", 0o644)
    os.replace(OUT + ".new", OUT)
    python = found.get("python") or {}
    print(
        f"binderbox: recorded {len(python.get('freeze', []))} Python packages and "
        f"{len(found.get('debian', []))} Debian packages beyond the base"
        + (f"; problem: {found['error']}" if found.get("error") else "")
    )


main()
'''
