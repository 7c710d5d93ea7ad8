"""Hostile repositories against a real ``binderbox serve`` (as root where the machine runs it
so): links out of the repository in both directions, a YAML alias bomb, an oversized
configuration file; and the legitimate links that must keep building.

Repositories are served by ``git daemon`` on 127.0.0.1. The host content they aim at holds
a marker this module made up (in a file, and in serve's own environment for
/proc/self/environ); it must appear nowhere binderbox writes or answers.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from tests.conftest import binderbox, commit_all
from tests.test_serve import Served, serving

pytestmark = pytest.mark.docker

MARKER = f"hostile-marker-{uuid.uuid4().hex}"
# Enough ".." to reach / from any checkout depth: the link aims at the host wherever the
# checkout lands.
UP = "../" * 16


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """A host folder holding files with the marker, standing for /etc, ~/.ssh and so on."""
    folder = tmp_path_factory.mktemp("host-secrets")
    (folder / "secret.txt").write_text(f"{MARKER}\n")
    (folder / "requirements.txt").write_text(f"{MARKER}\n")
    (folder / "cron-target").write_text("original host content\n")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_image) -> Iterator[Served]:
    with serving(
        tmp_path_factory,
        "hostile-repos",
        BINDERBOX_BUILD_ONLY_ENABLED="true",
        BINDERBOX_RATE_LIMIT_PER_MINUTE="0",
        # /proc/self/environ of serve (where builds run) then holds the marker.
        HOSTILE_MARKER=MARKER,
    ) as process:
        yield process


def publish(
    git_server, tmp_path: Path, name: str, files: dict[str, str], links: dict[str, str]
) -> str:
    work = tmp_path / name
    work.mkdir()
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    for rel, target in links.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, work / rel)
    commit_all(work)
    return git_server.publish(work, f"{name}.git")


def build_only(served: Served, url: str) -> tuple[list[dict], float]:
    started = time.monotonic()
    events = served.stream(f"/build/git/{quote(url, safe='')}/main?build_only=true")
    return events, time.monotonic() - started


def assert_no_host_content(served: Served, events: list[dict]) -> None:
    """The marker is in no event, no build log, not on /status, not in the database, the
    launch-events file or serve's own log."""
    assert MARKER not in repr(events)
    for event in events:
        if event.get("log_url"):
            log = requests.get(event["log_url"], timeout=10)
            assert log.status_code == 200 and MARKER not in log.text
    status = requests.get(served.url + "/status", timeout=10)
    assert status.status_code == 200 and MARKER not in status.text
    state = Path(served.env["BINDERBOX_STATE_DIR"])
    stored = [p for p in state.iterdir() if p.name.startswith("binderbox.sqlite")]
    assert stored, "no database in state_dir"
    for path in [*stored, Path(served.env["BINDERBOX_LAUNCH_EVENTS_FILE"]), served.log]:
        if path.exists():
            assert MARKER.encode() not in path.read_bytes(), path


def failure(events: list[dict]) -> str:
    assert events[-1]["phase"] == "failed", events[-1]
    message = events[-1]["message"]
    assert "\n" not in message and len(message) < 1000, message
    return message


@pytest.mark.parametrize(
    "name, files, links, named",
    [
        ("runtime-environ", {}, {"runtime.txt": "/proc/self/environ"}, ["runtime.txt"]),
        ("req-abs", {}, {"requirements.txt": "HOST/secret.txt"}, ["requirements.txt"]),
        (
            "env-relative",
            {"binder/apt.txt": "\n"},
            {"binder/environment.yml": f"{UP}HOST/secret.txt"},
            ["binder/environment.yml"],
        ),
        (
            "lock-chain",  # each link alone looks harmless; the chain leaves
            {},
            {"Pipfile.lock": "docs/lock.json", "docs/lock.json": "../up", "up": f"{UP}HOST"},
            ["Pipfile.lock", "docs/lock.json", "up"],
        ),
        ("binder-dir", {}, {"binder": "HOST"}, ["binder"]),
        ("description", {}, {"DESCRIPTION": "HOST/secret.txt"}, ["DESCRIPTION"]),
        ("dockerfile", {}, {"Dockerfile": "HOST/secret.txt"}, ["Dockerfile"]),
        ("data-dir", {"requirements.txt": "six\n"}, {"data": "/etc"}, ["data"]),
    ],
)
def test_a_link_out_is_refused_and_nothing_of_the_host_shows(
    served, git_server, tmp_path, host, name, files, links, named
):
    # HOST: the host folder; after UP, the same path without its leading "/".
    aimed = {
        rel: target.replace("HOST", str(host)[1:] if target.startswith(UP) else str(host))
        for rel, target in links.items()
    }
    url = publish(git_server, tmp_path, name, files, aimed)
    events, seconds = build_only(served, url)
    message = failure(events)
    assert message.startswith(tuple(f"'{rel}' is a link to " for rel in named)), message
    assert "outside the repository; binderbox does not build repositories with links" in message
    assert not any(e["phase"] == "building" for e in events)  # refused before detection
    assert seconds < 30
    assert_no_host_content(served, events)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_dockerignore_link_is_never_written_through(served, git_server, tmp_path, host, relative):
    target = host / "cron-target"
    before = target.read_bytes(), target.stat().st_mtime_ns
    link = f"{UP}{str(target).lstrip('/')}" if relative else str(target)
    files = {
        "binder/.dockerignore": f"* * * * * root echo {MARKER}\n",
        "binder/Dockerfile": "FROM binderbox/base:bookworm\n",
    }
    url = publish(git_server, tmp_path, f"ignore-{relative}", files, {".dockerignore": link})
    events, _ = build_only(served, url)
    message = failure(events)
    assert message.startswith("'.dockerignore' is a link to "), message
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert_no_host_content(served, events)


def test_a_yaml_alias_bomb_fails_at_once_and_the_service_stays_up(served, git_server, tmp_path):
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert len(bomb) < 400
    url = publish(git_server, tmp_path, "bomb", {"environment.yml": bomb}, {})
    events, seconds = build_only(served, url)
    assert failure(events).startswith(
        "environment.yml line 2 uses a YAML alias (*name); binderbox does not expand aliases, "
        "write the entries out. The whole log: "
    )
    assert seconds < 15
    assert served.process.poll() is None
    assert requests.get(served.url + "/health", timeout=5).status_code == 200


def test_an_oversized_requirements_file_is_refused_in_one_sentence(served, git_server, tmp_path):
    huge = "".join(f"package-{n}==1.0  # {'x' * 40}\n" for n in range(40_000))
    assert len(huge) > 2_000_000
    url = publish(git_server, tmp_path, "huge", {"requirements.txt": huge}, {})
    events, seconds = build_only(served, url)
    assert failure(events).startswith(
        "'requirements.txt' is larger than 1 MB, the limit for a configuration file. The whole"
    )
    assert seconds < 30
    assert sum(len(e["message"]) for e in events) < 5000
    assert requests.get(served.url + "/health", timeout=5).status_code == 200


def test_links_inside_the_repository_still_build(served, git_server, tmp_path):
    files = {"requirements.txt": "six==1.16.0\n", "data/v1/table.csv": "a,b\n1,2\n"}
    links = {
        "binder/requirements.txt": "../requirements.txt",
        "data/latest": "v1",
        "table.csv": "data/latest/table.csv",
    }
    url = publish(git_server, tmp_path, "inside", files, links)
    events, _ = build_only(served, url)
    assert events[-1]["phase"] == "ready", events[-1]
    image = events[-1]["image"]
    shown = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            image,
            "sh",
            "-c",
            "python -c 'import six; print(six.__version__)'; readlink data/latest; cat table.csv",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.stdout == "1.16.0\nv1\na,b\n1,2\n", shown.stderr


def test_the_users_own_folder_keeps_a_link_out_with_a_warning(
    tmp_path, host, base_image, built_images
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    os.symlink(str(host), folder / "shared-data")
    result = binderbox("build", "--json-logs", str(folder))
    if result.image:
        built_images.add(result.image)
    assert result.code == 0, result.stderr[-2000:]
    warnings = [e["message"] for e in result.events if "'shared-data'" in e["message"]]
    assert warnings == [
        f"Warning: 'shared-data' is a link to {str(host)!r}, outside the folder; it is copied "
        "into the image as a link and binderbox reads nothing through it."
    ]
    # A configuration file that leaves the folder is still not read.
    os.symlink(str(host / "requirements.txt"), folder / "requirements.txt")
    result = binderbox("build", "--json-logs", str(folder))
    assert result.code != 0
    assert result.failure["message"] == (
        "'requirements.txt' is a link that leaves the repository; binderbox reads "
        "configuration files only from inside it."
    )
    assert MARKER not in result.stdout + result.stderr
