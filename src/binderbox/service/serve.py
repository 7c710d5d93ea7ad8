"""``binderbox serve``: JupyterHub, the proxy and the web service, started and stopped together."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import uvicorn

from binderbox.builder.backend import Builder, LocalBuilder
from binderbox.builder.nodes import NodeBuilder
from binderbox.config import Settings, build_nodes
from binderbox.errors import BinderboxError
from binderbox.images import open_image_store
from binderbox.launch.backend import LocalHubBackend, open_session_backend
from binderbox.launch.firewall import FirewallError, FirewallStatus, bridge_name, guard
from binderbox.launch.firewall import blocker as firewall_blocker
from binderbox.launch.firewall import remove as remove_guard
from binderbox.launch.hub import build_bridge_network
from binderbox.launch.supervisor import Supervisor
from binderbox.service.app import create_app
from binderbox.service.buildlimits import (
    BuildLimitStatus,
    apply_build_limits,
    lift_build_limits,
    limit_files,
)
from binderbox.service.public import base_url, public_hosts
from binderbox.state import open_state_store


class PortInUse(BinderboxError):
    """The service's port is taken (often: binderbox serve already runs)."""


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortInUse(
                f"{host}:{port} is already in use: is binderbox serve already running? "
                "Stop it, or choose another --port."
            ) from None


_FIREWALLS = ("session_firewall", "build_firewall")


def firewalls_for(settings: Settings) -> Settings:
    """The settings with the firewalls' modes this deployment needs: when other machines
    can reach binderbox, "auto" means "required", and a serve that cannot set the rules
    refuses to start (FirewallError) before it starts anything."""
    public = public_hosts(settings)
    wanted = [name for name in _FIREWALLS if getattr(settings, name) != "off"]
    if not public or not wanted:
        return settings
    reason = firewall_blocker()
    if reason:
        offs = " and ".join(f"{name} = off" for name in wanted)
        raise FirewallError(
            f"binderbox is reachable from other machines (at {public[0]}), so it refuses to "
            f"start without its firewalls, and {reason}: run binderbox serve as root, or set "
            f"{offs} only if something else keeps sessions and builds from this machine "
            "and private networks."
        )
    return settings.with_overrides(**{name: "required" for name in wanted})


def serve(settings: Settings, say: Callable[[str], None]) -> None:
    """Run everything until Ctrl-C (or SIGTERM), then stop the hub and its sessions.

    The seams are picked here from the settings (see ARCHITECTURE.md): the session
    backend, the image store, the state store; builds run on this machine.
    """
    settings = firewalls_for(settings)
    check_port_free(settings.service_host, settings.service_port)
    # Checked before anything starts: a wrong database or registry setting fails at once.
    images = open_image_store(settings)
    store = open_state_store(settings)
    hub = open_session_backend(settings)
    say("Starting JupyterHub and the proxy")
    try:
        hub.start()
    except BaseException:
        store.close()
        raise
    if isinstance(hub, LocalHubBackend) and hub.hub.took_over:
        say(hub.hub.took_over)
    for note in hub.notes():
        say(note)
    # The CPU-hour budget, for backends that can measure their sessions (see cpu_budget.py).
    cpu_budget = hub.cpu_budget(say) if hasattr(hub, "cpu_budget") else None
    if settings.session_cpu_seconds_max and cpu_budget is None:
        say("CPU budget: this session backend cannot measure sessions; none is enforced.")
    server: _Server | None = None
    supervisor: Supervisor | None = None
    builds = FirewallStatus(False, "")
    limits = BuildLimitStatus(False, "")
    # uvicorn hands the signal that stopped it back to the previous handler once it has
    # shut down; without one of ours, SIGTERM would end the process before the cleanup.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        network = build_bridge_network()
        bridge = bridge_name(network)
        builds = guard(
            bridge,
            settings.session_blocked_networks,
            settings.build_firewall,
            who="builds",
            setting="build_firewall",
            ipv6=bool(network.get("EnableIPv6")),
            owner=hub.owner,
        )
        say(builds.message)
        limits = _reconcile_build_limits(settings)
        say(limits.message)
        if cpu_budget is not None:
            cpu_budget.start()
        if isinstance(hub, LocalHubBackend):

            def put_back() -> list[str]:
                """What a restarted dockerd may have lost, set up again (idempotent)."""
                nonlocal builds, limits, bridge
                try:
                    sessions = hub.hub.guard_sessions()
                    network = build_bridge_network()
                except docker.errors.DockerException as error:
                    raise BinderboxError(f"Docker did not answer: {error}") from None
                bridge = bridge_name(network)
                builds = guard(
                    bridge,
                    settings.session_blocked_networks,
                    settings.build_firewall,
                    who="builds",
                    setting="build_firewall",
                    ipv6=bool(network.get("EnableIPv6")),
                    owner=hub.owner,
                )
                limits = _reconcile_build_limits(settings)
                return [sessions.message, builds.message, limits.message]

            supervisor = Supervisor(
                hub.hub,
                say=say,
                docker_up=_docker_answers,
                reapply=put_back,
                limit=settings.restart_limit,
                window=settings.restart_window,
            )
            supervisor.start()
        notes = [*hub.notes(), builds.message, limits.message]
        app = create_app(
            settings,
            hub.launcher(),
            notes=notes,
            builder=_builder(settings, hub),
            images=images,
            store=store,
            owner=hub.owner,
            describe=hub.describe,
            # Sessions of the local backend run on this dockerd; cluster nodes pull.
            pull_before_launch=isinstance(hub, LocalHubBackend),
            # The disk budget: images, build cache and old logs cleaned in the background.
            clean=True,
            supervisor=supervisor,
        )
        base = f"http://{settings.service_host}:{settings.service_port}"
        if ":" in settings.service_host:
            base = f"http://[{settings.service_host}]:{settings.service_port}"
        links = base_url(settings)
        say(
            f"binderbox is serving at {base}/ (links point at {links}, sessions at "
            f"{hub.sessions_url}); Ctrl-C stops it"
        )
        server = _Server(
            uvicorn.Config(
                app,
                host=settings.service_host,
                port=settings.service_port,
                log_level="warning",
                timeout_graceful_shutdown=5,
            )
        )
        try:
            server.run()
        except (_Terminated, KeyboardInterrupt):
            pass  # the normal ways to stop a server; what to stop is decided below
    finally:
        signal.signal(signal.SIGTERM, previous)
        # SIGTERM is how service managers restart: sessions live on and the next start
        # adopts them. Ctrl-C (and anything else) stops every session too.
        keep = server is not None and server.stopped_by == signal.SIGTERM
        if keep:
            say("Stopping JupyterHub and the proxy; sessions keep running for the next start")
        else:
            say("Stopping JupyterHub, the proxy and every session")
        # First, so that the hub stopping below is not taken for a hub that died.
        if supervisor is not None:
            supervisor.stop()
        if cpu_budget is not None:
            cpu_budget.stop()
        with contextlib.suppress(OSError):
            lift_build_limits(limits)
            _limits_marker(settings).unlink(missing_ok=True)
        if builds.active:
            # Builds run only while binderbox serves; sessions keep their rules (they
            # may outlive this process).
            with contextlib.suppress(FirewallError, OSError, subprocess.SubprocessError):
                remove_guard(bridge, owner=hub.owner)
        hub.stop(keep_sessions=keep)
        store.close()


def _limits_marker(settings: Settings) -> Path:
    # Written while serve's build limits hold, so a start after a kill -9 knows they are
    # its own leftovers (and lifts them when the limits are off now).
    return Path(settings.state_dir).expanduser() / "build-limits.applied"


def _builder(settings: Settings, hub: object) -> Builder:
    """Builds here, or on the build nodes (those the Swarm backend calls guarded)."""
    if not build_nodes(settings):
        return LocalBuilder()
    fit = getattr(hub, "build_node_problem", None)
    return NodeBuilder(settings, fit) if fit else NodeBuilder(settings)


def _reconcile_build_limits(settings: Settings) -> BuildLimitStatus:
    """Put the build limits in place as the settings say, over whatever a killed serve
    left: set again when on, lifted when off now but left on by an earlier run."""
    marker = _limits_marker(settings)
    limits = apply_build_limits(settings.build_memory_limit, settings.build_pids_limit)
    if limits.active:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(limits.message + "\n")
    elif marker.exists():
        files = limit_files()
        if files is not None:
            with contextlib.suppress(OSError):
                lift_build_limits(BuildLimitStatus(True, "", files))
        marker.unlink(missing_ok=True)
    return limits


def _docker_answers() -> bool:
    """Whether dockerd answers a ping within a few seconds (the supervisor asks often)."""
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to answer means: not up
        return False


class _Terminated(Exception):
    """SIGTERM arrived (handed on by uvicorn after its own shutdown)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


class _Server(uvicorn.Server):
    """uvicorn's server, remembering which signal stopped it."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: object) -> None:
        self.stopped_by = sig
        super().handle_exit(sig, frame)
