"""Pipfile and Pipfile.lock → a pip requirements file (pure).

binderbox installs with uv rather than pipenv: the lock's pins (or the Pipfile's
specifiers) become requirement lines, ``[dev-packages]`` included, as repo2docker does
with ``pipenv install --dev``.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from binderbox.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PYTHON = re.compile(r"^(\d+)\.(\d+)")


@dataclass(frozen=True)
class PipenvRequirements:
    """Requirement lines derived from a Pipfile or its lock."""

    text: str
    # True when a line refers to files in the repository (``path = "."``).
    local: bool
    python_version: str  # "X.Y" or ""


def from_lock(text: str, rel: str) -> PipenvRequirements:
    """Translate a Pipfile.lock (JSON) into pinned requirement lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{rel} is not valid JSON: {err.msg} (line {err.lineno}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{rel} is not a Pipfile.lock (expected a JSON object).")
    meta = data.get("_meta") or {}
    python = str(((meta.get("requires") or {}).get("python_version")) or "")
    lines: list[str] = []
    local = False
    for section in ("default", "develop"):
        packages = data.get(section) or {}
        if not isinstance(packages, dict):
            raise ConfigError(f"{rel}: '{section}' must be an object of packages.")
        for name, spec in packages.items():
            line, is_local = _line(name, spec, rel, locked=True)
            lines.append(line)
            local = local or is_local
    return PipenvRequirements(_joined(lines), local, _python(python, rel))


def from_pipfile(text: str, rel: str) -> PipenvRequirements:
    """Translate a Pipfile (TOML) into requirement lines, dev-packages included."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{rel} is not valid TOML: {err}.") from None
    lines: list[str] = []
    sources = [s.get("url", "") for s in data.get("source") or [] if isinstance(s, dict)]
    for url in sources:
        if url and "pypi.org/simple" not in url:
            lines.append(f"--extra-index-url {url}")
    local = False
    for section in ("packages", "dev-packages"):
        packages = data.get(section) or {}
        if not isinstance(packages, dict):
            raise ConfigError(f"{rel}: [{section}] must be a table of packages.")
        for name, spec in packages.items():
            line, is_local = _line(name, spec, rel, locked=False)
            lines.append(line)
            local = local or is_local
    requires = data.get("requires") or {}
    python = str(requires.get("python_version") or requires.get("python_full_version") or "")
    return PipenvRequirements(_joined(lines), local, _python(python, rel))


def _line(name: str, spec: Any, rel: str, *, locked: bool) -> tuple[str, bool]:
    if not _NAME.match(name):
        raise ConfigError(f"{rel}: {name!r} is not a valid package name.")
    if isinstance(spec, str):
        return name + ("" if spec.strip() == "*" else spec.strip()), False
    if not isinstance(spec, dict):
        raise ConfigError(f"{rel}: the entry for {name!r} is neither a version nor a table.")
    extras = spec.get("extras") or []
    requirement = name + (f"[{','.join(map(str, extras))}]" if extras else "")
    markers = spec.get("markers") or ""
    suffix = f" ; {markers}" if markers else ""
    editable = "-e " if spec.get("editable") else ""
    if "path" in spec:
        path = str(spec["path"])
        if path.startswith("-") or "\n" in path:
            raise ConfigError(f"{rel}: the path of {name!r} is not a usable path.")
        target = path if path.startswith((".", "/")) else f"./{path}"
        return f"{editable}{target}{suffix}", True
    if "git" in spec:
        ref = spec.get("ref") or ""
        url = f"git+{spec['git']}" + (f"@{ref}" if ref else "")
        return (f"{editable}{url}#egg={name}" if editable else f"{requirement} @ {url}"), False
    if "file" in spec:
        return f"{requirement} @ {spec['file']}{suffix}", False
    version = str(spec.get("version") or "*").strip()
    if version == "*":
        version = ""
    return f"{requirement}{version}{suffix}", False


def _python(value: str, rel: str) -> str:
    if not value:
        return ""
    match = _PYTHON.match(value)
    if not match:
        raise ConfigError(f"{rel}: python_version {value!r} is not understood; write X.Y.")
    return f"{match[1]}.{match[2]}"


def _joined(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)
