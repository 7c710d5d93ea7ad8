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
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
import httpx
from docker.types import ContainerSpec, EndpointSpec, Placement, RestartPolicy, TaskTemplate
from dockerspawner import SwarmSpawner
from traitlets import Unicode, default

from binderbox.config import Settings, build_nodes
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
# Label of the pre-pull jobs.
LABEL_PREPULL = "binderbox.prepull"
# Label of the node guard service (the session firewall on every node, nodeguard.py).
LABEL_GUARD = "binderbox.guard"
# Seconds a node keeps its guard label after its guard stopped running.
GUARD_GRACE = 60.0
# Seconds serve's start waits for a first guarded node.
GUARD_START_TIMEOUT = 600.0
# The bridge BuildKit's steps use on a build node's dockerd (its default bridge).
BUILD_BRIDGE = "docker0"

logger = logging.getLogger("binderbox.swarm")


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
    guard_label = Unicode(
        "",
        config=True,
        help="Node label that says the session firewall is in place on a node; when set, "
        "sessions run only on nodes labelled with it (empty: the firewall is off).",
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

    @default("network_name")
    def _network_name_default(self) -> str:
        # Also after a hub restart, when the spawner is made from the database.
        return self.session_network

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
        if self.guard_label:
            # Fail closed: only where the node guard has put the firewall rules in place.
            await self._check_guarded_nodes()
            constraints.append(f"node.labels.{self.guard_label}==on")
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

    async def _check_guarded_nodes(self) -> None:
        nodes = await self.docker("nodes")
        if not any(
            (node["Spec"].get("Labels") or {}).get(self.guard_label) == "on"
            and node.get("Status", {}).get("State") == "ready"
            for node in nodes
        ):
            raise _spawn_error(
                "No Swarm node has the session firewall in place (binderbox's node guard "
                "runs on none that is up), so sessions cannot start; see the operator's "
                "status page.",
                reason="firewall",
                status=503,
            )

    async def _guard_runs_on(self, node: str) -> bool:
        # The guard service is named after the spawner's prefix (SwarmBackend.guard_name).
        filters = {"service": f"{self.prefix}-guard", "node": node, "desired-state": "running"}
        try:
            tasks = await self.docker("tasks", filters=filters)
        except docker.errors.APIError:
            return False
        return any(t["Status"]["State"] == "running" for t in tasks)

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
                if self.guard_label and not await self._guard_runs_on(node):
                    # The label lags a guard that stopped a moment ago: do not stay there.
                    raise _spawn_error(
                        f"The node {await self._node_name(node)} has no session firewall in "
                        "place right now; the session was not started there.",
                        reason="firewall",
                    )
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

    async def poll(self) -> Any:
        """Stopped when Swarm says so, and also when the session's node is down: Swarm
        keeps reporting a task of a lost node as running, and the hub would count (and
        proxy to) a session that is gone with its machine. A stopped session's service
        and network are removed here: the hub calls stop() only on servers it thinks run."""
        status = await self._poll_status()
        if status is not None and self.remove and self.object_id:
            await self.remove_object()
        return status

    async def _poll_status(self) -> Any:
        task = await self.get_task()
        if task and task["Status"]["State"] == "running" and task.get("NodeID"):
            try:
                node = await self.docker("inspect_node", task["NodeID"])
            except docker.errors.NotFound:
                node = {"Status": {"State": "unknown"}}
            except docker.errors.APIError:
                return None  # the manager is busy: judge at the next poll
            state = node.get("Status", {}).get("State", "unknown")
            if state != "ready":
                self.log.warning(
                    "Session %s is lost: its node %s is %s.",
                    self.service_name,
                    node.get("Description", {}).get("Hostname", task["NodeID"][:12]),
                    state,
                )
                return f"node {state}"
        return await super().poll()

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


def guarded(settings: Settings) -> bool:
    """Whether sessions need the node guard: on a Swarm "auto" means "required", since
    binderbox cannot see from the manager whether a node may go without."""
    return settings.session_firewall != "off"


def guard_label_for(hub_id: str) -> str:
    """The node label the node guard's nodes get (``on``), one per deployment."""
    return f"binderbox-guard-{hub_id}"


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
        # iptables for the node guard (nodeguard.py), which runs from this image.
        "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends iptables"
        " && rm -rf /var/lib/apt/lists/*",
        "COPY binderbox /opt/binderbox-src",
        "RUN npm install -g --no-audit --no-fund --loglevel=error configurable-http-proxy@5",
        # binderbox itself (its spawner) and its dependencies, into the venv of JupyterHub.
        "RUN uv pip install --python /srv/venv/bin/python '/opt/binderbox-src[postgres]'",
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
    _remove_old_hub_images(client, keep=name)
    return name


def _remove_old_hub_images(client: docker.DockerClient, keep: str) -> None:
    """Each binderbox version (or source change) makes a hub image of about 1 GB; the
    ones no container uses any more go (dockerd refuses to remove one a container uses,
    e.g. another deployment's hub)."""
    try:
        images = client.images.list(name=HUB_REPOSITORY)
    except docker.errors.APIError:
        return
    for image in images:
        for tag in image.tags:
            if tag != keep and tag.startswith(f"{HUB_REPOSITORY}:"):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(tag)


def render_hub_config(settings: Settings, *, hub_id: str, hub: str, proxy: str) -> str:
    """The jupyterhub_config.py of the hub container (pure; tokens come from its env)."""
    from binderbox.launch.hub import HUB_DB_URL_ENV, SERVICE_NAME, culler_and_roles
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
        (
            f"c.JupyterHub.db_url = os.environ[{HUB_DB_URL_ENV!r}]"
            if s.database_url
            else f"c.JupyterHub.db_url = 'sqlite:///{_HUB_DATA}/jupyterhub.sqlite'"
        ),
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
        f"c.BinderSwarmSpawner.guard_label = {guard_label_for(hub_id) if guarded(s) else ''!r}",
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
        # Node id → images a pre-pull job finished on there (this process's knowledge).
        self._prepulled: dict[str, set[str]] = {}
        self._stopping = threading.Event()
        self._prepuller: threading.Thread | None = None
        self._guarder: threading.Thread | None = None
        self.guard_name = f"binderbox-{self.hub_id}-guard"
        self.guard_label = guard_label_for(self.hub_id)
        # Node id → when its guard was last seen not running (for GUARD_GRACE).
        self._unguarded_since: dict[str, float] = {}

    # -- SessionBackend ---------------------------------------------------------------

    @property
    def owner(self) -> str:
        return self.hub_id

    def build_node_problem(self, node_id: str) -> str | None:
        """Why a build may not run on the Swarm node ``node_id`` (a build node's), or None:
        with the firewall on, only a node whose guard runs (labelled) is fit."""
        if not guarded(self.settings):
            return None
        if not node_id:
            return "it is not a node of this Swarm, so no node guard covers its builds"
        try:
            node = docker.from_env(timeout=30).nodes.get(node_id)
        except docker.errors.NotFound:
            return "it is not a node of this Swarm, so no node guard covers its builds"
        except docker.errors.DockerException as error:
            return f"the Swarm manager did not say whether it is guarded ({error})"
        if (node.attrs["Spec"].get("Labels") or {}).get(self.guard_label) != "on":
            return "its node guard (the build firewall) is not running"
        return None

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
        hub_env = self._database_env()
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
                    **hub_env,
                },
                volumes={
                    "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                    str(self.state_dir): {"bind": _HUB_DATA, "mode": "rw"},
                },
                labels=labels,
            )
            self._join_session_networks(client)
            if guarded(self.settings):
                # A node's first guard pulls the hub image from the registry: give it time.
                self._start_guard(client, image, max(timeout, GUARD_START_TIMEOUT))
            else:
                self._remove_guard(client)
            self._wait_until_up(client, timeout)
        except docker.errors.APIError as error:
            self.stop(keep_sessions=True)
            raise BinderboxError(
                f"The swarm backend could not start its hub and proxy: {error.explanation or error}"
            ) from None
        except BaseException:
            self.stop(keep_sessions=True)
            raise
        self._stopping.clear()
        if guarded(self.settings):
            self._guarder = threading.Thread(
                target=self._guard_loop, name="binderbox-node-guard", daemon=True
            )
            self._guarder.start()
        if self.settings.swarm_prepull_every and (
            self.settings.swarm_prepull_top or self.settings.swarm_prepull_images
        ):
            self._prepuller = threading.Thread(
                target=self._prepull_loop, name="binderbox-prepull", daemon=True
            )
            self._prepuller.start()

    def stop(self, keep_sessions: bool = False) -> None:
        self._stopping.set()
        for thread in (self._prepuller, self._guarder):
            if thread is not None:
                thread.join(timeout=5)
        self._prepuller = self._guarder = None
        with contextlib.suppress(BinderboxError):
            client = _docker()
            self._remove_containers(client)
            label = [f"{LABEL_HUB}={self.hub_id}", LABEL_PREPULL]
            for job in client.services.list(filters={"label": label}):
                with contextlib.suppress(docker.errors.APIError):
                    job.remove()
            if not keep_sessions:
                # Sessions first, then the firewall that guarded them (the guard's tasks
                # take their rules off as they stop).
                self._remove_sessions(client)
                self._remove_guard(client)
                # Its users' servers are gone: a fresh hub database for the next start.
                (self.state_dir / "jupyterhub.sqlite").unlink(missing_ok=True)
                if self.settings.database_url:
                    from binderbox.state_postgres import reset_hub_database

                    reset_hub_database(self.settings.database_url)
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
        if not guarded(self.settings):
            firewall = "the session firewall is off (session_firewall = off)"
        else:
            firewall = (
                f"the session firewall is set on each node by the Swarm service "
                f"{self.guard_name}, and sessions run only on nodes where it runs"
            )
        return [
            f"Sessions run on Docker Swarm nodes, each on an overlay network of its own; "
            f"{firewall}."
        ]

    def describe(self) -> dict[str, Any]:
        """The backend and its nodes: each node's state, its running sessions and the
        session images on it (those its sessions run and those pre-pulled there)."""
        nodes: list[dict[str, Any]] = []
        with contextlib.suppress(BinderboxError, docker.errors.APIError):
            client = _docker()
            sessions: dict[str, int] = {}
            images: dict[str, set[str]] = {}
            for task in self._tasks(client):
                node, image = task.get("NodeID", ""), self._short_image(task)
                if task["Status"]["State"] != "running" or not node:
                    continue
                if task["_session"]:
                    sessions[node] = sessions.get(node, 0) + 1
                    images.setdefault(node, set()).add(image)
            for node in client.nodes.list():
                attrs = node.attrs
                labels = attrs["Spec"].get("Labels") or {}
                nodes.append(
                    {
                        "name": attrs["Description"]["Hostname"],
                        "role": attrs["Spec"]["Role"],
                        "state": attrs["Status"]["State"],
                        "availability": attrs["Spec"].get("Availability", ""),
                        "sessions": sessions.get(node.id, 0),
                        "firewall": (
                            "on"
                            if labels.get(self.guard_label) == "on"
                            else ("off" if guarded(self.settings) else "off (not wanted)")
                        ),
                        "images": " ".join(
                            sorted(images.get(node.id, set()) | self._prepulled.get(node.id, set()))
                        ),
                    }
                )
        return {
            "backend": "swarm",
            "spawner": "SwarmSpawner",
            "sessions": self.sessions_url,
            "nodes": nodes,
        }

    # -- the node guard: the session firewall on every node -------------------------------

    def _start_guard(self, client: docker.DockerClient, image: str, timeout: float) -> None:
        """Run the node guard (nodeguard.py) on every node sessions may use, from the hub
        image in the registry, and wait until it guards at least one ready node. A guard
        that runs already with this image and these rules is kept (no unguarded gap
        across a restart)."""
        from binderbox.launch.nodeguard import HOST_CGROUP, READY_FILE
        from binderbox.registry import RegistryImageStore

        store = RegistryImageStore(self.settings)
        if not store.exists(image):
            store.push(image)
        reference = store.reference(image)
        command = [
            "python",
            "-m",
            "binderbox.launch.nodeguard",
            self.hub_id,
            self.settings.session_blocked_networks,
        ]
        mounts = []
        if build_nodes(self.settings):
            # Builds run on the nodes' BuildKit too: their firewall and their limits.
            command.append(BUILD_BRIDGE)
            command += [self.settings.build_memory_limit, str(self.settings.build_pids_limit)]
            mounts.append(docker.types.Mount(HOST_CGROUP.as_posix(), "/sys/fs/cgroup", type="bind"))
        constraints = [c.strip() for c in self.settings.swarm_constraints.split(",") if c.strip()]
        with contextlib.suppress(docker.errors.NotFound):
            running = client.services.get(self.guard_name)
            spec = running.attrs["Spec"]["TaskTemplate"]
            same = (
                spec["ContainerSpec"]["Image"].split("@", 1)[0] == reference
                and spec["ContainerSpec"].get("Args") == command
                and (spec.get("Placement") or {}).get("Constraints") == (constraints or None)
            )
            if same:
                self._wait_guarded(client, time.monotonic() + timeout)
                return
            running.remove()
        second = 1_000_000_000
        client.services.create(
            reference,
            args=command,
            name=self.guard_name,
            labels={LABEL_HUB: self.hub_id, LABEL_GUARD: "1"},
            mode=docker.types.ServiceMode("global"),
            networks=["host"],
            user="0:0",
            cap_add=["NET_ADMIN", "NET_RAW"],
            mounts=mounts,
            constraints=constraints or None,
            # Swarm calls a task running only once it is healthy: once the rules are set.
            healthcheck=docker.types.Healthcheck(
                test=["CMD", "test", "-f", str(READY_FILE)],
                interval=second,
                timeout=5 * second,
                retries=3,
                start_period=30 * second,
            ),
            restart_policy=RestartPolicy(condition="any", delay=5 * second),
            resources=docker.types.Resources(cpu_limit=int(0.2e9), mem_limit=256 * 1024**2),
        )
        self._wait_guarded(client, time.monotonic() + timeout)

    def _wait_guarded(self, client: docker.DockerClient, deadline: float) -> None:
        """Label the guarded nodes until every ready node with a guard task is guarded;
        past the deadline, go on if one is (the others join as their guard comes up) and
        fail in one sentence if none is."""
        while True:
            guarded_nodes, problems = self._sync_guard_labels(client)
            if guarded_nodes and not problems:
                return
            if time.monotonic() > deadline:
                if guarded_nodes:
                    for node, problem in problems.items():
                        logger.warning("The node guard is not up on %s: %s", node, problem)
                    return
                detail = "; ".join(f"{n}: {p}" for n, p in problems.items()) or "no node for it"
                raise BinderboxError(
                    "The session firewall could not be put in place on any Swarm node "
                    f"({detail}); set 'session_firewall' to off only if sessions may reach "
                    "the nodes and their networks."
                )
            time.sleep(0.5)

    def _sync_guard_labels(self, client: docker.DockerClient) -> tuple[set[str], dict[str, str]]:
        """Label ``on`` the nodes whose guard task runs (healthy), take the label off the
        others once their guard has not run for GUARD_GRACE seconds. Returns the guarded
        node ids and, per ready node whose guard is not running yet, what its task says."""
        try:
            service = client.services.get(self.guard_name)
        except docker.errors.NotFound:
            tasks: list[dict[str, Any]] = []
        else:
            tasks = service.tasks(filters={"desired-state": "running"})
        running = {t["NodeID"] for t in tasks if t["Status"]["State"] == "running"}
        guarded_nodes: set[str] = set()
        problems: dict[str, str] = {}
        now = time.monotonic()
        for node in client.nodes.list():
            attrs = node.attrs
            spec = attrs["Spec"]
            labels = dict(spec.get("Labels") or {})
            ready = attrs["Status"]["State"] == "ready"
            on = node.id in running and ready
            if on:
                guarded_nodes.add(node.id)
                self._unguarded_since.pop(node.id, None)
            else:
                since = self._unguarded_since.setdefault(node.id, now)
                if labels.get(self.guard_label) == "on" and now - since < GUARD_GRACE:
                    # Swarm stops a node's sessions once it no longer matches their
                    # constraints: a guard restarting (or a node's blip) must not do that.
                    # New sessions are kept off meanwhile by the spawner's own check.
                    on = True
            if ready and node.id not in running:
                mine = [t for t in tasks if t.get("NodeID") == node.id]
                if mine:
                    status = mine[0]["Status"]
                    problems[attrs["Description"]["Hostname"]] = (
                        f"{status['State']}: {status.get('Err') or status.get('Message', '')}"
                    )
            if (labels.get(self.guard_label) == "on") != on:
                if on:
                    labels[self.guard_label] = "on"
                else:
                    labels.pop(self.guard_label, None)
                # APIError: the node changed meanwhile (its version); the next round retries.
                with contextlib.suppress(docker.errors.APIError):
                    node.update({**spec, "Labels": labels})
        return guarded_nodes, problems

    def _guard_loop(self) -> None:
        """Keep the node labels in step with the guard's tasks (a node that joins gets
        sessions once its guard runs; one whose guard stops gets no more)."""
        while not self._stopping.wait(2):
            try:
                self._sync_guard_labels(_docker())
            except (BinderboxError, docker.errors.APIError) as error:
                logger.warning("Checking the node guard failed: %s", error)

    def _remove_guard(self, client: docker.DockerClient) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            client.services.get(self.guard_name).remove()
        for node in client.nodes.list():
            spec = node.attrs["Spec"]
            labels = dict(spec.get("Labels") or {})
            if labels.pop(self.guard_label, None) is not None:
                with contextlib.suppress(docker.errors.APIError):
                    node.update({**spec, "Labels": labels})

    # -- pre-pulling ---------------------------------------------------------------------

    def prepull(self, images: list[str], timeout: float = 900) -> dict[str, set[str]]:
        """Pull each image (binderbox names) onto every ready node sessions may run on,
        with a Swarm global job per image that runs ``true`` from it, locked down like a
        session (no network, no capabilities, nobody's uid). Returns image → the node ids
        it is on now. Blocking; a job that fails on a node leaves that node out."""
        client = _docker()
        registry = self._registry_prefix()
        done: dict[str, set[str]] = {}
        jobs = {image: self._start_prepull(client, registry + image) for image in images}
        deadline = time.monotonic() + timeout
        try:
            for image, service in jobs.items():
                done[image] = self._wait_prepull(client, service, deadline)
                for node in done[image]:
                    self._prepulled.setdefault(node, set()).add(image)
        finally:
            for service in jobs.values():
                with contextlib.suppress(docker.errors.APIError):
                    service.remove()
        return done

    def prepull_wanted(self, client: docker.DockerClient | None = None) -> list[str]:
        """What to pre-pull now: the images named in swarm_prepull_images, then the
        swarm_prepull_top images with the most sessions running, leaving out those every
        ready node has already."""
        s = self.settings
        client = client or _docker()
        counts: dict[str, int] = {}
        for task in self._tasks(client):
            if task["_session"] and task["Status"]["State"] == "running":
                image = self._short_image(task)
                counts[image] = counts.get(image, 0) + 1
        popular = sorted(counts, key=lambda image: -counts[image])[: s.swarm_prepull_top]
        named = [name.strip() for name in s.swarm_prepull_images.split(",") if name.strip()]
        ready = {
            node.id
            for node in client.nodes.list(filters={"role": "worker"})
            if node.attrs["Status"]["State"] == "ready"
        }
        wanted = []
        for image in dict.fromkeys([*named, *popular]):
            have = {node for node, images in self._prepulled.items() if image in images}
            if not ready <= have:
                wanted.append(image)
        return wanted

    def _registry_prefix(self) -> str:
        from binderbox.registry import registry_address

        s = self.settings
        return registry_address(s.registry_pull_url or s.registry_url) + "/"

    def _start_prepull(self, client: docker.DockerClient, reference: str) -> Any:
        name = (
            f"binderbox-{self.hub_id}-prepull-{hashlib.sha256(reference.encode()).hexdigest()[:10]}"
        )
        with contextlib.suppress(docker.errors.NotFound):
            client.services.get(name).remove()  # a leftover of a stopped process
        constraints = [c.strip() for c in self.settings.swarm_constraints.split(",") if c.strip()]
        return client.services.create(
            reference,
            command=["true"],
            name=name,
            labels={LABEL_HUB: self.hub_id, LABEL_PREPULL: "1"},
            mode=docker.types.ServiceMode("global-job"),
            user="65534:65534",
            cap_drop=["ALL"],
            constraints=constraints or None,
            restart_policy=RestartPolicy(condition="none"),
            resources=docker.types.Resources(cpu_limit=int(0.5e9), mem_limit=128 * 1024**2),
        )

    def _wait_prepull(self, client: docker.DockerClient, service: Any, deadline: float) -> set[str]:
        """The nodes where the job's task completed, once none on a ready node is still on
        its way (a node that is down would keep its task waiting)."""
        final = {"complete", "failed", "rejected", "shutdown", "orphaned", "remove"}
        while not self._stopping.is_set() and time.monotonic() < deadline:
            ready = {
                node.id for node in client.nodes.list() if node.attrs["Status"]["State"] == "ready"
            }
            tasks = service.tasks()
            waiting = [
                t for t in tasks if t["Status"]["State"] not in final and t.get("NodeID") in ready
            ]
            if tasks and not waiting:
                break
            time.sleep(0.5)
        return {t["NodeID"] for t in service.tasks() if t["Status"]["State"] == "complete"}

    def _prepull_loop(self) -> None:
        """Every swarm_prepull_every seconds, pre-pull what prepull_wanted names."""
        every = self.settings.swarm_prepull_every
        while not self._stopping.wait(every):
            try:
                wanted = self.prepull_wanted()
                if wanted:
                    self.prepull(wanted)
            except (BinderboxError, docker.errors.APIError) as error:
                # Next round tries again; launches pull for themselves meanwhile.
                logger.warning("Pre-pulling session images failed: %s", error)

    def _tasks(self, client: docker.DockerClient) -> list[dict[str, Any]]:
        """The running tasks of this deployment's session services (``_session`` True)."""
        found = []
        label = f"{LABEL_HUB}={self.hub_id}"
        for service in client.services.list(filters={"label": label}):
            is_session = LABEL_SESSION in service.attrs["Spec"].get("Labels", {})
            for task in service.tasks(filters={"desired-state": "running"}):
                found.append({**task, "_session": is_session})
        return found

    def _short_image(self, task: dict[str, Any]) -> str:
        """A task's image as binderbox names it (no registry, no digest)."""
        image = task["Spec"]["ContainerSpec"]["Image"].split("@", 1)[0]
        return image.rsplit("/", 1)[-1]

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(BinderboxError, docker.errors.APIError):
            raw = _docker().containers.get(self.hub_name).logs(tail=lines)
            return raw.decode(errors="replace").strip()
        return ""

    # -- helpers ------------------------------------------------------------------------

    def _database_env(self) -> dict[str, str]:
        """With database_url, the hub's own database on that server (made if missing),
        which the hub container must reach: a loopback address would be its own."""
        url = self.settings.database_url
        if not url:
            return {}
        from binderbox.launch.hub import HUB_DB_URL_ENV
        from binderbox.service.public import is_loopback
        from binderbox.state_postgres import ensure_hub_database

        host = urlsplit(url).hostname or ""
        if not host or is_loopback(host):
            raise BinderboxError(
                "Setting 'backend' is swarm and 'database_url' names PostgreSQL on "
                f"{host or 'a local socket'}, which the hub's container cannot reach: use an "
                "address of the database server that containers reach (e.g. the Swarm "
                "network's gateway, with PostgreSQL listening there)."
            )
        return {HUB_DB_URL_ENV: ensure_hub_database(url)}

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

    def _join_session_networks(self, client: docker.DockerClient) -> None:
        """Attach new hub and proxy containers to the networks of sessions that outlived
        the last ones (a restart): only there can the proxy reach them."""
        label = [f"{LABEL_HUB}={self.hub_id}", LABEL_NETWORK]
        for network in client.networks.list(filters={"label": label}):
            for container in (self.hub_name, self.proxy_name):
                with contextlib.suppress(docker.errors.APIError):
                    network.connect(container)

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
