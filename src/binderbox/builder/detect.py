"""Read a checked-out repository and decide what to build (pure: files in, a plan out).

The rules follow repo2docker's documented behaviour:

* ``binder/`` or ``.binder/``, when present, is the only place configuration is read from;
  having both is an error.
* A ``Dockerfile`` is exclusive: it is built as written and nothing else is applied.
* ``setup.py`` and ``pyproject.toml`` (with ``[project]`` and ``[build-system]``) count only
  at the repository root and only when there is no binder directory.
* Python packages come from the first of ``environment.yml`` (or ``.yaml``),
  ``Pipfile.lock``, ``Pipfile``, ``requirements.txt`` found in the configuration
  directory; the others are ignored, and ``setup.py`` is then installed only by
  ``requirements.txt`` repositories, or an environment.yml or Pipfile that refers to the
  repository itself.
* ``runtime.txt``, ``apt.txt``, ``postBuild`` and ``start`` are read from the
  configuration directory; runtime.txt's Python wins over an environment.yml's or a
  Pipfile's; an environment.yml's Debian packages follow apt.txt's.
* R is used when runtime.txt starts with ``r-``, when there is an ``install.R`` in the
  configuration directory, or a ``DESCRIPTION`` at the root without a binder directory
  (the repository is then installed as an R package).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from binderbox.builder import conda, pipfile, r_support, repofiles
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements, RSetup
from binderbox.builder.requirement_lines import refers_to_repository
from binderbox.errors import ConfigError, quoted

BINDER_DIRS = ("binder", ".binder")

# Files of ecosystems binderbox cannot build yet. A silent fallback to a plain Python
# environment would give users a wrong environment, so each of these stops the build.
NOT_YET_SUPPORTED = {
    "Project.toml": "Julia (Project.toml)",
    "JuliaProject.toml": "Julia (JuliaProject.toml)",
    "REQUIRE": "legacy Julia (REQUIRE)",
    "default.nix": "Nix (default.nix)",
}
# These are only looked for at the root, and only without a binder directory.
ROOT_ONLY_NOT_YET_SUPPORTED: dict[str, str] = {}

# A Debian package name (policy 5.6.1), optionally "=version" (policy 5.6.12).
_APT_LINE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]+)(?:=(?P<version>[A-Za-z0-9.+~:-]+))?$")
_RUNTIME_PYTHON = re.compile(r"python-(?P<major>\d+)(?:\.(?P<minor>\d+)(?:\.\d+)?)?")


def detect(repo: Path) -> BuildPlan:
    """Return the build plan for the repository checked out at ``repo``.

    Raises ConfigError, naming the file, when the configuration cannot be used. Every
    file is found and read through :mod:`repofiles`: inside the repository, size-capped.
    """
    if not repo.is_dir():
        raise ConfigError(f"The repository folder '{repo}' does not exist.")

    config_dir = _config_dir(repo)

    def rel(name: str) -> str:
        return f"{config_dir}/{name}" if config_dir else name

    def present(name: str) -> bool:
        return repofiles.is_file(repo, rel(name))

    def read(name: str) -> str:
        return repofiles.read_text(repo, rel(name))

    if present("Dockerfile"):
        return BuildPlan(config_dir=config_dir, dockerfile=rel("Dockerfile"))

    unsupported = [(rel(n), what) for n, what in NOT_YET_SUPPORTED.items() if present(n)]
    if not config_dir:
        unsupported += [(n, w) for n, w in ROOT_ONLY_NOT_YET_SUPPORTED.items() if present(n)]
    if unsupported:
        path, what = unsupported[0]
        raise ConfigError(
            f"{path}: {what} is not supported by binderbox yet; "
            "use requirements.txt and apt.txt instead, or a Dockerfile."
        )

    warnings: list[str] = []
    runtime_python = (
        _read_runtime(read("runtime.txt"), rel("runtime.txt")) if present("runtime.txt") else ""
    )

    # Which file lists the Python packages: the first one present wins.
    requirements, env_python, install_project, python_requires = None, "", "", ""
    env_apt: tuple[str, ...] = ()
    environment = [name for name in ("environment.yml", "environment.yaml") if present(name)]
    if len(environment) > 1:
        raise ConfigError(
            f"{rel('environment.yml')} and {rel('environment.yaml')} both exist; keep only one."
        )
    if environment:
        name = rel(environment[0])
        translated = conda.translate(read(environment[0]), name)
        if translated.unsupported:
            raise ConfigError(
                f"{name}: binderbox cannot provide these conda packages without conda: "
                f"{', '.join(translated.unsupported)} (remove them, or build with a Dockerfile)."
            )
        if translated.requirements:
            requirements = Requirements(
                name, translated.local, translated.requirements, from_its_folder=True
            )
        env_python, env_apt = translated.python_version, translated.apt_packages
        python_requires = translated.python_requires
        warnings += translated.notes
        # setup.py is installed only when the pip section refers to it (-e .).
    elif present("Pipfile.lock") or present("Pipfile"):
        name = "Pipfile.lock" if present("Pipfile.lock") else "Pipfile"
        translate = pipfile.from_lock if name == "Pipfile.lock" else pipfile.from_pipfile
        derived = translate(read(name), rel(name))
        if derived.text:
            requirements = Requirements(rel(name), derived.local, derived.text)
        env_python = derived.python_version
        # setup.py is installed only when the Pipfile refers to it (path = ".").
    elif present("requirements.txt"):
        requirements = _read_requirements(read("requirements.txt"), rel("requirements.txt"))
        install_project = "" if config_dir else _project_file(repo)
    else:
        install_project = "" if config_dir else _project_file(repo)
    if install_project == "pyproject.toml":
        python_requires = _requires_python(repo)

    apt_packages = _read_apt(read("apt.txt"), rel("apt.txt")) if present("apt.txt") else ()
    named = {package.name for package in apt_packages}  # apt.txt first, then environment.yml
    apt_packages += tuple(AptPackage(name) for name in env_apt if name not in named)
    r_setup = _r_setup(repo, config_dir, rel, apt_packages)
    if r_setup and r_setup.snapshot and r_setup.snapshot < r_support.EARLIEST_SNAPSHOT:
        warnings.append(
            f"{rel('runtime.txt')} asks for CRAN as of {r_setup.snapshot}; dated snapshots start "
            f"on {r_support.EARLIEST_SNAPSHOT}, which is used (unless cran_mirror is set)."
        )

    start = rel("start") if present("start") else ""
    if start and 'exec "$@"' not in repofiles.read_bytes(repo, start).decode(errors="replace"):
        warnings.append(f'{start} does not contain exec "$@"; the container command may never run.')

    return BuildPlan(
        config_dir=config_dir,
        python_version=runtime_python or env_python,
        python_requires="" if runtime_python or env_python else python_requires,
        apt_packages=apt_packages,
        requirements=requirements,
        install_project=install_project,
        r=r_setup,
        post_build=rel("postBuild") if present("postBuild") else "",
        start=start,
        warnings=tuple(warnings),
    )


def _config_dir(repo: Path) -> str:
    found = [name for name in BINDER_DIRS if repofiles.is_dir(repo, name)]
    if len(found) > 1:
        raise ConfigError(
            "The repository has both a 'binder' and a '.binder' folder; keep only one."
        )
    return found[0] if found else ""


def _read_apt(text: str, rel: str) -> tuple[AptPackage, ...]:
    packages: list[AptPackage] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        match = _APT_LINE.fullmatch(line)
        if not match:
            raise ConfigError(
                f"{rel} line {number}: {quoted(line)} is not a Debian package name "
                "(one package per line, optionally name=version)."
            )
        packages.append(AptPackage(match["name"], match["version"] or ""))
    return tuple(packages)


def _read_runtime(text: str, rel: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        return ""
    match = _RUNTIME_PYTHON.fullmatch(lines[0])
    if match and match["minor"] is None:
        return ""  # "python-3": any Python 3, so the base image's
    if match:
        return f"{match['major']}.{match['minor']}"
    if lines[0].startswith("r-"):
        return ""  # R (see _r_setup), with the base image's Python
    raise ConfigError(
        f"{rel}: {quoted(lines[0])} is not understood; write python-X.Y, for example python-3.11."
    )


def _r_setup(
    repo: Path, config_dir: str, rel: Callable[[str], str], apt: tuple[AptPackage, ...]
) -> RSetup | None:
    """R's part of the plan, or None when the repository does not use R."""
    version, snapshot = "", ""
    if repofiles.is_file(repo, rel("runtime.txt")):
        text = repofiles.read_text(repo, rel("runtime.txt"))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        first = lines[0] if lines else ""
        if first.startswith("r-"):
            version, snapshot = r_support.parse_runtime(first, rel("runtime.txt"))
    install_script = rel("install.R") if repofiles.is_file(repo, rel("install.R")) else ""
    description = not config_dir and repofiles.is_file(repo, "DESCRIPTION")
    if not (version or snapshot or install_script or description):
        return None
    compilers = bool(install_script) and r_support.install_script_compiles(
        repofiles.read_text(repo, install_script)
    )
    package = ""
    if description:
        package, needs = r_support.read_description(
            repofiles.read_text(repo, "DESCRIPTION"), "DESCRIPTION"
        )
        compilers = (
            compilers or repofiles.is_dir(repo, "src") or not r_support.from_debian(needs, apt)
        )
    return RSetup(version, snapshot, install_script, package, compilers)


def _read_requirements(text: str, rel: str) -> Requirements:
    local = False
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and refers_to_repository(line):
            local = True
    return Requirements(path=rel, local=local)


def _requires_python(repo: Path) -> str:
    """``[project] requires-python`` of an installable pyproject.toml, checked."""
    data = _load_pyproject(repo)
    project = data.get("project")
    spec = project.get("requires-python", "") if isinstance(project, dict) else ""
    if not isinstance(spec, str):
        raise ConfigError("pyproject.toml: requires-python must be a string such as '>=3.10'.")
    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise ConfigError(
            f"pyproject.toml: requires-python {quoted(spec)} is not a version specifier."
        ) from None
    return spec.strip()


def _project_file(repo: Path) -> str:
    """The root file that makes the repository an installable package, if any."""
    if repofiles.is_file(repo, "setup.py"):
        return "setup.py"
    if repofiles.is_file(repo, "pyproject.toml"):
        data = _load_pyproject(repo)
        if "project" in data and "build-system" in data:
            return "pyproject.toml"
    return ""


def _load_pyproject(repo: Path) -> dict:
    return repofiles.load_toml(repofiles.read_text(repo, "pyproject.toml"), "pyproject.toml")
