"""Sessions on a Docker Swarm: this dockerd as manager, two Docker-in-Docker workers
(tests/cluster.py), Debian's registry, and the SwarmBackend's hub and proxy containers on
an overlay network. Launches go through the hub's REST API with the real spawner."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator

import docker
import pytest
import requests
import websocket
from tests.cluster import DOCKER, Cluster
from tests.conftest import binderbox, free_port
from tests.test_launch import BINDER_FIELDS, execute_request

from binderbox.config import Settings
from binderbox.launch import Session, launch
from binderbox.launch.options import LABEL_USER
from binderbox.launch.swarm import SwarmBackend, hub_image_recipe, render_hub_config

pytestmark = pytest.mark.swarm


# --- pure ----------------------------------------------------------------------------


def test_hub_config_runs_the_swarm_spawner_against_the_proxy_container() -> None:
    settings = Settings().with_overrides(
        backend="swarm",
        registry_url="http://127.0.0.1:5000",
        registry_pull_url="172.30.0.1:5000",
        cull_every=5,
    )
    text = render_hub_config(settings, hub_id="abc", hub="the-hub", proxy="the-proxy")
    compile(text, "jupyterhub_config.py", "exec")
    assert "c.JupyterHub.spawner_class = 'binderbox.launch.swarm.BinderSwarmSpawner'" in text
    assert "c.ConfigurableHTTPProxy.should_start = False" in text
    assert "c.ConfigurableHTTPProxy.api_url = 'http://the-proxy:8001'" in text
    assert "c.JupyterHub.hub_connect_url = 'http://the-hub:8081/'" in text
    assert "c.BinderSwarmSpawner.registry = '172.30.0.1:5000'" in text
    assert "c.BinderSwarmSpawner.constraints = 'node.role==worker'" in text
    assert "c.BinderSwarmSpawner.pids_limit = 1024" in text
    # The firewall is wanted ("auto"): sessions go only to nodes the guard labels.
    assert "c.BinderSwarmSpawner.guard_label = 'binderbox-guard-abc'" in text
    off = render_hub_config(
        settings.with_overrides(session_firewall="off"), hub_id="abc", hub="h", proxy="p"
    )
    assert "c.BinderSwarmSpawner.guard_label = ''" in off


def test_hub_image_recipe_adds_the_proxy_and_binderbox_to_the_base() -> None:
    recipe = hub_image_recipe("binderbox/base:bookworm-1", ca=True)
    assert recipe.startswith("FROM binderbox/base:bookworm-1\n")
    assert "configurable-http-proxy@5" in recipe
    assert "uv pip install --python /srv/venv/bin/python '/opt/binderbox-src[postgres]'" in recipe
    assert "install -y -qq --no-install-recommends iptables" in recipe  # the node guard
    assert "NODE_EXTRA_CA_CERTS" in recipe


# --- a real cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_image(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny built image, pushed to the cluster's registry; its local name."""
    repo = tmp_path_factory.mktemp("swarm-tiny")
    (repo / "README.md").write_text("A tiny repository for the swarm tests.\n")
    result = binderbox("build", "--json-logs", str(repo))
    assert result.code == 0, result.stderr[-3000:]
    began = time.monotonic()
    cluster.registry.push(result.image)
    print(f"\npushed {result.image} in {time.monotonic() - began:.0f} s")
    return result.image


@pytest.fixture(scope="module")
def backend(
    cluster: Cluster,
    swarm_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SwarmBackend]:
    settings = Settings().with_overrides(
        backend="swarm",
        state_dir=str(tmp_path_factory.mktemp("swarm-state")),
        sessions_port=free_port(),
        hub_port=free_port(),
        proxy_api_port=free_port(),
        registry_url=f"http://{cluster.registry.push_url}",
        registry_pull_url=cluster.registry.pull_url,
        swarm_network=f"binderbox-swarm-{uuid.uuid4().hex[:6]}",
        cull_idle_timeout=0,
        session_start_timeout=180,
    )
    made = SwarmBackend(settings)
    began = time.monotonic()
    made.start()
    print(f"\nswarm hub and proxy answered after {time.monotonic() - began:.0f} s")
    try:
        yield made
    finally:
        made.stop(keep_sessions=False)
        client = docker.from_env()
        for network in client.networks.list(names=[settings.swarm_network]):
            network.remove()


def start_session(backend: SwarmBackend, image: str) -> Session:
    async def run() -> Session:
        async with backend.client() as client:
            return await launch(client, image, binder_env=BINDER_FIELDS, retries=1)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def two_sessions(backend: SwarmBackend, swarm_image: str) -> list[Session]:
    sessions = []
    for _ in range(2):
        began = time.monotonic()
        sessions.append(start_session(backend, swarm_image))
        print(f"\nsession ready after {time.monotonic() - began:.1f} s")
    return sessions


def service_of(session: Session) -> docker.models.services.Service:
    client = docker.from_env()
    (service,) = client.services.list(filters={"label": f"{LABEL_USER}={session.user}"})
    return service


def node_of(cluster: Cluster, session: Session) -> str:
    (task,) = [t for t in service_of(session).tasks() if t["Status"]["State"] == "running"]
    return cluster.nodes[task["NodeID"]]


def container_of(cluster: Cluster, session: Session) -> tuple[str, str]:
    """(worker node, container id) of the session's container."""
    worker = node_of(cluster, session)
    found = cluster.worker_exec(
        worker, "docker", "ps", "-q", "--filter", f"label={LABEL_USER}={session.user}"
    )
    return worker, found


def in_session(cluster: Cluster, session: Session, *command: str) -> subprocess.CompletedProcess:
    """Run a command inside the session's container, on its worker node."""
    worker, found = container_of(cluster, session)
    return subprocess.run(
        [DOCKER, "exec", worker, "docker", "exec", found, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_launches_land_on_both_workers(
    cluster: Cluster,
    two_sessions: list[Session],
) -> None:
    assert {node_of(cluster, s) for s in two_sessions} == set(cluster.workers)


def test_a_session_answers_through_the_proxy_with_its_token_only(
    backend: SwarmBackend, two_sessions: list[Session]
) -> None:
    session = two_sessions[0]
    assert session.url == f"{backend.public_url}user/{session.user}/"
    status = requests.get(f"{session.url}api/status", params={"token": session.token})
    assert status.status_code == 200, status.text
    assert "kernels" in status.json()
    assert requests.get(f"{session.url}api/status", params={"token": "0" * 48}).status_code == 403


def test_a_kernel_computes_over_the_websocket_through_the_proxy(
    two_sessions: list[Session],
) -> None:
    session = two_sessions[1]
    auth = {"Authorization": f"token {session.token}"}
    kernel = requests.post(f"{session.url}api/kernels", headers=auth, json={})
    assert kernel.status_code == 201, kernel.text
    ws_url = session.url.replace("http://", "ws://", 1)
    ws = websocket.create_connection(
        f"{ws_url}api/kernels/{kernel.json()['id']}/channels?token={session.token}", timeout=60
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps(execute_request(msg_id, "print(6*7)")))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            assert message["msg_type"] != "error", message["content"]
            if message["msg_type"] == "stream":
                assert message["content"]["text"].strip() == "42"
                return
        raise AssertionError("no output from the kernel within 60 s")
    finally:
        ws.close()


def test_a_session_service_carries_the_binder_limits_and_lock_down(
    cluster: Cluster,
    two_sessions: list[Session],
) -> None:
    session = two_sessions[0]
    task = service_of(session).attrs["Spec"]["TaskTemplate"]
    spec, resources = task["ContainerSpec"], task["Resources"]
    assert spec["Image"].startswith(f"{cluster.registry.pull_url}/binderbox-")
    assert spec["User"] == "1000:1000"
    assert spec["CapabilityDrop"] == ["ALL"]
    assert not spec.get("Mounts")
    assert resources["Limits"] == {
        "MemoryBytes": 2 * 1024**3,
        "NanoCPUs": 10**9,
        "Pids": 1024,
    }
    assert resources["Reservations"]["MemoryBytes"] == 1024**3
    assert task["RestartPolicy"]["Condition"] == "none"
    env = dict(item.split("=", 1) for item in spec["Env"])
    assert env["BINDER_REPO_URL"] == BINDER_FIELDS["repo_url"]
    assert "JUPYTERHUB_API_TOKEN" not in env
    # Inside the container on its node: user 1000, no capabilities, no new privileges
    # (set by the node's dockerd), the pids limit in the cgroup, no Docker socket.
    uid = in_session(cluster, session, "id", "-u")
    assert uid.stdout.strip() == "1000", uid.stderr
    caps = in_session(cluster, session, "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status")
    assert caps.stdout.split() == ["CapEff:", "0" * 16, "NoNewPrivs:", "1"], caps.stderr
    # What the node's dockerd made of the spec: the limits on the container itself.
    worker, found = container_of(cluster, session)
    (inspected,) = json.loads(cluster.worker_exec(worker, "docker", "inspect", found))
    host = inspected["HostConfig"]
    assert (host["PidsLimit"], host["Memory"], host["NanoCpus"]) == (1024, 2 * 1024**3, 10**9)
    # The guarantee is a scheduling reservation in Swarm (a node takes no more sessions
    # than its memory reserves), not the container's soft limit as on one machine.
    assert host["CapDrop"] == ["ALL"] and host["Privileged"] is False
    assert in_session(cluster, session, "test", "-e", "/var/run/docker.sock").returncode == 1


def test_sessions_on_the_overlay_cannot_reach_each_other(
    cluster: Cluster,
    two_sessions: list[Session],
) -> None:
    # The attempt from the first session is routed out of the worker's default route (an
    # overlay address of another network is not on its link), where the node guard's
    # rules refuse it before it leaves the node.
    first, second = two_sessions
    (task,) = [t for t in service_of(second).tasks() if t["Status"]["State"] == "running"]
    (attachment,) = task["NetworksAttachments"]
    address = attachment["Addresses"][0].split("/")[0]
    # A Jupyter answer, not just a connection: with no isolation a packet to an overlay
    # address of another network leaves through the node's default route, and what
    # answers out there is not the session.
    probe = (
        "import json, urllib.request\n"
        f"url = 'http://{address}:8888/user/{second.user}/api'\n"
        "print('connected', json.load(urllib.request.urlopen(url, timeout=3))['version'])\n"
    )
    # The probe works from inside the second session (its own address)…
    itself = in_session(cluster, second, "python3", "-c", probe)
    assert itself.returncode == 0 and "connected" in itself.stdout, itself.stderr
    # …but the first session, on a network of its own, has no route there.
    attempt = in_session(cluster, first, "python3", "-c", probe)
    routes = in_session(cluster, first, "cat", "/proc/net/route").stdout
    assert attempt.returncode != 0 and "connected" not in attempt.stdout, (
        f"{node_of(cluster, first)} reached {address} on {node_of(cluster, second)}; "
        f"routes:\n{routes}"
    )
    reasons = ("timed out", "refused", "No route to host", "unreachable", "Error")
    assert any(reason in attempt.stderr for reason in reasons), attempt.stderr


def test_stopping_the_backend_removes_sessions_hub_and_proxy(
    cluster: Cluster,
    backend: SwarmBackend,
    swarm_image: str,
) -> None:
    # Last in this module: it stops the module's backend (the fixture's stop is then a no-op).
    start_session(backend, swarm_image)
    backend.stop(keep_sessions=False)
    client = docker.from_env()
    label = f"binderbox.hub={backend.hub_id}"
    assert client.services.list(filters={"label": label}) == []
    assert client.containers.list(all=True, filters={"label": label}) == []
    assert client.networks.list(filters={"label": [label, "binderbox.session-network"]}) == []
