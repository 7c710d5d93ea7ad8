"""Sessions: a real JupyterHub subprocess, real configurable-http-proxy from npm, real
dockerd, and images built from tiny repositories. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import fcntl
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import docker
import pytest
import requests
import websocket
from tests.conftest import free_port

from binderbox.config import Settings, load_settings
from binderbox.errors import BinderboxError, UsageError
from binderbox.events import Event
from binderbox.launch import (
    HubAlreadyRunning,
    HubLauncher,
    InvalidSessionOptions,
    LaunchFailed,
    ManagedHub,
    Session,
    ensure_proxy,
    launch,
)
from binderbox.launch.hub import ensure_session_network, render_config
from binderbox.launch.options import LABEL_HUB, LABEL_USER, parse_user_options

TOKEN = "ab" * 24
BINDER_FIELDS = {
    "repo_url": "https://example.org/org/repo",
    "binder_ref_url": "https://example.org/org/repo/tree/0123abc",
    "binder_launch_host": "http://127.0.0.1:8585/",
    "binder_request": "v2/gh/org/repo/HEAD",
    "binder_persistent_request": "v2/gh/org/repo/0123abc",
}


# --- pure: options and the hub's configuration --------------------------------------


def test_options_accept_a_local_prefixed_image_a_hex_token_and_binder_fields() -> None:
    options = parse_user_options(
        {"image": "binderbox-org-repo:0123abc", "token": TOKEN, **BINDER_FIELDS}, "binderbox-"
    )
    assert options.image == "binderbox-org-repo:0123abc"
    assert options.binder_environment()["BINDER_REPO_URL"] == BINDER_FIELDS["repo_url"]
    assert options.binder_environment()["BINDER_REQUEST"] == "v2/gh/org/repo/HEAD"


@pytest.mark.parametrize(
    "image",
    [
        "jupyter/base-notebook:latest",  # not a binderbox image
        "quay.io/binderbox-x:1",  # a registry
        "binderbox-x;rm -rf /:1",
        "binderbox-",
        "binderbox-UPPER:1",
        "",
    ],
)
def test_options_refuse_images_not_built_here(image: str) -> None:
    with pytest.raises(InvalidSessionOptions):
        parse_user_options({"image": image, "token": TOKEN}, "binderbox-")


@pytest.mark.parametrize("token", ["", "short", "g" * 48, "AB" * 24, 42, None])
def test_options_refuse_tokens_that_are_not_hex(token: object) -> None:
    with pytest.raises(InvalidSessionOptions):
        parse_user_options({"image": "binderbox-x:1", "token": token}, "binderbox-")


def test_options_refuse_unknown_fields_and_multiline_values() -> None:
    base = {"image": "binderbox-x:1", "token": TOKEN}
    with pytest.raises(InvalidSessionOptions, match="Unknown session option 'privileged'"):
        parse_user_options({**base, "privileged": "true"}, "binderbox-")
    with pytest.raises(InvalidSessionOptions, match="one line"):
        parse_user_options({**base, "repo_url": "a\nb"}, "binderbox-")


def test_hub_config_keeps_everything_on_localhost_and_scopes_the_service(tmp_path: Path) -> None:
    settings = Settings().with_overrides(
        state_dir=str(tmp_path), cull_idle_timeout=20, cull_every=5, cull_max_age=60
    )
    text = render_config(settings, state_dir=tmp_path, proxy=Path("/x/chp"), hub_id="abc")
    compile(text, "jupyterhub_config.py", "exec")
    assert "c.JupyterHub.bind_url = 'http://127.0.0.1:8000/'" in text
    assert "c.JupyterHub.hub_bind_url = 'http://127.0.0.1:8081/'" in text
    assert "c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:8001'" in text
    assert "'scopes': ['admin:users', 'servers']" in text
    assert "'--timeout=20', '--cull-every=5', '--max-age=60', '--cull-users=True'" in text
    assert "c.JupyterHub.last_activity_interval = 5" in text
    assert "c.BinderSpawner.mem_limit = '2G'" in text
    assert "c.BinderSpawner.network_name = 'binderbox-sessions'" in text
    assert "c.BinderSpawner.use_internal_ip = False" in text
    no_culler = render_config(
        settings.with_overrides(cull_idle_timeout=0),
        state_dir=tmp_path,
        proxy=Path("/x"),
        hub_id="a",
    )
    assert "idle-culler" not in no_culler


def test_session_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "binderbox.toml"
    config.write_text("session_cpu_limit = 2\nsession_mem_limit = '4G'\ncull_idle_timeout = 0\n")
    settings = load_settings(config, environ={})
    assert (settings.session_cpu_limit, settings.session_mem_limit) == (2.0, "4G")
    for bad, message in [
        ({"session_mem_limit": "2 GB"}, "a size such as"),
        ({"session_mem_guarantee": "3G"}, "must not exceed"),
        ({"hub_port": 8000}, "must differ"),
        ({"session_pids_limit": 0}, "positive"),
        ({"cull_max_age": -1}, "0 \\(off\\)"),
        ({"session_network": "bridge"}, "not bridge"),
        ({"session_network": "x y"}, "session_network"),
    ]:
        with pytest.raises(UsageError, match=message):
            Settings().with_overrides(**bad)


# --- real hub, proxy and containers ---------------------------------------------------


@pytest.fixture(scope="session")
def proxy_command() -> Path:
    """configurable-http-proxy, installed from npm when this machine has none yet."""
    return ensure_proxy(Settings())


def hub_settings(state_dir: Path, proxy: Path, **overrides: object) -> Settings:
    return Settings().with_overrides(
        state_dir=str(state_dir),
        sessions_port=free_port(),
        hub_port=free_port(),
        proxy_api_port=free_port(),
        proxy_command=str(proxy),
        **overrides,
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, proxy_command: Path) -> Iterator[ManagedHub]:
    managed = ManagedHub(hub_settings(tmp_path_factory.mktemp("hub"), proxy_command))
    began = time.monotonic()
    managed.start()
    print(f"\nhub answered after {time.monotonic() - began:.1f} s")
    try:
        yield managed
    finally:
        managed.stop()


@pytest.fixture
def tiny_image(build: Callable, make_repo: Callable) -> str:
    repo = make_repo({"README.md": "A tiny repository for session tests.\n"}, name="tiny")
    result = build(str(repo))
    assert result.code == 0, result.stderr[-3000:]
    return result.image


def start_session(hub: ManagedHub, image: str, events: list[Event] | None = None) -> Session:
    async def run() -> Session:
        async with hub.client() as client:
            return await launch(
                client,
                image,
                binder_env=BINDER_FIELDS,
                emit=None if events is None else events.append,
            )

    return asyncio.run(run())


def hub_users(hub: ManagedHub) -> list[str]:
    async def run() -> list[str]:
        async with hub.client() as client:
            response = await client._http.get(f"{client.api_url}/users")
            response.raise_for_status()
            return [user["name"] for user in response.json()]

    return asyncio.run(run())


def delete_user(hub: ManagedHub, user: str) -> None:
    async def run() -> None:
        async with hub.client() as client:
            await client.delete_user(user)

    asyncio.run(run())


def session_containers(client: docker.DockerClient, **labels: str) -> list:
    filters = [f"{key}={value}" for key, value in labels.items()]
    return client.containers.list(all=True, filters={"label": filters})


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until it is true; return the seconds it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.5)
    return time.monotonic() - began


@pytest.mark.docker
def test_session_answers_through_the_proxy_with_its_token_only(
    hub: ManagedHub, tiny_image: str
) -> None:
    events: list[Event] = []
    began = time.monotonic()
    session = start_session(hub, tiny_image, events)
    print(f"\nsession ready after {time.monotonic() - began:.1f} s (cached image)")
    try:
        assert session.url == f"{hub.public_url}user/{session.user}/"
        assert events and {e.phase for e in events} == {"launching"}
        assert any("Starting a container" in e.message for e in events)

        status = requests.get(f"{session.url}api/status", params={"token": session.token})
        assert status.status_code == 200, status.text
        assert "kernels" in status.json()
        wrong = requests.get(f"{session.url}api/status", params={"token": "0" * 48})
        assert wrong.status_code == 403
        assert requests.get(f"{session.url}api/status").status_code == 403

        # JupyterLab is the default interface.
        home = requests.get(session.url, params={"token": session.token}, allow_redirects=False)
        assert home.status_code == 302
        assert urlsplit(home.headers["Location"]).path == f"/user/{session.user}/lab"
        lab = requests.get(f"{session.url}lab", params={"token": session.token})
        assert lab.status_code == 200 and "JupyterLab" in lab.text
    finally:
        delete_user(hub, session.user)


@pytest.mark.docker
def test_kernel_runs_code_over_the_websocket(hub: ManagedHub, tiny_image: str) -> None:
    session = start_session(hub, tiny_image)
    try:
        auth = {"Authorization": f"token {session.token}"}
        kernel = requests.post(f"{session.url}api/kernels", headers=auth, json={})
        assert kernel.status_code == 201, kernel.text
        kernel_id = kernel.json()["id"]
        ws_url = session.url.replace("http://", "ws://", 1)
        ws = websocket.create_connection(
            f"{ws_url}api/kernels/{kernel_id}/channels?token={session.token}", timeout=60
        )
        try:
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps(execute_request(msg_id, "print(6*7)")))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                message = json.loads(ws.recv())
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if message["msg_type"] == "stream":
                    assert message["content"]["text"].strip() == "42"
                    break
                assert message["msg_type"] != "error", message["content"]
            else:
                raise AssertionError("no output from the kernel within 60 s")
        finally:
            ws.close()
    finally:
        delete_user(hub, session.user)


def execute_request(msg_id: str, code: str) -> dict:
    return {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "session": uuid.uuid4().hex,
            "username": "test",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }


@pytest.mark.docker
def test_session_container_is_locked_down(
    hub: ManagedHub, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    session = start_session(hub, tiny_image)
    try:
        (container,) = session_containers(docker_client, **{LABEL_USER: session.user})
        assert container.labels[LABEL_HUB] == hub.hub_id
        config, host = container.attrs["Config"], container.attrs["HostConfig"]
        assert config["User"] == "1000:1000"
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Privileged"] is False
        assert host["Memory"] == 2 * 1024**3
        assert host["MemoryReservation"] == 1024**3
        assert host["PidsLimit"] == 1024
        assert host["CpuQuota"] == host["CpuPeriod"] == 100_000  # one CPU
        assert not host.get("Binds") and not container.attrs["Mounts"]
        assert host["PortBindings"]["8888/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]

        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["BINDER_REPO_URL"] == BINDER_FIELDS["repo_url"]
        assert env["BINDER_LAUNCH_HOST"] == BINDER_FIELDS["binder_launch_host"]
        assert env["BINDER_PERSISTENT_REQUEST"] == BINDER_FIELDS["binder_persistent_request"]
        assert "JUPYTERHUB_API_TOKEN" not in env

        uid = container.exec_run(["id", "-u"])
        assert uid.output.decode().strip() == "1000"
        caps = container.exec_run(["grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status"])
        assert caps.output.decode().split() == ["CapEff:", "0" * 16, "NoNewPrivs:", "1"]
    finally:
        delete_user(hub, session.user)


@pytest.mark.docker
def test_sessions_cannot_reach_each_other(
    hub: ManagedHub, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    first, second = start_session(hub, tiny_image), start_session(hub, tiny_image)
    try:
        (a,) = session_containers(docker_client, **{LABEL_USER: first.user})
        (b,) = session_containers(docker_client, **{LABEL_USER: second.user})
        network = hub.settings.session_network
        assert set(a.attrs["NetworkSettings"]["Networks"]) == {network}
        address = b.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        probe = (
            "import socket\n"
            f"socket.create_connection(({address!r}, 8888), timeout=3).close()\n"
            "print('connected')\n"
        )
        # The probe works: the second session's server answers at that address (asked
        # from inside the second session; the tests themselves talk to 127.0.0.1 only)…
        itself = b.exec_run(["python3", "-c", probe])
        assert itself.exit_code == 0 and b"connected" in itself.output, itself.output
        # …but the first session cannot reach it.
        attempt = a.exec_run(["python3", "-c", probe])
        assert attempt.exit_code != 0, attempt.output.decode()
        assert b"connected" not in attempt.output
        # Dropped (Docker's isolation) or rejected (the session firewall, when it is on).
        reasons = (b"timed out", b"refused", b"No route to host")
        assert any(reason in attempt.output for reason in reasons), attempt.output
    finally:
        delete_user(hub, first.user)
        delete_user(hub, second.user)


@pytest.mark.docker
def test_a_session_network_open_between_containers_is_refused(
    docker_client: docker.DockerClient,
) -> None:
    name = f"binderbox-test-open-{uuid.uuid4().hex[:6]}"
    docker_client.networks.create(name, driver="bridge")
    try:
        with pytest.raises(BinderboxError, match=f"'{name}' lets containers reach each other"):
            ensure_session_network(docker_client, name)
    finally:
        docker_client.networks.get(name).remove()
    # A missing one is created isolated, and accepted from then on.
    try:
        ensure_session_network(docker_client, name)
        ensure_session_network(docker_client, name)
        options = docker_client.networks.get(name).attrs["Options"]
        assert options["com.docker.network.bridge.enable_icc"] == "false"
    finally:
        docker_client.networks.get(name).remove()


@pytest.mark.docker
def test_deleting_the_user_removes_its_container(
    hub: ManagedHub, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    session = start_session(hub, tiny_image)
    assert len(session_containers(docker_client, **{LABEL_USER: session.user})) == 1
    delete_user(hub, session.user)
    assert session_containers(docker_client, **{LABEL_USER: session.user}) == []
    assert session.user not in hub_users(hub)
    gone = requests.get(
        f"{session.url}api/status", params={"token": session.token}, allow_redirects=False
    )
    assert gone.status_code != 200


@pytest.mark.docker
def test_hub_launcher_streams_launching_then_ready(hub: ManagedHub, tiny_image: str) -> None:
    async def run() -> list[Event]:
        async with hub.client() as client:
            launcher = HubLauncher(client)
            assert await launcher.healthy()
            return [event async for event in launcher.launch(tiny_image, BINDER_FIELDS)]

    events = asyncio.run(run())
    *launching, ready = events
    assert launching and all(e.phase == "launching" for e in launching)
    assert ready.phase == "ready"
    assert ready.fields["url"].startswith(hub.public_url)
    status = requests.get(
        f"{ready.fields['url']}api/status", params={"token": ready.fields["token"]}
    )
    assert status.status_code == 200
    delete_user(hub, ready.fields["user"])


@pytest.mark.docker
def test_a_cancelled_launch_leaves_no_user_or_container(
    hub: ManagedHub, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    async def run() -> None:
        async with hub.client() as client:
            started = asyncio.Event()

            def emit(event: Event) -> None:
                if "Starting a container" in event.message:
                    started.set()

            task = asyncio.create_task(launch(client, tiny_image, emit=emit))
            await asyncio.wait_for(started.wait(), timeout=60)
            task.cancel()  # the browser went away while the server was starting
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert hub_users(hub) == []
    assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id}) == []


@pytest.mark.docker
def test_images_not_built_here_are_refused_at_once(hub: ManagedHub) -> None:
    events: list[Event] = []
    for image, reason in [
        ("binderbox-never-built:0", "is not on this machine; build it first"),
        ("debian:bookworm", "only images built by this binderbox"),
    ]:
        with pytest.raises(LaunchFailed, match=reason):
            start_session(hub, image, events)
    assert not any("attempt" in e.message for e in events)  # no retries
    assert hub_users(hub) == []


@pytest.mark.docker
def test_a_failing_session_is_retried_with_its_reason_then_given_up(
    hub: ManagedHub,
    build: Callable,
    make_repo: Callable,
    docker_client: docker.DockerClient,
) -> None:
    repo = make_repo(
        {"start": ('#!/bin/sh\necho "cannot start: missing data" >&2\nexit 3\n', 0o755)}
    )
    image = build(str(repo)).image
    events: list[Event] = []

    async def run() -> None:
        async with hub.client() as client:
            await launch(client, image, retries=2, emit=events.append)

    with pytest.raises(LaunchFailed) as failure:
        asyncio.run(run())
    assert "after 2 attempts" in failure.value.message
    assert "exit code 3" in failure.value.message
    assert "cannot start: missing data" in failure.value.message
    retries = [e.message for e in events if "attempt 1 of 2" in e.message]
    assert retries and "cannot start: missing data" in retries[0]
    assert hub_users(hub) == []
    assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id}) == []


@pytest.mark.docker
def test_sessions_are_handed_out_at_the_public_address(
    tmp_path: Path, proxy_command: Path, tiny_image: str
) -> None:
    # As behind a reverse proxy: people reach the sessions' proxy at another address
    # (here localhost, which leads to the same proxy, so the session can be used).
    settings = hub_settings(tmp_path, proxy_command)
    public = f"http://localhost:{settings.sessions_port}/"
    with ManagedHub(settings.with_overrides(sessions_public_url=public)) as other:
        assert other.sessions_url == public
        session = start_session(other, tiny_image)
        try:
            assert session.url == f"{public}user/{session.user}/"
            status = requests.get(f"{session.url}api/status", params={"token": session.token})
            assert status.status_code == 200, status.text
        finally:
            delete_user(other, session.user)
    with pytest.raises(UsageError, match="sessions_public_url"):
        Settings().with_overrides(sessions_public_url="hub.example.org")


@pytest.mark.docker
def test_a_second_hub_on_the_same_state_dir_is_refused(hub: ManagedHub) -> None:
    second = ManagedHub(hub.settings.with_overrides(sessions_port=free_port()))
    with pytest.raises(
        HubAlreadyRunning, match="already running with the state directory"
    ) as refused:
        second.start()
    assert f"JupyterHub pid {hub.pid}" in refused.value.message

    async def healthy() -> bool:
        async with hub.client() as client:
            return await client.healthy()

    assert asyncio.run(healthy())


@pytest.mark.docker
def test_the_idle_culler_removes_an_idle_session_and_its_user_but_not_an_active_one(
    tmp_path: Path, proxy_command: Path, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    settings = hub_settings(tmp_path / "state", proxy_command, cull_idle_timeout=20, cull_every=5)
    with ManagedHub(settings) as culled_hub:
        idle = start_session(culled_hub, tiny_image)
        active = start_session(culled_hub, tiny_image)
        launched = time.monotonic()

        def idle_is_culled() -> bool:
            # Traffic through the proxy is what keeps a session alive.
            status = requests.get(f"{active.url}api/status", params={"token": active.token})
            assert status.status_code == 200, "the active session was culled"
            return not session_containers(
                docker_client, **{LABEL_USER: idle.user}
            ) and idle.user not in hub_users(culled_hub)

        wait_until(idle_is_culled, timeout=120, what="culling the idle session")
        culled_after = time.monotonic() - launched
        print(f"\nidle session culled {culled_after:.0f} s after launch")
        assert culled_after >= 15, "culled long before the idle timeout"
        assert active.user in hub_users(culled_hub)
        assert session_containers(docker_client, **{LABEL_USER: active.user})


@pytest.mark.docker
def test_stopping_the_hub_leaves_no_containers_or_proxy(
    tmp_path: Path, proxy_command: Path, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    hub = ManagedHub(hub_settings(tmp_path / "state", proxy_command))
    hub.start()
    try:
        for _ in range(2):
            start_session(hub, tiny_image)
        assert len(session_containers(docker_client, **{LABEL_HUB: hub.hub_id})) == 2
        proxy_pid = int((hub.state_dir / "proxy.pid").read_text())
        hub_pid = hub.pid
    finally:
        began = time.monotonic()
        hub.stop()
    print(f"\nhub with 2 sessions stopped in {time.monotonic() - began:.1f} s")
    assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id}) == []
    for pid in (proxy_pid, hub_pid):
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    for port in (hub.settings.sessions_port, hub.settings.hub_port, hub.settings.proxy_api_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    # The state directory can be used again at once.
    hub.start()
    hub.stop()


ORPHANING_SCRIPT = """
import asyncio, json, os, sys
from binderbox.config import Settings
from binderbox.launch import ManagedHub, launch
hub = ManagedHub(Settings().with_overrides(**json.loads(sys.argv[1]))).start()
async def main():
    async with hub.client() as client:
        await launch(client, sys.argv[2])
asyncio.run(main())
print(hub.pid, flush=True)
os._exit(0)  # gone without stop(): the hub, its proxy, culler and session live on
"""


@pytest.mark.docker
def test_the_next_hub_adopts_the_sessions_of_a_killed_one(
    tmp_path: Path, proxy_command: Path, tiny_image: str, docker_client: docker.DockerClient
) -> None:
    settings = hub_settings(tmp_path / "state", proxy_command)
    overrides = {
        name: getattr(settings, name)
        for name in ("state_dir", "sessions_port", "hub_port", "proxy_api_port", "proxy_command")
    }
    orphaned = subprocess.run(
        [sys.executable, "-c", ORPHANING_SCRIPT, json.dumps(overrides), tiny_image],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert orphaned.returncode == 0, orphaned.stderr[-3000:]
    hub_pid = int(orphaned.stdout.split()[-1])
    hub = ManagedHub(settings)
    try:
        # The orphaned hub still holds the state directory and serves its session; its
        # binderbox is gone, so the next start stops it and adopts the session.
        proxy_pid = int((hub.state_dir / "proxy.pid").read_text())
        assert process_alive(hub_pid) and process_alive(proxy_pid)
        assert not lock_is_free(hub.state_dir)
        assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id})

        hub.start()
        assert hub.took_over.startswith(f"JupyterHub pid {hub_pid}, left running by a binderbox")
        assert not process_alive(hub_pid)
        assert not process_alive(proxy_pid)  # the orphaned proxy is replaced
        # The session the crashed hub started lives on under the new hub.
        assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id})
        assert hub_users(hub)
    finally:
        hub.stop()
    assert session_containers(docker_client, **{LABEL_HUB: hub.hub_id}) == []


def lock_is_free(state_dir: Path) -> bool:
    with open(state_dir / "hub.lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # closing the file releases it


def process_alive(pid: int) -> bool:
    """True until the process has exited and closed its files (a zombie is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        # A killed leader shows "Z" while its other threads still hold its files.
        return state != "Z" or any(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
