"""Pipfile and Pipfile.lock: repo2docker's precedence rules and the translation to
requirement lines (pure, no Docker)."""

from __future__ import annotations

import json

import pytest

from binderbox.builder import pipfile
from binderbox.builder.detect import detect
from binderbox.errors import ConfigError

PIPFILE = """
[[source]]
url = "https://pypi.org/simple"
verify_ssl = true
name = "pypi"

[packages]
six = "*"
requests = {version = ">=2.0", extras = ["socks"]}
attrs = {version = "==23.1.0", markers = "python_version >= '3.8'"}

[dev-packages]
pytest = "==8.0.0"

[requires]
python_version = "3.13"
"""

LOCK = {
    "_meta": {"requires": {"python_version": "3.11"}},
    "default": {"six": {"version": "==1.16.0", "hashes": ["sha256:x"]}},
    "develop": {"iniconfig": {"version": "==2.0.0"}},
}


def test_pipfile_lines_include_dev_packages_and_python_version():
    derived = pipfile.from_pipfile(PIPFILE, "Pipfile")
    assert derived.text.splitlines() == [
        "six",
        "requests[socks]>=2.0",
        "attrs==23.1.0 ; python_version >= '3.8'",
        "pytest==8.0.0",
    ]
    assert derived.python_version == "3.13"
    assert not derived.local


def test_lock_pins_every_package_from_both_sections():
    derived = pipfile.from_lock(json.dumps(LOCK), "Pipfile.lock")
    assert derived.text.splitlines() == ["six==1.16.0", "iniconfig==2.0.0"]
    assert derived.python_version == "3.11"


def test_path_entry_is_local_and_editable():
    derived = pipfile.from_pipfile('[packages]\nmine = {path = ".", editable = true}\n', "Pipfile")
    assert derived.text.strip() == "-e ."
    assert derived.local


def test_git_entry_becomes_a_direct_reference():
    text = '[packages]\nlib = {git = "https://example.org/lib.git", ref = "v1"}\n'
    assert pipfile.from_pipfile(text, "Pipfile").text.strip() == (
        "lib @ git+https://example.org/lib.git@v1"
    )


def test_extra_package_index_is_kept():
    text = '[[source]]\nurl = "https://mirror.example.org/simple"\n[packages]\nsix = "*"\n'
    assert pipfile.from_pipfile(text, "Pipfile").text.splitlines()[0] == (
        "--extra-index-url https://mirror.example.org/simple"
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[packages\nsix = 1", "not valid TOML"),
        ('[packages]\n"six; rm -rf /" = "*"\n', "not a valid package name"),
        ("[packages]\nsix = 3\n", "neither a version nor a table"),
        ('[requires]\npython_version = "three"\n', "python_version"),
    ],
)
def test_bad_pipfile_is_a_config_error_naming_the_file(text, words):
    with pytest.raises(ConfigError, match=words) as error:
        pipfile.from_pipfile(text, "binder/Pipfile")
    assert "binder/Pipfile" in error.value.message


def test_bad_lock_is_a_config_error():
    with pytest.raises(ConfigError, match=r"Pipfile.lock is not valid JSON"):
        pipfile.from_lock("{not json", "Pipfile.lock")


def test_lock_wins_over_pipfile(make_repo):
    repo = make_repo({"Pipfile": PIPFILE, "Pipfile.lock": json.dumps(LOCK)})
    plan = detect(repo)
    assert plan.requirements.path == "Pipfile.lock"
    assert "six==1.16.0" in plan.requirements.derived
    assert plan.python_version == "3.11"


def test_pipfile_wins_over_requirements_txt(make_repo):
    repo = make_repo({"Pipfile": PIPFILE, "requirements.txt": "numpy\n"})
    plan = detect(repo)
    assert plan.requirements.path == "Pipfile"
    assert "numpy" not in plan.requirements.derived


def test_binder_dir_pipfile_wins_over_the_root_one(make_repo):
    repo = make_repo({"Pipfile": PIPFILE, "binder/Pipfile": '[packages]\nattrs = "*"\n'})
    plan = detect(repo)
    assert plan.requirements.path == "binder/Pipfile"
    assert plan.requirements.derived == "attrs\n"


def test_setup_py_is_installed_only_when_the_pipfile_refers_to_it(make_repo):
    setup = "from setuptools import setup\nsetup(name='x')\n"
    plain = detect(make_repo({"Pipfile": PIPFILE, "setup.py": setup}))
    assert plain.install_project == ""
    referring = detect(
        make_repo({"Pipfile": '[packages]\nx = {path = ".", editable = true}\n', "setup.py": setup})
    )
    assert referring.install_project == ""
    assert referring.requirements.local
    assert "-e ." in referring.requirements.derived


def test_pyproject_requires_python_is_a_range(make_repo):
    pyproject = (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "x"\nversion = "1"\nrequires-python = ">=3.12"\n'
    )
    plan = detect(make_repo({"pyproject.toml": pyproject}))
    assert (plan.python_version, plan.python_requires) == ("", ">=3.12")
    pinned = detect(make_repo({"pyproject.toml": pyproject, "runtime.txt": "python-3.11"}))
    assert (pinned.python_version, pinned.python_requires) == ("3.11", "")
    bad = pyproject.replace(">=3.12", "three")
    with pytest.raises(ConfigError, match="requires-python"):
        detect(make_repo({"pyproject.toml": bad}))


def test_empty_pipfile_installs_nothing(make_repo):
    assert detect(make_repo({"Pipfile": "[packages]\n"})).requirements is None


def test_runtime_txt_wins_over_the_pipfile_python(make_repo):
    plan = detect(make_repo({"Pipfile": PIPFILE, "runtime.txt": "python-3.11\n"}))
    assert plan.python_version == "3.11"
