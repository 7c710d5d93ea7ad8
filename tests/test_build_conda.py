"""environment.yml repositories, built for real without conda and checked inside the image."""

from __future__ import annotations

import pytest
from tests.conftest import run_in_image

pytestmark = pytest.mark.docker


def sh(image: str, script: str) -> str:
    result = run_in_image(image, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def warnings_of(result) -> list[str]:
    return [e["message"] for e in result.events if e["message"].startswith("Warning:")]


ENVIRONMENT = """\
name: demo
channels:
  - conda-forge
dependencies:
  - python=3.11
  - conda-forge::matplotlib-base
  - graphviz
  - pip
  - pip:
    - six==1.16.0
"""


def test_environment_yml_builds_without_conda(make_repo, build):
    repo = make_repo(
        {
            "environment.yml": ENVIRONMENT,
            # Beside an environment.yml, requirements.txt is ignored (as in repo2docker).
            "requirements.txt": "this-package-must-not-be-installed==0.0\n",
            "index.ipynb": "{}",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    image = result.image

    assert sh(image, "python --version").startswith("Python 3.11")
    assert sh(image, "python -c 'import six; print(six.__version__)'") == "1.16.0"
    assert sh(image, "python -c 'import matplotlib; print(matplotlib.__name__)'") == "matplotlib"
    # graphviz is Debian's: the dot program renders.
    assert sh(image, "echo 'digraph { a -> b }' | dot -Tsvg | grep -c '<svg'") == "1"
    assert sh(image, "command -v conda || echo none") == "none"
    assert any(
        "matplotlib-base is installed from PyPI as matplotlib" in w for w in warnings_of(result)
    )


def test_pip_section_paths_are_relative_to_the_environment_folder(make_repo, build):
    # As conda reads them: "-e .." is the repository root seen from binder/, and
    # "-r extra.txt" is binder/extra.txt.
    repo = make_repo(
        {
            "binder/environment.yml": "dependencies:\n  - pip:\n    - -e ..\n    - -r extra.txt\n",
            "binder/extra.txt": "six==1.16.0\n",
            "setup.py": (
                "from setuptools import setup\n"
                "setup(name='mypkg', version='1.0', py_modules=['mypkg'])\n"
            ),
            "mypkg.py": "ANSWER = 42\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert sh(result.image, "cd /tmp && python -c 'import mypkg, six; print(mypkg.ANSWER)'") == "42"
    # The temporary requirements file beside environment.yml is gone.
    assert sh(result.image, "ls -A binder") == "environment.yml\nextra.txt"


def test_python_313_selects_the_trixie_base(make_repo, build):
    repo = make_repo({"environment.yml": "dependencies:\n  - python=3.13\n  - six\n"})
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert sh(result.image, "python --version").startswith("Python 3.13")
    assert sh(result.image, ". /etc/os-release && echo $VERSION_CODENAME") == "trixie"
    assert sh(result.image, "python -c 'import six'") == ""


def test_conda_only_packages_fail_clearly_before_building(make_repo, build):
    repo = make_repo(
        {"binder/environment.yml": "dependencies:\n  - numpy\n  - cudatoolkit=11.8\n  - r-base\n"}
    )
    result = build(str(repo))
    assert result.code == 1
    assert result.failure["message"] == (
        "binder/environment.yml: binderbox cannot provide these conda packages without conda: "
        "cudatoolkit, r-base (remove them, or build with a Dockerfile)."
    )
    assert not any(e.get("log") for e in result.events)
    assert not result.image
