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
    # (Pipfile, Pipfile.lock, environment.yml); "" means install ``path`` as written.
    derived: str = ""
    # True when relative paths in ``derived`` are relative to the folder of ``path``, which
    # is where they are installed from (environment.yml's pip section, as conda does).
    from_its_folder: bool = False


@dataclass(frozen=True)
class RSetup:
    """R from Debian with the IRkernel, for repositories that use R."""

    # "X.Y" or "X.Y.Z" from runtime.txt, or "" for the R of the base's Debian suite.
    version: str = ""
    # CRAN snapshot date (YYYY-MM-DD) from runtime.txt, or "" for current CRAN.
    snapshot: str = ""
    # install.R, run as the user after the repository is copied; "" when there is none.
    install_script: str = ""
    # The package to install the repository as (DESCRIPTION at the root), or "".
    package: str = ""
    # Compilers and headers (r-base-dev): something may be built from source.
    compilers: bool = False


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
    # A PEP 440 range (pyproject's requires-python, environment.yml's python>=X.Y) when no
    # exact version is asked for; the newest base whose Python fits is chosen.
    python_requires: str = ""
    apt_packages: tuple[AptPackage, ...] = ()
    requirements: Requirements | None = None
    # Install the repository itself as a package (setup.py or pyproject.toml at the root).
    install_project: str = ""
    # R, when runtime.txt says r-…, or there is an install.R or a root DESCRIPTION.
    r: RSetup | None = None
    post_build: str = ""
    start: str = ""
    # Things the user should know about, shown before the build starts.
    warnings: tuple[str, ...] = field(default=())
