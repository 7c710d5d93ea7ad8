"""Sessions on a Docker Swarm: JupyterHub with dockerspawner's SwarmSpawner.

``SwarmBackend`` (the SessionBackend for ``backend = "swarm"``) runs JupyterHub and
configurable-http-proxy as two containers on this machine, the Swarm manager, attached to
an attachable overlay network, because only containers on the overlay reach sessions on
other nodes (the host cannot, and the ingress routing mesh was seen not to answer in a
Docker-in-Docker swarm). Their ports are published on 127.0.0.1 with plain port
mappings: the proxy's public port (``sessions_port``) and the hub's API (``hub_port``),
which ``serve`` talks to. The manager's Docker socket is mounted into the hub container
only, never into a session.

``BinderSwarmSpawner`` runs inside that hub: each session is a Swarm service with one
task, placed by Swarm (``swarm_constraints``), pulling its image from the registry
(``registry_pull_url``), with the Binder limits as Swarm resources. Each session gets an
overlay network of its own that only the hub and the proxy join besides it, so sessions
cannot reach each other (an overlay network has no switch to turn that off, as the
bridge's ``enable_icc`` does on one machine).

What Docker 20.10's service API cannot say, and where it is done instead:
- no-new-privileges: services have no such option before API 1.44; the worker nodes'
  dockerd sets it for every container (``"no-new-privileges": true`` in daemon.json).
  The spawner cannot check it; the tests do, inside a session.
- the pids limit: set as ``Resources.Limits.Pids`` (API 1.41, Docker 20.10), which the
  Python SDK has no argument for, so the spec is written here.
- capabilities: ``CapabilityDrop`` (API 1.41) takes ``ALL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
from docker.types import ContainerSpec, EndpointSpec, Placement, RestartPolicy, TaskTemplate
from dockerspawner import SwarmSpawner
from traitlets import Unicode, default

from binderbox.config import Settings
from binderbox.errors import BinderboxError, DockerUnavailable
from binderbox.launch.client import HubClient, HubUnavailable
from binderbox.launch.options import LABEL_HUB, LABEL_SESSION, LABEL_USER
from binderbox.launch.spawner import BinderSpawnerMixin, _spawn_error

# Where the hub container finds its configuration and keeps its database.
_HUB_DATA = "/srv/binderbox-hub"
_CA_IN_IMAGE = "/etc/binderbox-hub-ca.crt"
HUB_REPOSITORY = "binderbox-swarm-hub"
# Label of the per-session overlay networks, so a stopping hub finds leftovers.
LABEL_NETWORK = "binderbox.session-network"


class BinderSwarmSpawner(BinderSpawnerMixin, SwarmSpawner):
    """One Swarm service per session, locked down as on one machine, on its own network."""

    registry = Unicode(
        "", config=True, help="host:port the nodes pull session images from (empty: none)."
    )
    constraints = Unicode(
        "node.role==worker", config=True, help="Swarm placement constraints, comma-separated."
    )
    hub_container = Unicode("", config=True, help="The hub's container (joins session networks).")
    proxy_container = Unicode(
        "", config=True, help="The proxy's container (joins session networks)."
    )

    @default("use_internal_ip")
    def _use_internal_ip_default(self) -> bool:
        return True

    @default("extra_create_kwargs")
    def _extra_create_kwargs_default(self) -> Any:
        return {}

    @default("extra_host_config")
    def _extra_host_config_default(self) -> Any:
        return {}

    @property
    def session_network(self) -> str:
        return f"{self.object_name}-net"

    async def _apply_session_options(self, user_options: dict[str, Any]) -> None:
        """Check the request; the image runs from the registry under its checked name."""
        name = user_options.get("image") if isinstance(user_options, dict) else None
        prefix = f"{self.registry}/"
        if self.registry and isinstance(name, str) and name.startswith(prefix):
            # The service may hand over the registry reference; check the name under it.
            user_options = {**user_options, "image": name[len(prefix) :]}
        from binderbox.launch.options import InvalidSessionOptions, parse_user_options

        try:
            session = parse_user_options(user_options, self.image_prefix)
        except InvalidSessionOptions as error:
            raise _spawn_error(error.message, reason="options", status=400) from None
        self.session = session
        self.image = f"{prefix}{session.image}" if self.registry else session.image

    async def check_allowed(self, image: str) -> str:
        if self.session is None:
            raise _spawn_error("The session has no options.", reason="options", status=400)
        return self.image

    async def start(self) -> tuple[str, int]:
        self.network_name = self.session_network
        await self._make_session_network()
        try:
            return await super().start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.remove_object()
            raise

    async def _make_session_network(self) -> None:
        try:
            await self.docker(
                "create_network",
                self.network_name,
                driver="overlay",
                attachable=True,
                labels={LABEL_NETWORK: "1", LABEL_HUB: self.hub_label},
                check_duplicate=True,
            )
        except docker.errors.APIError as error:
            if error.status_code != 409:
                raise
        for container in (self.hub_container, self.proxy_container):
            if not container:
                continue
            try:
                await self.docker("connect_container_to_network", container, self.network_name)
            except docker.errors.APIError as error:
                if "already exists" not in str(error):
                    raise

    async def remove_object(self) -> None:
        if self.object_id:
            with contextlib.suppress(docker.errors.NotFound):
                await super().remove_object()
        await self._remove_session_network()

    async def _remove_session_network(self) -> None:
        name = self.session_network
        for container in (self.hub_container, self.proxy_container):
            if container:
                with contextlib.suppress(docker.errors.APIError):
                    await self.docker(
                        "disconnect_container_from_network", container, name, force=True
                    )
        # The task's endpoint on its node goes a moment after the service.
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.docker("remove_network", name)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                if time.monotonic() > deadline:
                    self.log.warning("The session network %s is still in use; left.", name)
                    return
                await asyncio.sleep(1)

    async def create_object(self) -> dict[str, Any]:
        """The session's service: one task, never restarted elsewhere (a session's state
        lives in its container), limits and lock-down in the spec."""
        labels = {LABEL_SESSION: "1", LABEL_HUB: self.hub_label, LABEL_USER: self.user.name}
        container = ContainerSpec(
            image=self.image,
            env=self.get_env(),
            args=await self.get_command(),
            user=f"{self.uid}:{self.uid}",
            labels=labels,
            mounts=[],
            cap_drop=["ALL"],
        )
        limits: dict[str, Any] = {"Pids": self.pids_limit}
        if self.mem_limit:
            limits["MemoryBytes"] = int(self.mem_limit)
        if self.cpu_limit:
            limits["NanoCPUs"] = int(self.cpu_limit * 1e9)
        reservations: dict[str, Any] = {}
        if self.mem_guarantee:
            reservations["MemoryBytes"] = int(self.mem_guarantee)
        if self.cpu_guarantee:
            reservations["NanoCPUs"] = int(self.cpu_guarantee * 1e9)
        constraints = [c.strip() for c in self.constraints.split(",") if c.strip()]
        task = TaskTemplate(
            container_spec=container,
            resources={"Limits": limits, "Reservations": reservations},
            networks=[self.network_name],
            placement=Placement(constraints=constraints or None),
            restart_policy=RestartPolicy(condition="none"),
        )
        service = await self.docker(
            "create_service",
            task,
            name=self.service_name,
            labels=labels,
            endpoint_spec=EndpointSpec(mode="dnsrr"),
        )
        while not await self.docker("tasks", filters={"service": self.service_name}):
            await asyncio.sleep(0.2)
        return service

    async def start_object(self) -> None:
        """Wait until the task runs; fail at once, with Swarm's reason, when it cannot."""
        self._progress(30, "Waiting for Swarm to place the session and pull its image")
        deadline = time.monotonic() + self.start_timeout
        while True:
            task = await self.get_task()
            if not task:
                raise _spawn_error("The session's Swarm service is gone.", reason="exited")
            status = task["Status"]
            state = status["State"].lower()
            if state == "running":
                node = task.get("NodeID", "")
                self._progress(50, f"Running on node {await self._node_name(node)}")
                return
            if state in {"failed", "rejected", "shutdown", "complete", "orphaned", "remove"}:
                raise _spawn_error(
                    f"Swarm could not run the session: {status.get('Err') or status['Message']}.",
                    reason="exited",
                )
            if time.monotonic() > deadline:
                raise _spawn_error(
                    f"Swarm did not run the session within {self.start_timeout} s "
                    f"(its task is {state}: {status.get('Message', '')}).",
                    reason="timeout",
                )
            await asyncio.sleep(0.3)

    async def _node_name(self, node_id: str) -> str:
        try:
            node = await self.docker("inspect_node", node_id)
        except docker.errors.APIError:
            return node_id[:12]
        return node["Description"]["Hostname"]

    async def get_ip_and_port(self) -> tuple[str, int]:
        """The task's own address on the session's network (no DNS, no routing mesh)."""
        task = await self.get_task()
        for attachment in (task or {}).get("NetworksAttachments", []):
            if attachment["Network"]["Spec"]["Name"] == self.network_name:
                return attachment["Addresses"][0].split("/")[0], self.port
        raise _spawn_error("The session has no address on its network.", reason="network")

    async def _fail_if_stopped(self) -> None:
        task = await self.get_task()
        state = (task or {}).get("Status", {}).get("State", "gone")
        if state not in {"running", "starting", "pending", "preparing", "assigned"}:
            tail = await self._output_tail()
            raise _spawn_error(
                f"The session stopped before Jupyter answered ({state}). Its last output:\n{tail}",
                reason="exited",
            )

    async def _output_tail(self) -> str:
        try:
            lines = await self.docker(
                "service_logs", self.service_id, stdout=True, stderr=True, tail=20
            )
            raw = b"".join(lines)
        except docker.errors.APIError:
            return "(no output)"
        return raw.decode(errors="replace").strip() or "(no output)"


# --- the backend: hub and proxy containers on the manager ------------------------------


def hub_id_for(settings: Settings) -> str:
    """A short id of this deployment (its state directory), labelling what it runs."""
    state = str(Path(settings.state_dir).expanduser().resolve())
    return hashlib.sha256(f"swarm:{state}".encode()).hexdigest()[:12]


def _source_root() -> Path:
    # src/binderbox/launch/swarm.py → the project (pyproject.toml beside src/).
    return Path(__file__).resolve().parents[3]


def hub_image_recipe(base: str, ca: bool) -> str:
    """The Dockerfile of the hub image (pure)."""
    lines = [f"FROM {base}"]
    if ca:
        lines += [
            f"COPY ca.crt {_CA_IN_IMAGE}",
            f"ENV SSL_CERT_FILE={_CA_IN_IMAGE} NODE_EXTRA_CA_CERTS={_CA_IN_IMAGE}",
        ]
    lines += [
        "COPY binderbox /opt/binderbox-src",
        "RUN npm install -g --no-audit --no-fund --loglevel=error configurable-http-proxy@5",
        # binderbox itself (its spawner) and its dependencies, into the venv of JupyterHub.
        "RUN uv pip install --python /srv/venv/bin/python /opt/binderbox-src",
        "ENV PATH=/srv/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"WORKDIR {_HUB_DATA}",
    ]
    return "\n".join(lines) + "\n"


def _project_files() -> list[Path]:
    root = _source_root()
    files = [root / "pyproject.toml", root / "README.md"]
    files += sorted(
        p
        for p in (root / "src" / "binderbox").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    return files


def ensure_hub_image(settings: Settings, client: docker.DockerClient) -> str:
    """The hub image for this work tree, built once and kept by a content hash tag."""
    from binderbox.builder.base import find_base
    from binderbox.builder.engine import DockerEngine

    base = find_base(DockerEngine(settings.docker_cli, client), settings.base_suite)
    if not base:
        raise BinderboxError(
            "The swarm backend's hub image is made from the base image, which is missing: "
            "run 'binderbox base' first."
        )
    ca = Path(settings.ca_bundle) if settings.ca_bundle else None
    recipe = hub_image_recipe(base, ca is not None)
    digest = hashlib.sha256(recipe.encode())
    digest.update(client.images.get(base).id.encode())
    root = _source_root()
    files = _project_files()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    if ca is not None:
        digest.update(ca.read_bytes())
    name = f"{HUB_REPOSITORY}:{digest.hexdigest()[:16]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(name)
        return name
    with tempfile.TemporaryDirectory() as context:
        ctx = Path(context)
        (ctx / "Dockerfile").write_text(recipe)
        if ca is not None:
            (ctx / "ca.crt").write_bytes(ca.read_bytes())
        for path in files:
            target = ctx / "binderbox" / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        result = subprocess.run(
            [settings.docker_cli, "build", "--quiet", "-t", name, str(ctx)],
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    if result.returncode != 0:
        raise BinderboxError(
            "The swarm backend's hub image could not be built.",
            log_tail="\n".join(result.stderr.strip().splitlines()[-15:]),
        )
    return name


def render_hub_config(settings: Settings, *, hub_id: str, hub: str, proxy: str) -> str:
    """The jupyterhub_config.py of the hub container (pure; tokens come from its env)."""
    from binderbox.launch.hub import SERVICE_NAME, culler_and_roles
    from binderbox.registry import registry_address

    s = settings
    registry = registry_address(s.registry_pull_url or s.registry_url) if s.registry_url else ""
    culler, roles = culler_and_roles(s, "python3")
    lines = [
        f'"""JupyterHub on a Docker Swarm, written by binderbox (hub {hub_id})."""',
        "import os",
        "",
        "c = get_config()  # noqa: F821",
        # Inside the container; the host reaches it through 127.0.0.1:<hub_port>.
        "c.JupyterHub.hub_bind_url = 'http://0.0.0.0:8081/'",
        f"c.JupyterHub.hub_connect_url = 'http://{hub}:8081/'",
        "c.ConfigurableHTTPProxy.should_start = False",
        f"c.ConfigurableHTTPProxy.api_url = 'http://{proxy}:8001'",
        "c.ConfigurableHTTPProxy.auth_token = os.environ['CONFIGPROXY_AUTH_TOKEN']",
        f"c.JupyterHub.db_url = 'sqlite:///{_HUB_DATA}/jupyterhub.sqlite'",
        f"c.JupyterHub.cookie_secret_file = '{_HUB_DATA}/jupyterhub_cookie_secret'",
        "c.JupyterHub.cleanup_servers = False",
        "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 1}",
        f"c.JupyterHub.last_activity_interval = {max(1, min(s.cull_every, 300))}",
        "c.JupyterHub.authenticator_class = 'null'",
        "c.JupyterHub.spawner_class = 'binderbox.launch.swarm.BinderSwarmSpawner'",
        "c.JupyterHub.services = [",
        f"    {{'name': {SERVICE_NAME!r},"
        " 'api_token': os.environ['BINDERBOX_HUB_SERVICE_TOKEN']},",
        *(f"    {service!r}," for service in culler),
        "]",
        f"c.JupyterHub.load_roles = {roles!r}",
        f"c.Spawner.start_timeout = {s.session_start_timeout}",
        f"c.Spawner.http_timeout = {s.session_start_timeout}",
        f"c.BinderSwarmSpawner.image_prefix = {s.image_prefix!r}",
        f"c.BinderSwarmSpawner.hub_label = {hub_id!r}",
        f"c.BinderSwarmSpawner.prefix = {'binderbox-' + hub_id!r}",
        f"c.BinderSwarmSpawner.mem_guarantee = {s.session_mem_guarantee!r}",
        f"c.BinderSwarmSpawner.mem_limit = {s.session_mem_limit!r}",
        f"c.BinderSwarmSpawner.cpu_limit = {float(s.session_cpu_limit)!r}",
        f"c.BinderSwarmSpawner.pids_limit = {s.session_pids_limit}",
        f"c.BinderSwarmSpawner.allow_origin = {s.session_allow_origin!r}",
        f"c.BinderSwarmSpawner.registry = {registry!r}",
        f"c.BinderSwarmSpawner.constraints = {s.swarm_constraints!r}",
        f"c.BinderSwarmSpawner.hub_container = {hub!r}",
        f"c.BinderSwarmSpawner.proxy_container = {proxy!r}",
    ]
    return "\n".join(lines) + "\n"


class SwarmBackend:
    """JupyterHub + configurable-http-proxy as containers on the Swarm manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).expanduser().resolve() / "swarm"
        self.hub_id = hub_id_for(settings)
        self.hub_name = f"binderbox-hub-{self.hub_id}"
        self.proxy_name = f"binderbox-proxy-{self.hub_id}"
        self._token = ""
        self._launcher: Any = None

    # -- SessionBackend ---------------------------------------------------------------

    @property
    def owner(self) -> str:
        return self.hub_id

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.hub_port}/hub/api"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.sessions_port}/"

    @property
    def sessions_url(self) -> str:
        return (self.settings.sessions_public_url or self.public_url).rstrip("/") + "/"

    def client(self) -> HubClient:
        """A new API client with the binderbox service's token (close it when done)."""
        if not self._token:
            raise HubUnavailable("The hub is not running.")
        return HubClient(
            self.api_url,
            self._token,
            self.public_url,
            start_timeout=self.settings.session_start_timeout + 30,
            sessions_url=self.sessions_url,
        )

    def start(self, timeout: float = 120) -> None:
        client = _docker()
        swarm = client.info().get("Swarm", {})
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise BinderboxError(
                "Setting 'backend' is swarm, but this machine's dockerd is not a Swarm "
                "manager: run 'docker swarm init' (and join the workers) first."
            )
        if not self.settings.registry_url:
            raise BinderboxError(
                "Setting 'backend' is swarm, which needs 'registry_url' (and "
                "'registry_pull_url' when the nodes reach the registry at another address)."
            )
        try:
            image = ensure_hub_image(self.settings, client)
            self._remove_containers(client)
            _ensure_overlay(client, self.settings.swarm_network)
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            config = self.state_dir / "jupyterhub_config.py"
            config.write_text(
                render_hub_config(
                    self.settings, hub_id=self.hub_id, hub=self.hub_name, proxy=self.proxy_name
                )
            )
            self._token = os.urandom(32).hex()
            proxy_token = os.urandom(32).hex()
            labels = {LABEL_HUB: self.hub_id}
            client.containers.run(
                image,
                [
                    "configurable-http-proxy",
                    "--ip=0.0.0.0",
                    "--port=8000",
                    "--api-ip=0.0.0.0",
                    "--api-port=8001",
                    f"--default-target=http://{self.hub_name}:8081",
                    f"--error-target=http://{self.hub_name}:8081/hub/error",
                ],
                name=self.proxy_name,
                detach=True,
                network=self.settings.swarm_network,
                ports={"8000/tcp": ("127.0.0.1", self.settings.sessions_port)},
                environment={"CONFIGPROXY_AUTH_TOKEN": proxy_token},
                labels=labels,
                user="65534:65534",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
            )
            client.containers.run(
                image,
                ["jupyterhub", "-f", f"{_HUB_DATA}/jupyterhub_config.py"],
                name=self.hub_name,
                detach=True,
                network=self.settings.swarm_network,
                ports={"8081/tcp": ("127.0.0.1", self.settings.hub_port)},
                environment={
                    "CONFIGPROXY_AUTH_TOKEN": proxy_token,
                    "BINDERBOX_HUB_SERVICE_TOKEN": self._token,
                },
                volumes={
                    "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                    str(self.state_dir): {"bind": _HUB_DATA, "mode": "rw"},
                },
                labels=labels,
            )
            self._wait_until_up(client, timeout)
        except docker.errors.APIError as error:
            self.stop(keep_sessions=True)
            raise BinderboxError(
                f"The swarm backend could not start its hub and proxy: {error.explanation or error}"
            ) from None
        except BaseException:
            self.stop(keep_sessions=True)
            raise

    def stop(self, keep_sessions: bool = False) -> None:
        with contextlib.suppress(BinderboxError):
            client = _docker()
            self._remove_containers(client)
            if not keep_sessions:
                self._remove_sessions(client)
                (self.state_dir / "jupyterhub.sqlite").unlink(missing_ok=True)
        self._token = ""
        self._launcher = None

    def launcher(self) -> Any:
        from binderbox.launch.session import HubLauncher

        if self._launcher is None:
            self._launcher = HubLauncher(self.client())
        return self._launcher

    async def healthy(self) -> bool:
        return await self.launcher().healthy()

    def notes(self) -> list[str]:
        return [
            "Sessions run on Docker Swarm nodes, each on an overlay network of its own; "
            "the session firewall does not cover other nodes."
        ]

    def describe(self) -> dict[str, Any]:
        nodes = []
        with contextlib.suppress(BinderboxError, docker.errors.APIError):
            for node in _docker().nodes.list():
                nodes.append(
                    {
                        "name": node.attrs["Description"]["Hostname"],
                        "role": node.attrs["Spec"]["Role"],
                        "state": node.attrs["Status"]["State"],
                    }
                )
        return {
            "backend": "swarm",
            "spawner": "SwarmSpawner",
            "sessions": self.sessions_url,
            "nodes": nodes,
        }

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(BinderboxError, docker.errors.APIError):
            raw = _docker().containers.get(self.hub_name).logs(tail=lines)
            return raw.decode(errors="replace").strip()
        return ""

    # -- helpers ------------------------------------------------------------------------

    def _wait_until_up(self, client: docker.DockerClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"token {self._token}"}
        with httpx.Client(timeout=2, trust_env=False) as http:
            while True:
                for name in (self.hub_name, self.proxy_name):
                    container = client.containers.get(name)
                    if container.status in {"exited", "dead"}:
                        raise HubUnavailable(
                            f"The {name} container stopped while starting.",
                            log_tail=container.logs(tail=20).decode(errors="replace"),
                        )
                with contextlib.suppress(httpx.HTTPError):
                    hub = http.get(f"{self.api_url}/", headers=headers)
                    proxied = http.get(f"{self.public_url}hub/api/")
                    if hub.status_code == 200 and proxied.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise HubUnavailable(
                        f"The swarm hub did not answer within {timeout:g} s.",
                        log_tail=self.log_tail(),
                    )
                time.sleep(0.3)

    def _remove_containers(self, client: docker.DockerClient) -> None:
        for name in (self.hub_name, self.proxy_name):
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(name).remove(force=True)

    def _remove_sessions(self, client: docker.DockerClient) -> None:
        label = f"{LABEL_HUB}={self.hub_id}"
        for service in client.services.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()
        deadline = time.monotonic() + 30
        while networks := client.networks.list(filters={"label": [label, LABEL_NETWORK]}):
            for network in networks:
                # APIError: its last endpoint on a node is still going; tried again below.
                with contextlib.suppress(docker.errors.APIError):
                    network.remove()
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)


def _ensure_overlay(client: docker.DockerClient, name: str) -> None:
    found = [n for n in client.networks.list(names=[name]) if n.name == name]
    if found:
        attrs = found[0].attrs
        if attrs.get("Driver") != "overlay" or not attrs.get("Attachable"):
            raise BinderboxError(
                f"The Docker network '{name}' is not an attachable overlay network; remove "
                "it or set 'swarm_network' to another name."
            )
        return
    client.networks.create(
        name, driver="overlay", attachable=True, labels={"binderbox.role": "swarm-hub"}
    )


def _docker() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException:
        raise DockerUnavailable(
            "The Docker daemon cannot be reached; the swarm backend needs the manager's dockerd."
        ) from None
    return client
