"""User errors through the real ``binderbox`` command, plus a few positive CLI checks.

Each failing command must exit non-zero with exactly one sentence for the user, print no
traceback, and leave no ``binderbox-build-*`` folder and no ``binderbox run`` container
behind. Every command gets its own ``TMPDIR`` so leftovers are attributable to it even while
other builds run on this machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from binderbox.naming import escape_slug
from binderbox.providers.local import LocalSource
from conftest import CliResult, binderbox

pytestmark = pytest.mark.docker

# Every fixture repository's folder name starts with this, so its images and containers
# can be told apart from those of other builds running on this machine.
MARK = "bbxcli"
MISSING_PACKAGE = "numpyy-does-not-exist-binderbox"


# --- helpers -------------------------------------------------------------------------------


def assert_one_sentence(message: str) -> None:
    assert message, "empty message"
    assert message == message.strip(), repr(message)
    assert "\n" not in message, repr(message)
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    assert "Traceback" not in message
    assert "unexpectedly" not in message, message


def image_prefix(repo: Path) -> str:
    """The name every image of this local folder starts with."""
    return f"binderbox-{escape_slug(LocalSource(repo).slug())}:"


def images_of(client: docker.DockerClient, repo: Path) -> list[str]:
    prefix = image_prefix(repo)
    return [t for image in client.images.list() for t in image.tags if t.startswith(prefix)]


def our_run_containers(client: docker.DockerClient) -> set[str]:
    """`binderbox run` containers made from images of this file's repositories."""
    return {
        c.id
        for c in client.containers.list(all=True, filters={"label": "binderbox.run=1"})
        if MARK in (c.attrs.get("Config", {}).get("Image") or "")
    }


def after_error(stderr: str) -> str:
    """What the human output prints after its `Error:` line (the log tail, if any)."""
    lines = stderr.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Error: "))
    return "\n".join(lines[start + 1 :])


def build_dirs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("binderbox-build-")}


_IMAGE_IN_STEP = re.compile(r"^==> (?:Built|Image) (?P<image>\S+)", re.M)


@dataclass
class Cli:
    tmpdir: Path
    client: docker.DockerClient
    built_images: set[str]

    def run(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        result = binderbox(*args, env={"TMPDIR": str(self.tmpdir), **(env or {})})
        for match in _IMAGE_IN_STEP.finditer(result.stderr):
            self.built_images.add(match["image"])
        if result.image:
            self.built_images.add(result.image)
        assert build_dirs(self.tmpdir) == set(), "a binderbox-build-* folder was left behind"
        return result

    def fails(
        self, *args: str, env: dict[str, str] | None = None, early: bool = False
    ) -> tuple[CliResult, str]:
        """Run a command that must fail cleanly; return the result and its one sentence.

        ``early``: the error comes before any step, so it is the only line printed.
        """
        containers = our_run_containers(self.client)
        result = self.run(*args, env=env)
        assert result.code != 0, (result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stdout
        assert "Traceback" not in result.stderr
        if "--json-logs" in args:
            failed = [e for e in result.events if e.get("phase") == "failed"]
            assert len(failed) == 1, result.stdout[-3000:]
            message = failed[0]["message"]
            assert not [e for e in result.events if e.get("phase") == "built"]
            if early:
                assert result.events == failed, result.events
        else:
            errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
            assert len(errors) == 1, result.stderr[-3000:]
            message = errors[0].removeprefix("Error: ")
            assert result.stdout == "", result.stdout[-2000:]
            if early:
                assert result.stderr.strip() == errors[0], result.stderr
        assert_one_sentence(message)
        assert our_run_containers(self.client) <= containers, "a run container was left behind"
        return result, message


@pytest.fixture
def cli(base_image: str, docker_client, built_images: set[str], tmp_path: Path) -> Cli:
    tmpdir = tmp_path / "binderbox-tmp"
    tmpdir.mkdir()
    return Cli(tmpdir, docker_client, built_images)


@pytest.fixture
def repo(make_repo: Callable[..., Path]) -> Callable[..., Path]:
    """A fixture repository whose folder name carries MARK."""
    counter = iter(range(100))

    def make(files: dict[str, str | tuple[str, int]]) -> Path:
        return make_repo(files, name=f"{MARK}{next(counter)}")

    return make


MODES = [pytest.param((), id="human"), pytest.param(("--json-logs",), id="json")]


# --- usage errors before anything is built -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_missing_path(cli, tmp_path, mode):
    missing = tmp_path / "no-such-folder"
    _, message = cli.fails("build", *mode, str(missing), early=True)
    assert "does not exist" in message
    assert str(missing) in message


@pytest.mark.parametrize("mode", MODES)
def test_file_instead_of_folder(cli, tmp_path, mode):
    file = tmp_path / "a-file.txt"
    file.write_text("not a repository\n")
    _, message = cli.fails("build", *mode, str(file), early=True)
    assert "is not a folder" in message
    assert str(file) in message


@pytest.mark.parametrize("mode", MODES)
def test_ref_with_local_folder(cli, repo, mode):
    folder = repo({"file": "x\n"})
    _, message = cli.fails("build", *mode, "--ref", "main", str(folder), early=True)
    assert "--ref" in message
    assert "git URL" in message


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--user-id", "0", "--user-id"),
        ("--user-name", "root", "--user-name"),
        ("--target-repo-dir", "srv/repo", "--target-repo-dir"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_unsafe_user_options(cli, repo, docker_client, option, value, named, mode):
    folder = repo({"file": "x\n"})
    _, message = cli.fails("build", *mode, option, value, str(folder))
    assert named in message
    assert value in message or option == "--user-id"
    assert images_of(docker_client, folder) == []


@pytest.mark.parametrize("mode", MODES)
def test_subdir_outside_the_repository(cli, repo, mode):
    folder = repo({"sub/file": "x\n"})
    _, message = cli.fails("build", *mode, "--subdir", "../x", str(folder), early=True)
    assert "--subdir '../x'" in message


@pytest.mark.parametrize("mode", MODES)
def test_missing_subdir(cli, repo, docker_client, mode):
    folder = repo({"sub/file": "x\n"})
    _, message = cli.fails("build", *mode, "--subdir", "nope", str(folder))
    assert "--subdir 'nope'" in message
    assert "not a folder" in message
    assert images_of(docker_client, folder) == []


@pytest.mark.parametrize("mode", MODES)
def test_apt_txt_injection_names_file_and_line(cli, repo, docker_client, mode):
    folder = repo({"apt.txt": "# tools\ncurl\nfoo; touch /x\n"})
    _, message = cli.fails("build", *mode, str(folder))
    assert "apt.txt" in message
    assert "line 3" in message
    assert "foo; touch /x" in message
    assert images_of(docker_client, folder) == []


@pytest.mark.parametrize("command", ["build", "run"])
def test_docker_not_running(cli, repo, command):
    folder = repo({"file": "x\n"})
    _, message = cli.fails(
        command, str(folder), env={"DOCKER_HOST": "unix:///tmp/nonexistent.sock"}, early=True
    )
    assert "Docker is not running" in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [("-p", "abc"), ("-e", "NOEQUALS"), ("-v", "/does/not/exist:/x")],
)
def test_run_bad_flag_is_a_usage_error(cli, repo, docker_client, flag, value):
    folder = repo({"file": "x\n"})
    _, message = cli.fails("run", flag, value, str(folder), early=True)
    assert message.startswith(f"{flag} '{value}'"), message
    assert images_of(docker_client, folder) == []


# --- failing builds --------------------------------------------------------------------------


def test_unknown_package_human(cli, repo):
    folder = repo({"requirements.txt": f"{MISSING_PACKAGE}\n"})
    result, message = cli.fails("build", str(folder))
    assert f"'{MISSING_PACKAGE}' was not found on the package index" in message
    assert "requirements.txt" in message
    tail = after_error(result.stderr)
    assert tail.startswith("The last lines of the build log:"), tail
    assert MISSING_PACKAGE in tail


def test_unknown_package_json(cli, repo):
    folder = repo({"requirements.txt": f"{MISSING_PACKAGE}\n"})
    result, message = cli.fails("build", "--json-logs", str(folder))
    assert f"'{MISSING_PACKAGE}' was not found on the package index" in message
    tail = result.failure.get("log_tail", "")
    assert MISSING_PACKAGE in tail
    assert 0 < len(tail.splitlines()) <= 25


@pytest.mark.parametrize("mode", MODES)
def test_failing_postbuild(cli, repo, docker_client, mode):
    folder = repo({"postBuild": ("#!/bin/bash\necho about to fail\nexit 3\n", 0o755)})
    result, message = cli.fails("build", *mode, str(folder))
    assert "postBuild" in message
    assert "exit" in message and re.search(r"\b3\b", message), message
    assert images_of(docker_client, folder) == []
    tail = result.failure.get("log_tail", "") if mode else after_error(result.stderr)
    assert "about to fail" in tail


@pytest.mark.parametrize("mode", MODES)
def test_dockerfile_base_cannot_be_pulled(cli, repo, docker_client, mode):
    folder = repo({"Dockerfile": "FROM busybox:doesnotexist-binderbox\nRUN true\n"})
    _, message = cli.fails("build", *mode, str(folder))
    assert "could not be pulled" in message
    assert "'busybox:doesnotexist-binderbox' named in Dockerfile" in message
    assert images_of(docker_client, folder) == []


# --- binderbox run ---------------------------------------------------------------------------


# `binderbox run REPO -- CMD` is the documented form; CMD right after REPO also works.
SEPARATORS = [
    pytest.param(("--",), id="dashdash"),
    pytest.param((), id="no-dashdash"),
]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_run_returns_the_command_exit_code_and_removes_the_container(
    cli, repo, docker_client, separator
):
    folder = repo({"file": "x\n"})
    before = our_run_containers(docker_client)
    result = cli.run("run", "--json-logs", str(folder), *separator, "sh", "-c", "exit 7")
    assert "Traceback" not in result.stderr
    assert result.image.startswith(image_prefix(folder)), result.events
    assert not docker_client.containers.list(
        all=True, filters={"label": "binderbox.run=1", "ancestor": result.image}
    )
    assert our_run_containers(docker_client) <= before
    assert result.code == 7, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_run_prints_the_command_output(cli, repo, docker_client, separator):
    folder = repo({"file": "x\n"})
    result = cli.run("run", str(folder), *separator, "python", "-c", "print(42)")
    assert "Traceback" not in result.stderr
    images = images_of(docker_client, folder)
    assert len(images) == 1
    assert not docker_client.containers.list(
        all=True, filters={"label": "binderbox.run=1", "ancestor": images[0]}
    )
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "42" in result.stdout.splitlines()


# --- positive build output -------------------------------------------------------------------


def test_no_build_prints_a_dockerfile_without_building(cli, repo, docker_client):
    folder = repo({"requirements.txt": "six\n", "file": "x\n"})
    result = cli.run("build", "--no-build", str(folder))
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FROM binderbox/base:"), lines[:3]
    assert any(ln.startswith("COPY") and "requirements.txt" in ln for ln in lines)
    assert any(ln.startswith("ENTRYPOINT") for ln in lines)
    assert "==>" not in result.stderr
    assert images_of(docker_client, folder) == []


def test_no_build_refuses_subdir_outside_the_repository(cli, repo):
    folder = repo({"file": "x\n"})
    sibling = folder.parent / "x"
    sibling.mkdir()
    (sibling / "requirements.txt").write_text("six\n")
    _, message = cli.fails("build", "--no-build", "--subdir", "../x", str(folder), early=True)
    assert "--subdir '../x'" in message


def test_no_build_prints_a_subdir_dockerfile(cli, repo):
    folder = repo({"sub/Dockerfile": "FROM scratch\nLABEL from=subdir\n", "file": "x\n"})
    result = cli.run("build", "--no-build", "--subdir", "sub", str(folder))
    assert "unexpectedly" not in result.stderr, result.stderr
    assert result.code == 0, result.stderr
    assert result.stdout == "FROM scratch\nLABEL from=subdir\n"


def test_human_build_output_shows_steps_and_ends_with_the_image(cli, repo, docker_client):
    folder = repo({"requirements.txt": "six\n", "file": "x\n"})
    result = cli.run("build", str(folder))
    assert result.code == 0, result.stderr[-3000:]
    steps = [ln for ln in result.stderr.splitlines() if ln.startswith("==> ")]
    assert any(ln.startswith("==> Resolving") for ln in steps), steps
    assert any(ln.startswith("==> Built") for ln in steps), steps
    assert not result.events  # human output has no JSON lines
    out = result.stdout.splitlines()
    assert out, "nothing on stdout"
    image = out[-1]
    assert image.startswith(image_prefix(folder)), out
    assert out == [image], "stdout should hold only the image name"
    assert docker_client.images.get(image).labels["binderbox.repo"] == str(folder.resolve())
    assert image in steps[-1]
