"""The service's /build event stream against a real uvicorn server, real builds and a
git daemon on 127.0.0.1 (build_only: launching sessions is tested with JupyterHub)."""

from __future__ import annotations

import contextlib
import http.client
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import docker
import pytest
import requests
import uvicorn
from tests.conftest import commit_all, free_port, wait_for_port

from binderbox.config import load_settings
from binderbox.service.app import create_app
from binderbox.store import BuildStore

pytestmark = pytest.mark.docker


class Service:
    def __init__(self, **overrides):
        overrides.setdefault("state_dir", tempfile.mkdtemp(prefix="binderbox-svc-state-"))
        self.state_dir = overrides["state_dir"]
        self.port = free_port()
        # Links are built from the configured address (never from the request's Host).
        overrides.setdefault("service_port", self.port)
        settings = load_settings(environ={}).with_overrides(**overrides)
        config = uvicorn.Config(
            create_app(settings, keepalive=1.0),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def events(self, path: str, timeout: float = 600) -> tuple[list[dict], list[str]]:
        """All events of one /build stream, and the comment lines seen."""
        response = requests.get(
            self.url + path, headers={"Accept": "text/event-stream"}, stream=True, timeout=timeout
        )
        events, comments = [], []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["phase"] in {"ready", "failed"}:
                    break
            elif line.startswith(":"):
                comments.append(line)
        response.close()
        return events, comments


@contextlib.contextmanager
def building_service(built_images: set[str], name: str, **overrides) -> Iterator[Service]:
    """A service that builds for repositories on 127.0.0.1 and allows build_only; the
    images it built are removed at the end of the run."""
    prefix = f"binderbox-{name}-{uuid.uuid4().hex[:6]}-"
    svc = Service(
        image_prefix=prefix, allowed_hosts="127.0.0.1", build_only_enabled=True, **overrides
    )
    try:
        yield svc
    finally:
        svc.stop()
        for image in docker.from_env().images.list():
            for tag in image.tags:
                if tag.startswith(prefix):
                    built_images.add(tag)


@pytest.fixture
def service(base_image, built_images, tmp_path):
    events = str(tmp_path / "events.jsonl")
    with building_service(built_images, "svc", launch_events_file=events) as svc:
        yield svc


def served_repo(git_server, tmp_path, files: dict[str, str], name: str) -> str:
    work = tmp_path / name
    work.mkdir()
    for rel, text in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    commit_all(work)
    return git_server.publish(work, f"{name}.git")


def build_path(url: str, ref: str = "main", **query: str) -> str:
    path = f"/build/git/{quote(url, safe='')}/{ref}"
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return path


def phases(events: list[dict]) -> list[str]:
    """The phase sequence with repeats collapsed."""
    out: list[str] = []
    for event in events:
        if not out or out[-1] != event["phase"]:
            out.append(event["phase"])
    return out


def test_without_the_accept_header_one_failed_event(service):
    response = requests.get(service.url + "/build/gh/org/repo/HEAD", timeout=10)
    assert response.status_code == 400
    event = json.loads(response.text.removeprefix("data: "))
    assert event["phase"] == "failed"
    assert event["status_code"] == 400


def test_build_only_streams_the_phases_and_then_reuses_the_image(service, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"requirements.txt": "six\n", "a.ipynb": "{}"}, "svc1")
    events, _ = service.events(build_path(url, build_only="true"))
    assert phases(events)[0] == "fetching"
    assert events[0]["message"] == f"Resolving main of {url}"
    assert phases(events)[-2:] == ["built", "ready"]
    assert "building" in phases(events)
    ready = events[-1]
    assert ready["image"].startswith(service_prefix(ready))
    assert ready["repo_url"] == url
    assert ready["binder_launch_host"] == service.url + "/"
    assert ready["binder_request"] == build_path(url).replace("/build/", "v2/", 1)
    assert ready["binder_persistent_request"].startswith("v2/git/")

    again, _ = service.events(build_path(url, build_only="true"))
    assert phases(again) == ["fetching", "built", "ready"]
    assert again[-1]["image"] == ready["image"]


def service_prefix(ready: dict) -> str:
    return ready["image"].split("git-127-0-0-1")[0]


def test_two_requests_for_a_new_commit_share_one_build(service, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"requirements.txt": "six\n", "b.txt": "b"}, "svc2")
    path = build_path(url, build_only="true")
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: service.events(path)[0], range(2))
    assert first[-1]["phase"] == second[-1]["phase"] == "ready"
    logs = [[e["message"] for e in run if e["phase"] == "building"] for run in (first, second)]
    # The same log, timings included, can only come from one shared build.
    assert logs[0] and logs[0] == logs[1]


def test_unknown_ref_fails_with_the_ref_named(service, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"a.txt": "a"}, "svc3")
    events, _ = service.events(build_path(url, "no-such-branch"))
    assert events[-1]["phase"] == "failed"
    assert "no-such-branch" in events[-1]["message"]
    assert "ready" not in phases(events)


def test_failing_repository_reports_the_cause_and_the_log(service, git_server, tmp_path):
    files = {"postBuild": "#!/bin/sh\necho about-to-fail\nexit 4\n"}
    url = served_repo(git_server, tmp_path, files, "svc4")
    events, _ = service.events(build_path(url, build_only="true"))
    failed = events[-1]
    assert failed["phase"] == "failed"
    assert "postBuild" in failed["message"] and "code 4" in failed["message"]
    assert "about-to-fail" in failed["log_tail"]
    assert "ready" not in phases(events)
    # The whole log stays at a stable address.
    log_url = failed["message"].rsplit("The whole log: ", 1)[1].split()[0]
    assert log_url.startswith(service.url + "/logs/")
    log = requests.get(log_url, timeout=10)
    assert log.status_code == 200
    assert "status: failed" in log.text and "about-to-fail" in log.text


def test_build_records_and_logs_survive_a_restart(base_image, built_images, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"d.txt": "d"}, "svc8")
    state = str(tmp_path / "state")
    with building_service(built_images, "svc8", state_dir=state) as first:
        events, _ = first.events(build_path(url, build_only="true"))
    built = next(e for e in events if e["phase"] == "built")
    # A build that was running when the service stopped can never finish.
    store = BuildStore(Path(state) / "binderbox.sqlite")
    stale = store.start("binderbox-x:1", "git://example.org/x", "main")
    store.append(stale, "half way")
    store.close()

    second = Service(state_dir=state)
    try:
        kept = requests.get(f"{second.url}/logs/{built['build_id']}", timeout=10)
        interrupted = requests.get(f"{second.url}/logs/{stale}", timeout=10)
        missing = requests.get(f"{second.url}/logs/{'0' * 32}", timeout=10)
    finally:
        second.stop()
    assert kept.status_code == 200 and "status: success" in kept.text
    launches = BuildStore(Path(state) / "binderbox.sqlite").recent_launches()
    assert [(x.provider, x.status) for x in launches] == [("git", "success")]
    assert launches[0].ref == built["image"].rsplit(":", 1)[1]
    assert "#" in kept.text  # BuildKit's log lines are there
    assert "status: failed (binderbox was restarted" in interrupted.text
    assert "half way" in interrupted.text
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc", "'file://'"),
        ("/srv/repo", "a local path"),
        ("git://10.1.2.3/repo.git", "local or private network"),
        ("http://169.254.169.254/latest", "local or private network"),
    ],
)
def test_dangerous_git_urls_are_refused(service, url, words):
    events, _ = service.events(build_path(url, "main"))
    assert [e["phase"] for e in events][-1] == "failed"
    assert words in events[-1]["message"]


def test_loopback_needs_the_operator_allow_list(base_image, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"a.txt": "a"}, "svc5")
    closed = Service(build_only_enabled=True)
    try:
        events, _ = closed.events(build_path(url, build_only="true"))
    finally:
        closed.stop()
    assert events[-1]["phase"] == "failed"
    assert "local or private network" in events[-1]["message"]


def test_keepalive_comments_during_a_long_build(service, git_server, tmp_path):
    files = {"postBuild": "#!/bin/sh\nsleep 3\n"}
    url = served_repo(git_server, tmp_path, files, "svc6")
    events, comments = service.events(build_path(url, build_only="true"))
    assert events[-1]["phase"] == "ready"
    assert ":keepalive" in comments


def test_metrics_count_builds_and_launches(service, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, {"c.txt": "c"}, "svc7")
    assert service.events(build_path(url, build_only="true"))[0][-1]["phase"] == "ready"
    service.events(build_path(url, "no-such-branch"))
    text = requests.get(service.url + "/metrics", timeout=10).text
    assert 'binderbox_builds_total{status="success"} 1.0' in text
    assert 'binderbox_launches_total{status="success"} 1.0' in text
    assert 'binderbox_launches_total{status="failed"} 1.0' in text
    assert "binderbox_build_duration_seconds_bucket" in text
    assert "binderbox_build_queue_length 0.0" in text
    # build_only launched nothing, so the launch-events archive has nothing yet.
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize("name", ["badge.svg", "badge_logo.svg"])
def test_badges(service, name):
    response = requests.get(f"{service.url}/{name}", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert "launch" in response.text and "binder" in response.text


def test_rate_limit_per_address(base_image):
    limited = Service(rate_limit_per_minute=2)
    try:
        codes = []
        for _ in range(3):
            response = requests.get(
                limited.url + "/build/gh/org/repo/..bad",
                headers={"Accept": "text/event-stream"},
                timeout=30,
            )
            codes.append(response.status_code)
            last = response.text
    finally:
        limited.stop()
    assert codes == [200, 200, 429]
    event = json.loads(last.removeprefix("data: "))
    assert event["phase"] == "failed" and "Too many launch requests" in event["message"]


def test_the_launch_page_token_skips_the_rate_limit(base_image):
    import re

    limited = Service(rate_limit_per_minute=1)
    try:
        page = requests.get(limited.url + "/v2/gh/org/repo/..bad", timeout=10).text
        data = json.loads(re.search(r'id="page-data">(.*?)</script>', page)[1])
        token = data["build_token"]

        def status(query: str) -> int:
            return requests.get(
                f"{limited.url}/build/gh/org/repo/..bad{query}",
                headers={"Accept": "text/event-stream"},
                timeout=30,
            ).status_code

        with_token = [status(f"?build_token={token}") for _ in range(3)]
        without = [status(""), status(""), status("?build_token=forged.00")]
    finally:
        limited.stop()
    assert with_token == [200, 200, 200]
    assert without == [200, 429, 429]


def test_the_launch_page_cannot_be_used_for_script_injection(service):
    response = requests.get(
        service.url + "/v2/gh/x/%3C%2Fscript%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E/HEAD",
        timeout=10,
    )
    assert response.status_code == 200
    assert "<script>alert(1)" not in response.text
    # The same path sent unescaped, as a hostile client may.
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    connection.request("GET", "/v2/gh/x/</script><script>alert(1)</script>/HEAD")
    injected = connection.getresponse()
    body = injected.read().decode()
    connection.close()
    assert injected.status == 200
    assert "\\u003c/script\\u003e" in body
    assert "<script>alert(1)" not in body


def test_banned_network_and_spec(base_image):
    banned = Service(banned_networks="127.0.0.0/8")
    try:
        response = requests.get(
            banned.url + "/build/gh/org/repo/HEAD",
            headers={"Accept": "text/event-stream"},
            timeout=30,
        )
    finally:
        banned.stop()
    assert response.status_code == 403
    assert json.loads(response.text.removeprefix("data: "))["phase"] == "failed"

    spec_ban = Service(banned_specs="^gh/evil/")
    try:
        events, _ = spec_ban.events("/build/gh/evil/repo/HEAD")
    finally:
        spec_ban.stop()
    assert [e["phase"] for e in events] == ["failed"]
    assert "temporarily disabled" in events[0]["message"]


def test_operations_endpoints(service):
    providers = requests.get(service.url + "/api/repoproviders", timeout=10).json()
    assert {p["provider"] for p in providers} >= {"gh", "gl", "gist", "git"}
    health = requests.get(service.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["ok"] is True
    assert "binderbox" in requests.get(service.url + "/versions", timeout=10).json()["binderhub"]
    legacy = requests.get(
        service.url + "/repo/org/project?urlpath=lab", allow_redirects=False, timeout=10
    )
    assert legacy.status_code == 302
    assert legacy.headers["location"] == "/v2/gh/org/project/HEAD?urlpath=lab"
    page = requests.get(service.url + "/v2/gh/org/project/HEAD", timeout=10)
    assert page.status_code == 200 and "/static/binderbox.js" in page.text


def test_health_is_503_when_docker_is_unreachable(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/binderbox-no-docker.sock")
    svc = Service()
    try:
        response = requests.get(svc.url + "/health", timeout=30)
    finally:
        svc.stop()
    assert response.status_code == 503
    assert response.json()["checks"][0] == {
        "service": "Docker",
        "ok": False,
        "message": response.json()["checks"][0]["message"],
    }
    assert time.monotonic()  # the request above returned: no hang


def test_a_resolved_branch_is_reused_briefly(service, git_server, tmp_path):
    work = tmp_path / "svc9"
    work.mkdir()
    (work / "a.txt").write_text("first")
    first_commit = commit_all(work)
    url = git_server.publish(work, "svc9.git")
    first, _ = service.events(build_path(url, build_only="true"))
    (work / "a.txt").write_text("second")
    commit_all(work)
    git_server.publish(work, "svc9.git")
    # Within ref_cache_seconds the branch still means the commit resolved a moment ago.
    again, _ = service.events(build_path(url, build_only="true"))
    assert first[-1]["image"] == again[-1]["image"]
    assert first[-1]["binder_persistent_request"].endswith(first_commit)

    fresh = Service(
        allowed_hosts="127.0.0.1",
        build_only_enabled=True,
        ref_cache_seconds=0,
        image_prefix=first[-1]["image"].split("127-0-0-1")[0],
    )
    try:
        latest, _ = fresh.events(build_path(url, build_only="true"))
    finally:
        fresh.stop()
    assert latest[-1]["image"] != first[-1]["image"]
