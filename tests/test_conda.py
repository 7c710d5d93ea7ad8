"""environment.yml: the translation to requirement lines and Debian packages, and where
detect() puts it among the other configuration files (pure, no Docker)."""

from __future__ import annotations

import pytest

from binderbox.builder import conda
from binderbox.builder.detect import detect
from binderbox.builder.plan import AptPackage, Requirements
from binderbox.builder.render import DERIVED_REQUIREMENTS, ImageOptions, render
from binderbox.errors import ConfigError

ENV = "environment.yml"


def env_file(*dependencies: str, pip: tuple[str, ...] = ()) -> str:
    lines = ["name: demo", "channels:", "  - conda-forge", "dependencies:"]
    lines += [f"  - {d}" for d in dependencies]
    if pip:
        lines += ["  - pip:", *(f"    - {p}" for p in pip)]
    return "\n".join(lines) + "\n"


def lines_for(*dependencies: str, pip: tuple[str, ...] = ()) -> list[str]:
    return conda.translate(env_file(*dependencies, pip=pip), ENV).requirements.splitlines()


def config_error(text: str, rel: str = ENV) -> str:
    with pytest.raises(ConfigError) as info:
        conda.translate(text, rel)
    return info.value.message


# --- conda's version syntax → PEP 440 -------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ("numpy", "numpy"),
        ("numpy=1.26", "numpy==1.26.*"),
        ("numpy=1", "numpy==1.*"),
        ("numpy=1.26.4", "numpy==1.26.4"),
        ("numpy=1.26.*", "numpy==1.26.*"),
        ("numpy=1.26*", "numpy==1.26.*"),
        ("numpy==1.26.4", "numpy==1.26.4"),
        ("numpy>=1.2,<2", "numpy>=1.2,<2"),
        ("numpy >=1.2, <2", "numpy>=1.2,<2"),
        ("numpy >= 1.2", "numpy>=1.2"),
        ("numpy!=1.25.0", "numpy!=1.25.0"),
        ("numpy~=1.26", "numpy~=1.26"),
        ("numpy 1.26.*", "numpy==1.26.*"),
        ("numpy 1.26.4", "numpy==1.26.4"),
        ("numpy 1.26", "numpy==1.26"),
        ("numpy=*", "numpy"),
        ("numpy *", "numpy"),
    ],
)
def test_conda_version_becomes_a_pep440_specifier(entry, line):
    assert lines_for(entry) == [line]


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        # A build string pins a fully written version exactly.
        ("numpy=1.2=py311_0", "numpy==1.2"),
        ("numpy=1.26.4=py311h64a7726_0", "numpy==1.26.4"),
        ("numpy 1.26.4 py311_0", "numpy==1.26.4"),
        ("numpy >=1.2 py311_0", "numpy>=1.2"),
    ],
)
def test_build_strings_are_dropped(entry, line):
    assert lines_for(entry) == [line]


@pytest.mark.parametrize(
    "entry", ["conda-forge::numpy=1.26", "defaults::numpy=1.26", "conda-forge/linux-64::numpy=1.26"]
)
def test_channel_prefix_is_stripped(entry):
    assert lines_for(entry) == ["numpy==1.26.*"]


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("numpy 1.11|1.12", "alternatives"),
        ("numpy[version='>=1.2']", "name=version"),
        ("numpy 1.2 py_0 extra", "at most"),
        ("numpy@1.2", "unexpected characters"),
        ("numpy>=", "has no version"),
        ("numpy>=1.*", "cannot be written"),
        ("numpy=1.2;rm", "unexpected characters"),
        ("-e /etc", "not a conda package"),
        ("--index-url=http://example.org", "not a conda package"),
    ],
)
def test_versions_pypi_cannot_express_are_a_config_error_naming_the_entry(entry, words):
    message = config_error(f"dependencies:\n  - {entry!r}\n")
    assert message.startswith(f"{ENV}:")
    assert words in message
    assert entry in message


# --- names: PyPI renames, Debian packages, what is skipped or cannot be provided ---------


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ("matplotlib-base=3.8", "matplotlib==3.8.*"),
        ("pytorch", "torch"),
        ("pytables", "tables"),
        ("msgpack-python", "msgpack"),
        ("py-opencv", "opencv-python-headless"),
        ("opencv", "opencv-python-headless"),
        ("pyqt", "PyQt5"),
        ("netcdf4", "netCDF4"),
        ("dask=2026.8", "dask[complete]==2026.8.*"),
        ("dask-core", "dask"),
        # Same name on PyPI: no table entry needed.
        ("scikit-learn=1.4", "scikit-learn==1.4.*"),
        ("pillow", "pillow"),
        ("ipython", "ipython"),
        ("tensorflow-cpu", "tensorflow-cpu"),
        ("ipywidgets>=8", "ipywidgets>=8"),
    ],
)
def test_conda_names_map_to_pypi_names(entry, line):
    assert lines_for(entry) == [line]


def test_every_table_entry_is_lowercase_and_has_no_spaces():
    for name in [*conda.PYPI_NAMES, *conda.DEBIAN_PACKAGES, *conda.ALREADY_IN_THE_IMAGE]:
        assert name == name.lower().strip() and " " not in name, name
    for packages in conda.DEBIAN_PACKAGES.values():
        assert packages and all(p == p.lower() for p in packages)


def test_renamed_packages_are_noted_for_the_user():
    translated = conda.translate(env_file("matplotlib-base", "netcdf4", "numpy"), "binder/" + ENV)
    assert translated.notes == (
        "binder/environment.yml: matplotlib-base is installed from PyPI as matplotlib.",
    )


@pytest.mark.parametrize(
    ("entry", "debian"),
    [
        ("graphviz", ("graphviz",)),
        ("gdal", ("gdal-bin", "libgdal-dev")),
        ("proj", ("proj-bin",)),
        ("geos", ("libgeos-dev",)),
        ("git", ("git",)),
        ("make", ("make",)),
        ("gcc", ("build-essential",)),
        ("compilers", ("build-essential", "gfortran")),
        ("cmake", ("cmake",)),
        ("ffmpeg", ("ffmpeg",)),
        ("pandoc", ("pandoc",)),
        ("imagemagick", ("imagemagick",)),
        ("hdf5", ("libhdf5-dev",)),
        ("nodejs>=18", ("nodejs",)),
    ],
)
def test_programs_and_c_libraries_come_from_debian(entry, debian):
    translated = conda.translate(env_file(entry), ENV)
    assert translated.apt_packages == debian
    assert translated.requirements == ""


def test_debian_notes_say_when_the_name_or_the_version_changes():
    translated = conda.translate(env_file("graphviz", "gdal", "ffmpeg=6"), ENV)
    assert translated.notes == (
        "environment.yml: gdal is installed from Debian as gdal-bin, libgdal-dev.",
        "environment.yml: ffmpeg is installed from Debian as ffmpeg (Debian's version: the "
        "conda version is not kept).",
    )


def test_python_graphviz_brings_the_bindings_and_the_program():
    translated = conda.translate(env_file("python-graphviz", "graphviz"), ENV)
    assert translated.requirements == "graphviz\n"
    assert translated.apt_packages == ("graphviz",)  # once


@pytest.mark.parametrize(
    "entry",
    [
        "python",
        "pip",
        "conda",
        "mamba",
        "setuptools",
        "wheel",
        "jupyter",
        "jupyterlab=4",
        "notebook",
        "nb_conda_kernels",
        "ipykernel",
        "libgcc-ng=13.2.0=h807b86a_5",
        "openssl",
        "conda-forge::_libgcc_mutex=0.1=conda_forge",
    ],
)
def test_jupyter_and_conda_machinery_is_skipped_silently(entry):
    translated = conda.translate(env_file(entry), ENV)
    assert translated.requirements == ""
    assert translated.apt_packages == ()
    assert translated.notes == translated.unsupported == ()


def test_packages_binderbox_cannot_provide_are_listed_in_order():
    translated = conda.translate(
        env_file("numpy", "cudatoolkit=11.8", "r-base=4.3", "r-ggplot2", "julia", "pandas"), ENV
    )
    assert translated.unsupported == ("cudatoolkit", "r-base", "r-ggplot2", "julia")
    assert translated.requirements.splitlines() == ["numpy", "pandas"]


def test_unknown_names_are_assumed_to_be_on_pypi():
    assert lines_for("some-package-only-conda-has=1.0") == ["some-package-only-conda-has==1.0.*"]


# --- python version -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "version"),
    [
        ("python=3.11", "3.11"),
        ("python=3.13.1", "3.13"),
        ("python>=3.10", ""),
        ("python>=3.10,<3.13", ""),
        ("python 3.12.*", "3.12"),
        ("python==3.11", "3.11"),
        ("python=3.11.8=hab00c5b_0_cpython", "3.11"),
        ("conda-forge::python=3.12", "3.12"),
        ("python=3", ""),
        ("python<3.13", ""),
        ("python", ""),
    ],
)
def test_python_version(entry, version):
    translated = conda.translate(env_file(entry), ENV)
    assert translated.python_version == version
    assert translated.requirements == ""


@pytest.mark.parametrize(
    ("entry", "requires"),
    [("python>=3.10", ">=3.10"), ("python>=3.10,<3.13", ">=3.10,<3.13"), ("python=3.11", "")],
)
def test_python_ranges_become_a_requirement_not_a_pin(entry, requires):
    assert conda.translate(env_file(entry), ENV).python_requires == requires


def test_no_python_means_the_base_python():
    assert conda.translate(env_file("numpy"), ENV).python_version == ""


# --- the pip section ------------------------------------------------------------------------


def test_pip_section_is_used_as_written_after_the_conda_packages():
    pip = ("six==1.16.0", "--index-url https://pypi.org/simple", "requests[socks]>=2")
    translated = conda.translate(env_file("numpy=1.26", "pip", pip=pip), ENV)
    assert translated.requirements.splitlines() == ["numpy==1.26.*", *pip]
    assert not translated.local


@pytest.mark.parametrize(
    "line",
    ["-e .", "-e ..", "-r requirements.txt", "./vendor/pkg", "--find-links ./wheels", "x @ file:."],
)
def test_pip_section_referring_to_files_is_local(line):
    assert conda.translate(env_file("numpy", pip=(line,)), ENV).local


def test_pip_section_git_url_is_not_local():
    line = "git+https://example.org/lib.git@v1#egg=lib"
    assert not conda.translate(env_file(pip=(line,)), ENV).local


def test_empty_pip_section_and_comments_are_ignored():
    text = "dependencies:\n  - numpy\n  - pip:\n"
    assert conda.translate(text, ENV).requirements == "numpy\n"
    text = "dependencies:\n  - pip:\n    - '# a comment'\n    - ''\n    - six\n"
    assert conda.translate(text, ENV).requirements == "six\n"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("dependencies:\n  - pip:\n    - |\n      six\n      -e /etc\n", "spans several lines"),
        ("dependencies:\n  - pip:\n    - 1.5\n", "not a requirement line"),
        ("dependencies:\n  - pip:\n    - {a: b}\n", "not a requirement line"),
        ("dependencies:\n  - pip: six\n", "must be a list"),
        ("dependencies:\n  - |\n    numpy\n    -e /etc\n", "spans several lines"),
    ],
)
def test_bad_pip_entries_are_config_errors(text, words):
    message = config_error(text)
    assert message.startswith(f"{ENV}:") and words in message


# --- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("dependencies: [numpy\n", "is not valid YAML"),
        ("dependencies:\n  - numpy\n - pandas\n", "is not valid YAML"),
        ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),
        ("- numpy\n- pandas\n", "expected a YAML mapping"),
        ("just a string\n", "expected a YAML mapping"),
        ("dependencies: numpy\n", "'dependencies' must be a list"),
        ("dependencies:\n  - 3\n", "neither a package nor the pip section"),
        ("dependencies:\n  - numpy: 1.2\n", "neither a package nor the pip section"),
        ("dependencies:\n  - pip: [six]\n    other: 1\n", "neither a package nor the pip section"),
    ],
)
def test_invalid_file_is_a_config_error_naming_the_file(text, words):
    message = config_error(text, "binder/environment.yml")
    assert message.startswith("binder/environment.yml")
    assert words in message


def test_yaml_error_gives_the_line():
    assert "(line 3)" in config_error("dependencies:\n  - numpy\n - pandas\n")


@pytest.mark.parametrize("text", ["", "name: empty\n", "dependencies:\n"])
def test_empty_environment_installs_nothing(text):
    translated = conda.translate(text, ENV)
    assert (translated.requirements, translated.apt_packages, translated.python_version) == (
        "",
        (),
        "",
    )


def test_channels_are_read_for_a_future_conda_backend_and_otherwise_ignored():
    text = "channels:\n  - conda-forge\n  - defaults\ndependencies:\n  - numpy\n"
    translated = conda.translate(text, ENV)
    assert translated.channels == ("conda-forge", "defaults")
    assert translated.requirements == "numpy\n"
    assert conda.translate("channels: conda-forge\n", ENV).channels == ()


def test_variables_are_noted_as_not_applied():
    translated = conda.translate("variables:\n  MY_VAR: 1\ndependencies: [numpy]\n", ENV)
    assert translated.notes == (
        "environment.yml: 'variables' are not set by binderbox; export them in start.",
    )


# --- detect(): environment.yml among the other files ----------------------------------------


def config_error_of(repo) -> str:
    with pytest.raises(ConfigError) as info:
        detect(repo)
    return info.value.message


ENVIRONMENT = env_file("python=3.13", "numpy=1.26", "matplotlib-base", "graphviz", pip=("six",))


def test_environment_yml_becomes_derived_requirement_lines(make_repo):
    plan = detect(make_repo({ENV: ENVIRONMENT}))
    assert plan.requirements == Requirements(
        ENV, False, "numpy==1.26.*\nmatplotlib\nsix\n", from_its_folder=True
    )
    assert plan.python_version == "3.13"
    assert plan.apt_packages == (AptPackage("graphviz"),)
    assert plan.warnings == (
        "environment.yml: matplotlib-base is installed from PyPI as matplotlib.",
    )


def test_environment_yaml_spelling_works_too(make_repo):
    plan = detect(make_repo({"binder/environment.yaml": ENVIRONMENT}))
    assert plan.requirements.path == "binder/environment.yaml"


def test_both_spellings_is_a_config_error(make_repo):
    message = config_error_of(make_repo({ENV: ENVIRONMENT, "environment.yaml": ENVIRONMENT}))
    assert "environment.yml and environment.yaml both exist" in message


@pytest.mark.parametrize(
    "other",
    [
        {"requirements.txt": "pandas\n"},
        {"Pipfile": '[packages]\npandas = "*"\n'},
        {"Pipfile.lock": '{"default": {"pandas": {"version": "==2.0"}}}'},
    ],
)
def test_environment_yml_wins_over_requirements_txt_and_pipfiles(make_repo, other):
    plan = detect(make_repo({ENV: ENVIRONMENT, **other}))
    assert plan.requirements.path == ENV
    assert "pandas" not in plan.requirements.derived


@pytest.mark.parametrize("binder", ["binder", ".binder"])
def test_binder_dir_environment_yml_wins_and_root_one_is_ignored(make_repo, binder):
    repo = make_repo(
        {
            f"{binder}/{ENV}": env_file("pandas"),
            ENV: "not: [valid\n",
            f"{binder}/requirements.txt": "numpy\n",
        }
    )
    plan = detect(repo)
    assert plan.requirements.path == f"{binder}/{ENV}"
    assert plan.requirements.derived == "pandas\n"


def test_root_environment_yml_ignored_with_binder_dir(make_repo):
    plan = detect(make_repo({ENV: ENVIRONMENT, "binder/requirements.txt": "numpy\n"}))
    assert plan.requirements == Requirements("binder/requirements.txt", local=False)
    assert plan.python_version == ""


def test_setup_py_is_installed_only_when_the_pip_section_refers_to_it(make_repo):
    setup = "from setuptools import setup\nsetup(name='x')\n"
    plain = detect(make_repo({ENV: env_file("numpy"), "setup.py": setup}))
    assert plain.install_project == ""
    referring = detect(make_repo({ENV: env_file("numpy", pip=("-e .",)), "setup.py": setup}))
    assert referring.install_project == ""
    assert referring.requirements.local
    assert referring.requirements.derived == "numpy\n-e .\n"


def test_debian_packages_follow_apt_txt_without_duplicates(make_repo):
    repo = make_repo(
        {
            ENV: env_file("graphviz", "gdal", "cmake"),
            "apt.txt": "cmake=3.25.1-1\ncurl\n",
        }
    )
    assert detect(repo).apt_packages == (
        AptPackage("cmake", "3.25.1-1"),
        AptPackage("curl"),
        AptPackage("graphviz"),
        AptPackage("gdal-bin"),
        AptPackage("libgdal-dev"),
    )


def test_runtime_txt_wins_over_the_environment_python(make_repo):
    plan = detect(make_repo({ENV: ENVIRONMENT, "runtime.txt": "python-3.11\n"}))
    assert plan.python_version == "3.11"


def test_environment_without_pip_packages_installs_no_requirements(make_repo):
    plan = detect(make_repo({ENV: env_file("python=3.11", "graphviz")}))
    assert plan.requirements is None
    assert plan.python_version == "3.11"
    assert plan.apt_packages == (AptPackage("graphviz"),)


def test_unprovidable_packages_stop_detection_naming_all_of_them(make_repo):
    repo = make_repo({f"binder/{ENV}": env_file("numpy", "cudatoolkit=11.8", "r-base", "r-dplyr")})
    assert config_error_of(repo) == (
        "binder/environment.yml: binderbox cannot provide these conda packages without conda: "
        "cudatoolkit, r-base, r-dplyr (remove them, or build with a Dockerfile)."
    )


def test_invalid_environment_yml_stops_detection(make_repo):
    assert config_error_of(make_repo({ENV: "- numpy\n"})).startswith("environment.yml ")


def test_non_utf8_environment_yml_is_a_config_error(make_repo):
    repo = make_repo({})
    (repo / ENV).write_bytes(b"dependencies:\n  - caf\xe9\n")
    assert "not a UTF-8 text file" in config_error_of(repo)


# --- render(): the pip section's relative paths, as conda reads them ------------------------


def test_local_pip_section_is_installed_from_the_environment_folder(make_repo):
    plan = detect(make_repo({f"binder/{ENV}": env_file("numpy", pip=("-e ..",))}))
    recipe = render(plan, ImageOptions(base_image="binderbox/base:bookworm-20250101"))
    lines = recipe.dockerfile.splitlines()
    copy = [i for i, ln in enumerate(lines) if DERIVED_REQUIREMENTS in ln]
    assert len(copy) == 1
    assert lines[copy[0]].endswith(
        f"binderbox/{DERIVED_REQUIREMENTS} /home/jovyan/binder/.binderbox-pip-requirements.txt"
    )
    install = lines[copy[0] + 1]
    assert "cd binder && { uv pip install" in install
    assert "-r .binderbox-pip-requirements.txt --no-build" in install
    # "-e .." must be built: the retry from source installs from the same folder and file.
    retry = lines[copy[0] + 2]
    assert "cd binder && {" in retry
    assert "-r .binderbox-pip-requirements.txt && rm .binderbox-pip-requirements.txt" in retry
    assert copy[0] > next(i for i, ln in enumerate(lines) if " repo/ " in ln)
    assert recipe.support_files[DERIVED_REQUIREMENTS] == "numpy\n-e ..\n"


def test_plain_environment_is_installed_before_the_repository_is_copied(make_repo):
    plan = detect(make_repo({ENV: env_file("numpy")}))
    lines = render(plan, ImageOptions(base_image="b")).dockerfile.splitlines()
    deps = next(i for i, ln in enumerate(lines) if "/tmp/binderbox-deps/requirements.txt" in ln)
    assert deps < next(i for i, ln in enumerate(lines) if " repo/ " in ln)
