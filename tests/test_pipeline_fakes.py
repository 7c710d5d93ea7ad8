"""The launch pipeline through the real app (Starlette's TestClient), its seams filled with
simple fakes: a builder that says a few lines, an image store that is a set, a launcher
that hands out a URL. No Docker and no hub: what is tested is the pipeline's own logic.
The state store is the real SQLite one in a temp dir; refs resolve against a real
``git daemon`` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from binderbox.builder.pipeline import BuildRequest, BuildResult
from binderbox.config import Settings
from binderbox.errors import BinderboxError, BuildFailed
from binderbox.events import Emit, Event
from binderbox.service.app import create_app
from binderbox.state import state_owner
from binderbox.store import BuildStore
from conftest import commit_all


class FakeBuilder:
    """Says a few log lines, then "builds" the image into the fake store (or fails)."""

    def __init__(self, images: FakeImageStore, *, fail: str = "") -> None:
        self.images = images
        self.fail = fail
        self.calls: list[str] = []
        # Set by a test to hold the build half way (cleared: the build waits).
        self.go_on = threading.Event()
        self.go_on.set()

    def build(self, request: BuildRequest, settings: Settings, emit: Emit) -> BuildResult:
        commit = request.source.resolve()
        image = request.image_for(settings, commit)
        self.calls.append(image)
        emit(Event("building", "Step 1/2: installing the requirements", log=True))
        if not self.go_on.wait(timeout=30):
            raise BinderboxError("The fake build was never let go on.")
        emit(Event("building", "Step 2/2: copying the repository", log=True))
        if self.fail:
            raise BuildFailed(self.fail, log_tail="Step 2/2: copying the repository")
        self.images.local.add(image)
        return BuildResult(image=image, commit=commit, reused=False, plan=None, seconds=0.1)


class FakeImageStore:
    """Images kept in a "registry" (a set); pushes and pulls are recorded."""

    def __init__(self, kept: set[str] | None = None) -> None:
        self.kept = set(kept or ())
        self.local: set[str] = set()
        self.pushed: list[str] = []
        self.pulled: list[str] = []

    def exists(self, name: str) -> bool:
        return name in self.kept

    def reference(self, name: str) -> str:
        return f"registry.test/{name}"

    def push(self, name: str) -> None:
        assert name in self.local, "pushed before it was built"
        self.pushed.append(name)
        self.kept.add(name)

    def pull(self, name: str) -> None:
        assert name in self.kept, "pulled an image the store does not have"
        self.pulled.append(name)


class FakeLauncher:
    """A session is a URL and a token; ``fail`` makes every launch fail with that."""

    def __init__(self, *, fail: str = "") -> None:
        self.fail = fail
        self.launched: list[tuple[str, dict[str, str]]] = []

    async def launch(self, image: str, binder_env: dict[str, str]) -> AsyncIterator[Event]:
        yield Event("launching", f"Starting a session of {image}")
        if self.fail:
            raise BinderboxError(self.fail)
        self.launched.append((image, dict(binder_env)))
        user = f"u{len(self.launched)}"
        yield Event(
            "ready",
            "Server ready",
            {"url": f"http://127.0.0.1:1/user/{user}/", "token": "t0ken", "user": user},
        )

    async def healthy(self) -> bool:
        return True

    async def running_images(self) -> list[str]:
        return [image for image, _ in self.launched]

    async def running_sessions(self) -> list[tuple[str, str]]:
        return [(image, env.get("repo_url", "")) for image, env in self.launched]


@pytest.fixture
def repo(git_server, tmp_path: Path) -> str:
    """A repository served by git daemon; its build path at main."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "requirements.txt").write_text("six\n")
    commit_all(work)
    url = git_server.publish(work, f"fakes-{tmp_path.name}.git")
    return f"/build/git/{quote(url, safe='')}/main"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        state_dir=str(tmp_path / "state"),
        allowed_hosts="127.0.0.1",
        build_only_enabled=True,
        public_url="http://binder.test/",
    )


@pytest.fixture
def serve_fakes(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def start(launcher, builder, images, **kwargs) -> TestClient:
        app = create_app(settings, launcher, builder=builder, images=images, **kwargs)
        client = TestClient(app)
        client.__enter__()  # one event loop for every request, as under uvicorn
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def stream(client: TestClient, path: str, seen: list[dict] | None = None) -> list[dict]:
    """The events of one /build request (also appended to ``seen`` as they come)."""
    events = seen if seen is not None else []
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def phases(events: list[dict]) -> list[str]:
    return list(dict.fromkeys(e["phase"] for e in events))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_an_image_the_store_has_is_launched_without_a_build(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder, launcher = FakeBuilder(images), FakeLauncher()
    client = serve_fakes(launcher, builder, images)
    first = stream(client, repo + "?build_only=true")
    image = first[-1]["image"]
    assert builder.calls == [image] and images.kept == {image}

    events = stream(client, repo)
    assert phases(events) == ["fetching", "built", "launching", "ready"]
    assert events[1]["message"] == "Found a built image for this commit, launching."
    assert builder.calls == [image]  # no second build
    ready = events[-1]
    assert ready["image"] == image and ready["token"] == "t0ken"
    assert ready["binder_launch_host"] == "http://binder.test/"
    assert launcher.launched[0][0] == image
    assert launcher.launched[0][1]["binder_launch_host"] == "http://binder.test/"
    # Sessions run on this machine: the image came from the store first.
    assert images.pulled == [image]


def test_a_missing_image_is_built_pushed_then_launched(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder, launcher = FakeBuilder(images), FakeLauncher()
    client = serve_fakes(launcher, builder, images, pull_before_launch=False)
    events = stream(client, repo)
    assert phases(events) == ["fetching", "building", "built", "launching", "ready"]
    lines = [e["message"] for e in events if e["phase"] == "building"]
    assert lines[:2] == [
        "Step 1/2: installing the requirements",
        "Step 2/2: copying the repository",
    ]
    image = builder.calls[0]
    assert lines[-1] == f"Pushing {image} to the image registry."
    assert images.pushed == [image] and images.pulled == []  # nodes pull for themselves
    built = next(e for e in events if e["phase"] == "built")
    assert built["message"] == f"Built {image}."
    assert built["log_url"] == f"http://binder.test/logs/{built['build_id']}"
    log = client.get(f"/logs/{built['build_id']}")
    assert "status: success" in log.text and "Step 2/2: copying the repository" in log.text
    assert [i for i, _ in launcher.launched] == [image]


def test_a_failed_build_ends_in_one_failed_event_with_the_log_link(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder = FakeBuilder(images, fail="requirements.txt line 1: 'six' was not found.")
    launcher = FakeLauncher()
    client = serve_fakes(launcher, builder, images)
    events = stream(client, repo)
    failed = [e for e in events if e["phase"] == "failed"]
    assert len(failed) == 1 and events[-1] is failed[0]
    assert "built" not in phases(events) and launcher.launched == []
    assert failed[0]["log_url"].startswith("http://binder.test/logs/")
    assert failed[0]["message"].startswith(
        "requirements.txt line 1: 'six' was not found. The whole log: http://binder.test/logs/"
    )
    assert failed[0]["log_tail"] == "Step 2/2: copying the repository"
    assert images.pushed == []
    log = client.get("/logs/" + failed[0]["log_url"].rsplit("/", 1)[1])
    assert "status: failed (requirements.txt line 1" in log.text
    launches = BuildStore(Path(settings.state_dir) / "binderbox.sqlite").recent_launches()
    assert [x.status for x in launches] == ["failed"]


def test_a_failed_launch_says_why_once(serve_fakes, repo, settings):
    images = FakeImageStore()
    launcher = FakeLauncher(fail="The session stopped before Jupyter answered (exit code 1).")
    client = serve_fakes(launcher, FakeBuilder(images), images)
    events = stream(client, repo)
    assert phases(events) == ["fetching", "building", "built", "launching", "failed"]
    assert [e["message"] for e in events if e["phase"] == "failed"] == [
        "The session stopped before Jupyter answered (exit code 1)."
    ]
    launches = BuildStore(Path(settings.state_dir) / "binderbox.sqlite").recent_launches()
    assert [(x.status, x.message) for x in launches] == [
        ("failed", "The session stopped before Jupyter answered (exit code 1).")
    ]


def test_build_only_builds_and_launches_nothing(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder, launcher = FakeBuilder(images), FakeLauncher()
    client = serve_fakes(launcher, builder, images)
    events = stream(client, repo + "?build_only=true")
    assert phases(events) == ["fetching", "building", "built", "ready"]
    assert events[-1]["message"] == "The image is built; nothing was launched."
    assert launcher.launched == [] and images.pulled == []
    assert images.pushed == builder.calls


def test_two_launches_of_one_commit_share_one_build(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder, launcher = FakeBuilder(images), FakeLauncher()
    builder.go_on.clear()
    client = serve_fakes(launcher, builder, images)
    first: list[dict] = []
    second: list[dict] = []
    threads = [threading.Thread(target=stream, args=(client, repo, first))]
    threads[0].start()
    wait_for(lambda: builder.calls, "the first launch's build to start")
    threads.append(threading.Thread(target=stream, args=(client, repo, second)))
    threads[1].start()
    # The second follower has joined the running build once it replays its first line.
    wait_for(lambda: any(e["phase"] == "building" for e in second), "the second follower")
    builder.go_on.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(builder.calls) == 1
    for events in (first, second):
        assert events[-1]["phase"] == "ready", events[-1]
        assert [e["message"] for e in events if e["phase"] == "building"][:2] == [
            "Step 1/2: installing the requirements",
            "Step 2/2: copying the repository",
        ]
    built = [next(e for e in ev if e["phase"] == "built")["build_id"] for ev in (first, second)]
    assert built[0] == built[1]
    assert len(launcher.launched) == 2 and images.pushed == builder.calls


def test_a_start_marks_failed_only_its_own_unfinished_builds(serve_fakes, settings):
    path = Path(settings.state_dir) / "binderbox.sqlite"
    store = BuildStore(path)
    mine = store.start("binderbox-a:1", "git://example.org/a", "main", owner=state_owner(settings))
    theirs = store.start("binderbox-b:1", "git://example.org/b", "main", owner="another-hub")
    legacy = store.start("binderbox-c:1", "git://example.org/c", "main")  # before owners
    store.close()

    images = FakeImageStore()
    client = serve_fakes(FakeLauncher(), FakeBuilder(images), images)
    status = {
        build: client.get(f"/logs/{build}").text.splitlines()[3] for build in (mine, theirs, legacy)
    }
    assert status[mine].startswith("status: failed (binderbox was restarted")
    assert status[legacy].startswith("status: failed (binderbox was restarted")
    assert status[theirs] == "status: running"  # another service may still be running it

    store = BuildStore(path)
    ours = store.start("binderbox-d:1", "git://example.org/d", "main", owner="me")
    assert store.interrupted("someone-else") == 0
    assert store.interrupted("me") == 1 and store.get(ours).status == "failed"
    assert store.get(theirs).status == "running"
    store.close()


def test_the_builds_a_service_runs_are_recorded_as_its_own(serve_fakes, repo, settings):
    images = FakeImageStore()
    builder = FakeBuilder(images)
    builder.go_on.clear()
    client = serve_fakes(FakeLauncher(), builder, images, owner="hub-one")
    seen: list[dict] = []
    thread = threading.Thread(target=stream, args=(client, repo + "?build_only=true", seen))
    thread.start()
    try:
        wait_for(lambda: builder.calls, "the build to start")
        path = Path(settings.state_dir) / "binderbox.sqlite"
        store = BuildStore(path)
        # Another service's start leaves it alone; only hub-one's own next start would not.
        assert store.interrupted("hub-two") == 0
        store.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            owners = db.execute("SELECT owner, status FROM builds").fetchall()
        assert owners == [("hub-one", "running")]
    finally:
        builder.go_on.set()
        thread.join(timeout=30)
    assert seen[-1]["phase"] == "ready"


def test_health_and_status_describe_the_session_backend(serve_fakes, settings):
    images = FakeImageStore()
    backend = {
        "backend": "swarm",
        "nodes": [{"node": "w1", "sessions": 2}, {"node": "w2", "sessions": 0}],
    }
    client = serve_fakes(FakeLauncher(), FakeBuilder(images), images, describe=lambda: backend)
    health = client.get("/health").json()
    assert health["sessions"] == backend
    page = client.get("/status").text
    assert 'id="sessions-backend">backend: swarm<' in page
    assert '<table id="sessions-nodes">' in page and "<td>w2</td><td>0</td>" in page
