"""Each repo2docker rule, built for real and checked by running commands in the image."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import docker
import pytest
from tests.conftest import BINDERBOX, binderbox, run_in_image

from binderbox.builder import stack

pytestmark = pytest.mark.docker


def sh(image: str, script: str) -> str:
    result = run_in_image(image, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_requirements_apt_postbuild_and_start_in_binder_dir(make_repo, build):
    repo = make_repo(
        {
            "binder/requirements.txt": "six==1.16.0\n",
            "binder/apt.txt": "# a comment\n\ncowsay\n",
            "binder/postBuild": "#!/bin/bash\necho built-by-$(id -un) > ~/post-build-mark\n",
            "binder/start": '#!/bin/bash\nexport FROM_START=start-ran\nexec "$@"\n',
            # Root files are ignored when there is a binder directory.
            "requirements.txt": "this-package-must-not-be-installed==0.0\n",
            "apt.txt": "not a package line\n",
            "index.ipynb": "{}",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    image = result.image

    assert sh(image, "id -u; id -un") == "1000\njovyan"
    assert sh(image, 'echo "$HOME $REPO_DIR $(pwd)"') == "/home/jovyan /home/jovyan /home/jovyan"
    path = sh(image, "echo $PATH").split(":")
    assert path[:2] == ["/home/jovyan/.local/bin", "/home/jovyan/.local/bin"]
    assert sh(image, "for c in python python3 pip; do command -v $c; done").splitlines() == [
        "/srv/venv/bin/python",
        "/srv/venv/bin/python3",
        "/srv/venv/bin/pip",
    ]
    assert sh(image, "python -c 'import six; print(six.__version__)'") == "1.16.0"
    assert sh(image, "cat ~/post-build-mark") == "built-by-jovyan"
    assert sh(image, "echo $FROM_START") == "start-ran"
    assert sh(image, "test -x /usr/games/cowsay && echo yes") == "yes"
    assert sh(image, "stat -c %U index.ipynb binder/postBuild") == "jovyan\njovyan"
    # The user can install packages at runtime into the image's Python.
    assert "Successfully installed" in sh(
        image, "pip install --no-deps -q six==1.17.0 && echo Successfully installed"
    )
    assert sh(image, "locale | grep LANG=") == "LANG=en_US.UTF-8"


def as_user(image: str, script: str) -> str:
    """Run ``script`` as a session does (uid 1000), asserting it succeeds."""
    command = ["docker", "run", "--rm", "--user", "1000:1000", image, "sh", "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_user_installs_with_uv_and_pip_in_post_build_and_in_a_session(make_repo, build):
    repo = make_repo(
        {
            "requirements.txt": "six==1.16.0\n",
            "postBuild": "#!/bin/sh\nuv pip install -q toml==0.10.2\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    image = result.image
    # As `!uv pip install` and `!pip install` in a notebook: into the session's Python,
    # which the user owns, with caches of the user's own.
    assert as_user(image, "stat -c %U /srv/venv; uv cache dir") == (
        "jovyan\n/home/jovyan/.cache/uv"
    )
    # One session: what it installs is gone with its container.
    session = as_user(
        image,
        "uv pip install -q --python /srv/venv/bin/python iniconfig==2.0.0"
        " && pip install -q tomli-w==1.0.0"
        " && python -c 'import iniconfig, tomli_w, toml; print(\"imported\")'"
        " && uv pip freeze",
    ).splitlines()
    assert session[0] == "imported"
    wanted = {"six==1.16.0", "toml==0.10.2", "iniconfig==2.0.0", "tomli-w==1.0.0"}
    assert wanted <= set(session[1:])
    # The build's cache stayed in its mounts: the image has only their empty mount point.
    assert as_user(image, f"ls -A {stack.UV_CACHE} | wc -l") == "0"


def test_root_files_when_there_is_no_binder_dir(make_repo, build):
    repo = make_repo(
        {
            "requirements.txt": "six==1.16.0\n",
            "postBuild": "#!/bin/sh\ntouch ~/.root-post-build\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert sh(result.image, "python -c 'import six' && ls -a ~ | grep root-post") == (
        ".root-post-build"
    )


def test_setup_py_installed_only_without_binder_dir(make_repo, build):
    setup = (
        "from setuptools import setup\nsetup(name='mypkg', version='1.0', py_modules=['mypkg'])\n"
    )
    files = {"setup.py": setup, "mypkg.py": "ANSWER = 42\n"}
    result = build(str(make_repo(files)))
    assert result.code == 0, result.stderr
    assert sh(result.image, "cd /tmp && python -c 'import mypkg; print(mypkg.ANSWER)'") == "42"

    with_binder = build(str(make_repo({**files, "binder/apt.txt": "\n"})))
    assert with_binder.code == 0, with_binder.stderr
    probe = run_in_image(with_binder.image, "sh", "-c", "cd /tmp && python -c 'import mypkg'")
    assert probe.returncode != 0


def test_pyproject_project_installed(make_repo, build):
    pyproject = (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "pyproj"\nversion = "0.1"\n'
        '[tool.setuptools]\npy-modules = ["pyproj"]\n'
    )
    repo = make_repo({"pyproject.toml": pyproject, "pyproj.py": "NAME = 'pyproj'\n"})
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert sh(result.image, "cd /tmp && python -c 'import pyproj; print(pyproj.NAME)'") == "pyproj"


def test_requirements_with_local_references_install_after_the_copy(make_repo, build):
    repo = make_repo(
        {
            "requirements.txt": "-r extra-requirements.txt\n-e ./localpkg\n",
            "extra-requirements.txt": "six==1.16.0\n",
            "localpkg/setup.py": "from setuptools import setup\n"
            "setup(name='localpkg', version='0.1', py_modules=['localpkg'])\n",
            "localpkg/localpkg.py": "VALUE = 'local'\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert (
        sh(result.image, "cd /tmp && python -c 'import six, localpkg; print(localpkg.VALUE)'")
        == "local"
    )


def test_dockerfile_is_exclusive(make_repo, build, base_image):
    repo = make_repo(
        {
            "binder/Dockerfile": f"FROM {base_image}\nRUN echo from-dockerfile > /marker\n",
            "binder/requirements.txt": "six\n",
            "binder/postBuild": "#!/bin/sh\ntouch /tmp/should-not-run\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert sh(result.image, "cat /marker") == "from-dockerfile"
    # Nothing of binderbox's own recipe was applied: no entrypoint, no postBuild.
    for path in ("/usr/local/bin/binderbox-entrypoint", "/tmp/should-not-run"):
        assert run_in_image(result.image, "test", "-e", path).returncode != 0
    labels = docker.from_env().images.get(result.image).labels
    assert labels["binderbox.repo"] == str(repo)


def test_user_options(make_repo, build):
    repo = make_repo({"requirements.txt": "six==1.16.0\n", "data.txt": "hello\n"})
    result = build(
        str(repo), "--user-id", "1234", "--user-name", "alice", "--target-repo-dir", "/srv/work"
    )
    assert result.code == 0, result.stderr
    image = result.image
    assert sh(image, "id -u; id -un") == "1234\nalice"
    assert sh(image, 'echo "$HOME $REPO_DIR $(pwd)"') == "/home/alice /srv/work /srv/work"
    assert sh(image, "cat data.txt; stat -c %U data.txt") == "hello\nalice"
    # Non-default options give a different image name than the default build.
    assert build(str(repo)).image != image


def test_appendix_runs_last(make_repo, build):
    repo = make_repo({"postBuild": "#!/bin/sh\necho post > ~/order\n"})
    result = build(str(repo), "--appendix", "RUN echo appendix >> ~/order")
    assert result.code == 0, result.stderr
    assert sh(result.image, "cat ~/order") == "post\nappendix"


def test_second_build_of_unchanged_repo_reuses_the_image(make_repo, build):
    repo = make_repo({"requirements.txt": "six==1.16.0\n", "a.ipynb": "{}"})
    first = build(str(repo))
    assert first.code == 0, first.stderr
    second = build(str(repo))
    assert second.code == 0
    assert second.image == first.image
    assert any("reusing" in e["message"] for e in second.events if e["phase"] == "built")
    assert not any(e["phase"] == "building" for e in second.events)


def test_editing_a_notebook_rebuilds_only_the_final_layers(make_repo, build):
    repo = make_repo({"requirements.txt": "six==1.16.0\n", "a.ipynb": "{}"})
    first = build(str(repo))
    assert first.code == 0, first.stderr
    (repo / "a.ipynb").write_text('{"cells": []}')
    second = build(str(repo))
    assert second.code == 0, second.stderr
    assert second.image != first.image
    log = "\n".join(e["message"] for e in second.events if e["phase"] == "building")
    # The dependency layers come from the cache; only the repository copy is new.
    install_vertex = next(
        line.split()[0]
        for line in log.splitlines()
        if "RUN" in line and "requirements.txt" in line and line.startswith("#")
    )
    assert f"{install_vertex} CACHED" in log
    # BuildKit's digest-only lines are left out of what people read.
    assert not re.search(r"^#\d+ sha256:[0-9a-f]{64}$", log, re.MULTILINE), log


def test_jupyterlab_answers_with_its_token_on_localhost(make_repo, base_image, built_images):
    repo = make_repo({"hello.ipynb": "{}"})
    proc = subprocess.Popen(
        [*BINDERBOX, "run", str(repo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    client = docker.from_env()
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # blocks until printed or the process exits
        assert url.startswith("http://127.0.0.1:"), url or proc.stderr.read()
        base, token = url.split("lab?token=")
        with urllib.request.urlopen(f"{base}api/status?token={token}", timeout=10) as response:
            assert response.status == 200
            assert "started" in json.loads(response.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}api/status?token=wrong", timeout=10)
        assert refused.value.code == 403
        running = client.containers.list(filters={"label": "binderbox.run=1"})
        assert running
        attrs = running[0].attrs["HostConfig"]
        assert attrs["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in attrs["SecurityOpt"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while client.containers.list(all=True, filters={"label": "binderbox.run=1"}):
        assert time.monotonic() < deadline, "the container was not removed after Ctrl-C"
        time.sleep(0.2)


def test_apt_injection_is_refused_before_building(make_repo, build):
    repo = make_repo({"apt.txt": "cowsay\nfoo; touch /x\n"})
    result = build(str(repo))
    assert result.code == 1
    assert "apt.txt line 2" in result.failure["message"]
    assert not any(e.get("log") for e in result.events)
    assert not result.image


def test_runtime_txt_picks_the_base_that_ships_that_python(make_repo, build):
    result = build(str(make_repo({"runtime.txt": "python-3.13\n", "requirements.txt": "six\n"})))
    assert result.code == 0, result.stderr
    assert sh(result.image, "python --version").startswith("Python 3.13")


def test_runtime_txt_unavailable_python_uses_the_nearest_with_a_warning(make_repo, build):
    result = build(str(make_repo({"runtime.txt": "python-3.10\n"})))
    assert result.code == 0, result.stderr
    warnings = [e["message"] for e in result.events if e["message"].startswith("Warning:")]
    assert any("3.10" in w and "3.11" in w for w in warnings), warnings
    assert sh(result.image, "python --version").startswith("Python 3.11")


def test_runtime_txt_unavailable_python_can_be_refused(make_repo, build):
    repo = make_repo({"runtime.txt": "python-3.10\n"})
    result = binderbox("build", "--json-logs", str(repo), env={"BINDERBOX_PYTHON_FALLBACK": "fail"})
    assert result.code == 1
    assert "Python 3.10" in result.failure["message"]


def test_any_debian_image_can_be_the_base(make_repo, build, base_image):
    # Our own base, treated as a foreign image: binderbox must add Python, uv and tini itself.
    repo = make_repo({"requirements.txt": "six==1.16.0\n"})
    result = build(str(repo), "--base-image", base_image)
    assert result.code == 0, result.stderr
    assert sh(result.image, "python -c 'import six; print(six.__version__)'") == "1.16.0"
    assert sh(result.image, "id -un") == "jovyan"
