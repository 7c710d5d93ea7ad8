"""Prebuilt images through the real `binderbox serve`: images this test makes are pushed to
a registry it starts (Docker Hub is out of reach here), then launched by name with
/build/image/<name>, pulled by dockerd, checked for a Jupyter server and run as a session
with the same lock-down as a built image."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
import requests
from tests.conftest import free_port
from tests.registry import Registry, running_registry
from tests.test_serve import Served, run_code, serving

from binderbox.providers.image import OFF

pytestmark = pytest.mark.docker


@dataclass(frozen=True)
class Images:
    registry: Registry
    jupyter: str  # in the registry: a Jupyter server on the PATH, user jovyan (1000)
    bare: str  # in the registry: no Jupyter server at all
    bare_id: str
    closed: str  # a registry address where nothing listens


def _tiny_rootfs() -> bytes:
    """A root file system with an /etc/passwd and nothing to run."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for folder in ("etc", "tmp"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        passwd = b"root:x:0:0::/root:/bin/sh\njovyan:x:1000:1000::/tmp:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return data.getvalue()


def _push(client: docker.DockerClient, reference: str) -> None:
    repository, tag = reference.rsplit(":", 1)
    for line in client.api.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in line, line


@pytest.fixture(scope="module")
def images(base_image: str) -> Iterator[Images]:
    client = docker.from_env()
    run = uuid.uuid4().hex[:6]
    with running_registry() as registry:
        jupyter = f"{registry.address}/test/prebuilt-{run}:1"
        bare = f"{registry.address}/test/bare-{run}:1"
        # The base image holds the server stack in /srv/venv; a session image has it on
        # the PATH and jovyan as its user. A commit of a created container (nothing runs).
        container = client.containers.create(base_image, command=["true"])
        try:
            container.commit(
                jupyter.rsplit(":", 1)[0],
                "1",
                changes=[
                    "ENV PATH=/srv/venv/bin:/usr/local/bin:/usr/bin:/bin",
                    "USER jovyan",
                    "WORKDIR /home/jovyan",
                ],
            )
        finally:
            container.remove(force=True)
        client.api.import_image_from_data(
            _tiny_rootfs(), repository=bare.rsplit(":", 1)[0], tag="1", changes=['CMD ["/x"]']
        )
        bare_id = client.images.get(bare).id
        try:
            for name in (jupyter, bare):
                _push(client, name)
                # Gone from this machine: serve must pull it from the registry.
                client.images.remove(name, noprune=False)
            yield Images(registry, jupyter, bare, bare_id, f"127.0.0.1:{free_port()}")
        finally:
            for name in (jupyter, bare):
                try:
                    client.images.remove(name, force=True)
                except docker.errors.ImageNotFound:
                    pass
            try:
                client.images.remove(bare_id, force=True)
            except docker.errors.ImageNotFound:
                pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, images: Images) -> Iterator[Served]:
    allowed = f"{images.registry.address}/test/*, {images.closed}/*"
    with serving(
        tmp_path_factory,
        "prebuilt",
        BINDERBOX_PREBUILT_IMAGES=allowed,
        BINDERBOX_USAGE_MIN_LAUNCHES="1",
    ) as process:
        yield process


def refusal(served: Served, name: str) -> str:
    events = served.stream(f"/build/image/{name}")
    assert [e["phase"] for e in events][-1] == "failed", events
    message = events[-1]["message"]
    assert "\n" not in message and message.endswith("."), message
    return message


def test_an_allowed_image_is_pulled_checked_and_runs_code_locked_down(served, images):
    events = served.stream(f"/build/image/{images.jupyter}")
    assert events[-1]["phase"] == "ready", events
    messages = [e["message"] for e in events]
    assert messages[0] == f"Pulling {images.jupyter}"
    assert any("has a Jupyter server" in m for m in messages)
    ready = events[-1]
    assert ready["image"].startswith(served.prefix + "image-")
    assert ready["repo_url"] == images.jupyter
    pinned = ready["binder_persistent_request"].removeprefix("v2/image/")
    assert pinned.startswith(images.jupyter.rsplit(":", 1)[0] + "@sha256:")
    out = run_code(ready["url"], ready["token"], "import os; print(os.getuid(), os.getgid())")
    assert out.split() == ["1000", "1000"]

    # The session is locked down like a built image's.
    client = docker.from_env()
    (session,) = [
        c
        for c in client.containers.list(filters={"label": "binderbox.session"})
        if c.attrs["Config"]["Image"] == ready["image"]
    ]
    host = session.attrs["HostConfig"]
    assert session.attrs["Config"]["User"] == "1000:1000"
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] and host["Memory"] > 0

    # The status page and the usage numbers name it by the image.
    assert f"image/{images.jupyter}" in requests.get(served.url + "/status", timeout=30).text
    usage = requests.get(served.url + "/usage.json", timeout=30).json()
    assert f"image/{images.jupyter}" in [r["repository"] for r in usage["repositories"]]

    # The persistent link (by digest) launches the same content: no probe again.
    again = served.stream(f"/build/image/{pinned}")
    assert again[-1]["phase"] == "ready", again
    assert not any("has a Jupyter server" in e["message"] for e in again)
    assert again[-1]["image"].rsplit(":", 1)[1] == ready["image"].rsplit(":", 1)[1]


def test_an_image_without_a_jupyter_server_is_refused_and_leaves_nothing(served, images):
    said = refusal(served, images.bare)
    assert said == (
        f"The image {images.bare} has no jupyter server; install jupyter_server in it "
        "(pip install jupyterlab brings it), on the PATH of uid 1000."
    )
    client = docker.from_env()
    left = [
        c.name
        for c in client.containers.list(all=True, sparse=True)
        if c.attrs.get("ImageID") == images.bare_id or c.attrs.get("Image") == images.bare_id
    ]
    assert left == []
    assert not [t for t in client.images.get(images.bare_id).tags if t.startswith(served.prefix)]


def test_names_not_allowed_hostile_or_unpullable_are_refused_in_one_sentence(served, images):
    other = f"{images.registry.address}/other/image:1"
    assert refusal(served, other).startswith(f"The image {other} is not one this binderbox")
    assert "is not one this binderbox launches" in refusal(served, "python:3.12")
    for hostile in ("--help", "a%20b", "..%2Fx", "x" * 500, "http:%2F%2Fx%2Fy", "x:1@sha256:00"):
        said = refusal(served, hostile)
        assert "image" in said.lower() or "scheme" in said
    missing = f"{images.registry.address}/test/missing:1"
    assert refusal(served, missing) == (
        f"The image {missing} was not found in the registry {images.registry.address}."
    )
    unreachable = refusal(served, f"{images.closed}/x:1")
    assert unreachable.startswith(f"The registry {images.closed} cannot be reached (")


def test_the_form_offers_a_docker_image(served):
    page = requests.get(served.url + "/", timeout=30).text
    assert '<option value="image">Docker image</option>' in page


def test_prebuilt_images_are_off_by_default(tmp_path_factory, images):
    with serving(tmp_path_factory, "prebuilt-off") as off:
        assert refusal(off, images.jupyter) == OFF
        assert "Docker image" not in requests.get(off.url + "/", timeout=30).text


def test_with_a_registry_sessions_run_binderboxs_checked_copy(tmp_path_factory, images):
    """With registry_url, the checked image is pushed to binderbox's registry under its
    content name, and sessions get it from there (as session nodes of a Swarm would)."""
    registry = images.registry
    client = docker.from_env()
    with serving(
        tmp_path_factory,
        "prebuilt-registry",
        BINDERBOX_PREBUILT_IMAGES=f"{registry.address}/test/*",
        BINDERBOX_REGISTRY_URL=registry.url,
    ) as served:
        try:
            events = served.stream(f"/build/image/{images.jupyter}")
            assert events[-1]["phase"] == "ready", events
            assert f"Pushing {images.jupyter} to the image registry." in [
                e["message"] for e in events
            ]
            name = events[-1]["image"]
            repository, tag = name.rsplit(":", 1)
            manifest = requests.head(
                f"{registry.url}/v2/{repository}/manifests/{tag}",
                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
                timeout=30,
            )
            assert manifest.status_code == 200
            out = run_code(events[-1]["url"], events[-1]["token"], "print(6*7)")
            assert out.strip() == "42"
        finally:
            for image in client.images.list():
                for kept in image.tags:
                    if kept.startswith(f"{registry.address}/{served.prefix}"):
                        client.images.remove(kept, force=True)
