"""The CPU-hour budget: a session that has used ``session_cpu_seconds_max`` seconds of CPU
time is stopped (mybinder.org: "up to one cpu-hour for more computationally intensive
sessions").

The watcher runs inside ``binderbox serve`` (a thread with its own event loop), not as a
hub service: it talks to the hub only through its REST API (``HubClient``) and measures
sessions through ``SessionMeter``, a small interface each session backend fills. This
machine's is ``DockerSessionMeter`` (the Docker stats API, which reads the container's
cgroup: cgroup v1 here, v2 elsewhere, the same answer); a cluster backend gives one that
asks each node's dockerd about the task containers of its sessions.

A stop is written to binderbox's output and to the hub's log: the hub logs every API
request with its query, so the stop request carries the reason, the CPU seconds and the
repository as query parameters the hub otherwise ignores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

import docker
import docker.errors

from binderbox.launch.client import HubClient, HubError
from binderbox.launch.options import LABEL_HUB, LABEL_SESSION, LABEL_USER

logger = logging.getLogger("binderbox.limits")


@dataclass(frozen=True)
class SessionCpu:
    """How much CPU time one session (its hub user) has used so far."""

    user: str
    cpu_seconds: float


class SessionMeter(Protocol):
    """Measures the running sessions of one deployment."""

    async def cpu_usage(self) -> list[SessionCpu]:
        """CPU seconds used by each running session since it started."""
        ...


class MeterUnavailable(Exception):
    """The sessions cannot be measured right now (e.g. dockerd does not answer)."""


class DockerSessionMeter:
    """Sessions as containers on this machine's dockerd, found by their hub label."""

    def __init__(self, hub_id: str) -> None:
        self.hub_id = hub_id
        self._client: docker.DockerClient | None = None

    async def cpu_usage(self) -> list[SessionCpu]:
        return await asyncio.to_thread(self._measure)

    def _measure(self) -> list[SessionCpu]:
        try:
            if self._client is None:
                self._client = docker.from_env(timeout=30)
            containers = self._client.containers.list(
                filters={"label": [f"{LABEL_HUB}={self.hub_id}", LABEL_SESSION]}
            )
        except docker.errors.DockerException as error:
            self._client = None
            raise MeterUnavailable(f"Docker did not list the sessions: {error}") from None
        usage = []
        for container in containers:
            user = container.labels.get(LABEL_USER, "")
            try:
                # one_shot: the current counters, without waiting a second for a second
                # sample (there is no rate to compute, only the total).
                stats = container.stats(stream=False, one_shot=True)
            except docker.errors.NotFound:
                continue  # stopped meanwhile
            except docker.errors.DockerException as error:
                raise MeterUnavailable(f"Docker did not measure {user}: {error}") from None
            nanoseconds = (stats.get("cpu_stats") or {}).get("cpu_usage", {}).get("total_usage")
            if user and nanoseconds is not None:
                usage.append(SessionCpu(user, nanoseconds / 1e9))
        return usage


def over_budget(usage: list[SessionCpu], budget: float) -> list[SessionCpu]:
    """The sessions that have used at least ``budget`` CPU seconds (none when 0)."""
    if budget <= 0:
        return []
    return [session for session in usage if session.cpu_seconds >= budget]


def stop_query(session: SessionCpu, budget: float, repo_url: str) -> str:
    """The query of the stop request: what the hub's log shows as the reason."""
    return urlencode(
        {
            "reason": "cpu-budget",
            "cpu_seconds": f"{session.cpu_seconds:.1f}",
            "budget": f"{budget:g}",
            "repo": repo_url or "unknown",
        },
        safe=":/",
    )


class CpuBudget:
    """Every ``every`` seconds, stops the sessions over ``budget`` CPU seconds (and removes
    their throwaway hub users, as the culler does)."""

    def __init__(
        self,
        meter: SessionMeter,
        client: Callable[[], HubClient],
        *,
        budget: float,
        every: float,
        say: Callable[[str], None],
    ) -> None:
        self.meter, self.new_client = meter, client
        self.budget, self.every, self.say = budget, every, say
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        # The last trouble said, so a dockerd that stays down is not said every round.
        self._trouble = ""

    def start(self) -> None:
        """Start watching in a thread of its own (serve's event loop is uvicorn's)."""
        if self.budget <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run()), name="binderbox-cpu-budget", daemon=True
        )
        self._thread.start()
        self._started.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """Stop watching; a stop already asked of the hub finishes first."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout)

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        while not self._stop.is_set():
            try:
                # A client per round: a hub that serve started again has a new token.
                async with self.new_client() as client:
                    await self.check(client)
            except Exception as error:  # the watcher must outlive one bad round
                # One sentence, said once; the next round tries again.
                self._say_trouble(f"The CPU budget check failed: {error}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    async def check(self, client: HubClient) -> list[str]:
        """One round: measure, stop whoever is over the budget; the users stopped."""
        try:
            usage = await self.meter.cpu_usage()
        except MeterUnavailable as error:
            self._say_trouble(f"The CPU budget cannot be checked: {error}")
            return []
        stopped = []
        for session in over_budget(usage, self.budget):
            try:
                if await self._stop_session(client, session):
                    stopped.append(session.user)
            except HubError as error:
                self._say_trouble(f"The CPU budget could not stop {session.user}: {error}")
        if usage or stopped:
            self._trouble = ""
        return stopped

    async def _stop_session(self, client: HubClient, session: SessionCpu) -> bool:
        user = await client.get_user(session.user)
        server = (user or {}).get("servers", {}).get("")
        if not server or server.get("pending") in {"stop", "spawn"}:
            return False  # not the hub's, being stopped already, or still starting
        repo = str((server.get("user_options") or {}).get("repo_url", ""))
        self.say(
            f"Stopping session {session.user} ({repo or 'unknown repository'}): it used "
            f"{session.cpu_seconds:.1f} CPU seconds, over the budget of {self.budget:g} "
            "(session_cpu_seconds_max)."
        )
        await client.stop_server(session.user, query=stop_query(session, self.budget, repo))
        await client.delete_user(session.user)
        return True

    def _say_trouble(self, message: str) -> None:
        if message != self._trouble:
            self._trouble = message
            self.say(message)
        logger.debug(message)
