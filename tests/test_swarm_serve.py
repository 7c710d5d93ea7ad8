"""The real `binderbox serve` with `backend = "swarm"`: this dockerd as Swarm manager, two
Docker-in-Docker workers (tests/cluster.py), Debian's registry, PostgreSQL for binderbox's
state and the hub's. Builds run on the workers' dockerd (reached over TLS, the build
nodes) and push from there; sessions run on the workers and pull. The tests run in this
file's order: each goes on from the cluster the last left."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import docker
import psycopg
import pytest
import requests
from tests.cluster import Cluster
from tests.postgres import postgres_cluster
from tests.test_serve import (
    Served,
    commit_all,
    run_code,
    serve_env,
    served_repo,
    start_serve,
    stop_and_clean,
    wait_until,
)

from binderbox.launch.options import LABEL_SESSION, LABEL_USER
from binderbox.launch.swarm import LABEL_GUARD
from binderbox.state_postgres import hub_database_name

pytestmark = [pytest.mark.swarm, pytest.mark.docker]


@dataclass
class Deployment:
    """The running serve and what the tests learnt so far."""

    served: Served
    env: dict[str, str]
    log: Path
    database: str
    repo_path: str = ""
    image: str = ""
    build_id: str = ""
    sessions: list[dict] = field(default_factory=list)  # ready events


@pytest.fixture(scope="module")
def database(cluster: Cluster) -> Iterator[str]:
    """A PostgreSQL database on the nodes' gateway, which the hub's container reaches."""
    with postgres_cluster(also_listen=(cluster.gateway,)) as server:
        yield server.new_database(host=cluster.gateway)


@pytest.fixture(scope="module")
def deployment(
    cluster: Cluster,
    database: str,
    base_image: str,
    git_server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    prefix = f"binderbox-sw-{uuid.uuid4().hex[:6]}-"
    env = {
        **serve_env(tmp_path_factory, prefix),
        "BINDERBOX_BACKEND": "swarm",
        "BINDERBOX_REGISTRY_URL": f"http://{cluster.registry.push_url}",
        "BINDERBOX_REGISTRY_PULL_URL": cluster.registry.pull_url,
        "BINDERBOX_DATABASE_URL": database,
        "BINDERBOX_SWARM_NETWORK": f"binderbox-swarm-{uuid.uuid4().hex[:6]}",
        "BINDERBOX_SESSION_START_TIMEOUT": "240",
        # Pre-pulling is switched on by the restart test; before, a node pulls for itself.
        "BINDERBOX_SWARM_PREPULL_EVERY": "0",
        # Builds run on the two workers (not on a third added later).
        "BINDERBOX_SWARM_BUILD_NODES": ",".join(cluster.build_hosts.values()),
        "BINDERBOX_SWARM_BUILD_TLS_DIR": str(cluster.tls_dir),
        "BINDERBOX_BUILD_ONLY_ENABLED": "true",
    }
    log = tmp_path_factory.mktemp("swarm-serve") / "serve.log"
    began = time.monotonic()
    # The first start may build the hub image and push it (the node guard runs from it).
    served = start_serve(env, log, prefix, timeout=420)
    print(f"\nswarm serve answered after {time.monotonic() - began:.0f} s")
    made = Deployment(served, env, log, database)
    repo = served_repo(git_server, tmp_path_factory.mktemp("swarm-repo"), "swarmed")
    made.repo_path = f"/build/git/{quote(repo, safe='')}/main"
    try:
        yield made
    finally:
        stop_and_clean(made.served)
        client = docker.from_env()
        for network in client.networks.list(names=[env["BINDERBOX_SWARM_NETWORK"]]):
            network.remove()
        print(f"\nserve's log:\n{log.read_text()[-3000:]}")


def user_of(ready: dict) -> str:
    return ready["url"].rstrip("/").rsplit("/", 1)[1]


def node_of(cluster: Cluster, ready: dict) -> str:
    """The worker the session's task runs on."""
    client = docker.from_env()
    (service,) = client.services.list(filters={"label": f"{LABEL_USER}={user_of(ready)}"})
    (task,) = [t for t in service.tasks() if t["Status"]["State"] == "running"]
    return cluster.nodes[task["NodeID"]]


def worker_has(cluster: Cluster, worker: str, image: str) -> bool:
    found = cluster.worker_exec(
        worker, "docker", "images", "-q", f"{cluster.registry.pull_url}/{image}"
    )
    return found != ""


def answers(ready: dict) -> bool:
    try:
        status = requests.get(
            f"{ready['url']}api/status", params={"token": ready["token"]}, timeout=10
        )
    except requests.RequestException:
        return False
    return status.status_code == 200


def cluster_state() -> str:
    """What a failure message needs: the services' tasks and the hub's log tail."""
    client = docker.from_env()
    lines = []
    for service in client.services.list():
        for task in service.tasks():
            status = task["Status"]
            lines.append(
                f"{service.name} on {task.get('NodeID', '')[:8]}: {status['State']} "
                f"({status.get('Err') or status.get('Message', '')})"
            )
    for container in client.containers.list(filters={"name": "binderbox-hub-"}):
        lines.append(container.logs(tail=40).decode(errors="replace"))
    return "\n".join(lines)


def nodes(deployment: Deployment) -> dict[str, dict]:
    """/health's view of the cluster: node name → its record."""
    body = requests.get(deployment.served.url + "/health", timeout=30).json()
    return {node["name"]: node for node in body["sessions"]["nodes"]}


def build_node_of(cluster: Cluster, events: list[dict]) -> str:
    """The worker whose dockerd the build ran on, as its events say."""
    said = [e["message"] for e in events if "Building on the build node" in e["message"]]
    assert len(said) == 1, [e["message"] for e in events]
    host = said[0].removeprefix("Building on the build node ").rstrip(".")
    (worker,) = [w for w, h in cluster.build_hosts.items() if h == host]
    return worker


def test_a_launch_builds_on_a_worker_pushes_and_computes_on_a_worker(
    cluster: Cluster,
    deployment: Deployment,
) -> None:
    events = deployment.served.stream(deployment.repo_path)
    phases = [e["phase"] for e in events]
    assert phases[-1] == "ready", events[-1]
    assert "building" in phases
    assert any("Pushing" in e["message"] for e in events), [e["message"] for e in events]
    ready = events[-1]
    # The build ran on a worker, which keeps the image under the name sessions run; the
    # manager's dockerd never had it.
    builder = build_node_of(cluster, events)
    assert worker_has(cluster, builder, ready["image"])
    with pytest.raises(docker.errors.ImageNotFound):
        docker.from_env().images.get(ready["image"])
    built = next(e for e in events if e["phase"] == "built" and e.get("build_id"))
    deployment.image, deployment.build_id = ready["image"], built["build_id"]
    deployment.sessions.append(ready)
    # "Built" now means the registry has it.
    name, tag = deployment.image.rsplit(":", 1)
    manifest = requests.head(
        f"http://{cluster.registry.push_url}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=10,
    )
    assert manifest.status_code == 200
    assert ready["url"].startswith(f"http://127.0.0.1:{deployment.env['BINDERBOX_SESSIONS_PORT']}/")
    assert node_of(cluster, ready) in cluster.workers
    assert run_code(ready["url"], ready["token"], "import six; print(6*7)").strip() == "42"
    # The hub keeps its users in its own PostgreSQL database.
    with psycopg.connect(deployment.database, dbname=hub_database_name(deployment.database)) as db:
        users = [row[0] for row in db.execute("SELECT name FROM users").fetchall()]
    assert user_of(ready) in users


def test_a_second_launch_does_not_build_and_pulls_on_the_other_worker(
    cluster: Cluster,
    deployment: Deployment,
) -> None:
    (first,) = deployment.sessions
    other = next(w for w in cluster.workers if w != node_of(cluster, first))
    if worker_has(cluster, other, deployment.image):
        # It built the image (and has no session using it): it must pull it now.
        pushed = f"{cluster.registry.pull_url}/{deployment.image}"
        cluster.worker_exec(other, "docker", "rmi", pushed)
    assert not worker_has(cluster, other, deployment.image)
    events = deployment.served.stream(deployment.repo_path)
    phases = [e["phase"] for e in events]
    assert phases[-1] == "ready", events[-1]
    assert "building" not in phases
    ready = events[-1]
    deployment.sessions.append(ready)
    # Swarm spreads the sessions: the second lands on the worker without one.
    assert node_of(cluster, ready) == other
    assert worker_has(cluster, other, deployment.image)
    assert run_code(ready["url"], ready["token"], "print(7*6)").strip() == "42"


PROBE = """
import json, os, socket, urllib.parse
def probe(host, port):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        return "connected"
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        s.close()
hub = urllib.parse.urlsplit(os.environ["JUPYTERHUB_API_URL"])
targets = dict(TARGETS, hub=(hub.hostname, hub.port))
print(json.dumps({name: probe(*where) for name, where in targets.items()}))
"""


def session_address(ready: dict) -> str:
    """The session's address on its own overlay network."""
    client = docker.from_env()
    (service,) = client.services.list(filters={"label": f"{LABEL_USER}={user_of(ready)}"})
    (task,) = [t for t in service.tasks() if t["Status"]["State"] == "running"]
    (attachment,) = task["NetworksAttachments"]
    return attachment["Addresses"][0].split("/")[0]


def test_sessions_reach_the_hub_but_not_each_other_nor_the_nodes_networks(
    cluster: Cluster,
    deployment: Deployment,
) -> None:
    first, second = deployment.sessions
    client = docker.from_env()
    node = client.containers.get(node_of(cluster, first))
    node_address = node.attrs["NetworkSettings"]["Networks"][cluster.network]["IPAddress"]
    database = urlsplit(deployment.database)
    targets = {
        "registry": (cluster.gateway, cluster.registry.port),
        "database": (database.hostname, database.port),
        "manager": (cluster.gateway, 2377),
        "its node": (node_address, 7946),
        "other session": (session_address(second), 8888),
    }
    code = PROBE.replace("TARGETS", repr(targets))
    seen = json.loads(run_code(first["url"], first["token"], code))
    # The hub answers (the probe can connect), over the session's own overlay network…
    assert seen.pop("hub") == "connected"
    # …and everything else is refused at the node at once (the node guard's REJECT, not
    # a packet lost on its way out of this machine, which would time out).
    for name, result in seen.items():
        assert result.startswith("OSError") or "No route to host" in result, (name, result)
        assert "timed out" not in result, (name, result)


BUILD_PROBE = """#!/bin/sh
python3 - <<'END'
import socket
for name, host, port in TARGETS:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        result = "connected"
    except OSError as error:
        result = f"{type(error).__name__}: {error}"
    finally:
        s.close()
    print(f"probe {name}: {result}", flush=True)
END
"""


def test_a_build_on_a_node_cannot_reach_the_nodes_the_registry_or_the_database(
    cluster: Cluster,
    deployment: Deployment,
    git_server,
    tmp_path: Path,
) -> None:
    client = docker.from_env()
    address = {
        w: client.containers.get(w).attrs["NetworkSettings"]["Networks"][cluster.network][
            "IPAddress"
        ]
        for w in cluster.workers
    }
    database = urlsplit(deployment.database)
    targets = [
        ("public", "pypi.org", 443),
        ("registry", cluster.gateway, cluster.registry.port),
        ("database", database.hostname, database.port),
        ("manager", cluster.gateway, 2377),
        *[(f"dockerd of {w}", address[w], 2376) for w in cluster.workers],
    ]
    work = tmp_path / "prober"
    work.mkdir()
    (work / "requirements.txt").write_text("six==1.16.0\n")
    (work / "postBuild").write_text(BUILD_PROBE.replace("TARGETS", repr(targets)))
    (work / "postBuild").chmod(0o755)
    commit_all(work)
    repo = git_server.publish(work, "prober.git")
    events = deployment.served.stream(f"/build/git/{quote(repo, safe='')}/main?build_only=true")
    assert events[-1]["phase"] == "ready", events[-1]
    build_node_of(cluster, events)
    built = next(e for e in events if e["phase"] == "built" and e.get("build_id"))
    log = requests.get(f"{deployment.served.url}/logs/{built['build_id']}", timeout=30).text
    seen = dict(re.findall(r"probe ([^:]+): (.*)", log))
    assert set(seen) == {name for name, _, _ in targets}, log[-3000:]
    # Out to the internet the build may go (it installs packages), to nothing else: the
    # node guard's REJECT on the node's docker0, at once (not a timeout).
    assert seen.pop("public") == "connected"
    for name, result in seen.items():
        assert "refused" in result or "No route to host" in result, (name, result)
    # Each build node's guard holds its BuildKit steps to the build limits as well.
    (guard,) = client.services.list(filters={"label": LABEL_GUARD})
    said = b"".join(guard.logs(stdout=True, stderr=True)).decode(errors="replace")
    assert said.count("Build limits: on (all builds together") >= len(cluster.workers), said


def test_the_quota_counts_sessions_on_every_node(deployment: Deployment) -> None:
    refused = deployment.served.stream(deployment.repo_path)
    assert refused[-1]["phase"] == "failed"
    assert "Too many users running" in refused[-1]["message"]


def test_health_and_status_show_each_node_with_its_sessions_and_images(
    cluster: Cluster,
    deployment: Deployment,
) -> None:
    seen = nodes(deployment)
    for worker in cluster.workers:
        assert seen[worker]["state"] == "ready"
        assert seen[worker]["firewall"] == "on"
        assert seen[worker]["sessions"] == 1
        assert deployment.image in seen[worker]["images"].split()
    page = requests.get(deployment.served.url + "/status", timeout=30)
    assert page.status_code == 200
    assert 'id="sessions-nodes"' in page.text
    assert all(worker in page.text for worker in cluster.workers)


def test_a_restart_keeps_sessions_builds_and_logs(deployment: Deployment) -> None:
    first = deployment.served
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=120) == 0
    # The sessions live on while the service, hub and proxy are gone.
    client = docker.from_env()
    for ready in deployment.sessions:
        assert client.services.list(filters={"label": f"{LABEL_USER}={user_of(ready)}"})
    # Started again, now pre-pulling this image onto every node every few seconds.
    deployment.env.update(
        BINDERBOX_SWARM_PREPULL_EVERY="3", BINDERBOX_SWARM_PREPULL_IMAGES=deployment.image
    )
    deployment.served = start_serve(deployment.env, deployment.log, first.prefix, timeout=180)
    for ready in deployment.sessions:
        try:
            wait_until(lambda r=ready: answers(r), 90, "a session answering after the restart")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{cluster_state()}") from None
    log = requests.get(f"{deployment.served.url}/logs/{deployment.build_id}", timeout=30)
    assert log.status_code == 200
    assert "six" in log.text
    # Both sessions still count against the quota after the restart.
    refused = deployment.served.stream(deployment.repo_path)
    assert "Too many users running" in refused[-1]["message"]


def test_a_new_worker_gets_the_pre_pulled_image_before_any_session(
    cluster: Cluster,
    deployment: Deployment,
) -> None:
    began = time.monotonic()
    worker = cluster.add_worker()
    print(f"\nthird worker ready after {time.monotonic() - began:.0f} s")
    wait_until(
        lambda: worker_has(cluster, worker, deployment.image), 180, "the image on the new node"
    )
    wait_until(
        lambda: deployment.image in nodes(deployment)[worker]["images"].split(),
        60,
        "/health listing the pre-pulled image",
    )
    assert nodes(deployment)[worker]["sessions"] == 0
    # The node guard comes up there too; only then may sessions go to the new node.
    wait_until(lambda: nodes(deployment)[worker]["firewall"] == "on", 180, "its firewall")


def test_a_dead_worker_leaves_the_service_healthy_and_launches_go_elsewhere(
    cluster: Cluster,
    deployment: Deployment,
    git_server,
    tmp_path: Path,
) -> None:
    repo = served_repo(git_server, tmp_path, "survivor")
    path = f"/build/git/{quote(repo, safe='')}/main"
    doomed = deployment.served.stream(path)[-1]
    assert doomed["phase"] == "ready", doomed
    victim = node_of(cluster, doomed)
    # The newest worker had no session, so Swarm put this one there.
    assert victim == cluster.workers[-1]
    cluster.kill_worker(victim)
    wait_until(lambda: nodes(deployment)[victim]["state"] == "down", 90, "Swarm seeing it down")
    health = requests.get(deployment.served.url + "/health", timeout=30)
    assert health.status_code == 200, health.text
    # The hub notices the lost session and lets it go (it no longer counts or routes).
    client = docker.from_env()
    wait_until(
        lambda: not client.services.list(filters={"label": f"{LABEL_USER}={user_of(doomed)}"}),
        120,
        "the lost session removed",
    )
    # Two launches (this repository's quota) go to the nodes left, and compute.
    survivors = set(cluster.workers) - {victim}
    for _ in range(2):
        ready = deployment.served.stream(path)[-1]
        assert ready["phase"] == "ready", ready
        assert node_of(cluster, ready) in survivors
    assert run_code(ready["url"], ready["token"], "print(sum(range(10)))").strip() == "45"
    # The sessions of the first repository, on the nodes left, are untouched.
    assert all(answers(ready) for ready in deployment.sessions)
    body = json.loads(health.text)
    assert body["ok"] is True


@pytest.mark.xfail(
    reason="known bug, open in issue 12: after a serve restart on the Swarm backend the "
    "idle culler polls every 5 s but culls none of the idle sessions",
    strict=False,
)
def test_idle_sessions_on_every_node_are_culled(deployment: Deployment) -> None:
    client = docker.from_env()

    def sessions() -> list:
        return client.services.list(filters={"label": LABEL_SESSION})

    assert len(sessions()) >= 2  # on both workers left
    nodes_with_sessions = {
        t["NodeID"] for s in sessions() for t in s.tasks() if t["Status"]["State"] == "running"
    }
    assert len(nodes_with_sessions) >= 2
    # serve again with a short idle timeout: the culler (through the hub, which sees every
    # node's sessions) ends them all, wherever they run.
    first = deployment.served
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=120) == 0
    deployment.env.update(BINDERBOX_CULL_IDLE_TIMEOUT="20", BINDERBOX_CULL_EVERY="5")
    deployment.served = start_serve(deployment.env, deployment.log, first.prefix, timeout=180)
    try:
        wait_until(lambda: not sessions(), 120, "every idle session culled")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster_state()}") from None
    health = requests.get(deployment.served.url + "/health", timeout=30)
    assert health.status_code == 200, health.text
    assert all(node["sessions"] == 0 for node in nodes(deployment).values())
