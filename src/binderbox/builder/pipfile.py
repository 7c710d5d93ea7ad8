"""Pipfile and Pipfile.lock → a pip requirements file (pure).

binderbox installs with uv rather than pipenv: the lock's pins (or the Pipfile's
specifiers) become requirement lines, ``[dev-packages]`` included, as repo2docker does
with ``pipenv install --dev``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from binderbox.builder import package_index
from binderbox.builder.repofiles import load_json, load_toml
from binderbox.errors import ConfigError, quoted

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
    data = load_json(text, rel)
    if not isinstance(data, dict):
        raise ConfigError(f"{rel} is not a Pipfile.lock (expected a JSON object).")
    meta = _table(data.get("_meta"), rel, "_meta")
    python = str(_table(meta.get("requires"), rel, "_meta.requires").get("python_version") or "")
    # As in the Pipfile: PyPI means the configured index, other sources stay extra ones.
    lines = [f"--extra-index-url {url}" for url in _lock_sources(meta.get("sources"), rel)]
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
    data = load_toml(text, rel)
    lines: list[str] = []
    listed = data.get("source") or []
    sources = (
        [s.get("url", "") for s in listed if isinstance(s, dict)]
        if isinstance(listed, list)
        else []
    )
    for url in sources:
        if not isinstance(url, str) or "\n" in url or "\r" in url:
            raise ConfigError(f"{rel}: the source url {quoted(url)} is not a URL.")
        # PyPI under any of its addresses means the configured index (index_url).
        if url and not package_index.names_pypi(url):
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
    requires = _table(data.get("requires"), rel, "requires")
    python = str(requires.get("python_version") or requires.get("python_full_version") or "")
    return PipenvRequirements(_joined(lines), local, _python(python, rel))


def _line(name: str, spec: Any, rel: str, *, locked: bool) -> tuple[str, bool]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{rel}: {quoted(name)} is not a valid package name.")
    if isinstance(spec, str):
        return name + ("" if spec.strip() == "*" else spec.strip()), False
    if not isinstance(spec, dict):
        raise ConfigError(f"{rel}: the entry for {quoted(name)} is neither a version nor a table.")
    extras = spec.get("extras") or []
    requirement = name + (f"[{','.join(map(str, extras))}]" if extras else "")
    markers = spec.get("markers") or ""
    suffix = f" ; {markers}" if markers else ""
    editable = "-e " if spec.get("editable") else ""
    if "path" in spec:
        path = str(spec["path"])
        if path.startswith("-") or "\n" in path:
            raise ConfigError(f"{rel}: the path of {quoted(name)} is not a usable path.")
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
        raise ConfigError(f"{rel}: python_version {quoted(value)} is not understood; write X.Y.")
    return f"{match[1]}.{match[2]}"


def _table(value: Any, rel: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{rel}: '{key}' must be a table.")
    return value


def _joined(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _lock_sources(listed: Any, rel: str) -> list[str]:
    """The index URLs of a lock's ``_meta.sources`` that are not PyPI itself."""
    if not isinstance(listed, list):
        return []
    urls = []
    for source in listed:
        url = source.get("url", "") if isinstance(source, dict) else ""
        if not isinstance(url, str) or "\n" in url or "\r" in url:
            raise ConfigError(f"{rel}: a source url in _meta.sources is not a URL.")
        if url and not package_index.names_pypi(url):
            urls.append(url)
    return urls
