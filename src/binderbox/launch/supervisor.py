"""What ``binderbox serve`` does when a part it depends on dies: bring it back.

A thread beside the service looks once a second at:

- JupyterHub (serve's child): when it has exited, it is started again with the same
  token, config and database, so it finds its running sessions, starts a proxy and routes
  them again;
- configurable-http-proxy (the hub's child): the hub itself starts it again within
  ``PROXY_CHECK_SECONDS`` and gives it every route; the supervisor notices the new pid,
  says so and counts it;
- dockerd: while it does not answer, /health's Docker check already says so; when it
  answers again, what binderbox put in place beside it (the session network, the
  firewalls, the build limits) is put back, since a restarted dockerd may have lost it.

Each restart is one line in serve's output and one count in /metrics
(``binderbox_restarts_total{part}``). A part that dies ``limit`` times within ``window``
seconds is in a crash loop: /health says so (503) in one sentence, and the hub is started
again only after a back-off (``window`` seconds, doubling each time, at most ten windows)
instead of at full speed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from binderbox.errors import BinderboxError

HUB = "JupyterHub"
PROXY = "configurable-http-proxy"
DOCKERD = "dockerd"
# After a failed attempt to put the firewalls and limits back, the next one waits this long.
REAPPLY_RETRY_SECONDS = 10


class SupervisedHub(Protocol):
    """What the supervisor needs of the hub (ManagedHub has it)."""

    log_path: Path

    def exited(self) -> int | None: ...

    def restart(self, timeout: float = 60) -> None: ...

    def proxy_pid(self) -> int | None: ...


@dataclass
class Part:
    """One supervised part: its restarts and recent deaths."""

    name: str
    restarts: int = 0
    deaths: deque[float] = field(default_factory=deque)
    up: bool = True
    # The sentence /health shows while this part is not well ("" when it is).
    trouble: str = ""
    # While in a crash loop: when the next try may be, and how long the last wait was.
    retry_at: float = 0.0
    backoff: float = 0.0


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped by its parent does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class Supervisor(Collector):
    """Watches the hub, its proxy and dockerd from a thread; restarts the hub, puts the
    firewalls and limits back after dockerd returns, and reports to /health and /metrics.

    ``docker_up`` answers whether dockerd responds (blocking, short timeout); ``reapply``
    puts back what binderbox set up beside dockerd and returns its sentences (raising a
    BinderboxError when it cannot); ``clock`` is for tests.
    """

    def __init__(
        self,
        hub: SupervisedHub,
        *,
        say: Callable[[str], None],
        docker_up: Callable[[], bool],
        reapply: Callable[[], list[str]],
        limit: int = 5,
        window: float = 60,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.say = say
        self.docker_up = docker_up
        self.reapply = reapply
        self.limit = limit
        self.window = window
        self.every = every
        self.clock = clock
        self.parts = {name: Part(name) for name in (HUB, PROXY, DOCKERD)}
        self._proxy_pid = hub.proxy_pid()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the thread ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="binderbox-supervisor")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (serve is stopping everything); waits for a restart under way."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=90)

    def _run(self) -> None:
        while not self._stopping.wait(self.every):
            try:
                self.tick()
            except Exception as error:  # the watcher itself must never stop
                self.say(f"Supervisor: a check failed ({error}); trying again.")

    def tick(self) -> None:
        """One look at every part (the thread calls it every ``every`` seconds)."""
        self._check_docker()
        self._check_hub()
        self._check_proxy()

    # --- the parts ---

    def _check_hub(self) -> None:
        part = self.parts[HUB]
        code = self.hub.exited()
        if code is None and part.up:
            self._settle(part)
            return
        now = self.clock()
        if part.up:  # it has just died
            part.up = False
            self._died(part, now)
            self.say(
                f"JupyterHub exited (code {code}); "
                + (
                    f"it died {len(part.deaths)} times within {self.window:g} s, so binderbox "
                    f"tries again in {part.backoff:g} s."
                    if part.retry_at > now
                    else f"starting it again (see {self.hub.log_path})."
                )
            )
        if now < part.retry_at or self._stopping.is_set():
            return
        try:
            self.hub.restart()
        except BinderboxError as error:
            self._died(part, self.clock())
            with self._lock:
                part.trouble = part.trouble or f"JupyterHub could not be started again: {error}"
            self.say(f"JupyterHub could not be started again: {error}")
            return
        with self._lock:
            part.up = True
            part.restarts += 1
        self._proxy_pid = self.hub.proxy_pid()  # the new hub's own proxy: not a restart
        self.say(f"JupyterHub is back (restart {part.restarts}); its sessions are routed again.")

    def _check_proxy(self) -> None:
        if not self.parts[HUB].up:
            return  # a new hub starts a new proxy
        part = self.parts[PROXY]
        pid = self.hub.proxy_pid()
        if pid is not None and pid != self._proxy_pid and pid_alive(pid):
            if self._proxy_pid is not None:
                self._died(part, self.clock())
                with self._lock:
                    part.restarts += 1
                self.say(
                    f"configurable-http-proxy (pid {self._proxy_pid}) died; JupyterHub "
                    f"started it again (pid {pid}) with every route (restart {part.restarts})."
                )
            self._proxy_pid = pid
        alive = self._proxy_pid is not None and pid_alive(self._proxy_pid)
        with self._lock:
            part.up = alive
        if alive:
            self._settle(part)

    def _check_docker(self) -> None:
        part = self.parts[DOCKERD]
        if not self.docker_up():
            if part.up:
                with self._lock:
                    part.up = False
                self.say("dockerd does not answer; builds and launches fail until it is back.")
            return
        if part.up:
            return
        if self.clock() < part.retry_at:
            return
        try:
            notes = self.reapply()
        except BinderboxError as error:
            with self._lock:
                part.trouble = (
                    "dockerd is back, but what binderbox sets up beside it could not be put "
                    f"back: {error}"
                )
                part.retry_at = self.clock() + REAPPLY_RETRY_SECONDS
            self.say(part.trouble)
            return
        with self._lock:
            part.up = True
            part.restarts += 1
            part.trouble, part.retry_at = "", 0.0
        self.say(f"dockerd answers again; put back: {' '.join(notes)}")

    # --- crash loops ---

    def _died(self, part: Part, now: float) -> None:
        with self._lock:
            part.deaths.append(now)
            while part.deaths and part.deaths[0] < now - self.window:
                part.deaths.popleft()
            # In a crash loop until it has stayed up for a whole window (see _settle).
            if len(part.deaths) < self.limit and not part.trouble:
                return
            died = f"{part.name} died {len(part.deaths)} times within {self.window:g} s"
            if part.name == PROXY:
                # The hub starts its proxy again itself, at most every PROXY_CHECK_SECONDS.
                part.trouble = f"{died}; JupyterHub keeps starting it again (see its log)."
                return
            part.backoff = min(part.backoff * 2 or self.window, 10 * self.window)
            part.retry_at = now + part.backoff
            part.trouble = (
                f"{died}; binderbox waits {part.backoff:g} s before it starts it again "
                f"(see {self.hub.log_path})."
            )

    def _settle(self, part: Part) -> None:
        """A part that has stayed up for a whole window is out of its crash loop."""
        now = self.clock()
        with self._lock:
            while part.deaths and part.deaths[0] < now - self.window:
                part.deaths.popleft()
            if part.trouble and not part.deaths and part.name != DOCKERD:
                part.trouble, part.backoff, part.retry_at = "", 0.0, 0.0
                self.say(f"{part.name} has stayed up for {self.window:g} s: well again.")

    # --- what /health and /metrics show ---

    def checks(self) -> list[dict]:
        """/health's entries: one per part in trouble (a crash loop, a failed restart)."""
        with self._lock:
            return [
                {"service": part.name, "ok": False, "message": part.trouble}
                for part in self.parts.values()
                if part.trouble
            ]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        restarts = CounterMetricFamily(
            "binderbox_restarts",
            "Times a part binderbox serve depends on died and came back.",
            labels=["part"],
        )
        up = GaugeMetricFamily(
            "binderbox_part_up", "Whether the part runs now (1) or not (0).", labels=["part"]
        )
        with self._lock:
            for part in self.parts.values():
                restarts.add_metric([part.name], part.restarts)
                up.add_metric([part.name], 1.0 if part.up else 0.0)
        yield restarts
        yield up
