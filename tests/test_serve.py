"""`binderbox serve` end to end: the real command with JupyterHub, the proxy, dockerd and a
git daemon on 127.0.0.1; a launch ends in a JupyterLab server that runs code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import docker
import pytest
import requests
import websocket
from tests.conftest import BINDERBOX, binderbox, commit_all, firewall_possible, free_port

from binderbox.config import Settings
from binderbox.launch.proxy import ensure_proxy
from binderbox.service.buildlimits import CGROUP_ROOT, limit_files

pytestmark = pytest.mark.docker


class Served:
    def __init__(self, process: subprocess.Popen, url: str, env: dict[str, str], prefix: str):
        self.process, self.url, self.env, self.prefix = process, url, env, prefix
        self.log: Path | None = None

    def stream(self, path: str) -> list[dict]:
        response = requests.get(
            self.url + path, headers={"Accept": "text/event-stream"}, stream=True, timeout=900
        )
        events = []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["phase"] in {"ready", "failed"}:
                    break
        response.close()
        return events


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def serve_env(tmp_path_factory, prefix: str) -> dict[str, str]:
    return {
        "BINDERBOX_STATE_DIR": str(tmp_path_factory.mktemp("serve-state")),
        "BINDERBOX_SERVICE_PORT": str(free_port()),
        "BINDERBOX_SESSIONS_PORT": str(free_port()),
        "BINDERBOX_HUB_PORT": str(free_port()),
        "BINDERBOX_PROXY_API_PORT": str(free_port()),
        "BINDERBOX_PROXY_COMMAND": str(ensure_proxy(Settings())),
        "BINDERBOX_ALLOWED_HOSTS": "127.0.0.1",
        "BINDERBOX_IMAGE_PREFIX": prefix,
        "BINDERBOX_PER_REPO_QUOTA": "2",
        "BINDERBOX_LAUNCH_EVENTS_FILE": str(tmp_path_factory.mktemp("events") / "events.jsonl"),
    }


def start_serve(env: dict[str, str], log_path: Path, prefix: str, timeout: float = 120) -> Served:
    log = log_path.open("a")
    process = subprocess.Popen(
        [*BINDERBOX, "serve"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    url = f"http://127.0.0.1:{env['BINDERBOX_SERVICE_PORT']}"
    wait_until(lambda: healthy(url) or process.poll() is not None, timeout, "serve answering")
    assert process.poll() is None, log_path.read_text()
    served = Served(process, url, env, prefix)
    served.log = log_path
    return served


def stop_and_clean(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGINT)
        served.process.wait(timeout=90)
    client = docker.from_env()
    for image in client.images.list():
        for tag in image.tags:
            if tag.startswith(served.prefix):
                client.images.remove(tag, force=True)


@contextlib.contextmanager
def serving(tmp_path_factory, name: str, **env: str) -> Iterator[Served]:
    """A real ``binderbox serve`` for a test module; stopped and its images removed after."""
    prefix = f"binderbox-{name}-{uuid.uuid4().hex[:6]}-"
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    process = start_serve({**serve_env(tmp_path_factory, prefix), **env}, log, prefix)
    try:
        yield process
    finally:
        stop_and_clean(process)


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_image) -> Iterator[Served]:
    with serving(tmp_path_factory, "serve") as process:
        yield process


def run_code(url: str, token: str, code: str) -> str:
    auth = {"Authorization": f"token {token}"}
    kernel = requests.post(f"{url}api/kernels", headers=auth, json={}, timeout=60)
    assert kernel.status_code == 201, kernel.text
    ws = websocket.create_connection(
        f"{url.replace('http://', 'ws://', 1)}api/kernels/{kernel.json()['id']}/channels"
        f"?token={token}",
        timeout=60,
    )
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "session": uuid.uuid4().hex,
                    "username": "test",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False, "allow_stdin": False},
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            assert message["msg_type"] != "error", message["content"]
            if message["msg_type"] == "stream":
                return message["content"]["text"]
        raise AssertionError("the kernel printed nothing within 60 s")
    finally:
        ws.close()


def served_repo(git_server, tmp_path: Path, name: str) -> str:
    work = tmp_path / name
    work.mkdir()
    (work / "requirements.txt").write_text("six==1.16.0\n")
    (work / "index.ipynb").write_text("{}")
    commit_all(work)
    return git_server.publish(work, f"{name}.git")


def test_a_launch_ends_in_a_server_that_runs_code(served, git_server, tmp_path):
    url = served_repo(git_server, tmp_path, "launchme")
    path = f"/build/git/{quote(url, safe='')}/main"
    events = served.stream(path)
    phases = [e["phase"] for e in events]
    assert phases[-1] == "ready", events[-1]
    order = ["fetching", "building", "built", "launching", "ready"]
    assert [p for p in dict.fromkeys(phases) if p in order] == order
    ready = events[-1]
    assert ready["url"].endswith("/") and ready["token"]
    assert ready["image"].startswith(served.prefix)
    status = requests.get(f"{ready['url']}api/status", params={"token": ready["token"]}, timeout=30)
    assert status.status_code == 200
    assert run_code(ready["url"], ready["token"], "import six; print(6*7)").strip() == "42"

    # The same commit again: the image is reused, only the launch happens.
    began = time.monotonic()
    again = served.stream(path)
    assert [e["phase"] for e in again][-1] == "ready"
    assert "building" not in [e["phase"] for e in again]
    assert time.monotonic() - began < 60
    assert again[-1]["url"] != ready["url"]  # a new throwaway user

    # Each launch is in the archive, in mybinder.org's shape: minutes only, no addresses.
    lines = Path(served.env["BINDERBOX_LAUNCH_EVENTS_FILE"]).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 2
    commit = ready["binder_persistent_request"].rsplit("/", 1)[1]
    assert events[0] == {
        "timestamp": events[0]["timestamp"],
        "schema": "binderhub.jupyter.org/launch",
        "version": 3,
        "provider": "Git",
        "spec": f"{quote(url, safe='')}/main",
        "ref": commit,
        "status": "success",
        "origin": served.url.removeprefix("http://"),
    }
    assert events[0]["timestamp"].endswith(":00")

    # Two sessions of this repository run now, the quota: a third is refused.
    refused = served.stream(path)
    assert [e["phase"] for e in refused][-1] == "failed"
    assert "Too many users running" in refused[-1]["message"]


def session_containers(prefix: str) -> list:
    # sparse: no inspection per container, which would race with removals
    containers = docker.from_env().containers.list(all=True, sparse=True)
    return [c for c in containers if str(c.attrs.get("Image", "")).startswith(prefix)]


def test_sessions_survive_a_restart_and_are_still_culled(
    tmp_path_factory, base_image, git_server, tmp_path
):
    prefix = f"binderbox-restart-{uuid.uuid4().hex[:6]}-"
    env = serve_env(tmp_path_factory, prefix)
    log = tmp_path / "serve.log"
    first = start_serve(env, log, prefix)
    try:
        url = served_repo(git_server, tmp_path, "restartme")
        ready = first.stream(f"/build/git/{quote(url, safe='')}/main")[-1]
        assert ready["phase"] == "ready", ready
        # A service manager's restart: SIGTERM, then start again on the same state.
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=90) == 0
        assert len(session_containers(prefix)) == 1

        env_again = {**env, "BINDERBOX_CULL_IDLE_TIMEOUT": "15", "BINDERBOX_CULL_EVERY": "5"}
        second = start_serve(env_again, log, prefix)
        try:

            def answers() -> bool:
                try:
                    return (
                        requests.get(
                            f"{ready['url']}api/status", params={"token": ready["token"]}, timeout=5
                        ).status_code
                        == 200
                    )
                except requests.RequestException:
                    return False

            wait_until(answers, 60, "the session answering after the restart")
            # The restarted hub culls it once idle.
            wait_until(lambda: not session_containers(prefix), 120, "the idle session culled")
        finally:
            stop_and_clean(second)
    finally:
        stop_and_clean(first)
    assert session_containers(prefix) == []


def test_serve_says_whether_sessions_and_builds_are_fenced_in(served):
    state = "on" if firewall_possible() else "off"
    said = served.log.read_text()
    assert f"Session firewall: {state}" in said, said
    assert f"Build firewall: {state}" in said, said
    limits = "on" if os.geteuid() == 0 and limit_files(CGROUP_ROOT) else "off"
    assert f"Build limits: {limits}" in said, said


def test_a_second_serve_is_refused(served):
    result = binderbox("serve", env=served.env, timeout=120)
    assert result.code == 1
    assert "already" in result.stderr


def test_ctrl_c_stops_everything(served):
    client = docker.from_env()
    served.process.send_signal(signal.SIGINT)
    served.process.wait(timeout=90)
    assert served.process.returncode == 0
    assert not healthy(served.url)
    leftovers = [
        c
        for c in client.containers.list(all=True)
        if c.image.tags and c.image.tags[0].startswith(served.prefix)
    ]
    assert leftovers == []
