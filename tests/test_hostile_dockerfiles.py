"""Repository Dockerfiles in service builds: what dockerd or BuildKit would fetch or mount on
their behalf is refused with one sentence; a Dockerfile that uses only its own context
builds. The refused forms are pure unit tests; the ADD of a local service, the no-Jupyter
image and the clean build run real BuildKit builds through the service."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import ClassVar
from urllib.parse import quote

import docker
import pytest
from tests.test_service_build import build_path, building_service, phases, served_repo

from binderbox.builder.dockerfile_check import check_dockerfile, refusal
from binderbox.config import Settings
from binderbox.launch.options import LABEL_SESSION, NO_JUPYTER_SERVER
from binderbox.naming import image_name_for
from binderbox.providers.git import GitSource

REGISTRIES = ("docker.io", "quay.io")


def refused(text: str, **kwargs) -> list[int]:
    """The numbers of the refused lines."""
    return [p.line_number for p in check_dockerfile(text, REGISTRIES, **kwargs)]


# ---------- pure: each refused form ----------


@pytest.mark.parametrize(
    "directive",
    ["# syntax=docker/dockerfile:1", "#SYNTAX = evil.io/frontend", "  #  Syntax=x", "# syntax =x"],
)
def test_syntax_directives_are_refused_in_any_spelling(directive):
    assert refused(f"{directive}\nFROM binderbox/base\n") == [1]


@pytest.mark.parametrize(
    "line",
    [
        "ADD http://127.0.0.1:8000/secret /secret",
        "add HTTPS://169.254.169.254/latest/meta-data/ /m",
        'ADD ["http://example.org/a", "/a"]',
        "ADD --chown=1000 ftp://example.org/a /a",
        "ADD git@github.com:org/repo.git /src",
        "ADD https://github.com/org/repo.git#main /src",
        "ADD --keep-git-dir=true repo /src",
    ],
)
def test_add_of_a_remote_source_is_refused(line):
    assert refused(f"FROM binderbox/base\n{line}\n") == [2]


def test_add_through_an_argument_or_a_continuation_is_refused():
    assert refused("FROM a\nARG URL=http://127.0.0.1/x\nADD $URL /x\n") == [3]
    assert refused("FROM a\nADD ${NOWHERE} /x\n") == [2]
    # Docker joins continued lines without a space; comment lines in between are dropped.
    assert refused("FROM a\nADD htt\\\n# note\n\n  p://127.0.0.1/x /x\n") == [2]
    assert refused("# escape=`\nFROM a\nADD htt`\np://127.0.0.1/x /x\n") == [3]


@pytest.mark.parametrize(
    "mount",
    [
        "type=secret,id=token",
        "type=ssh",
        "type=cache,target=/root/.cache",
        "type=cache,id=binderbox-uv-1000,target=/var/cache/binderbox/uv",
        "type=bind,from=busybox,target=/b",
        "type=bind,from=quay.io/org/image,target=/b",
    ],
)
def test_mounts_of_secrets_caches_and_foreign_images_are_refused(mount):
    assert refused(f"FROM binderbox/base\nRUN --mount={mount} true\n") == [2]


def test_copy_from_an_image_is_refused_and_from_a_stage_is_not():
    assert refused("FROM a\nCOPY --from=busybox /bin/busybox /b\n") == [2]
    assert refused("FROM a\ncopy --from=127.0.0.1:5000/x /x /x\n") == [2]
    text = "FROM a AS Builder\nRUN true\nFROM b\nCOPY --from=builder /x /x\nCOPY --from=0 /x /y\n"
    assert refused(text) == []
    assert refused("FROM a AS b\nFROM c\nRUN --mount=type=bind,from=b,target=/s true\n") == []


@pytest.mark.parametrize(
    "image",
    [
        "127.0.0.1:5000/private",
        "localhost/private",
        "registry.internal.example/team/image:1",
        "Internal/image",  # a capital letter makes the first part a host, as Docker reads it
        "169.254.169.254/x",
    ],
)
def test_images_from_other_registries_are_refused(image):
    assert refused(f"FROM {image}\n") == [1]


def test_images_from_listed_registries_and_stages_build():
    text = (
        "FROM jupyter/base-notebook AS one\n"
        "FROM quay.io/jupyter/scipy-notebook:2024-01-01\n"
        "from index.docker.io/library/python:3.11\n"
        "FROM one\n"
        "FROM scratch\n"
    )
    assert refused(text) == []


def test_from_arguments_are_resolved_or_refused():
    assert refused("ARG BASE=quay.io/jupyter/base-notebook\nFROM ${BASE}\n") == []
    assert refused("ARG BASE=10.0.0.1:5000/x\nFROM $BASE\n") == [2]
    assert refused("ARG BASE\nFROM ${BASE}\n") == [2]
    assert refused("ARG TAG=1\nFROM ${REG:-127.0.0.1:5000}/x:${TAG}\n") == [2]
    assert refused("ARG BASE\nFROM $BASE\n", build_args={"BASE": "python:3.11"}) == []
    assert refused("FROM a\n", build_args={"BUILDKIT_SYNTAX": "evil.io/frontend"}) == [0]


def test_heredoc_bodies_are_read_as_this_dockerd_reads_them():
    # dockerd 20.10's built-in frontend has no heredocs: the body lines are instructions.
    assert refused("FROM a\nRUN <<EOF\nADD http://127.0.0.1/x /x\nEOF\n") == [3]
    # Newer frontends read the body as data; the instruction after it is still checked.
    assert refused("FROM a\nCOPY <<EOF /f\nline \\\nEOF\nADD http://127.0.0.1/x /x\n") == [5]


def test_onbuild_triggers_are_checked_like_instructions():
    assert refused("FROM a\nONBUILD ADD http://127.0.0.1/x /x\n") == [2]
    assert refused("FROM a\nONBUILD COPY . /src\n") == []


def test_network_and_security_options_are_refused():
    assert refused("FROM a\nRUN --network=host curl 127.0.0.1\n") == [2]
    assert refused("FROM a\nRUN --security=insecure true\n") == [2]


def test_the_refusal_is_one_short_sentence_quoting_the_line():
    long_url = "http://127.0.0.1/" + "x" * 5000
    text = f"FROM a\nADD {long_url}\x1b[2J /x\nADD http://b/ /b\n"
    message = refusal(text, "binder/Dockerfile", REGISTRIES)
    assert message.startswith("binder/Dockerfile line 2 ('ADD http://127.0.0.1/xxx")
    assert "(and 1 more line like it)." in message
    assert len(message) < 600 and "\x1b" not in message and "\n" not in message


def test_ordinary_dockerfiles_pass():
    text = (
        "FROM binderbox/base:bookworm\n"
        "ENV PATH=/srv/venv/bin:$PATH\n"
        "USER root\n"
        "RUN apt-get update && apt-get install -y curl \\\n"
        "    && rm -rf /var/lib/apt/lists/*\n"
        "COPY --chown=1000:1000 . /home/jovyan/\n"
        "ADD requirements.txt /tmp/\n"
        "RUN --mount=type=bind,target=/ctx --mount=type=tmpfs,target=/t ls /ctx\n"
        "USER 1000\n"
    )
    assert refused(text) == []


# ---------- real builds through the service ----------


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Recorder.requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host secret\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_secret_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP service on 127.0.0.1 standing for this machine's own services."""
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _Recorder.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def dockerfile_service(base_image, built_images):
    with building_service(built_images, "hostile") as svc:
        yield svc


@pytest.mark.docker
def test_add_of_a_local_service_is_refused_and_never_fetched(
    dockerfile_service, git_server, tmp_path, base_image, local_secret_server
):
    port, requests_seen = local_secret_server
    files = {
        "Dockerfile": f"FROM {base_image}\nADD http://127.0.0.1:{port}/secret /secret\n",
        "a.txt": "a",
    }
    url = served_repo(git_server, tmp_path, files, "hostile-add")
    events, _ = dockerfile_service.events(build_path(url, build_only="true"))
    failed = events[-1]
    assert failed["phase"] == "failed"
    assert failed["message"].startswith(
        f"Dockerfile line 2 ('ADD http://127.0.0.1:{port}/secret /secret') downloads with ADD"
    )
    assert not any("as written" in e["message"] for e in events)
    assert requests_seen == []


@pytest.mark.docker
def test_a_dockerfile_using_its_own_context_builds(
    dockerfile_service, git_server, tmp_path, base_image
):
    files = {
        "Dockerfile": (
            f"FROM {base_image}\n"
            "ENV PATH=/srv/venv/bin:$PATH\n"
            "COPY --chown=1000:1000 . /home/jovyan/\n"
            "ADD data.txt /home/jovyan/added.txt\n"
            "RUN --mount=type=bind,target=/ctx cat /ctx/data.txt > /tmp/from-bind\n"
            "USER 1000\n"
            "WORKDIR /home/jovyan\n"
        ),
        "data.txt": "own data\n",
    }
    url = served_repo(git_server, tmp_path, files, "hostile-own")
    events, _ = dockerfile_service.events(build_path(url, build_only="true"))
    assert phases(events)[-2:] == ["built", "ready"], events[-1]
    image = events[-1]["image"]
    out = docker.from_env().containers.run(
        image, ["cat", "/home/jovyan/added.txt", "/tmp/from-bind"], remove=True
    )
    assert out.decode() == "own data\nown data\n"


@pytest.mark.docker
def test_refused_setting_builds_no_repository_dockerfile(
    base_image, built_images, git_server, tmp_path
):
    files = {"Dockerfile": f"FROM {base_image}\n", "a.txt": "a"}
    url = served_repo(git_server, tmp_path, files, "hostile-refused")
    with building_service(built_images, "refused", repository_dockerfiles="refused") as svc:
        events, _ = svc.events(build_path(url, build_only="true"))
    assert events[-1]["phase"] == "failed"
    assert events[-1]["message"].startswith(
        "This binderbox does not build repositories' own Dockerfiles (Dockerfile);"
    )


# ---------- an image without a Jupyter server, through binderbox serve ----------


@pytest.fixture(scope="module")
def served_sessions(tmp_path_factory, base_image):
    from tests.test_serve import serving

    with serving(tmp_path_factory, "nojupyter") as served:
        yield served


def session_containers() -> list:
    return docker.from_env().containers.list(all=True, filters={"label": LABEL_SESSION})


@pytest.mark.docker
def test_an_image_without_jupyter_fails_in_one_sentence_at_build_and_at_launch(
    served_sessions, git_server, tmp_path, base_image
):
    before = {c.id for c in session_containers()}
    # The base's venv is not on its PATH: a Dockerfile of just FROM has no `jupyter`.
    files = {"Dockerfile": f"FROM {base_image}\nUSER 1000\n", "a.txt": "a"}
    url = served_repo(git_server, tmp_path, files, "nojupyter")
    events = served_sessions.stream(f"/build/git/{quote(url, safe='')}/main")
    failed = events[-1]
    assert failed["phase"] == "failed"
    assert failed["message"].startswith(
        "The image built from Dockerfile has no Jupyter server: sessions run 'jupyter server'"
    )
    assert "launching" not in [e["phase"] for e in events]
    assert not any(i.startswith(served_sessions.prefix) for i in local_tags())

    # An image that is already there (built before this check) fails at the start, once.
    settings = Settings(image_prefix=served_sessions.prefix)
    commit = GitSource(url, "main").resolve()
    image = image_name_for(settings, GitSource(url, "main").slug(), commit, {})
    docker.from_env().images.get(base_image).tag(image)
    events = served_sessions.stream(f"/build/git/{quote(url, safe='')}/main")
    failed = events[-1]
    assert failed["phase"] == "failed", failed
    assert NO_JUPYTER_SERVER in failed["message"]
    assert not any("attempt" in e["message"] for e in events)
    assert "Internal Server Error" not in " ".join(e["message"] for e in events)
    deadline = time.monotonic() + 60
    while {c.id for c in session_containers()} - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {c.id for c in session_containers()} - before == set()


def local_tags() -> list[str]:
    return [t for image in docker.from_env().images.list() for t in image.tags]
