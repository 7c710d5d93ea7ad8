"""JupyterHub as a managed subprocess: config, start, health, clean stop.

The hub starts configurable-http-proxy and the idle culler itself (as a hub-managed
service) and stops both, and every session container, when it stops. Everything listens
on 127.0.0.1. The hub's state (database, config, log, lock) lives in ``state_dir``;
sessions are throwaway, so each start begins with an empty database.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import docker
import docker.errors
import httpx

from binderbox.config import Settings
from binderbox.errors import BinderboxError, DockerUnavailable
from binderbox.launch.client import HubClient, HubUnavailable
from binderbox.launch.firewall import FirewallStatus, bridge_name, guard
from binderbox.launch.options import LABEL_HUB
from binderbox.launch.proxy import ProxyUnavailable, find_proxy

# The hub reads the binderbox service's token from here, so it is never written to disk.
SERVICE_TOKEN_ENV = "BINDERBOX_HUB_SERVICE_TOKEN"
# ... and its PostgreSQL database URL (with database_url), which may carry a password.
HUB_DB_URL_ENV = "BINDERBOX_HUB_DB_URL"
SERVICE_NAME = "binderbox"
# What the binderbox service may do: create and delete users, start and stop servers
# (which includes reading their progress).
SERVICE_SCOPES = ("admin:users", "servers")
CULLER_SCOPES = (
    "list:users",
    "read:users:activity",
    "read:servers",
    "delete:servers",
    "admin:users",
)
CONFIG_FILE = "jupyterhub_config.py"
LOG_FILE = "jupyterhub.log"
LOCK_FILE = "hub.lock"
DB_FILE = "jupyterhub.sqlite"
PROXY_PID_FILE = "proxy.pid"
PROXY_CHECK_SECONDS = 2
# Processes the hub starts in its state directory (and stops, unless it is killed).
_HUB_HELPERS = (b"configurable-http-proxy", b"jupyterhub_idle_culler")


class HubAlreadyRunning(BinderboxError):
    """Another hub holds the lock on this state directory."""


def hub_id_for(state_dir: Path) -> str:
    """A short id of the hub of one state directory, put on its containers as a label."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


def culler_and_roles(settings: Settings, python: str) -> tuple[list[dict], list[dict]]:
    """The hub's idle-culler service (run by ``python``; none when idle culling is off) and
    the roles of binderbox's service and the culler, for either kind of hub."""
    s = settings
    culler = []
    if s.cull_idle_timeout > 0:
        culler = [
            {
                "name": "idle-culler",
                "command": [
                    python,
                    "-m",
                    "jupyterhub_idle_culler",
                    f"--timeout={s.cull_idle_timeout}",
                    f"--cull-every={s.cull_every}",
                    f"--max-age={s.cull_max_age}",
                    # Binder users exist for one session only.
                    "--cull-users=True",
                ],
            }
        ]
    roles = [{"name": SERVICE_NAME, "scopes": list(SERVICE_SCOPES), "services": [SERVICE_NAME]}]
    if culler:
        roles.append(
            {"name": "idle-culler", "scopes": list(CULLER_SCOPES), "services": ["idle-culler"]}
        )
    return culler, roles


def render_config(settings: Settings, *, state_dir: Path, proxy: Path, hub_id: str) -> str:
    """The jupyterhub_config.py for these settings (pure; secrets come from the env)."""
    s = settings
    culler, roles = culler_and_roles(s, sys.executable)
    # The hub learns about traffic from the proxy only this often, so it must poll at least
    # as often as the culler looks, or active sessions would seem idle.
    activity_interval = max(1, min(s.cull_every, 300))
    lines = [
        f'"""JupyterHub configuration written by binderbox (hub {hub_id}); rewritten on every'
        ' start."""',
        "import os",
        "",
        "c = get_config()  # noqa: F821",
        f"c.JupyterHub.bind_url = {f'http://127.0.0.1:{s.sessions_port}/'!r}",
        f"c.JupyterHub.hub_bind_url = {f'http://127.0.0.1:{s.hub_port}/'!r}",
        f"c.ConfigurableHTTPProxy.api_url = {f'http://127.0.0.1:{s.proxy_api_port}'!r}",
        f"c.ConfigurableHTTPProxy.command = {[str(proxy)]!r}",
        f"c.ConfigurableHTTPProxy.pid_file = {str(state_dir / PROXY_PID_FILE)!r}",
        f"c.JupyterHub.pid_file = {str(state_dir / 'jupyterhub.pid')!r}",
        f"c.JupyterHub.db_url = os.environ[{HUB_DB_URL_ENV!r}]"
        if s.database_url
        else f"c.JupyterHub.db_url = {'sqlite:///' + str(state_dir / DB_FILE)!r}",
        f"c.JupyterHub.cookie_secret_file = {str(state_dir / 'jupyterhub_cookie_secret')!r}",
        # Sessions outlive a restart of the hub; binderbox removes them itself when the
        # whole service stops (ManagedHub.stop(keep_sessions=False)).
        "c.JupyterHub.cleanup_servers = False",
        # Answer a spawn request after 1 s at most, so the rest is told as progress events;
        # bad options still fail the request itself (they are checked within that second).
        "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 1}",
        "c.JupyterHub.cleanup_proxy = True",
        # The hub starts the proxy again this soon after it dies, and gives it its routes.
        f"c.ConfigurableHTTPProxy.check_running_interval = {PROXY_CHECK_SECONDS}",
        f"c.JupyterHub.last_activity_interval = {activity_interval}",
        # Nobody logs in: users are made and removed through the API by binderbox.
        "c.JupyterHub.authenticator_class = 'null'",
        "c.JupyterHub.spawner_class = 'binderbox.launch.spawner.BinderSpawner'",
        "c.JupyterHub.services = [",
        f"    {{'name': {SERVICE_NAME!r}, 'api_token': os.environ[{SERVICE_TOKEN_ENV!r}]}},",
        *(f"    {service!r}," for service in culler),
        "]",
        f"c.JupyterHub.load_roles = {roles!r}",
        f"c.Spawner.start_timeout = {s.session_start_timeout}",
        f"c.Spawner.http_timeout = {s.session_start_timeout}",
        f"c.BinderSpawner.image_prefix = {s.image_prefix!r}",
        f"c.BinderSpawner.hub_label = {hub_id!r}",
        f"c.BinderSpawner.mem_guarantee = {s.session_mem_guarantee!r}",
        f"c.BinderSpawner.mem_limit = {s.session_mem_limit!r}",
        f"c.BinderSpawner.cpu_limit = {float(s.session_cpu_limit)!r}",
        f"c.BinderSpawner.pids_limit = {s.session_pids_limit}",
        f"c.BinderSpawner.allow_origin = {s.session_allow_origin!r}",
        f"c.BinderSpawner.kernel_oom_score_adj = {s.session_kernel_oom_score_adj}",
        # Sessions sit on their own network, isolated from each other; the proxy still
        # reaches each one through its port published on 127.0.0.1.
        f"c.BinderSpawner.network_name = {s.session_network!r}",
        "c.BinderSpawner.use_internal_ip = False",
    ]
    return "\n".join(lines) + "\n"


class ManagedHub:
    """One JupyterHub (with its proxy and culler) for one state directory.

    ``start()`` blocks until the hub answers through the proxy; ``stop()`` ends it, its
    proxy and every session container it started. Use as a context manager, or call
    ``start``/``stop`` (from async code, through ``asyncio.to_thread``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).expanduser().resolve()
        self.hub_id = hub_id_for(self.state_dir)
        self._token = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._log: IO[bytes] | None = None
        # Set by start() when it stopped a hub a killed binderbox left (one sentence).
        self.took_over = ""
        # Whether the session firewall is in place (set by start()).
        self.firewall = FirewallStatus(False, "Session firewall: not set up yet.")

    @property
    def api_url(self) -> str:
        """The hub's REST API, e.g. ``http://127.0.0.1:8081/hub/api``."""
        return f"http://127.0.0.1:{self.settings.hub_port}/hub/api"

    @property
    def public_url(self) -> str:
        """The proxy on this machine, e.g. ``http://127.0.0.1:8000/``."""
        return f"http://127.0.0.1:{self.settings.sessions_port}/"

    @property
    def sessions_url(self) -> str:
        """Where people reach sessions: ``sessions_public_url``, else the proxy here."""
        return (self.settings.sessions_public_url or self.public_url).rstrip("/") + "/"

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

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

    def __enter__(self) -> ManagedHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> ManagedHub:
        """Start the hub and wait until it answers; raise a BinderboxError if it cannot."""
        if self._process is not None:
            raise HubAlreadyRunning("This hub is already started.")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Outside the clean-up below: when another hub holds the state directory, its
        # proxy, sessions and database are not ours to touch.
        self._lock()
        try:
            proxy = find_proxy(self.settings)
            if proxy is None:
                raise ProxyUnavailable(
                    "configurable-http-proxy is not installed: run "
                    "'python -m binderbox.launch' (./bootstrap test does) or set "
                    "'proxy_command'."
                )
            # The lock is ours, so a proxy or culler still running here lost its hub.
            self._stop_leftover_processes()
            self._check_ports()
            # Sessions a previous hub of this state directory left running are adopted:
            # the hub finds them through its database, routes them and culls them.
            self.guard_sessions()
            config = self.state_dir / CONFIG_FILE
            text = render_config(
                self.settings, state_dir=self.state_dir, proxy=proxy, hub_id=self.hub_id
            )
            config.write_text(text)
            config.chmod(0o600)
            self._token = os.urandom(32).hex()
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while it runs
            self._spawn()
            # A binderbox that exits without stop() must not leave the hub running.
            atexit.register(self.stop)
            self._wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def guard_sessions(self) -> FirewallStatus:
        """Make sure the session network exists and its firewall is in place (again: after
        dockerd restarted, or a binderbox killed before it could tidy up); idempotent."""
        network = ensure_session_network(_docker_client(), self.settings.session_network)
        self.firewall = guard(
            bridge_name(network),
            self.settings.session_blocked_networks,
            self.settings.session_firewall,
            who="sessions",
            setting="session_firewall",
            ipv6=bool(network.get("EnableIPv6")),
            owner=self.hub_id,
        )
        return self.firewall

    def _spawn(self) -> None:
        assert self._lock_fd is not None and self._log is not None
        self._process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.state_dir / CONFIG_FILE)],
            cwd=self.state_dir,
            env={**os.environ, SERVICE_TOKEN_ENV: self._token, **self._database_env()},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for binderbox reaches the hub via stop(), and
            # a binderbox killed outright leaves it serving the sessions until the next
            # start takes over (see _take_over_orphan).
            start_new_session=True,
            # The hub holds the lock too, so an orphaned hub still blocks a second one.
            pass_fds=(self._lock_fd,),
        )
        self._note_owner(f"JupyterHub pid {self._process.pid}, started by pid {os.getpid()}")

    def exited(self) -> int | None:
        """The hub's exit code once it has died (None while it runs or when not started)."""
        return self._process.poll() if self._process is not None else None

    def restart(self, timeout: float = 60) -> None:
        """Start the hub again after it died, with the same token, config and database:
        it finds its sessions in the database, starts a proxy and routes them again."""
        if self._process is None or self._log is None:
            raise HubUnavailable("The hub was not started, so it cannot be restarted.")
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        # Its proxy and culler outlive it; the new hub starts its own.
        self._stop_leftover_processes()
        self._wait_for_ports(timeout=10)
        self._spawn()
        self._wait_until_up(timeout)

    def proxy_pid(self) -> int | None:
        """The pid of the proxy the hub runs now (from its pid file), if it wrote one."""
        try:
            return int((self.state_dir / PROXY_PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 60, *, keep_sessions: bool = False) -> None:
        """Stop the hub and its proxy; remove its sessions too unless ``keep_sessions``
        (a restart: the next start on this state directory adopts them)."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._stop_leftover_processes()
        if not keep_sessions:
            with contextlib.suppress(BinderboxError):
                self._remove_containers(_docker_client())
            # Its users' servers are gone: a fresh database for the next start.
            for old in self.state_dir.glob(DB_FILE + "*"):
                old.unlink(missing_ok=True)
            if self.settings.database_url:
                from binderbox.state_postgres import reset_hub_database

                with contextlib.suppress(BinderboxError):
                    reset_hub_database(self.settings.database_url)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._token = ""
        self._unlock()

    def _database_env(self) -> dict[str, str]:
        """With database_url, the hub's own database on that server (made if missing)."""
        if not self.settings.database_url:
            return {}
        from binderbox.state_postgres import ensure_hub_database

        return {HUB_DB_URL_ENV: ensure_hub_database(self.settings.database_url)}

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _lock(self) -> None:
        path = self.state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if not self._take_over_orphan(fd, owner):
                os.close(fd)
                raise HubAlreadyRunning(
                    f"A binderbox hub is already running with the state directory "
                    f"{self.state_dir}{f' ({owner})' if owner else ''}. Stop it first, or "
                    "give this one another 'state_dir'."
                ) from None
        self._lock_fd = fd
        self._note_owner(f"started by pid {os.getpid()}")

    def _take_over_orphan(self, fd: int, owner: str, timeout: float = 40) -> bool:
        """When the lock is held by a hub whose binderbox was killed (it lives on, serving
        the sessions), stop it (SIGTERM: it keeps the sessions and stops its proxy) and
        take the lock; False when the holder is anything else, e.g. a running binderbox."""
        found = re.fullmatch(r"JupyterHub pid (\d+), started by pid (\d+)", owner)
        if not found:
            return False
        pid, parent = int(found[1]), int(found[2])
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = Path(os.readlink(proc / "cwd"))
            status = (proc / "status").read_text()
        except OSError:
            return False  # not a process we may look at: whoever it is, it is not ours
        ppid = re.search(r"^PPid:\s*(\d+)", status, re.MULTILINE)
        if b"jupyterhub" not in cmdline or cwd != self.state_dir:
            return False
        if ppid is not None and int(ppid[1]) == parent:
            return False  # its binderbox is alive: a second serve must not take over
        _end_process(pid, grace=timeout / 2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.1)
                continue
            self.took_over = (
                f"JupyterHub pid {pid}, left running by a binderbox that was killed (pid "
                f"{parent}), was stopped; its sessions are adopted."
            )
            return True
        return False

    def _note_owner(self, text: str) -> None:
        # Shown by a second hub that finds the lock taken.
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, text.encode(), 0)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _wait_for_ports(self, timeout: float) -> None:
        """Wait until a dead hub's and proxy's ports are free again (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._check_ports()
                return
            except HubUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _check_ports(self) -> None:
        s = self.settings
        for name, port in (
            ("sessions_port", s.sessions_port),
            ("hub_port", s.hub_port),
            ("proxy_api_port", s.proxy_api_port),
        ):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise HubUnavailable(
                        f"Port {port} on 127.0.0.1 ('{name}') is already in use."
                    ) from None

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"token {self._token}"}
        with httpx.Client(timeout=2, trust_env=False) as http:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise HubUnavailable(
                        f"JupyterHub stopped while starting (exit code "
                        f"{self._process.returncode}); see {self.log_path}.",
                        log_tail=self.log_tail(),
                    )
                try:
                    hub = http.get(f"{self.api_url}/", headers=headers)
                    proxied = http.get(f"{self.public_url}hub/api/")
                    if hub.status_code == 200 and proxied.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise HubUnavailable(
                        f"JupyterHub did not answer within {timeout:g} s; see {self.log_path}.",
                        log_tail=self.log_tail(),
                    )
                time.sleep(0.2)

    def _stop_leftover_processes(self) -> None:
        """End a proxy or culler that outlived a killed hub of this state directory.

        The hub stops both itself; they are found by their command and their working
        directory, which is this state directory.
        """
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if Path(os.readlink(proc / "cwd")) != self.state_dir:
                    continue
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(name in cmdline for name in _HUB_HELPERS):
                _end_process(int(proc.name))
        (self.state_dir / PROXY_PID_FILE).unlink(missing_ok=True)

    def _remove_containers(self, client: docker.DockerClient) -> None:
        """Remove the session containers of this state directory's hub, if any remain."""
        try:
            for container in client.containers.list(
                all=True, filters={"label": f"{LABEL_HUB}={self.hub_id}"}
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
        except docker.errors.APIError as error:
            raise DockerUnavailable(f"Docker could not list session containers: {error}") from None


def _end_process(pid: int, grace: float = 5) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; return once it has exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                status = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            if status.rsplit(")", 1)[-1].split()[0] == "Z":  # exited, not yet reaped
                return
            time.sleep(0.05)


# Docker's bridge driver option that, set to "false", drops traffic between containers.
_ICC = "com.docker.network.bridge.enable_icc"


def ensure_session_network(client: docker.DockerClient, name: str) -> dict:
    """Make sure the bridge network ``name`` exists with traffic between containers off and
    no IPv6 (refuse one that lets containers talk to each other or has IPv6: the session
    firewall's blocked networks are IPv4); return its attributes."""
    for _ in range(2):
        found = [n for n in client.networks.list(names=[name]) if n.name == name]
        if found:
            network = found[0]
            network.reload()
            attrs = network.attrs
            if attrs.get("Driver") != "bridge" or attrs.get("Options", {}).get(_ICC) != "false":
                raise BinderboxError(
                    f"The Docker network '{name}' lets containers reach each other; remove "
                    f"it ('docker network rm {name}') so binderbox creates an isolated one, "
                    "or set 'session_network' to another name."
                )
            if attrs.get("EnableIPv6"):
                raise BinderboxError(
                    f"The Docker network '{name}' has IPv6 on, which the session firewall "
                    f"does not cover; remove it ('docker network rm {name}') so binderbox "
                    "creates one without IPv6, or set 'session_network' to another name."
                )
            return attrs
        try:
            client.networks.create(
                name,
                driver="bridge",
                options={_ICC: "false"},
                enable_ipv6=False,
                labels={"binderbox.role": "sessions"},
                check_duplicate=True,
            )
        except docker.errors.APIError as error:
            if error.status_code != 409:  # 409: another hub created it just now
                raise BinderboxError(
                    f"The Docker network '{name}' for sessions cannot be created: "
                    f"{error.explanation or error}"
                ) from None
    raise BinderboxError(f"The Docker network '{name}' for sessions cannot be found.")


def build_bridge_network() -> dict:
    """Docker's default bridge network (its attributes), where BuildKit runs build steps."""
    return _docker_client().networks.get("bridge").attrs


def build_bridge() -> str:
    """The host interface of Docker's default bridge, where BuildKit runs build steps."""
    return bridge_name(build_bridge_network())


def _docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException:
        raise DockerUnavailable(
            "The Docker daemon cannot be reached; sessions need a running dockerd."
        ) from None
    return client
