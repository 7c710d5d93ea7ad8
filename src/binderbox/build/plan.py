"""The typed result of reading a repository's configuration files."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AptPackage:
    """One line of apt.txt: a Debian package name, optionally pinned to a version."""

    name: str
    version: str = ""

    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.version else self.name


@dataclass(frozen=True)
class Requirements:
    """A pip requirements file.

    ``local`` is true when it refers to files in the repository (``-e .``, ``-r other.txt``,
    paths), so it can only be installed once the whole repository is in the image.
    """

    path: str  # relative to the repository root
    local: bool
    # Requirement lines binderbox derived from ``path`` when it is not a requirements file
    # (Pipfile, Pipfile.lock); "" means install ``path`` as written.
    derived: str = ""


@dataclass(frozen=True)
class BuildPlan:
    """What to build, decided from the configuration files alone.

    Paths are relative to the repository root and use forward slashes.
    """

    # "" for the repository root, otherwise "binder" or ".binder".
    config_dir: str = ""
    # A Dockerfile is exclusive: when set, it is built as written and nothing else applies.
    dockerfile: str = ""
    # "X.Y" from runtime.txt, or "" for the base image's Python.
    python_version: str = ""
    apt_packages: tuple[AptPackage, ...] = ()
    requirements: Requirements | None = None
    # Install the repository itself as a package (setup.py or pyproject.toml at the root).
    install_project: str = ""
    post_build: str = ""
    start: str = ""
    # Things the user should know about, shown before the build starts.
    warnings: tuple[str, ...] = field(default=())
