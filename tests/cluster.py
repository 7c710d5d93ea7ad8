"""A Docker Swarm cluster on this machine, for the many-machines tests.

The manager is this machine's dockerd; the workers are Docker-in-Docker containers made
from Debian packages (mmdebstrap + docker.io), on a bridge network the fixture creates
(see ../shared/ENVIRONMENT.md, "Fresh machines and clusters"). Images reach the workers
through Debian's ``docker-registry``: the manager pushes to it as ``127.0.0.1:PORT/…``
(loopback registries need no TLS), the workers pull the same repository as
``<gateway>:PORT/…`` (listed in their ``insecure-registries``).

Each worker's dockerd also listens on ``tcp://<its address>:2376`` with TLS client
certificates (a CA, a client certificate and one server certificate per worker, made with
openssl in the fixture's folder), the way an operator opens a build node's Docker API to
the manager: ``Cluster.build_hosts`` and ``Cluster.tls_dir`` are what serve's
``swarm_build_nodes`` and ``swarm_build_tls_dir`` take.

The swarm is left again at the end, but only when this dockerd was in none before, so a
machine that already runs a swarm keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import pytest

DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
# The worker image: bookworm minbase with dockerd. Bump the tag when the recipe changes.
NODE_IMAGE = "binderbox-swarm-node:bookworm-1"
NODE_PACKAGES = "docker.io,iptables,ca-certificates"
WORKERS = 2
# What a Docker-in-Docker worker needs, short of --privileged (which fails here).
_DIND_FLAGS = [
    "--cap-add=ALL",
    "--cap-drop=SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs",
    "/var/lib/docker:exec",
]


def swarm_unavailable() -> str:
    """Why a cluster cannot be made here ('' when it can)."""
    if os.geteuid() != 0:
        return "the swarm tests need root (Docker-in-Docker worker nodes)"
    if shutil.which(DOCKER) is None:
        return "the swarm tests need docker (apt-get install docker.io)"
    try:
        docker.from_env().ping()
    except docker.errors.DockerException:
        return "the swarm tests need a running dockerd"
    if shutil.which("docker-registry") is None:
        return "the swarm tests need Debian's docker-registry (apt-get install docker-registry)"
    if shutil.which("mmdebstrap") is None and not _has_image(NODE_IMAGE):
        return "the swarm tests need mmdebstrap to make the worker image"
    return ""


def _run(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}… failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def _has_image(name: str) -> bool:
    return subprocess.run([DOCKER, "image", "inspect", name], capture_output=True).returncode == 0


def node_image() -> str:
    """The worker image, made once with mmdebstrap (about a minute) and kept by its tag."""
    if _has_image(NODE_IMAGE):
        return NODE_IMAGE
    with tempfile.TemporaryDirectory() as work:
        tar = Path(work) / "node.tar"
        _run(
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={NODE_PACKAGES}",
            "bookworm",
            str(tar),
            timeout=900,
        )
        _run(DOCKER, "import", "--change", 'CMD ["dockerd"]', str(tar), NODE_IMAGE, timeout=300)
    return NODE_IMAGE


@dataclass
class Registry:
    """Debian's docker-registry, on 127.0.0.1 (manager pushes) and the nodes' gateway
    (workers pull): two registry processes sharing one storage directory."""

    port: int
    gateway: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def push_url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pull_url(self) -> str:
        return f"{self.gateway}:{self.port}"

    def push(self, image: str) -> str:
        """Push a local image; return the name the workers pull it by."""
        name = image.rsplit("/", 1)[-1]
        _run(DOCKER, "tag", image, f"{self.push_url}/{name}")
        _run(DOCKER, "push", f"{self.push_url}/{name}", timeout=600)
        return f"{self.pull_url}/{name}"


def _start_registry(root: Path, address: str, log: Path) -> subprocess.Popen:
    config = root.parent / f"registry-{address.replace(':', '-')}.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n"
    )
    return subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # polling a thing that is still starting
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g} s")
        time.sleep(0.3)


@dataclass
class Cluster:
    """The running cluster: its bridge network, gateway, workers and registry."""

    network: str
    gateway: str
    workers: list[str]
    registry: Registry
    joined_swarm: bool
    # Swarm node id → worker container name (which is also the node's hostname).
    nodes: dict[str, str] = field(default_factory=dict)

    # (node image, test tag, join token, manager address) for add_worker.
    _join: tuple[str, str, str, str] = ("", "", "", "")
    # Worker name → its dockerd's TLS-protected API ("tcp://address:2376").
    build_hosts: dict[str, str] = field(default_factory=dict)
    # ca.pem, cert.pem, key.pem of the client (and ca-key.pem, which signs the workers').
    tls_dir: Path = Path()

    def worker_exec(self, worker: str, *command: str, timeout: float = 60) -> str:
        return _run(DOCKER, "exec", worker, *command, timeout=timeout)

    def add_worker(self) -> str:
        """Start one more Docker-in-Docker worker, join it and wait until Swarm calls it
        ready; its name (also its hostname)."""
        image, tag, token, manager = self._join
        name = f"binderbox-worker-{tag}-{len(self.workers) + 1}"
        daemon_json = json.dumps(
            {"insecure-registries": [self.registry.pull_url], "no-new-privileges": True}
        )
        _run(
            DOCKER,
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            self.network,
            "--label",
            f"binderbox.test={tag}",
            *_DIND_FLAGS,
            image,
            "sh",
            "-c",
            f"mkdir -p /etc/docker /certs && echo '{daemon_json}' > /etc/docker/daemon.json"
            # The node's boot waits for its certificate, which needs its address.
            " && until [ -f /certs/ready ]; do sleep 0.1; done"
            " && exec dockerd -H unix:///var/run/docker.sock -H tcp://0.0.0.0:2376"
            " --tlsverify --tlscacert /certs/ca.pem --tlscert /certs/server-cert.pem"
            " --tlskey /certs/server-key.pem >/var/log/dockerd.log 2>&1",
        )
        self.workers.append(name)
        address = json.loads(_run(DOCKER, "inspect", name))[0]["NetworkSettings"]["Networks"][
            self.network
        ]["IPAddress"]
        certs = self.tls_dir / name
        certs.mkdir()
        _sign(self.tls_dir, certs, "server", f"subjectAltName=IP:{address},DNS:{name}")
        shutil.copy(self.tls_dir / "ca.pem", certs / "ca.pem")
        _run(DOCKER, "cp", f"{certs}/.", f"{name}:/certs")
        _run(DOCKER, "exec", name, "touch", "/certs/ready")
        self.build_hosts[name] = f"tcp://{address}:2376"
        _wait(
            lambda: self.worker_exec(name, "docker", "info") != "",
            60,
            f"dockerd in {name} did not answer",
        )
        self.worker_exec(name, "docker", "swarm", "join", "--token", token, manager)
        client = docker.from_env()

        def ready() -> bool:
            for node in client.nodes.list():
                attrs = node.attrs
                if attrs["Description"]["Hostname"] == name and attrs["Status"]["State"] == "ready":
                    self.nodes[node.id] = name
                    return True
            return False

        _wait(ready, 60, f"{name} did not join the swarm")
        return name

    def kill_worker(self, name: str) -> None:
        """The machine dies: its container is killed (its node stays listed, down)."""
        _run(DOCKER, "kill", name)


def _openssl(*args: str) -> None:
    _run("openssl", *args)


def make_tls(folder: Path) -> None:
    """A test CA and a client certificate (ca.pem, cert.pem, key.pem) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(folder / "ca-key.pem"), "-out", str(folder / "ca.pem"),
        "-days", "2", "-subj", "/CN=binderbox test CA",
    )  # fmt: skip
    _sign(folder, folder, "", "extendedKeyUsage=clientAuth")


def _sign(ca: Path, folder: Path, prefix: str, extension: str) -> None:
    """A key and a certificate signed by ``ca``'s CA, as ``<prefix>-key.pem`` and
    ``<prefix>-cert.pem`` (``key.pem``/``cert.pem`` without a prefix)."""
    stem = f"{prefix}-" if prefix else ""
    key, cert, request = (folder / f"{stem}{n}" for n in ("key.pem", "cert.pem", "req.pem"))
    extensions = folder / f"{stem}ext.cnf"
    extensions.write_text(extension + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(request), "-subj", f"/CN={prefix or 'client'}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca / "ca.pem"),
        "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    key.chmod(0o600)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def swarm_cluster(workdir: Path) -> Iterator[Cluster]:
    """Make the cluster; on leaving, remove everything it made (and leave the swarm if
    this dockerd joined it here)."""
    client = docker.from_env()
    tag = uuid.uuid4().hex[:6]
    network = f"binderbox-nodes-{tag}"
    workers: list[str] = []
    registry: Registry | None = None
    joined = False
    image = node_image()
    state = client.info()["Swarm"]["LocalNodeState"]
    try:
        created = client.networks.create(network, driver="bridge", labels={"binderbox.test": tag})
        created.reload()
        gateway = created.attrs["IPAM"]["Config"][0]["Gateway"]
        port = _free_port()
        storage = workdir / "registry"
        storage.mkdir()
        registry = Registry(port, gateway)
        for address in (f"127.0.0.1:{port}", f"{gateway}:{port}"):
            registry.processes.append(_start_registry(storage, address, workdir / "registry.log"))
        _wait(
            lambda: _run("curl", "-sf", f"http://127.0.0.1:{port}/v2/", check=False) == "{}",
            20,
            "the registry did not answer",
        )
        if state == "inactive":
            _run(
                DOCKER,
                "swarm",
                "init",
                "--advertise-addr",
                gateway,
                "--listen-addr",
                f"{gateway}:2377",
            )
            joined = True
        elif state != "active":
            raise RuntimeError(f"this dockerd's swarm state is {state!r}; expected inactive")
        token = _run(DOCKER, "swarm", "join-token", "-q", "worker")
        manager = client.info()["Swarm"]["NodeAddr"]
        cluster = Cluster(network, gateway, workers, registry, joined)
        cluster._join = (image, tag, token, f"{manager}:2377")
        cluster.tls_dir = workdir / "tls"
        make_tls(cluster.tls_dir)
        for _ in range(WORKERS):
            cluster.add_worker()
        yield cluster
    finally:
        _teardown(client, tag, network, workers, registry, joined)


def _teardown(
    client: docker.DockerClient,
    tag: str,
    network: str,
    workers: list[str],
    registry: Registry | None,
    joined: bool,
) -> None:
    with contextlib.suppress(docker.errors.APIError):
        for service in client.services.list(filters={"label": f"binderbox.test={tag}"}):
            service.remove()
    for name in workers:
        subprocess.run([DOCKER, "rm", "-fv", name], capture_output=True)
    # Worker nodes that are gone stay listed as down until removed; only ours.
    with contextlib.suppress(docker.errors.APIError):
        for node in client.nodes.list(filters={"role": "worker"}):
            if node.attrs["Description"]["Hostname"] in workers:
                subprocess.run([DOCKER, "node", "rm", "--force", node.id], capture_output=True)
    if joined:
        subprocess.run([DOCKER, "swarm", "leave", "--force"], capture_output=True)
    subprocess.run([DOCKER, "network", "rm", network], capture_output=True)
    if registry is not None:
        for process in registry.processes:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This dockerd as Swarm manager, two Docker-in-Docker workers and a registry."""
    reason = swarm_unavailable()
    if reason:
        pytest.skip(reason)
    began = time.monotonic()
    with swarm_cluster(tmp_path_factory.mktemp("cluster")) as made:
        print(f"\ncluster of {WORKERS} workers ready after {time.monotonic() - began:.0f} s")
        yield made
