"""Build options beyond the configuration files: ignore files, --subdir, --label,
--build-arg (real builds, checked inside the image)."""

from __future__ import annotations

import re
import time

import docker
import pytest
from tests.conftest import run_in_image

pytestmark = pytest.mark.docker


def present(image: str, *paths: str) -> dict[str, bool]:
    return {p: run_in_image(image, "test", "-e", p).returncode == 0 for p in paths}


def test_root_dockerignore_keeps_files_out_of_the_image(make_repo, build):
    repo = make_repo(
        {
            ".dockerignore": "# big things\ndata/\n*.csv\n!keep.csv\n/secret.txt\n",
            "data/huge.bin": "x",
            "drop.csv": "a,b",
            "keep.csv": "c,d",
            "secret.txt": "token",
            "notebook.ipynb": "{}",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert present(
        result.image, "data", "drop.csv", "keep.csv", "secret.txt", "notebook.ipynb"
    ) == {
        "data": False,
        "drop.csv": False,
        "keep.csv": True,
        "secret.txt": False,
        "notebook.ipynb": True,
    }


def test_binder_dir_ignore_file_wins_over_the_root_one(make_repo, build):
    repo = make_repo(
        {
            ".dockerignore": "a.txt\n",
            "binder/.containerignore": "b.txt\n",
            "binder/requirements.txt": "six\n",
            "a.txt": "a",
            "b.txt": "b",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert present(result.image, "a.txt", "b.txt") == {"a.txt": True, "b.txt": False}


def test_ignore_patterns_cannot_reach_outside_the_repository(make_repo, build):
    repo = make_repo({".dockerignore": "../binderbox\n../Dockerfile\n", "x.txt": "x"})
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert present(result.image, "x.txt") == {"x.txt": True}


def test_dockerfile_build_uses_the_binder_dir_ignore_file(make_repo, build, base_image):
    repo = make_repo(
        {
            "binder/Dockerfile": f"FROM {base_image}\nCOPY . /src\n",
            "binder/.dockerignore": "private/\n",
            "private/key": "k",
            "public/readme": "r",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    assert present(result.image, "/src/private", "/src/public/readme") == {
        "/src/private": False,
        "/src/public/readme": True,
    }


def test_subdir_is_built_as_the_repository(make_repo, build):
    repo = make_repo(
        {
            "requirements.txt": "this-is-not-used==0\n",
            "project/requirements.txt": "six==1.16.0\n",
            "project/analysis.ipynb": "{}",
        }
    )
    result = build(str(repo), "--subdir", "project")
    assert result.code == 0, result.stderr
    assert present(result.image, "analysis.ipynb", "project") == {
        "analysis.ipynb": True,
        "project": False,
    }
    labels = docker.from_env().images.get(result.image).labels
    assert labels["binderbox.subdir"] == "project"


def test_labels_and_build_args(make_repo, build, base_image):
    repo = make_repo(
        {"Dockerfile": f"FROM {base_image}\nARG GREETING=unset\nRUN echo $GREETING > /greeting\n"}
    )
    result = build(str(repo), "--build-arg", "GREETING=hello there", "--label", "team=physics")
    assert result.code == 0, result.stderr
    assert run_in_image(result.image, "cat", "/greeting").stdout.strip() == "hello there"
    labels = docker.from_env().images.get(result.image).labels
    assert labels["team"] == "physics"


@pytest.mark.parametrize("flag", ["--label", "--build-arg"])
def test_malformed_key_value_is_refused(make_repo, build, flag):
    result = build(str(make_repo({"a.txt": "a"})), flag, "NOEQUALS")
    assert result.code == 1
    assert result.failure["message"] == f"{flag} 'NOEQUALS' is not KEY=VALUE."


def test_a_build_that_runs_too_long_is_stopped_with_a_message(make_repo, base_image):
    from tests.conftest import binderbox

    repo = make_repo({"postBuild": "#!/bin/sh\nsleep 120\n"})
    began = time.monotonic()
    result = binderbox("build", "--json-logs", str(repo), env={"BINDERBOX_BUILD_TIMEOUT": "5"})
    assert result.code == 1
    assert result.failure["message"] == (
        "The build took longer than the limit of 5 seconds and was stopped."
    )
    assert time.monotonic() - began < 60


def test_run_passes_environment_volumes_and_can_mount_the_repository(
    make_repo, base_image, built_images, tmp_path
):
    from tests.conftest import binderbox

    repo = make_repo({"notes.txt": "from the build\n"})
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("mounted data\n")
    script = 'echo "$GREETING"; cat /data/x.txt; grep -c " /home/jovyan " /proc/mounts'
    result = binderbox(
        "run",
        "--editable",
        "-e",
        "GREETING=hello",
        "-v",
        f"{data}:/data",
        str(repo),
        "--",
        "sh",
        "-c",
        script,
    )
    assert result.code == 0, result.stderr
    assert result.stdout.split() == ["hello", "mounted", "data", "1"]
    built_images.update(re.findall(r"binderbox-local-[\w.-]+:\w+", result.stderr))


def test_run_options_after_the_repository_are_explained(make_repo, base_image):
    from tests.conftest import binderbox

    result = binderbox("run", str(make_repo({"a.txt": "a"})), "--editable")
    assert result.code == 2
    assert "Options go before REPO" in result.stderr and "'--editable'" in result.stderr
