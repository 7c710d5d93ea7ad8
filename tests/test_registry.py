"""Images through a real OCI registry (Debian's docker-registry on 127.0.0.1): push,
the manifest HEAD as "the image exists", pull back and run, failures in one sentence,
and the service finding a build in the registry instead of building again."""

from __future__ import annotations

import http.server
import subprocess
import threading
import uuid
from collections.abc import Iterator

import docker
import httpx
import pytest
from tests.conftest import free_port
from tests.registry import Registry, registry_fixture  # noqa: F401 (the `registry` fixture)

from binderbox.config import load_settings
from binderbox.errors import UsageError
from binderbox.registry import RegistryError, RegistryImageStore, repository_and_tag

pytestmark = pytest.mark.docker

FILE_TEXT = "pushed through the registry\n"
LONG_TAG = "f" * 40 + "-o1a2b3c4d"  # a commit and an options digest


def settings_for(registry_url: str, **overrides):
    return load_settings(environ={}).with_overrides(registry_url=registry_url, **overrides)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert "Traceback" not in message
    assert message.endswith("."), message
    assert len(message) < 600, message


@pytest.fixture(scope="module")
def store(registry: Registry) -> RegistryImageStore:
    return RegistryImageStore(settings_for(registry.url))


@pytest.fixture(scope="module")
def pushed(store, base_image, tmp_path_factory) -> Iterator[str]:
    """A small image FROM the base with one file added, named as binderbox names
    images, built locally and pushed."""
    name = f"binderbox-reg-{uuid.uuid4().hex[:6]}-git-127-0-0-1-tiny-1a2b3c:{'c0ffee' * 6}"
    context = tmp_path_factory.mktemp("tiny-image")
    (context / "hello.txt").write_text(FILE_TEXT)
    (context / "Dockerfile").write_text(f"FROM {base_image}\nCOPY hello.txt /hello.txt\n")
    subprocess.run(
        ["/usr/bin/docker", "build", "-q", "-t", name, str(context)],
        check=True,
        capture_output=True,
        env={"DOCKER_BUILDKIT": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    try:
        store.push(name)
        yield name
    finally:
        client = docker.from_env()
        for reference in (name, store.reference(name)):
            try:
                client.images.remove(reference)
            except docker.errors.ImageNotFound:
                pass


def local_tags(name: str) -> list[str]:
    try:
        return docker.from_env().images.get(name).tags
    except docker.errors.ImageNotFound:
        return []


# -- names and settings (no registry needed) ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("binderbox-git-127-0-0-1-r-1a2b3c:abc123", ("binderbox-git-127-0-0-1-r-1a2b3c", "abc123")),
        ("binderbox-gh-org-repo:" + LONG_TAG, ("binderbox-gh-org-repo", LONG_TAG)),
        ("binder/org-repo:main", ("binder/org-repo", "main")),
        ("binder.example-org/repo_x", ("binder.example-org/repo_x", "latest")),
    ],
)  # fmt: skip
def test_a_name_splits_into_repository_and_tag(name, split):
    assert repository_and_tag(name) == split


@pytest.mark.parametrize("name", ["Binderbox-Upper:tag", "binderbox-x-:tag", "a//b:tag", "a:b c"])
def test_a_name_a_registry_cannot_hold_is_refused_in_one_sentence(name):
    with pytest.raises(RegistryError) as caught:
        repository_and_tag(name)
    assert_one_sentence(caught.value.message)


def test_sessions_pull_from_the_pull_address():
    name = "binderbox-gh-org-repo:abc"
    same = RegistryImageStore(settings_for("http://127.0.0.1:5000"))
    assert same.reference(name) == "127.0.0.1:5000/binderbox-gh-org-repo:abc"
    nodes = RegistryImageStore(
        settings_for("http://127.0.0.1:5000", registry_pull_url="172.18.0.1:5000")
    )
    assert nodes.reference(name) == "172.18.0.1:5000/binderbox-gh-org-repo:abc"
    assert nodes.address == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "values",
    [
        {"registry_url": "127.0.0.1:5000"},  # no scheme: http or https?
        {"registry_url": "ftp://127.0.0.1:5000"},
        {"registry_url": "http://user:secret@127.0.0.1:5000"},
        {"registry_url": "http://127.0.0.1:5000/v2/"},
        {"registry_pull_url": "172.18.0.1:5000"},  # without registry_url
        {"registry_url": "http://127.0.0.1:5000", "registry_pull_url": "172.18.0.1:5000/x"},
    ],
)
def test_registry_settings_are_checked(values):
    with pytest.raises(UsageError) as caught:
        load_settings(environ={}).with_overrides(**values)
    assert "registry" in caught.value.message
    assert_one_sentence(caught.value.message)


# -- against the real registry ------------------------------------------------------------


def test_a_pushed_image_is_in_the_registry(registry, store, pushed):
    assert store.exists(pushed)
    repository, tag = repository_and_tag(pushed)
    catalog = httpx.get(registry.url + "/v2/_catalog", trust_env=False).json()
    assert repository in catalog["repositories"]
    tags = httpx.get(f"{registry.url}/v2/{repository}/tags/list", trust_env=False).json()
    assert tags["tags"] == [tag]
    # The push left no second name for the image in the local store.
    assert local_tags(pushed) == [pushed]


def test_a_missing_name_is_false_without_error(store, pushed):
    repository, _ = repository_and_tag(pushed)
    assert store.exists(f"{repository}:another-commit") is False
    assert store.exists(f"binderbox-never-pushed-{uuid.uuid4().hex[:6]}:abc") is False


def test_a_removed_local_copy_is_pulled_back_and_runs(store, pushed):
    client = docker.from_env()
    client.images.remove(pushed)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(pushed)

    store.pull(pushed)
    assert sorted(local_tags(pushed)) == sorted([pushed, store.reference(pushed)])
    out = client.containers.run(pushed, ["cat", "/hello.txt"], remove=True, user="1000")
    assert out.decode() == FILE_TEXT


def test_pulling_a_name_the_registry_lacks_is_one_sentence(store):
    with pytest.raises(RegistryError) as caught:
        store.pull(f"binderbox-never-pushed-{uuid.uuid4().hex[:6]}:abc")
    assert caught.value.message.startswith("Pulling binderbox-never-pushed-")
    assert_one_sentence(caught.value.message)


def test_pushing_an_image_that_is_not_here_is_one_sentence(store):
    with pytest.raises(RegistryError) as caught:
        store.push("binderbox-not-built-here:abc")
    assert caught.value.message == "There is no local image binderbox-not-built-here:abc to push."


def test_a_registry_that_is_down_is_one_sentence(pushed):
    down = RegistryImageStore(settings_for(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(RegistryError) as looked:
        down.exists(pushed)
    assert "cannot be reached" in looked.value.message
    assert_one_sentence(looked.value.message)

    with pytest.raises(RegistryError) as pushing:
        down.push(pushed)
    assert pushing.value.message.startswith(f"Pushing {pushed} to the image registry at")
    assert_one_sentence(pushing.value.message)
    # Nothing half-done: no tag for the dead registry stays behind.
    assert pushed in local_tags(pushed)
    assert not [tag for tag in local_tags(pushed) if tag.startswith(down.address)]

    with pytest.raises(RegistryError) as pulling:
        down.pull(pushed)
    assert_one_sentence(pulling.value.message)


def test_a_registry_asking_for_credentials_is_named():
    """A registry answering 401 (htpasswd auth) is said to want credentials."""

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="registry"')
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RegistryError) as caught:
            RegistryImageStore(settings_for(url)).exists("binderbox-x:abc")
    finally:
        server.shutdown()
        server.server_close()
    assert "asks for credentials" in caught.value.message
    assert_one_sentence(caught.value.message)


# -- the service: a build pushes, the next launch of the commit finds it in the registry --


def test_the_service_pushes_a_build_and_the_next_launch_finds_it_in_the_registry(
    registry, store, base_image, built_images, git_server, tmp_path
):
    from tests.test_service_build import build_path, building_service, phases, served_repo

    url = served_repo(git_server, tmp_path, {"README.md": "registry\n"}, "reg1")
    with building_service(built_images, "reg", registry_url=registry.url) as svc:
        first, _ = svc.events(build_path(url, build_only="true"))
        assert first[-1]["phase"] == "ready", first[-1]
        assert "building" in phases(first)
        image = next(e["image"] for e in first if e["phase"] == "built")
        assert store.exists(image)

        # Gone from this machine's Docker: only the registry still has it.
        docker.from_env().images.remove(image)
        again, _ = svc.events(build_path(url, build_only="true"))
        assert phases(again) == ["fetching", "built", "ready"], again
        assert again[-2]["message"] == "Found a built image for this commit, launching."
        assert not local_tags(image)


def test_the_service_says_so_when_the_registry_is_down(
    base_image, built_images, git_server, tmp_path
):
    from tests.test_service_build import build_path, building_service, served_repo

    url = served_repo(git_server, tmp_path, {"README.md": "down\n"}, "reg2")
    dead = f"http://127.0.0.1:{free_port()}"
    with building_service(built_images, "regdown", registry_url=dead) as svc:
        events, _ = svc.events(build_path(url, build_only="true"))
    failed = events[-1]
    assert failed["phase"] == "failed"
    assert "cannot be reached" in failed["message"]
    assert_one_sentence(failed["message"])
