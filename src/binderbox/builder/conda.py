"""environment.yml → requirement lines for uv and Debian packages (pure).

binderbox has no conda: each conda dependency is provided another way.

* Python packages are installed from PyPI under the same name, or under the name in
  ``PYPI_NAMES`` when conda calls them differently; conda's version syntax becomes
  PEP 440 (``numpy=1.26`` → ``numpy==1.26.*``) and build strings are dropped.
* Programs and C libraries come from Debian, as listed in ``DEBIAN_PACKAGES``.
* Jupyter and conda's own machinery, and the libraries conda's Python is built on, are
  already in the image (``ALREADY_IN_THE_IMAGE``) and skipped.
* What none of these can provide (``CANNOT_PROVIDE``, and R's ``r-*`` packages) is
  reported, so the build can stop before it starts.
* ``python=X.Y`` picks the Python version; the ``pip:`` section is used as written.

``channels:`` are read and otherwise ignored. They are kept in the translation because a
real conda backend (micromamba, used when a channel is configured and reachable) would
need them: it would be a second function returning a ``CondaTranslation``-like plan, and
detect would choose between the two. Only this translation exists today.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from binderbox.builder.requirement_lines import refers_to_repository
from binderbox.errors import ConfigError, quoted, shortened

# Conda names whose PyPI project has another name. Names that differ only in case or in
# "-", "_" and "." are the same project on PyPI (PEP 503) and need no entry.
PYPI_NAMES = {
    "matplotlib-base": "matplotlib",  # conda-forge: matplotlib without the Qt backend
    "numpy-base": "numpy",  # Anaconda's defaults channel splits numpy in two
    "pytorch": "torch",
    "pytorch-cpu": "torch",  # older conda-forge name of the CPU build
    "python-graphviz": "graphviz",  # the Python bindings; "graphviz" is the program
    "py-opencv": "opencv-python-headless",  # headless: the image has no display or libGL
    "opencv": "opencv-python-headless",
    "pytables": "tables",
    "msgpack-python": "msgpack",
    "pyqt": "PyQt5",  # conda-forge's pyqt is Qt 5
    "netcdf4": "netCDF4",
    # conda-forge's dask is a metapackage (distributed, bokeh, pyarrow, lz4, …), the
    # counterpart of PyPI's dask[complete]; its dask-core is PyPI's plain dask.
    "dask": "dask[complete]",
    "dask-core": "dask",
    "py-xgboost": "xgboost",  # conda-forge: the Python package of the xgboost feedstock
    "python-kaleido": "kaleido",  # conda-forge feedstock name of plotly's kaleido
    "psycopg2": "psycopg2-binary",  # conda's build bundles libpq, like the binary wheel
}

# Conda packages that are programs or C libraries, and the Debian packages that provide
# them (the same names exist in bookworm and trixie). A name in both tables gets both.
DEBIAN_PACKAGES = {
    "graphviz": ("graphviz",),
    "python-graphviz": ("graphviz",),  # conda's python-graphviz brings the dot program
    "gdal": ("gdal-bin", "libgdal-dev"),  # the osgeo Python bindings are not included
    "libgdal": ("gdal-bin", "libgdal-dev"),
    "proj": ("proj-bin",),
    "geos": ("libgeos-dev",),
    "hdf5": ("libhdf5-dev",),
    "libnetcdf": ("libnetcdf-dev",),
    "git": ("git",),
    "git-lfs": ("git-lfs",),
    "make": ("make",),
    "cmake": ("cmake",),
    "pkg-config": ("pkg-config",),
    "compilers": ("build-essential", "gfortran"),  # conda-forge: C, C++ and Fortran
    "c-compiler": ("build-essential",),
    "cxx-compiler": ("build-essential",),
    "fortran-compiler": ("gfortran",),
    "gcc": ("build-essential",),
    "gxx": ("build-essential",),
    "gcc_linux-64": ("build-essential",),
    "gxx_linux-64": ("build-essential",),
    "gfortran": ("gfortran",),
    "gfortran_linux-64": ("gfortran",),
    "ffmpeg": ("ffmpeg",),
    "pandoc": ("pandoc",),
    "imagemagick": ("imagemagick",),
    "poppler": ("poppler-utils",),
    "tesseract": ("tesseract-ocr",),
    "openjdk": ("default-jdk-headless",),
    "nodejs": ("nodejs",),  # binderbox's bases already have it
    "curl": ("curl",),
    "wget": ("wget",),
    "unzip": ("unzip",),
    "zip": ("zip",),
    "jq": ("jq",),
}

# Already in every binderbox image, so skipped without a word.
ALREADY_IN_THE_IMAGE = frozenset(
    {
        # conda's and Jupyter's own machinery: the image has its server stack
        "python",  # its version is read (python=X.Y), then the package is skipped
        "pip",
        "setuptools",
        "wheel",
        "conda",
        "mamba",
        "jupyter",
        "jupyterlab",
        "notebook",
        "nb_conda_kernels",
        "ipykernel",
        "python_abi",  # conda-forge metapackage pinning the Python ABI
        "cpuonly",  # pytorch channel metapackage choosing CPU builds; PyPI's torch has them
        # The libraries conda's python package is built on, as listed by
        # `conda env export`; Debian's python3 in the base brings its own.
        "_libgcc_mutex",
        "_openmp_mutex",
        "bzip2",
        "ca-certificates",
        "ld_impl_linux-64",
        "libexpat",
        "libffi",
        "libgcc",
        "libgcc-ng",
        "libgomp",
        "liblzma",
        "libmpdec",
        "libnsl",
        "libsqlite",
        "libstdcxx",
        "libstdcxx-ng",
        "libuuid",
        "libxcrypt",
        "libzlib",
        "ncurses",
        "openssl",
        "readline",
        "sqlite",
        "tk",
        "tzdata",
        "xz",
        "zlib",
        # BLAS selectors: numpy and scipy wheels from PyPI bundle OpenBLAS
        "blas",
        "libblas",
        "libcblas",
        "liblapack",
        "libopenblas",
        "openblas",
        "nomkl",
    }
)

# Conda packages binderbox cannot provide without conda. R ("r" and every "r-*") is a
# separate ecosystem, to be supported from Debian's r-cran-* packages later.
CANNOT_PROVIDE = frozenset(
    {
        "cudatoolkit",
        "cuda-toolkit",
        "cuda-nvcc",
        "cudnn",
        "pytorch-cuda",
        "julia",  # not packaged by Debian
        "r",
    }
)


@dataclass(frozen=True)
class CondaTranslation:
    """What binderbox installs for an environment.yml instead of a conda environment."""

    # Requirement lines for uv: the translated conda dependencies, then the pip section
    # as written; "" when there are none.
    requirements: str
    # True when a pip-section line refers to files in the repository (-e ., -r, paths);
    # like conda, such paths are relative to the folder of the environment file.
    local: bool
    apt_packages: tuple[str, ...]  # Debian package names, without duplicates
    python_version: str  # "X.Y" or "" for the base image's Python
    # A range such as ">=3.9,<3.13" when python is not pinned to one X.Y ("" for none).
    python_requires: str
    # Conda dependencies (names as written) that binderbox cannot provide.
    unsupported: tuple[str, ...]
    # What was installed under another name or from Debian, for the user to see.
    notes: tuple[str, ...]
    # Read but unused: see the module docstring.
    channels: tuple[str, ...]


# libyaml's parser when PyYAML has it (about ten times faster), else PyYAML's own.
_YAML_LOADER = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
# Bounds on what an environment file may hold before it is turned into Python values:
# real ones have a few hundred entries, nested three or four deep. Without them a file
# under the size cap could still keep PyYAML busy for minutes.
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 32


def load_yaml(text: str, rel: str) -> Any:
    """Parse a repository's YAML file, bounded; ConfigError with a short reason.

    A first pass over the parser's events (no values built yet) refuses aliases
    (``*name``, and ``<<: *name`` merges: what lets a few hundred bytes expand into
    gigabytes; conda's own exports never use them), more than ``MAX_YAML_NODES`` entries
    and nesting deeper than ``MAX_YAML_DEPTH``; only then are the values built.
    """
    try:
        nodes = depth = 0
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            line = event.start_mark.line + 1 if event.start_mark else 0
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(
                    f"{rel} line {line} uses a YAML alias (*name); binderbox does not expand "
                    "aliases, write the entries out."
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(
                        f"{rel} line {line} nests deeper than {MAX_YAML_DEPTH} levels; an "
                        "environment file needs three or four."
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_YAML_NODES:
                    raise ConfigError(
                        f"{rel} has more than {MAX_YAML_NODES:,} entries, more than binderbox "
                        "reads from an environment file."
                    )
        return yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: plain values only
    except yaml.reader.ReaderError as err:
        raise ConfigError(
            f"{rel} contains a character YAML does not allow (#x{err.character:02x})."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "it cannot be parsed"
        raise ConfigError(f"{rel} is not valid YAML: {shortened(problem)}{where}.") from None
    except RecursionError:
        raise ConfigError(f"{rel} nests too deeply to be read.") from None


def translate(text: str, rel: str) -> CondaTranslation:
    """Translate an environment.yml's text; ``rel`` names it in errors and notes."""
    data = load_yaml(text, rel)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{rel} is not a conda environment file (expected a YAML mapping).")

    listed = data.get("channels")
    channels = tuple(c for c in listed if isinstance(c, str)) if isinstance(listed, list) else ()
    dependencies = data.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise ConfigError(f"{rel}: 'dependencies' must be a list.")

    lines: list[str] = []
    pip_lines: list[str] = []
    apt: dict[str, None] = {}
    unsupported: list[str] = []
    notes: list[str] = []
    python_version = python_requires = ""
    for entry in dependencies:
        if isinstance(entry, dict) and list(entry) == ["pip"]:
            pip_lines += _pip_section(entry["pip"], rel)
            continue
        if not isinstance(entry, str):
            raise ConfigError(
                f"{rel}: the dependency {quoted(entry)} is neither a package nor the pip section."
            )
        name, spec = _parse(entry, rel)
        key = name.lower()
        if key == "python":
            python_version, python_requires = _python_version(spec, entry, rel)
        if key in ALREADY_IN_THE_IMAGE:
            continue
        if key in CANNOT_PROVIDE or key.startswith("r-"):
            unsupported.append(name)
            continue
        moved: list[str] = []
        debian = DEBIAN_PACKAGES.get(key, ())
        if key in PYPI_NAMES or not debian:
            pypi = PYPI_NAMES.get(key, name)
            lines.append(pypi + ",".join(op + version for op, version in spec))
            if _canonical(pypi) != _canonical(name):
                moved.append(f"from PyPI as {pypi}")
        if debian:
            apt.update(dict.fromkeys(debian))
            if debian != (key,) or spec:
                pin = " (Debian's version: the conda version is not kept)" if spec else ""
                moved.append(f"from Debian as {', '.join(debian)}{pin}")
        if moved:
            notes.append(f"{rel}: {name} is installed {' and '.join(moved)}.")

    if isinstance(data.get("variables"), dict) and data["variables"]:
        notes.append(f"{rel}: 'variables' are not set by binderbox; export them in start.")
    requirements = "".join(line + "\n" for line in lines + pip_lines)
    return CondaTranslation(
        requirements=requirements,
        local=any(refers_to_repository(line) for line in pip_lines),
        apt_packages=tuple(apt),
        python_version=python_version,
        python_requires=python_requires,
        unsupported=tuple(unsupported),
        notes=tuple(notes),
        channels=channels,
    )


# A package name, then its version and build string (the channel prefix is gone by then).
_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9._+-]*)(?P<rest>.*)$", re.DOTALL)
_REST_CHARS = re.compile(r"^[A-Za-z0-9_.*+!<>=,~ ]*$")
_OPERATOR = re.compile(r"^(==|!=|<=|>=|~=|<|>)")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.!+_-]*?(\.\*)?$")

Spec = tuple[tuple[str, str], ...]  # (operator, version) pairs, all of which must hold


def _parse(entry: str, rel: str) -> tuple[str, Spec]:
    """A conda match spec → its package name and a PEP 440 specifier."""
    text = entry.strip()
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{rel}: the dependency {quoted(entry)} spans several lines.")
    text = text.rpartition("::")[2]  # channel prefix: conda-forge::numpy
    match = _NAME.match(text)
    if not match:
        raise ConfigError(f"{rel}: {quoted(entry)} is not a conda package specification.")

    def not_understood(why: str) -> ConfigError:
        return ConfigError(f"{rel}: the version in {quoted(entry)} is not understood ({why}).")

    rest = match["rest"]
    if "[" in rest:
        raise not_understood("write name=version instead of [key=value]")
    if "|" in rest:
        raise not_understood("PyPI has no way to write alternatives with '|'")
    if not _REST_CHARS.match(rest):
        raise not_understood("unexpected characters")
    # "numpy >= 1.2, < 2" → ">=1.2,<2"; the build string, if any, stays a second word.
    words = re.sub(r"\s*,\s*", ",", re.sub(r"([<>=!~]=?)\s+", r"\1", rest)).split()
    if len(words) > 2:
        raise not_understood("expected name, version and build string at most")
    version = words[0] if words else ""
    build = words[1] if len(words) > 1 else ""
    # conda's "=": numpy=1.26 (a series), numpy=1.26.4, numpy=1.26.4=py311_0 (a build).
    fuzzy = version.startswith("=") and not version.startswith("==")
    if fuzzy:
        version, _, build_too = version[1:].partition("=")
        build = build or build_too
        fuzzy = not build
    pairs: list[tuple[str, str]] = []
    for item in version.split(",") if version else []:
        operator = _OPERATOR.match(item)
        op, number = (operator[1], item[operator.end() :]) if operator else ("==", item)
        if number in ("*", ""):
            if number == "" or op != "==":
                raise not_understood(f"{quoted(item)} has no version")
            continue  # any version
        if number.endswith("*") and not number.endswith(".*"):
            number = number[:-1] + ".*"  # 1.26* → 1.26.*
        elif fuzzy and not operator and not number.endswith(".*") and number.count(".") < 2:
            number += ".*"  # numpy=1.26 means the 1.26 series
        if not _VERSION.match(number) or (number.endswith(".*") and op not in ("==", "!=")):
            raise not_understood(f"{quoted(item)} cannot be written as a PyPI version")
        pairs.append((op, number))
    return match["name"], tuple(pairs)


def _python_version(spec: Spec, entry: str, rel: str) -> tuple[str, str]:
    """The X.Y that ``python=X.Y`` or ``python X.Y.*`` pins, or else the range that
    ``python>=X.Y`` and friends allow, as a PEP 440 specifier."""
    for op, version in spec:
        match = re.match(r"^(\d+)(?:\.(\d+))?", version)
        if not match:
            raise ConfigError(f"{rel}: {quoted(entry)} does not name a Python version.")
        if op == "==":
            # python=3 means any Python 3: the base image's.
            return (f"{match[1]}.{match[2]}" if match[2] else ""), ""
    return "", ",".join(op + version for op, version in spec)


def _pip_section(lines: Any, rel: str) -> list[str]:
    if lines is None:
        return []
    if not isinstance(lines, list):
        raise ConfigError(f"{rel}: the pip section must be a list of requirement lines.")
    result: list[str] = []
    for line in lines:
        if not isinstance(line, str):
            raise ConfigError(f"{rel}: the pip entry {quoted(line)} is not a requirement line.")
        line = line.strip()
        if "\n" in line or "\r" in line:
            raise ConfigError(f"{rel}: the pip entry {quoted(line)} spans several lines.")
        if line and not line.startswith("#"):
            result.append(line)
    return result


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
