"""The SessionBackend seam: what ``binderbox serve`` starts, and talks to, for sessions.

``LocalHubBackend`` is the embedded default: JupyterHub as a managed subprocess on this
machine, with its proxy, its idle culler and DockerSpawner (``BinderSpawner``). A hub on
a Docker Swarm (``binderbox.launch.swarm.SwarmBackend``, with ``BinderSwarmSpawner``)
or on Kubernetes is one more class with these methods; ``settings.backend`` picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from binderbox.config import Settings
from binderbox.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from binderbox.launch.cpu_budget import CpuBudget
    from binderbox.launch.hub import ManagedHub
    from binderbox.launch.session import HubLauncher
    from binderbox.service.launchflow import Launcher


class SessionBackend(Protocol):
    """Sessions for the service: started with ``serve``, stopped with it."""

    @property
    def owner(self) -> str:
        """This deployment's id (its hub id): it labels the sessions, hooks the
        firewall chains and owns the builds in the StateStore."""
        ...

    @property
    def sessions_url(self) -> str:
        """Where people reach the sessions (ends with '/')."""
        ...

    def start(self) -> None:
        """Start the hub and what it needs; blocks until it answers, or raises a
        BinderboxError with one sentence."""
        ...

    def stop(self, keep_sessions: bool) -> None:
        """Stop the hub; sessions stop too unless ``keep_sessions`` (a restart)."""
        ...

    def launcher(self) -> Launcher:
        """What the launch step starts sessions with (after ``start``)."""
        ...

    async def healthy(self) -> bool: ...

    def notes(self) -> list[str]:
        """Sentences for the status page and serve's output (e.g. the session firewall)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A short description for /status and /health: the backend's name and what it
        runs on (JSON values)."""
        ...


class LocalHubBackend:
    """JupyterHub, configurable-http-proxy and DockerSpawner on this machine."""

    def __init__(self, settings: Settings) -> None:
        from binderbox.launch.hub import ManagedHub

        self.settings = settings
        self.hub: ManagedHub = ManagedHub(settings)
        self._launcher: HubLauncher | None = None

    @property
    def owner(self) -> str:
        return self.hub.hub_id

    @property
    def sessions_url(self) -> str:
        return self.hub.sessions_url

    def start(self) -> None:
        from binderbox.launch.hub import ManagedHub
        from binderbox.launch.proxy import ensure_proxy

        proxy = ensure_proxy(self.settings)  # installs configurable-http-proxy with npm once
        if not self.settings.proxy_command:
            self.settings = self.settings.with_overrides(proxy_command=str(proxy))
            self.hub = ManagedHub(self.settings)
        self.hub.start()

    def stop(self, keep_sessions: bool) -> None:
        self.hub.stop(keep_sessions=keep_sessions)

    def launcher(self) -> HubLauncher:
        from binderbox.launch.session import HubLauncher

        if self._launcher is None:
            self._launcher = HubLauncher(self.hub.client())
        return self._launcher

    async def healthy(self) -> bool:
        return await self.launcher().healthy()

    def notes(self) -> list[str]:
        return [self.hub.firewall.message]

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "spawner": "DockerSpawner", "sessions": self.sessions_url}

    def cpu_budget(self, say: Callable[[str], None]) -> CpuBudget:
        """The CPU-hour watcher for this hub's sessions (serve starts and stops it)."""
        from binderbox.launch.cpu_budget import CpuBudget, DockerSessionMeter

        return CpuBudget(
            DockerSessionMeter(self.hub.hub_id),
            self.hub.client,
            budget=self.settings.session_cpu_seconds_max,
            every=self.settings.session_cpu_check_every,
            say=say,
        )


BACKENDS = ("local", "swarm")


def open_session_backend(settings: Settings) -> SessionBackend:
    """The backend ``settings.backend`` names (not started yet)."""
    if settings.backend == "swarm":
        try:
            from binderbox.launch.swarm import SwarmBackend
        except ModuleNotFoundError as error:
            raise UsageError(
                f"Setting 'backend' is swarm, which this binderbox cannot run (the Python "
                f"module {error.name} is missing)."
            ) from None
        return SwarmBackend(settings)
    if settings.backend != "local":
        raise UsageError(f"Setting 'backend' must be one of {', '.join(BACKENDS)}.")
    return LocalHubBackend(settings)
