"""Pipfile and Pipfile.lock repositories, built for real and checked inside the image."""

from __future__ import annotations

import json

import pytest
from tests.conftest import run_in_image

pytestmark = pytest.mark.docker


def python(image: str, code: str) -> str:
    result = run_in_image(image, "sh", "-c", f"cd /tmp && python -c '{code}'")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_lock_pins_win_over_the_pipfile_and_requirements(make_repo, build):
    lock = {
        "_meta": {"requires": {"python_version": "3.11"}},
        "default": {"six": {"version": "==1.16.0"}},
        "develop": {"iniconfig": {"version": "==2.0.0"}},
    }
    repo = make_repo(
        {
            "Pipfile": '[packages]\nsix = "==1.17.0"\n',
            "Pipfile.lock": json.dumps(lock),
            "requirements.txt": "this-must-not-be-installed==0\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert python(result.image, "import six, iniconfig; print(six.__version__)") == "1.16.0"


def test_pipfile_that_refers_to_the_repository_installs_it(make_repo, build):
    repo = make_repo(
        {
            "Pipfile": '[packages]\nsix = "*"\nmine = {path = ".", editable = true}\n',
            "setup.py": "from setuptools import setup\n"
            "setup(name='mine', version='1.0', py_modules=['mine'])\n",
            "mine.py": "WHO = 'mine'\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert python(result.image, "import six, mine; print(mine.WHO)") == "mine"
