"""Prebuilt images (/v2/image/<name>) without Docker: the reference grammar, the allow-list,
the sentences, and the launch through the real app with a fake dockerd, image store and
launcher (tests/test_prebuilt_serve.py runs the real thing)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from binderbox.config import Settings, load_settings
from binderbox.errors import UsageError
from binderbox.events import Event
from binderbox.images import LocalImageStore
from binderbox.launch.options import check_image
from binderbox.naming import prebuilt_image_name
from binderbox.providers.image import (
    OFF,
    ImageRefused,
    allowed,
    parse_image_reference,
    parse_patterns,
    pinned_reference,
)
from binderbox.service.app import create_app
from binderbox.service.prebuilt import (
    ImageFacts,
    PrebuiltImages,
    PullFailed,
    pull_failure,
    user_notes,
)

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


# ---------- the reference grammar ----------


@pytest.mark.parametrize(
    ("sent", "normalised"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.12", "docker.io/library/python:3.12"),
        ("jupyter/base-notebook", "docker.io/jupyter/base-notebook:latest"),
        ("docker.io/python:3", "docker.io/library/python:3"),
        ("index.docker.io/jupyter/x:1", "docker.io/jupyter/x:1"),
        ("quay.io/jupyter/base-notebook:2024-12-02", "quay.io/jupyter/base-notebook:2024-12-02"),
        ("127.0.0.1:5000/test/prebuilt:1", "127.0.0.1:5000/test/prebuilt:1"),
        ("localhost/a/b", "localhost/a/b:latest"),
        ("registry.example.org:8443/a/b/c:V1.0_x", "registry.example.org:8443/a/b/c:V1.0_x"),
        (f"quay.io/jupyter/x@{DIGEST}", f"quay.io/jupyter/x@{DIGEST}"),
        (f"python@{DIGEST}", f"docker.io/library/python@{DIGEST}"),
    ],
)
def test_references_are_normalised_as_dockerd_reads_them(sent, normalised):
    assert str(parse_image_reference(sent)) == normalised


@pytest.mark.parametrize(
    ("sent", "said"),
    [
        ("--help", "is not a Docker image name"),
        ("-q", "is not a Docker image name"),
        ("a b", "is not a Docker image name"),
        ("../x", "is not a Docker image name"),
        ("a/../b", "is not a Docker image name"),
        ("./x", "is not a Docker image name"),
        ("/x", "is not a Docker image name"),
        ("x/", "is not a Docker image name"),
        ("a//b", "is not a Docker image name"),
        ("Python", "is not a Docker image name"),
        ("quay.io/Jupyter/x", "is not a Docker image name"),
        ("x\ny", "is not a Docker image name"),
        ("x\x00", "is not a Docker image name"),
        ("x;rm -rf /", "is not a Docker image name"),
        ("$(id)", "is not a Docker image name"),
        ("host:99999/x", "is not a Docker image name"),
        ("host:0/x", "is not a Docker image name"),
        ("-host.org/x", "is not a Docker image name"),
        ("[::1]:5000/x", "is not a Docker image name"),
        ("x" * 401, "at most 400 characters"),
        ("a/" * 130 + "b", "at most 255 characters"),
        ("http://x/y", "without a scheme"),
        ("https://quay.io/jupyter/x", "without a scheme"),
        ("docker://x", "without a scheme"),
        ("x:", "is not an image tag"),
        ("x:-tag", "is not an image tag"),
        ("x:" + "t" * 129, "is not an image tag"),
        ("x@sha256:abc", "only by a sha256 digest"),
        ("x@sha512:" + "a" * 128, "only by a sha256 digest"),
        (f"x@{DIGEST.upper()}", "only by a sha256 digest"),
        (f"x@{DIGEST}@{DIGEST}", "only by a sha256 digest"),
        (f"x:1@{DIGEST}", "by a tag or by a digest, not both"),
        ("", "Name an image"),
    ],
)
def test_hostile_and_broken_names_are_refused_in_one_sentence(sent, said):
    with pytest.raises(ImageRefused) as refused:
        parse_image_reference(sent)
    message = refused.value.message
    assert said in message
    assert message.endswith(".") and "\n" not in message and len(message) < 400


# ---------- the allow-list ----------


def allows(setting: str, name: str) -> bool:
    return allowed(parse_image_reference(name), parse_patterns(setting))


def test_a_pattern_allows_what_lies_under_it_and_nothing_beside_it():
    setting = "quay.io/jupyter/*, registry.example.org/*"
    assert allows(setting, "quay.io/jupyter/base-notebook:2024-12-02")
    assert allows(setting, f"quay.io/jupyter/base-notebook@{DIGEST}")
    assert allows(setting, "quay.io/jupyter/nested/image")
    assert allows(setting, "registry.example.org/any/thing:1")
    assert not allows(setting, "quay.io/jupyterx/base-notebook")
    assert not allows(setting, "quay.io/other/base-notebook")
    assert not allows(setting, "quay.io.evil.org/jupyter/x")
    assert not allows(setting, "registry.example.org.evil.org/x")
    assert not allows(setting, "registry.example.org:5000/x")
    assert not allows(setting, "jupyter/base-notebook")  # Docker Hub's, not quay.io's


def test_patterns_are_normalised_like_references():
    # Docker Hub: a bare name is a library image, and the long spellings mean the same.
    assert allows("python", "python:3.12")
    assert allows("python", "docker.io/library/python")
    assert allows("docker.io/python", "python@" + DIGEST)
    assert allows("index.docker.io/jupyter/*", "jupyter/scipy-notebook")
    assert allows("jupyter/*", "docker.io/jupyter/scipy-notebook:1")
    assert not allows("python", "pythonx")
    assert not allows("python", "someone/python")


def test_a_pattern_with_a_tag_allows_that_tag_only_and_no_digest():
    assert allows("python:3.*", "python:3.12")
    assert not allows("python:3.*", "python:2.7")
    assert not allows("python:3.*", "python")  # latest
    assert not allows("python:3.12", "python@" + DIGEST)  # a digest cannot be told to be 3.12
    assert allows(f"python@{DIGEST}", f"docker.io/library/python@{DIGEST}")
    assert not allows(f"python@{DIGEST}", f"python@{OTHER_DIGEST}")


def test_a_star_alone_allows_every_image_and_a_host_wildcard_only_its_host():
    assert allows("*", "anything.example/x:1")
    assert allows("*.example.org/*", "a.example.org/x")
    assert not allows("*.example.org/*", "a.example.org.evil/x")


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("registry.example.org", "names no image; write registry.example.org/*"),
        ("https://quay.io/jupyter/*", "not an image pattern"),
        ("quay.io/jupyter/* ; rm", "not an image pattern"),
        ("quay*.io/x", "leading labels"),
    ],
)
def test_bad_patterns_stop_serve_at_start_in_one_sentence(setting, said, tmp_path):
    with pytest.raises(UsageError) as refused:
        load_settings(environ={"BINDERBOX_PREBUILT_IMAGES": setting})
    assert refused.value.message.startswith("Setting 'prebuilt_images': ")
    assert said in refused.value.message


def test_the_setting_is_off_by_default():
    assert Settings().prebuilt_images == ""
    assert parse_patterns(Settings().prebuilt_images) == []


# ---------- names, pins, sentences ----------


def test_the_local_name_is_one_the_spawner_starts_and_names_the_content():
    settings = Settings(image_prefix="binderbox-")
    name = prebuilt_image_name(settings, "quay.io/jupyter/base-notebook:latest", DIGEST)
    assert name.startswith("binderbox-image-quay-io-jupyter-base-notebook-latest-")
    assert name.endswith(":" + "ab" * 32)
    assert check_image(name, "binderbox-") == name  # the hub's own check lets it run
    for longest in ("a/" * 120 + "b:" + "t" * 128, "a/" * 120 + "b@" + DIGEST):
        reference = str(parse_image_reference(longest))
        long = prebuilt_image_name(settings, reference, DIGEST)
        assert check_image(long, "binderbox-") == long and len(long) < 255


def test_a_reference_is_pinned_to_the_digest_of_its_own_repository():
    reference = parse_image_reference("python:3.12")
    pinned = pinned_reference(
        reference, [f"someone/python@{OTHER_DIGEST}", f"python@{DIGEST}", "junk@@"]
    )
    assert str(pinned) == f"docker.io/library/python@{DIGEST}"
    assert pinned_reference(reference, []) == reference


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ("manifest for 127.0.0.1:5000/x:1 not found: manifest unknown", "was not found in"),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            "was not found in",
        ),
        (
            'Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused',
            "cannot be reached",
        ),
        ("dial tcp: lookup nowhere.invalid: no such host", "cannot be reached"),
        ("http: server gave HTTP response to HTTPS client", "answers only over plain http"),
        ("unauthorized: authentication required", "asks for credentials"),
        ("something else\nentirely", "failed: something else entirely."),
    ],
)
def test_pull_failures_are_one_sentence(raw, said):
    message = pull_failure(parse_image_reference("127.0.0.1:5000/x:1"), raw)
    assert said in message and "\n" not in message and message.endswith(".")


def test_the_images_user_is_told_when_it_is_not_the_sessions():
    passwd = "root:x:0:0::/root:/bin/sh\njovyan:x:1000:100::/home/jovyan:/bin/sh\n"
    assert user_notes("jovyan", passwd) == ()
    assert user_notes("1000:100", passwd) == ()
    (root,) = user_notes("", passwd)
    assert "runs as root by default" in root and "always run as uid 1000" in root
    (named,) = user_notes("app", "app:x:1234:1234::/app:/bin/sh\njovyan:x:1000:1000::/h:")
    assert "'app'" in named
    no_home = user_notes("1000", "root:x:0:0::/root:/bin/sh\n")
    assert len(no_home) == 1 and "no user with uid 1000" in no_home[0]


# ---------- the launch through the app, with fakes ----------


class FakeDocker:
    """A dockerd and the registries it pulls from: ``remote`` maps a normalised reference
    to its image; pulls, probes and tags are recorded."""

    def __init__(self) -> None:
        self.remote: dict[str, ImageFacts] = {}
        self.jupyter: dict[str, bool] = {}
        self.local: dict[str, ImageFacts] = {}
        self.pulls: list[str] = []
        self.probes: list[str] = []
        self.tags: list[tuple[str, str]] = []

    def publish(
        self, reference: str, image_id: str, *, jupyter: bool, user: str = "jovyan"
    ) -> None:
        repository = reference.rsplit(":", 1)[0]
        facts = ImageFacts(image_id, (f"{repository}@{DIGEST}",), user)
        self.remote[reference] = facts
        self.jupyter[image_id] = jupyter

    def pull(self, reference, timeout: float) -> None:
        self.pulls.append(str(reference))
        if reference.registry == "127.0.0.9:1":
            raise PullFailed(pull_failure(reference, "dial tcp 127.0.0.9:1: connection refused"))
        if str(reference) not in self.remote:
            raise PullFailed(pull_failure(reference, "manifest unknown"))
        self.local[str(reference)] = self.remote[str(reference)]

    def inspect(self, reference: str) -> ImageFacts | None:
        return self.local.get(reference)

    def has_jupyter_server(self, image_id: str) -> bool | None:
        self.probes.append(image_id)
        return self.jupyter[image_id]

    def passwd(self, image_id: str) -> str | None:
        return "root:x:0:0::/root:/bin/sh\njovyan:x:1000:100::/home/jovyan:/bin/sh\n"

    def tag(self, image_id: str, name: str) -> None:
        self.tags.append((image_id, name))


class FakeRegistry:
    """An image store that is a registry (sessions' nodes pull from it)."""

    def __init__(self) -> None:
        self.kept: set[str] = set()
        self.pushed: list[str] = []
        self.pulled: list[str] = []

    def exists(self, name: str) -> bool:
        return name in self.kept

    def reference(self, name: str) -> str:
        return f"registry.test/{name}"

    def push(self, name: str) -> None:
        self.pushed.append(name)
        self.kept.add(name)

    def pull(self, name: str) -> None:
        self.pulled.append(name)


class FakeLauncher:
    def __init__(self) -> None:
        self.launched: list[tuple[str, dict[str, str]]] = []

    async def launch(self, image: str, binder_env: dict[str, str]) -> AsyncIterator[Event]:
        yield Event("launching", f"Starting a session of {image}")
        self.launched.append((image, dict(binder_env)))
        yield Event("ready", "Server ready", {"url": "http://127.0.0.1:1/user/u/", "token": "t"})

    async def healthy(self) -> bool:
        return True

    async def running_images(self) -> list[str]:
        return [image for image, _ in self.launched]

    async def running_sessions(self) -> list[tuple[str, str]]:
        return [(image, env.get("repo_url", "")) for image, env in self.launched]


JUPYTER_ID = "sha256:" + "11" * 32
BARE_ID = "sha256:" + "22" * 32


@pytest.fixture
def fake_docker() -> FakeDocker:
    docker = FakeDocker()
    docker.publish("quay.io/jupyter/base-notebook:latest", JUPYTER_ID, jupyter=True)
    docker.publish("quay.io/jupyter/bare:1", BARE_ID, jupyter=False)
    docker.publish("docker.io/library/python:3.12", "sha256:" + "33" * 32, jupyter=True)
    return docker


@pytest.fixture
def app_with(tmp_path: Path, fake_docker: FakeDocker) -> Iterator:
    clients: list[TestClient] = []

    def start(prebuilt_images: str = "quay.io/jupyter/*", images=None, **more) -> TestClient:
        settings = Settings(
            state_dir=str(tmp_path / f"state{len(clients)}"),
            public_url="http://binder.test/",
            prebuilt_images=prebuilt_images,
            build_only_enabled=True,
            **more,
        )
        launcher = FakeLauncher()
        app = create_app(
            settings,
            launcher,
            images=images if images is not None else FakeLocalStore(),
            prebuilt=PrebuiltImages(fake_docker),
        )
        client = TestClient(app)
        client.__enter__()
        client.launcher = launcher  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


class FakeLocalStore(LocalImageStore):
    """This machine's dockerd as the image store (nothing to push or pull), without one."""

    def exists(self, name: str) -> bool:
        return True

    def reference(self, name: str) -> str:
        return name

    def push(self, name: str) -> None:
        raise AssertionError("nothing is pushed to this machine's own store")

    def pull(self, name: str) -> None:
        pass


def stream(client: TestClient, path: str) -> list[dict]:
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as response:
        return [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]


def failure(client: TestClient, path: str) -> str:
    events = stream(client, path)
    assert [e["phase"] for e in events][-1] == "failed", events
    message = events[-1]["message"]
    assert "\n" not in message and message.endswith("."), message
    return message


def test_an_allowed_image_is_pulled_checked_and_launched(app_with, fake_docker):
    client = app_with()
    events = stream(client, "/build/image/quay.io/jupyter/base-notebook")
    assert [e["phase"] for e in events] == [
        "fetching",
        "fetching",
        "built",
        "launching",
        "ready",
    ], events
    assert events[0]["message"] == "Pulling quay.io/jupyter/base-notebook:latest"
    assert "has a Jupyter server" in events[1]["message"]
    ready = events[-1]
    assert ready["image"].startswith("binderbox-image-quay-io-jupyter-base-notebook-latest-")
    assert ready["image"].endswith(":" + "11" * 32)
    assert ready["repo_url"] == "quay.io/jupyter/base-notebook:latest"
    assert ready["binder_ref_url"] == f"quay.io/jupyter/base-notebook@{DIGEST}"
    assert ready["binder_request"] == "v2/image/quay.io/jupyter/base-notebook:latest"
    assert ready["binder_persistent_request"] == f"v2/image/quay.io/jupyter/base-notebook@{DIGEST}"
    (launched,) = client.launcher.launched
    assert launched[0] == ready["image"]
    assert launched[1]["repo_url"] == "quay.io/jupyter/base-notebook:latest"
    assert fake_docker.tags == [(JUPYTER_ID, ready["image"])]

    # The status page names the launch and the session by the image.
    page = client.get("/status").text
    assert "image/quay.io/jupyter/base-notebook:latest" in page

    # Again, written another way: the same image, the probe's answer is reused, and the
    # tag was pulled a moment ago (ref_cache_seconds).
    again = stream(client, "/build/image/quay.io%2Fjupyter%2Fbase-notebook%3Alatest")
    assert [e["phase"] for e in again][-1] == "ready"
    assert not any("Jupyter server" in e["message"] for e in again)
    assert fake_docker.probes == [JUPYTER_ID]
    assert fake_docker.pulls == ["quay.io/jupyter/base-notebook:latest"]
    assert again[-1]["image"] == ready["image"]


def test_an_image_of_another_user_still_runs_as_uid_1000_and_says_so(app_with, fake_docker):
    fake_docker.publish("quay.io/jupyter/as-root:1", "sha256:" + "44" * 32, jupyter=True, user="")
    events = stream(app_with(), "/build/image/quay.io/jupyter/as-root:1")
    assert events[-1]["phase"] == "ready"
    assert (
        "The image runs as root by default; sessions here always run as uid 1000, so files "
        "only root may change stay read-only in the session."
    ) in [e["message"] for e in events if e["phase"] == "fetching"]


def test_a_moving_tag_is_asked_for_again_after_ref_cache_seconds(app_with, fake_docker):
    client = app_with(ref_cache_seconds=0)
    for _ in range(2):
        assert stream(client, "/build/image/quay.io/jupyter/base-notebook")[-1]["phase"] == "ready"
    assert len(fake_docker.pulls) == 2
    assert fake_docker.probes == [JUPYTER_ID]  # the content did not change: no new probe


def test_a_digest_is_pulled_once(app_with, fake_docker):
    pinned = f"quay.io/jupyter/base-notebook@{DIGEST}"
    fake_docker.publish(pinned, JUPYTER_ID, jupyter=True)
    client = app_with(ref_cache_seconds=0)
    for _ in range(2):
        assert stream(client, f"/build/image/{pinned}")[-1]["phase"] == "ready"
    assert fake_docker.pulls == [pinned]


def test_off_by_default_in_one_sentence(app_with, fake_docker):
    client = app_with(prebuilt_images="")
    assert failure(client, "/build/image/quay.io/jupyter/base-notebook") == OFF
    assert failure(client, "/build/image/--help") == OFF
    assert fake_docker.pulls == []


def test_refusals_are_one_sentence_and_pull_nothing(app_with, fake_docker):
    client = app_with()
    said = failure(client, "/build/image/quay.io/other/image:1")
    assert said == (
        "The image quay.io/other/image:1 is not one this binderbox launches "
        "(it launches quay.io/jupyter/*)."
    )
    assert "not one this binderbox launches" in failure(client, "/build/image/python")
    for hostile in ("--help", "a%20b", "..%2Fx", "x" * 500, "http:%2F%2Fx%2Fy", "a@b", "%00"):
        assert "image" in failure(client, f"/build/image/{hostile}").lower()
    assert failure(client, "/build/image/").startswith("Name an image after /image/")
    assert fake_docker.pulls == [] and fake_docker.probes == []


def test_an_image_without_a_jupyter_server_is_refused_and_remembered(app_with, fake_docker):
    client = app_with()
    for _ in range(2):
        said = failure(client, "/build/image/quay.io/jupyter/bare:1")
        assert said == (
            "The image quay.io/jupyter/bare:1 has no jupyter server; install jupyter_server "
            "in it (pip install jupyterlab brings it), on the PATH of uid 1000."
        )
    assert fake_docker.probes == [BARE_ID]
    assert fake_docker.tags == [] and client.launcher.launched == []


def test_a_failed_pull_ends_the_launch_in_one_sentence(app_with, fake_docker):
    client = app_with(prebuilt_images="quay.io/jupyter/*, 127.0.0.9:1/*")
    assert failure(client, "/build/image/quay.io/jupyter/missing:1") == (
        "The image quay.io/jupyter/missing:1 was not found in the registry quay.io."
    )
    said = failure(client, "/build/image/127.0.0.9:1/x:1")
    assert said.startswith("The registry 127.0.0.9:1 cannot be reached (")


def test_quotas_count_sessions_per_image(app_with, fake_docker):
    client = app_with(per_repo_quota=1, prebuilt_images="quay.io/jupyter/*, python")
    assert stream(client, "/build/image/quay.io/jupyter/base-notebook")[-1]["phase"] == "ready"
    assert "Too many users running quay.io/jupyter/base-notebook:latest" in failure(
        client, "/build/image/quay.io/jupyter/base-notebook:latest"
    )
    # Another image is another count.
    assert stream(client, "/build/image/python:3.12")[-1]["phase"] == "ready"


def test_with_a_registry_the_checked_image_is_pushed_once(app_with, fake_docker):
    registry = FakeRegistry()
    client = app_with(images=registry)
    first = stream(client, "/build/image/quay.io/jupyter/base-notebook")
    assert "Pushing quay.io/jupyter/base-notebook:latest to the image registry." in [
        e["message"] for e in first
    ]
    stream(client, "/build/image/quay.io/jupyter/base-notebook")
    image = first[-1]["image"]
    assert registry.pushed == [image]
    # Sessions run on this machine here: each launch brings binderbox's copy back.
    assert registry.pulled == [image, image]


def test_build_only_and_banned_specs_apply(app_with, fake_docker):
    client = app_with(banned_specs="^image/quay.io/jupyter/base-notebook:latest$")
    assert "temporarily disabled" in failure(client, "/build/image/quay.io/jupyter/base-notebook")
    events = stream(client, "/build/image/quay.io/jupyter/base-notebook:2?build_only=true")
    assert events[-1]["phase"] == "failed"  # not published: not found
    fake_docker.publish("quay.io/jupyter/base-notebook:2", JUPYTER_ID, jupyter=True)
    events = stream(client, "/build/image/quay.io/jupyter/base-notebook:2?build_only=true")
    assert events[-1]["phase"] == "ready" and client.launcher.launched == []


def test_the_form_offers_docker_images_only_when_enabled(app_with):
    off, on = app_with(prebuilt_images=""), app_with()
    assert "Docker image" not in off.get("/").text
    assert "image" not in [p["provider"] for p in off.get("/api/repoproviders").json()]
    assert '<option value="image">Docker image</option>' in on.get("/").text
    assert "image" in [p["provider"] for p in on.get("/api/repoproviders").json()]
