"""The disk budget: the image cleaner against real images on this dockerd, the build-cache
prune against a dockerd of our own (Docker-in-Docker: a prune beside a build crashed this
machine's dockerd 20.10, and other tests build here), the prune held off while builds
run, and the numbers on /status and /metrics through the real app."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from starlette.testclient import TestClient
from tests.conftest import binderbox

from binderbox.builder.pipeline import BuildResult
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.service.app import create_app
from binderbox.service.buildqueue import BuildQueue
from binderbox.service.cleaner import (
    Cleaner,
    DockerBuildCache,
    HeldImage,
    LocalImageHoldings,
    choose_removals,
)
from binderbox.store import BuildStore

DOCKER_CLI = "/usr/bin/docker"


def _after(moment: float) -> None:
    """Return once the clock is past ``moment``."""
    deadline = time.monotonic() + 5
    while time.time() <= moment:
        assert time.monotonic() < deadline


def _wait(check: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


async def _until(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.01)


def _exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


# --- the choice, with made-up images ---------------------------------------------------


def _image(name: str, size: int, created: float) -> HeldImage:
    return HeldImage((name,), "sha256:" + name, size, created)


def test_the_choice_takes_least_recently_used_first_until_under_budget():
    images = [_image(n, 10, created=t) for n, t in (("a", 100), ("b", 200), ("c", 300))]
    # a was launched last, b never: b (built 200) goes first, then c (built 300).
    launched = {"a": 5000.0}
    chosen = choose_removals(images, launched, set(), budget=15, now=10_000, min_age=0)
    assert [i.names for i in chosen] == [("b",), ("c",)]
    assert choose_removals(images, launched, set(), budget=30, now=10_000) == []
    assert choose_removals(images, launched, set(), budget=0, now=10_000) == []  # no budget


def test_the_choice_never_takes_a_protected_or_recent_image():
    images = [_image(n, 10, created=100) for n in "abc"]
    chosen = choose_removals(images, {}, {"a", "sha256:b"}, budget=1, now=10_000, min_age=0)
    assert [i.names for i in chosen] == [("c",)]  # still over budget: the rest may not go
    launched = {"c": 9_900.0}  # launched 100 s ago
    chosen = choose_removals(images, launched, {"a"}, budget=1, now=10_000, min_age=600)
    assert [i.names for i in chosen] == [("b",)]


# --- real images on this dockerd --------------------------------------------------------


@pytest.fixture
def prefix(docker_client: docker.DockerClient) -> Iterator[str]:
    """An image prefix no one else uses; every image under it is removed afterwards."""
    name = f"bbclean-{uuid.uuid4().hex[:8]}-"
    yield name
    for image in docker_client.images.list():
        for tag in image.tags:
            if tag.startswith(name):
                try:
                    docker_client.images.remove(tag, force=True)
                except docker.errors.APIError:
                    pass


@pytest.fixture
def build_under(base_image: str, make_repo) -> Callable[[str, str], str]:
    """Build a tiny repository (a README and ``kb`` kilobytes of data) under a prefix."""

    def build(prefix: str, name: str, kb: int = 300) -> str:
        repo = make_repo({"README.md": f"# {name}\n", "data.bin": os.urandom(kb * 512).hex()})
        result = binderbox(
            "build", "--json-logs", str(repo), env={"BINDERBOX_IMAGE_PREFIX": prefix}
        )
        assert result.code == 0, result.stderr[-2000:]
        assert result.image.startswith(prefix)
        return result.image

    return build


@pytest.mark.docker
def test_least_recently_launched_images_go_and_the_one_in_use_and_the_base_stay(
    docker_client: docker.DockerClient, prefix: str, build_under, base_image: str, tmp_path: Path
):
    never, a, b, c, used = (build_under(prefix, n) for n in ("never", "a", "b", "c", "used"))
    # Not binderbox's although named under the prefix: the base tagged by hand.
    impostor = f"{prefix}impostor:1"
    docker_client.images.get(base_image).tag(impostor)
    store = BuildStore(tmp_path / "state.sqlite")
    # Launch order, oldest first: the in-use image, then a, b, c ("never" never launched:
    # it counts from its build, before every launch).
    for image in (used, a, b, c):
        store.record_launch("git", image, "c", "success", 1.0, image=image)
        _after(time.time())
    container = docker_client.containers.run(
        used, ["600"], entrypoint=["sleep"], detach=True, name=f"{prefix}session"
    )
    try:
        holdings = LocalImageHoldings(prefix)
        held = {name: image for image in holdings.held() for name in image.names}
        assert set(held) == {never, a, b, c, used}  # neither the impostor nor the base
        assert all(150_000 < image.bytes < 5_000_000 for image in held.values())  # beyond base
        total = sum(image.bytes for image in held.values())
        # Room for all but the three least recently launched, the in-use one aside.
        budget = total - held[never].bytes - held[a].bytes - held[b].bytes
        settings = Settings(
            image_prefix=prefix,
            image_cache_max_bytes=budget,
            build_cache_max_bytes=0,
            log_retention_days=0,
        )
        cleaner = Cleaner(settings, store, holdings=holdings, min_age=0)
        report = asyncio.run(cleaner.run_once())
        assert report.errors == []
        assert report.images_removed == [never, a, b]
        assert report.images_bytes == budget and report.images_count == 2
        for name in (never, a, b):
            assert not _exists(docker_client, name)
        for name in (c, used, impostor, base_image):
            assert _exists(docker_client, name)
        assert asyncio.run(cleaner.run_once()).images_removed == []  # under budget now

        # Over any budget: c goes, the image a container uses never does.
        cleaner.settings = settings.with_overrides(image_cache_max_bytes=1)
        report = asyncio.run(cleaner.run_once())
        assert report.images_removed == [c]
        assert _exists(docker_client, used) and report.images_bytes == held[used].bytes
        # A launch under way protects its image too, once the container is gone.
        container.remove(force=True)
        cleaner.launching = lambda: {used}
        assert asyncio.run(cleaner.run_once()).images_removed == []
        cleaner.launching = frozenset
        assert asyncio.run(cleaner.run_once()).images_removed == [used]
    finally:
        if _container_exists(docker_client, container.id):
            container.remove(force=True)
        docker_client.images.remove(impostor)
        store.close()
    assert _exists(docker_client, base_image)


def _container_exists(client: docker.DockerClient, ident: str) -> bool:
    try:
        client.containers.get(ident)
    except docker.errors.NotFound:
        return False
    return True


# --- the build cache: a dockerd of our own ----------------------------------------------


@pytest.fixture
def own_dockerd(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[str]:
    """A Docker-in-Docker dockerd (no network) answering on a socket in tmp_path."""
    from tests.cluster import node_image

    sockets = tmp_path / "dind"
    sockets.mkdir()
    container = docker_client.containers.run(
        node_image(),
        [
            "sh",
            "-c",
            "exec dockerd -H unix:///run/dind/docker.sock --iptables=false --bridge=none"
            " >/var/log/dockerd.log 2>&1",
        ],
        detach=True,
        name=f"bbclean-dind-{uuid.uuid4().hex[:8]}",
        network_mode="none",
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        volumes={
            "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
            str(sockets): {"bind": "/run/dind", "mode": "rw"},
        },
        tmpfs={"/var/lib/docker": "exec"},
    )
    url = f"unix://{sockets}/docker.sock"
    try:

        def answers() -> bool:
            try:
                return docker.DockerClient(base_url=url).ping()
            except docker.errors.DockerException:
                return False

        _wait(answers, "the Docker-in-Docker dockerd answering")
        yield url
    finally:
        container.remove(force=True)


def _fill_cache(url: str, tmp_path: Path, count: int, mb: int) -> None:
    """``count`` BuildKit builds copying ``mb`` MB each, their images removed (so the
    cache records are no image's)."""
    for n in range(count):
        context = tmp_path / f"context{n}"
        context.mkdir()
        (context / "data").write_bytes(os.urandom(mb * 1_000_000))
        (context / "Dockerfile").write_text("FROM scratch\nCOPY data /data\n")
        env = {**os.environ, "DOCKER_HOST": url, "DOCKER_BUILDKIT": "1"}
        for command in (["build", "-q", "-t", f"fill:{n}", str(context)], ["rmi", f"fill:{n}"]):
            subprocess.run([DOCKER_CLI, *command], env=env, check=True, capture_output=True)


@pytest.mark.docker
def test_the_build_cache_is_pruned_to_its_budget(own_dockerd: str, tmp_path: Path):
    _fill_cache(own_dockerd, tmp_path, count=4, mb=5)
    cache = DockerBuildCache(docker.DockerClient(base_url=own_dockerd))
    before = cache.size()
    assert before >= 30_000_000  # 4 x 5 MB copied, and 4 x 5 MB of context
    assert not cache.busy()
    budget = 12_000_000
    settings = Settings(build_cache_max_bytes=budget, image_cache_max_bytes=0, log_retention_days=0)

    async def scenario():
        queue = BuildQueue(limit=1)
        return await Cleaner(settings, _NoStore(), cache=cache, queue=queue).run_once()

    report = asyncio.run(scenario())
    assert report.errors == [] and report.build_cache_note == ""
    assert report.build_cache_bytes == cache.size() <= budget
    assert report.build_cache_freed >= before - budget
    assert cache.size() > 0  # pruned to the budget, not emptied


class _NoStore:
    """A state store with nothing in it (retention is off in these runs)."""

    def last_launched(self) -> dict[str, float]:
        return {}


class FakeCache:
    """A build cache over budget that records when it is pruned and can hold a prune."""

    def __init__(self, queue: BuildQueue, log: list[str]) -> None:
        self.queue, self.log = queue, log
        self.release = threading.Event()
        self.running_at_prune: int | None = None
        self.sized = 0

    def size(self) -> int:
        self.sized += 1
        return 100 if self.running_at_prune is None else 10

    def busy(self) -> bool:
        return False

    def prune(self, keep_bytes: int) -> int:
        self.running_at_prune = self.queue.running
        self.log.append("prune started")
        assert self.release.wait(10)
        self.log.append("prune ended")
        return 90


def _blocking_build(log: list[str], name: str, release: threading.Event):
    def build(emit) -> BuildResult:
        log.append(f"{name} started")
        assert release.wait(10)
        log.append(f"{name} ended")
        return BuildResult(image=name, commit="c", reused=False, plan=None, seconds=0.0)

    return build


def test_the_prune_waits_for_running_builds_and_holds_new_ones():
    settings = Settings(build_cache_max_bytes=50, image_cache_max_bytes=0, log_retention_days=0)
    log: list[str] = []

    async def scenario() -> None:
        queue = BuildQueue(limit=2)
        cache = FakeCache(queue, log)
        cleaner = Cleaner(settings, _NoStore(), cache=cache, queue=queue, prune_wait=30)
        first_done = threading.Event()
        queue.submit("first", _blocking_build(log, "first", first_done))
        await _until(lambda: queue.running == 1, "the first build starting")
        run = asyncio.create_task(cleaner.run_once())
        await _until(lambda: cache.sized, "the cleaner measuring the cache")
        for _ in range(100):  # the cleaner has its turns; it must not prune meanwhile
            await asyncio.sleep(0)
        assert "prune started" not in log and not run.done()
        first_done.set()
        await _until(lambda: "prune started" in log, "the prune starting")
        assert cache.running_at_prune == 0
        second, _ = queue.submit("second", _blocking_build(log, "second", threading.Event()))
        message = "Waiting while binderbox cleans its build cache."
        await _until(
            lambda: any(e.message == message for e in second.waiting_events),
            "the second build being held",
        )
        assert "second started" not in log
        cache.release.set()
        report = await run
        assert report.build_cache_freed == 90 and report.build_cache_bytes == 10
        await _until(lambda: "second started" in log, "the second build starting")
        queue.close()

    asyncio.run(scenario())
    assert log[:4] == ["first started", "first ended", "prune started", "prune ended"]
    assert log[4] == "second started"


def test_a_prune_that_never_finds_a_quiet_moment_waits_for_a_later_run():
    settings = Settings(build_cache_max_bytes=50, image_cache_max_bytes=0, log_retention_days=0)
    log: list[str] = []

    async def scenario():
        queue = BuildQueue(limit=1)
        cache = FakeCache(queue, log)
        cleaner = Cleaner(settings, _NoStore(), cache=cache, queue=queue, prune_wait=0.2)
        release = threading.Event()
        queue.submit("long", _blocking_build(log, "long", release))
        await _until(lambda: queue.running == 1, "the build starting")
        report = await cleaner.run_once()
        release.set()
        # The queue was never held: a build submitted now starts at once.
        await _until(lambda: queue.running == 0, "the build ending")
        queue.submit("next", _blocking_build(log, "next", release))
        await _until(lambda: "next ended" in log, "the next build")
        queue.close()
        return report

    report = asyncio.run(scenario())
    assert "prune started" not in log
    assert report.build_cache_note == (
        "Builds ran the whole time; the build cache is pruned on a later run."
    )
    assert report.build_cache_bytes == 100 and report.errors == []


# --- through the real app ---------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found[1])


@pytest.mark.docker
def test_status_and_metrics_show_the_budget_and_the_last_run(
    docker_client: docker.DockerClient, prefix: str, build_under, tmp_path: Path
):
    old, new = build_under(prefix, "old"), build_under(prefix, "new")
    store = BuildStore(tmp_path / "state" / "binderbox.sqlite")
    store.record_launch("git", "new", "c", "success", 1.0, image=new)
    held = {n: i.bytes for i in LocalImageHoldings(prefix).held() for n in i.names}
    budget = held[new] + 1000  # room for one
    settings = Settings(
        state_dir=str(tmp_path / "state"),
        image_prefix=prefix,
        image_cache_max_bytes=budget,
        # Measured on this dockerd, never pruned here (see the module's docstring).
        build_cache_max_bytes=10**15,
        log_retention_days=30,
    )
    app = create_app(settings, None, store=store, clean=True)
    app.state.cleaner.min_age = 0  # the images were built a moment ago
    with TestClient(app) as client:
        _wait(
            lambda: (
                "binderbox_cleaner_last_run_timestamp_seconds 0.0"
                not in client.get("/metrics").text
            ),
            "the first cleaner run",
        )
        metrics = client.get("/metrics").text
        assert _metric(metrics, "binderbox_image_cache_bytes") == held[new]
        assert _metric(metrics, "binderbox_image_cache_budget_bytes") == budget
        assert _metric(metrics, "binderbox_image_cache_images") == 1
        assert _metric(metrics, "binderbox_build_cache_budget_bytes") == 10**15
        assert _metric(metrics, "binderbox_build_cache_bytes") >= 0
        assert _metric(metrics, "binderbox_cleaner_removed_images_total") == 1
        assert (
            _metric(metrics, 'binderbox_cleaner_freed_bytes_total{store="images"}') == (held[old])
        )
        assert _metric(metrics, 'binderbox_cleaner_runs_total{status="ok"}') == 1
        assert _metric(metrics, "binderbox_cleaner_last_run_timestamp_seconds") > 0
        page = client.get("/status").text
        assert re.search(r'id="disk-images">[\d.]+ [kM]B of [\d.]+ [kM]B</strong>', page)
        assert 'id="disk-build-cache">' in page and "of 1000.0 TB" in page
        assert "removed 1 image" in page and f"Removed: {old}" in page
    assert not _exists(docker_client, old) and _exists(docker_client, new)
    store.close()


def test_a_failing_cleaner_run_is_one_sentence_and_the_service_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    class DockerGone:
        def held(self):
            raise docker.errors.DockerException("connection refused")

    class StoreGone(BuildStore):
        def forget_older_than(self, cutoff, keep_images=frozenset()):
            raise BinderboxError("The state database at sqlite cannot be reached.")

    store = StoreGone(tmp_path / "state.sqlite")
    settings = Settings(
        state_dir=str(tmp_path), image_prefix="bbclean-gone-", build_cache_max_bytes=0
    )
    app = create_app(
        settings, None, store=store, clean=True, image_holdings=DockerGone(), build_cache=None
    )
    app.state.cleaner.cache = None  # nothing is pruned on this machine's dockerd
    with caplog.at_level("WARNING"), TestClient(app) as client:
        _wait(
            lambda: (
                'binderbox_cleaner_runs_total{status="failed"} 1.0' in client.get("/metrics").text
            ),
            "a failed cleaner run",
        )
        page = client.get("/status")
        assert page.status_code in (200, 503)  # the page answers, whatever the health
        docker_sentence = (
            "Cleaning the images failed: Docker did not answer (DockerException); "
            "is dockerd running?"
        )
        store_sentence = (
            "Deleting old build logs and launches failed: The state database at sqlite "
            "cannot be reached."
        )
        assert docker_sentence in page.text and store_sentence in page.text
        assert client.get("/versions").status_code == 200
    warnings = [r for r in caplog.records if r.name == "binderbox.service.cleaner"]
    assert [r.getMessage() for r in warnings] == [docker_sentence, store_sentence]
    assert all(r.exc_info is None for r in warnings)
    store.close()
