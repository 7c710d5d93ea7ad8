"""Benchmark launching sessions through ``binderbox serve`` (JupyterHub + DockerSpawner).

The script starts the real ``binderbox serve`` on free ports of 127.0.0.1 with a
temporary state directory, and serves a tiny repository (``requirements.txt`` with
``six``, one notebook) with ``git daemon`` on 127.0.0.1. One warm-up launch builds the
image; every measured launch then finds it built, so only the launch is timed:

(1) time from sending ``GET /build/git/<escaped url>/main`` to the ``ready`` event;
(2) time from the same request until ``GET {url}api/status?token=…`` answers 200
    through the proxy (polled every 50 ms after ``ready``);
    both as median and p95 over ``--launches`` sequential launches (default 20);
(3) the same for ``--concurrent`` launches sent at once (default 10), plus the wall time
    of the batch (first request to last 200);
(4) resident memory (VmRSS from /proc/<pid>/status, children included) of the service
    and of the hub (jupyterhub, configurable-http-proxy, idle culler) when idle and with
    the ``--launches`` sessions running, and the memory of the session containers
    (one ``docker stats --no-stream`` sample).

Sessions of the sequential run are kept running, so (4) is measured with exactly
``--launches`` sessions; they are then shut down through Jupyter's own API (as a user
would) before the concurrent batch, which starts from an idle hub again.

Where the time goes: each launch is split into steps with the event stream (arrival
times), the hub's log ("User … took N seconds to start", request durations) and docker's
own timestamps of the running session (Created, State.StartedAt, Jupyter's log lines);
all read the same host clock.

Run from the repository root:  .venv/bin/python benchmarks/bench_launch.py

Exit status: 0 when the target (median sequential time to ready <= 3 s) is met, 1 when it
is missed, 2 on an error. At the end, also after a failure or Ctrl-C, ``binderbox serve``
is stopped with SIGINT (which removes the hub's containers), and the image, the git daemon
and the temporary folders are removed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_build import notebook  # noqa: E402  (after the path set-up above)

from binderbox.config import Settings  # noqa: E402
from binderbox.errors import BinderboxError  # noqa: E402
from binderbox.launch.hub import LOG_FILE, hub_id_for  # noqa: E402
from binderbox.launch.options import LABEL_HUB, LABEL_USER  # noqa: E402
from binderbox.launch.proxy import ensure_proxy  # noqa: E402

# Target: median time from the /build request to the ready event, sequential launches.
READY_TARGET_S = 3.0
# Bounds on every wait, so a stuck step fails the run instead of hanging it.
SERVE_START_TIMEOUT = 120
WARMUP_TIMEOUT = 1200  # the warm-up builds the image
LAUNCH_TIMEOUT = 180  # the hub's session_start_timeout is 120 s
STATUS_POLL_S = 0.05
STOP_TIMEOUT = 120
SESSIONS_GONE_TIMEOUT = 120  # the hub notices a stopped server on its 30 s poll

# Hub log lines: "[I 2026-11-25 19:03:20.123 JupyterHub base:1193] …".
_HUB_LINE = re.compile(
    r"^\[\w (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) JupyterHub [^\]]*\] (?P<msg>.*)$"
)
_HUB_TOOK = re.compile(r"User (?P<user>\S+) took (?P<s>\d+\.\d+) seconds to start")
_HUB_REQUEST = re.compile(
    r"^(?P<code>\d{3}) (?P<method>[A-Z]+) /hub/api/users/(?P<user>[^/\s?]+)(?P<rest>\S*) "
    r".* (?P<ms>\d+(?:\.\d+)?)ms$"
)
# docker's RFC 3339 timestamps, with nanoseconds: "2026-11-25T19:08:44.618647638Z".
_DOCKER_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")
# Jupyter Server's line once it listens (the spawner then sees it answer within 0.2 s).
_JUPYTER_RUNNING = "is running at:"
_MEM_UNITS = {
    "B": 1,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
MIB = 1024**2


class BenchError(Exception):
    """Something the benchmark needs failed; it cannot go on."""


# ---------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {timeout:g} s")
        time.sleep(every)


def run(*command: str, timeout: float = 120, check: bool = True) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(command[:3])} … did not finish in {timeout} s") from None
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Bench",
        "GIT_AUTHOR_EMAIL": "bench@example.org",
        "GIT_COMMITTER_NAME": "Bench",
        "GIT_COMMITTER_EMAIL": "bench@example.org",
    }
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile: the ceil(0.95 n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------
# The fixture repository, served by git daemon on 127.0.0.1


@contextmanager
def git_daemon(root: Path) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={root}",
            str(root),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise BenchError("git daemon exited at start")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 20, "git daemon listening", every=0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def publish_repo(work: Path, served: Path, name: str, requirements: str = "six\n") -> None:
    """A tiny Binder repository (six, one notebook) pushed to a bare repo ``name``."""
    work.mkdir(parents=True)
    (work / "requirements.txt").write_text(requirements)
    (work / "index.ipynb").write_text(notebook("Launch benchmark", ["import six", "six.PY3"]))
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "launch benchmark fixture", cwd=work)
    bare = served / name
    git("init", "--quiet", "--bare", str(bare), cwd=served)
    git("push", "--quiet", str(bare), "main", cwd=work)
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=bare)


# ---------------------------------------------------------------------------------------
# binderbox serve as a subprocess


class Serve:
    """``binderbox serve`` with its own state directory, ports and image prefix."""

    def __init__(self, work: Path, docker_cli: str) -> None:
        self.state_dir = (work / "state").resolve()
        self.log_path = work / "serve.log"
        self.docker_cli = docker_cli
        self.prefix = f"binderbox-bench-launch-{uuid.uuid4().hex[:6]}-"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub_id = hub_id_for(self.state_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.hub_pid: int | None = None
        self.start_timeout: float = SERVE_START_TIMEOUT
        ports = set()
        while len(ports) < 3:
            ports.add(free_port())
        sessions, hub, proxy_api = sorted(ports)
        self.env = {
            "BINDERBOX_STATE_DIR": str(self.state_dir),
            "BINDERBOX_SERVICE_HOST": "127.0.0.1",
            "BINDERBOX_SERVICE_PORT": str(self.port),
            "BINDERBOX_SESSIONS_PORT": str(sessions),
            "BINDERBOX_HUB_PORT": str(hub),
            "BINDERBOX_PROXY_API_PORT": str(proxy_api),
            "BINDERBOX_ALLOWED_HOSTS": "127.0.0.1",
            "BINDERBOX_IMAGE_PREFIX": self.prefix,
            "BINDERBOX_DOCKER_CLI": docker_cli,
            # The culler runs (its memory counts) but culls nothing during the run.
            "BINDERBOX_CULL_IDLE_TIMEOUT": "3600",
        }

    @property
    def hub_log(self) -> Path:
        return self.state_dir / LOG_FILE

    def start(self) -> None:
        try:
            self.env["BINDERBOX_PROXY_COMMAND"] = str(ensure_proxy(Settings()))
        except BinderboxError as error:
            raise BenchError(f"configurable-http-proxy: {error.message}") from None
        self.state_dir.mkdir(parents=True, mode=0o700)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "binderbox", "serve"],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: only this script signals it (Ctrl-C reaches us, we stop it).
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"binderbox serve exited at start:\n{tail}")
            try:
                with httpx.Client(timeout=5, trust_env=False) as http:
                    return http.get(f"{self.url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, self.start_timeout, "binderbox serve answering /health")
        self.find_hub()

    def find_hub(self) -> None:
        """The JupyterHub process below serve (its memory is the hub's)."""
        assert self.process is not None
        table = process_table()
        hubs = [
            pid
            for pid in descendants(self.process.pid, table)
            if " -m jupyterhub -f " in table[pid][1]
        ]
        if not hubs:
            raise BenchError("found no JupyterHub process below binderbox serve")
        self.hub_pid = hubs[0]

    def stop(self) -> None:
        """SIGINT (serve then stops the hub, the proxy and every session), then leftovers."""
        process = self.process
        if process is not None and process.poll() is None:
            began, sessions = time.monotonic(), len(self.containers())
            for sig, wait in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGTERM, 30)):
                process.send_signal(sig)
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    print(f"binderbox serve did not stop after {sig.name}", file=sys.stderr)
            else:
                process.kill()
                process.wait()
            print(
                f"binderbox serve stopped in {time.monotonic() - began:.1f} s "
                f"({sessions} session(s) were running)",
                flush=True,
            )
        # A killed serve leaves its hub (own session) running: stop it the same way.
        if self.hub_pid is not None and pid_alive(self.hub_pid, b"jupyterhub"):
            os.kill(self.hub_pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while pid_alive(self.hub_pid, b"jupyterhub") and time.monotonic() < deadline:
                time.sleep(0.2)
        for container in self.containers(running_only=False):
            run(self.docker_cli, "rm", "-f", container, check=False)

    def remove_images(self) -> None:
        out = run(self.docker_cli, "images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
        tags = [t for t in out.split() if t.startswith(self.prefix)]
        if tags:
            run(self.docker_cli, "rmi", "-f", *tags, check=False)

    def containers(self, *, running_only: bool = True) -> list[str]:
        """Full ids of this hub's session containers."""
        args = [self.docker_cli, "ps", "-q", "--no-trunc"]
        if not running_only:
            args.append("--all")
        out = run(*args, "--filter", f"label={LABEL_HUB}={self.hub_id}", check=False)
        return out.split()


# ---------------------------------------------------------------------------------------
# One launch


@dataclass
class Launch:
    wall_start: float  # time.time() when the request was sent (to match the hub's log)
    t0: float  # time.monotonic() then
    ready_s: float = 0.0
    status_s: float = 0.0
    status_tries: int = 0
    # (seconds since the request, phase, message) as the events arrived.
    events: list[tuple[float, str, str]] = field(default_factory=list)
    user: str = ""
    url: str = ""
    token: str = ""
    image: str = ""

    def first(self, phase: str) -> float | None:
        return next((t for t, p, _ in self.events if p == phase), None)


def launch(http: httpx.Client, service_url: str, path: str, timeout: float) -> Launch:
    """One /build request until ``ready``, then poll api/status until it answers 200."""
    result = Launch(wall_start=time.time(), t0=time.monotonic())
    deadline = result.t0 + timeout
    ready: dict[str, Any] | None = None
    with http.stream(
        "GET", service_url + path, headers={"Accept": "text/event-stream"}
    ) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(f"/build answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise BenchError(f"no ready event within {timeout} s")
            if not line.startswith("data: "):
                continue  # blank separators and keepalive comments
            event = json.loads(line[6:])
            now = time.monotonic() - result.t0
            result.events.append((now, event["phase"], event.get("message", "")))
            if event["phase"] == "failed":
                raise BenchError(f"the launch failed: {event.get('message', '')[:1500]}")
            if event["phase"] == "ready":
                ready = event
                result.ready_s = now
                break
    if ready is None:
        raise BenchError("the event stream ended before the ready event")
    result.user, result.url = ready.get("user", ""), ready["url"]
    result.token, result.image = ready["token"], ready.get("image", "")

    status_url = f"{result.url}api/status"
    while True:
        result.status_tries += 1
        try:
            answer = http.get(status_url, params={"token": result.token})
            if answer.status_code == 200:
                result.status_s = time.monotonic() - result.t0
                return result
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{status_url} did not answer 200 within {timeout} s")
        time.sleep(STATUS_POLL_S)


def http_client() -> httpx.Client:
    # Read timeout between chunks: the service sends a keepalive every 25 s.
    return httpx.Client(timeout=httpx.Timeout(60, connect=10), trust_env=False)


def concurrent_launches(service_url: str, path: str, count: int) -> list[Launch]:
    """``count`` launches released at the same moment, one thread and client each."""
    barrier = threading.Barrier(count)

    def one(_: int) -> Launch:
        with http_client() as http:
            barrier.wait(timeout=30)
            return launch(http, service_url, path, LAUNCH_TIMEOUT)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def shut_down_sessions(http: httpx.Client, launches: list[Launch], serve: Serve) -> None:
    """Stop each session as its user would (Jupyter's POST api/shutdown), then wait until
    the hub has noticed and removed every container (it polls servers every 30 s)."""
    for item in launches:
        try:
            http.post(f"{item.url}api/shutdown", headers={"Authorization": f"token {item.token}"})
        except httpx.TransportError:
            pass  # the server may close the connection while it stops
    wait_until(lambda: not serve.containers(), 60, "every session container stopping", every=0.5)
    wait_until(
        lambda: not serve.containers(running_only=False),
        SESSIONS_GONE_TIMEOUT,
        "the hub removing the stopped session containers",
        every=1,
    )


# ---------------------------------------------------------------------------------------
# Memory


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(proc.name)] = (ppid, cmdline.strip())
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pid_alive(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # it exited meanwhile
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m[1]) * 1024 if m else 0


def process_label(cmdline: str) -> str:
    if "configurable-http-proxy" in cmdline:
        return "configurable-http-proxy (node)"
    if "jupyterhub_idle_culler" in cmdline:
        return "idle culler (python)"
    if "-m jupyterhub" in cmdline:
        return "jupyterhub (python)"
    if "-m binderbox serve" in cmdline:
        return "binderbox serve (python)"
    return Path(cmdline.split(" ", 1)[0]).name or "?"


@dataclass
class Memory:
    """One sample: RSS per process of the service and of the hub, and the sessions."""

    service: dict[str, int]
    hub: dict[str, int]
    sessions: int
    containers: list[int]  # docker stats memory of each session container, bytes
    host_per_session: int  # containerd-shim + docker-proxy RSS, all sessions, bytes

    @property
    def service_total(self) -> int:
        return sum(self.service.values())

    @property
    def hub_total(self) -> int:
        return sum(self.hub.values())


def measure_memory(serve: Serve, with_containers: bool) -> Memory:
    assert serve.process is not None and serve.hub_pid is not None
    table = process_table()
    hub_tree = set(descendants(serve.hub_pid, table))
    service: dict[str, int] = {}
    hub: dict[str, int] = {}
    for pid in descendants(serve.process.pid, table):
        target = hub if pid in hub_tree else service
        label = process_label(table[pid][1])
        target[label] = target.get(label, 0) + rss_bytes(pid)
    ids = serve.containers()
    containers: list[int] = []
    host = 0
    if with_containers and ids:
        out = run(
            serve.docker_cli,
            "stats",
            "--no-stream",
            "--format",
            "{{.ID}}\t{{.MemUsage}}",
            *ids,
            timeout=120,
        )
        for line in out.splitlines():
            if "\t" in line:
                containers.append(parse_mem(line.split("\t")[1].split("/")[0]))
        host = host_side_rss(serve, ids, table)
    return Memory(service, hub, len(ids), containers, host)


def parse_mem(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]+)\s*", text)
    if not m or m[2].upper() not in _MEM_UNITS:
        raise BenchError(f"cannot read docker stats memory {text!r}")
    return int(float(m[1]) * _MEM_UNITS[m[2].upper()])


def host_side_rss(serve: Serve, ids: list[str], table: dict[int, tuple[int, str]]) -> int:
    """RSS of the per-container helpers on the host: containerd-shim and docker-proxy."""
    ports = run(
        serve.docker_cli,
        "inspect",
        "--format",
        "{{range $p, $conf := .NetworkSettings.Ports}}{{range $conf}}{{.HostPort}} {{end}}{{end}}",
        *ids,
    ).split()
    total = 0
    for pid, (_, cmdline) in table.items():
        words = cmdline.split()
        shim = "containerd-shim" in cmdline and any(f"-id {i}" in cmdline for i in ids)
        proxy = (
            "docker-proxy" in cmdline
            and "-host-port" in words[:-1]
            and words[words.index("-host-port") + 1] in ports
        )
        if shim or proxy:
            total += rss_bytes(pid)
    return total


# ---------------------------------------------------------------------------------------
# Where the launch time goes: the hub's log and docker's own timestamps


def hub_log_times(path: Path) -> dict[str, dict[str, float]]:
    """Per user, from the hub's log: when its spawn ended (epoch s), how long it took, and
    the durations of its API requests (ms)."""
    users: dict[str, dict[str, float]] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return users
    for line in lines:
        m = _HUB_LINE.match(line)
        if not m:
            continue
        msg = m["msg"]
        if took := _HUB_TOOK.search(msg):
            info = users.setdefault(took["user"], {})
            # The hub logs in local time, as time.time() and datetime.timestamp() read it.
            ts = datetime.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            info["spawned"] = ts
            info["spawn_s"] = float(took["s"])
        elif req := _HUB_REQUEST.match(msg):
            key = {("POST", ""): "create_user_ms", ("POST", "/server"): "post_server_ms"}.get(
                (req["method"], req["rest"])
            )
            if key:
                users.setdefault(req["user"], {})[key] = float(req["ms"])
    return users


def docker_time(text: str) -> float:
    m = _DOCKER_TS.match(text.strip())
    if not m:
        raise BenchError(f"cannot read docker's timestamp {text!r}")
    whole = datetime.datetime.fromisoformat(m[1]).replace(tzinfo=datetime.UTC)
    return whole.timestamp() + float(f"0.{m[2] or 0}")


def session_times(serve: Serve, keep_log: Path | None = None) -> dict[str, dict[str, float]]:
    """Per user of a running session (epoch s): container created and started (docker
    inspect), Jupyter's first output line and its "is running at" line (docker logs)."""
    ids = serve.containers()
    if not ids:
        return {}
    out = run(
        serve.docker_cli,
        "inspect",
        "--format",
        f'{{{{.Id}}}}\t{{{{index .Config.Labels "{LABEL_USER}"}}}}\t{{{{.Created}}}}'
        "\t{{.State.StartedAt}}",
        *ids,
    )
    times: dict[str, dict[str, float]] = {}
    for line in out.splitlines():
        cid, user, created, started = line.split("\t")
        logs = subprocess.run(
            [serve.docker_cli, "logs", "--timestamps", cid],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        text = logs.stdout + logs.stderr  # Jupyter logs to stderr
        stamped = sorted(
            (docker_time(row), row) for row in text.splitlines() if _DOCKER_TS.match(row)
        )
        running = [t for t, row in stamped if _JUPYTER_RUNNING in row]
        if not stamped or not running:
            continue
        times[user] = {
            "created": docker_time(created),
            "started": docker_time(started),
            "first_output": stamped[0][0],
            "jupyter_running": running[0],
        }
        if keep_log is not None and not keep_log.exists():
            keep_log.write_text("\n".join(row for _, row in stamped) + "\n")
    return times


BREAKDOWN = (
    "request → 'built' event (service resolves main via git daemon, finds the image)",
    "'built' → the hub begins the spawn (create the user, POST …/server)",
    "spawn begins → docker create called (option checks, image inspect)",
    "docker create + start, until the container's process runs",
    "process runs → Jupyter's first log line (mostly importing jupyter_server)",
    "first log line → Jupyter 'is running at' (extensions link and load)",
    "Jupyter running → hub's spawn done (spawner polls /api, hub checks it)",
    "spawn done → 'ready' event at the client (proxy route, progress stream)",
    "'ready' → api/status 200 through the proxy",
)


def breakdown(
    launches: list[Launch], hub: dict[str, dict[str, float]], sessions: dict[str, dict[str, float]]
) -> list[list[float]]:
    """Per launch, the seconds of each BREAKDOWN step; they add up to the api/status time.
    Launches missing from the hub's log or whose container is gone are left out."""
    rows = []
    for item in launches:
        info, times, built = hub.get(item.user, {}), sessions.get(item.user), item.first("built")
        if built is None or times is None or "spawned" not in info:
            continue
        marks = [
            0.0,
            built,
            info["spawned"] - info["spawn_s"] - item.wall_start,
            times["created"] - item.wall_start,
            times["started"] - item.wall_start,
            times["first_output"] - item.wall_start,
            times["jupyter_running"] - item.wall_start,
            info["spawned"] - item.wall_start,
            item.ready_s,
            item.status_s,
        ]
        rows.append([b - a for a, b in itertools.pairwise(marks)])
    return rows


# ---------------------------------------------------------------------------------------
# Reporting


def machine_lines(docker_cli: str) -> list[str]:
    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1])
    os_name = platform.platform()
    os_release = Path("/etc/os-release")
    if os_release.exists() and (m := re.search(r'PRETTY_NAME="([^"]+)"', os_release.read_text())):
        os_name = m[1]
    server = run(docker_cli, "version", "--format", "{{.Server.Version}}", check=False).strip()
    return [
        f"date:     {datetime.date.today().isoformat()}",
        f"machine:  {os_name}, kernel {platform.release()}",
        f"cpus:     {len(os.sched_getaffinity(0))} (nproc), memory {mem_kb / 1024**2:.1f} GiB",
        f"docker:   server {server}",
        f"load avg: {load()} (other work on this machine slows the measurements)",
    ]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def stats_line(title: str, values: list[float]) -> str:
    return (
        f"{title:<40} {len(values):>3} {statistics.median(values):>8.2f} {p95(values):>7.2f}"
        f" {min(values):>7.2f} {max(values):>7.2f}"
    )


def mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def report(
    sequential: list[Launch],
    concurrent: list[Launch],
    memory: dict[str, Memory],
    hub: dict[str, dict[str, float]],
    sessions: dict[str, dict[str, float]],
) -> tuple[list[str], bool]:
    n = len(sequential)
    lines = [
        "",
        "Launch times, seconds from sending GET /build/… (image already built)",
        "",
        f"{'case':<40} {'n':>3} {'median':>8} {'p95':>7} {'min':>7} {'max':>7}",
        "-" * 76,
        stats_line("sequential: 'ready' event", [x.ready_s for x in sequential]),
        stats_line("sequential: api/status 200", [x.status_s for x in sequential]),
    ]
    if concurrent:
        c = len(concurrent)
        start = min(x.t0 for x in concurrent)
        last_ready = max(x.t0 + x.ready_s for x in concurrent) - start
        last_status = max(x.t0 + x.status_s for x in concurrent) - start
        lines += [
            stats_line(f"{c} at once: 'ready' event", [x.ready_s for x in concurrent]),
            stats_line(f"{c} at once: api/status 200", [x.status_s for x in concurrent]),
            f"{c} at once: batch wall time {last_status:.2f} s to the last 200 "
            f"({last_ready:.2f} s to the last 'ready')",
        ]
    if n >= 10:
        head = statistics.median(x.ready_s for x in sequential[:5])
        tail = statistics.median(x.ready_s for x in sequential[-5:])
        lines.append(
            f"sequential 'ready', median of launches 1-5: {head:.2f} s, "
            f"{n - 4}-{n} (with {n - 5}+ sessions running): {tail:.2f} s"
        )
    tries = [x.status_tries for x in sequential + concurrent]
    lines.append(
        f"api/status requests until the first 200: {min(tries)}-{max(tries)} "
        f"(1 means it answered at once after 'ready')"
    )

    for title, group in (("sequential", sequential), ("at once", concurrent)):
        rows = breakdown(group, hub, sessions)
        if not rows:
            continue
        lines += [
            "",
            f"Where the time goes, {title} ({len(rows)} launches; seconds per step: median, max):",
        ]
        for i, name in enumerate(BREAKDOWN):
            values = [row[i] for row in rows]
            lines.append(f"  {statistics.median(values):>6.2f} {max(values):>6.2f}  {name}")
        hub_ms = [hub[x.user] for x in group if x.user in hub]
        for key, what in (
            ("create_user_ms", "POST /users/<name> (create the user)"),
            ("post_server_ms", "POST /users/<name>/server (answers after <= 1 s)"),
        ):
            values = [info[key] for info in hub_ms if key in info]
            if values:
                lines.append(f"  hub request {what}: median {statistics.median(values):.0f} ms")

    idle, after, busy = memory.get("idle"), memory.get("idle_after"), memory.get("busy")
    columns = [(k, m) for k, m in (("idle, fresh", idle), ("idle", after), ("busy", busy)) if m]
    if columns:
        heads = ["at start" if k == "idle, fresh" else f"{m.sessions} sessions" for k, m in columns]
        lines += [
            "",
            "Memory (MiB; VmRSS summed over processes, docker stats for containers)",
            "",
            f"{'':<40}" + "".join(f"{h:>14}" for h in heads),
            "-" * (40 + 14 * len(columns)),
        ]
        labels: list[tuple[str, str]] = []
        for _, m in columns:
            for label in [*m.service, *m.hub]:
                side = "service" if label in m.service else "hub"
                if (side, label) not in labels:
                    labels.append((side, label))

        def row(title: str, get: Callable[[Memory], float]) -> str:
            return f"{title:<40}" + "".join(f"{mib(get(m)):>14}" for _, m in columns)

        lines.append(row("service, total", lambda m: m.service_total))
        for side, label in labels:
            if side == "service":
                lines.append(row(f"  {label}", lambda m, lab=label: m.service.get(lab, 0)))
        lines.append(row("hub, total", lambda m: m.hub_total))
        for side, label in labels:
            if side == "hub":
                lines.append(row(f"  {label}", lambda m, lab=label: m.hub.get(lab, 0)))
        if busy and busy.containers:
            per = statistics.median(busy.containers)
            lines += [
                f"session containers (docker stats), {len(busy.containers)} running: total "
                f"{mib(sum(busy.containers))} MiB, median {mib(per)} MiB each",
                f"host helpers of those sessions (containerd-shim + docker-proxy): "
                f"{mib(busy.host_per_session)} MiB",
            ]
            if after:
                growth = busy.hub_total - after.hub_total
                lines.append(
                    f"hub growth with {busy.sessions} sessions: {mib(growth)} MiB "
                    f"({growth / max(1, busy.sessions) / MIB:.1f} MiB per session)"
                )

    median_ready = statistics.median(x.ready_s for x in sequential)
    ok = median_ready <= READY_TARGET_S
    lines += [
        "",
        "Target:",
        f"  median sequential time to 'ready' <= {READY_TARGET_S:g} s"
        f"   {median_ready:.2f} s  {'PASS' if ok else 'MISS'}",
    ]
    return lines, ok


# ---------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, work: Path, serve: Serve) -> tuple[list[str], bool, dict]:
    for line in machine_lines(args.docker):
        print(line, flush=True)
    served = work / "git"
    served.mkdir()
    publish_repo(work / "repo", served, "launchbench.git")
    memory: dict[str, Memory] = {}
    with git_daemon(served) as git_port, http_client() as http:
        repo_url = f"git://127.0.0.1:{git_port}/launchbench.git"
        path = f"/build/git/{quote(repo_url, safe='')}/main"
        print(f"repo:     {repo_url} (requirements.txt: six; one notebook)", flush=True)

        began = time.monotonic()
        serve.start()
        print(f"serve:    {serve.url} up after {time.monotonic() - began:.1f} s", flush=True)
        memory["idle"] = measure_memory(serve, with_containers=False)

        began = time.monotonic()
        warm = launch(http, serve.url, path, WARMUP_TIMEOUT)
        built = "building" in {phase for _, phase, _ in warm.events}
        print(
            f"warm-up:  {time.monotonic() - began:.1f} s "
            f"({'built' if built else 'found'} {warm.image})",
            flush=True,
        )
        shut_down_sessions(http, [warm], serve)
        time.sleep(2)
        memory["idle_after"] = measure_memory(serve, with_containers=False)

        print(f"\nsequential: {args.launches} launches, sessions kept running", flush=True)
        sequential = []
        for i in range(args.launches):
            item = launch(http, serve.url, path, LAUNCH_TIMEOUT)
            if any(phase == "building" for _, phase, _ in item.events):
                raise BenchError("a measured launch built the image again")
            sequential.append(item)
            print(
                f"[{i + 1:>2}/{args.launches}] ready {item.ready_s:6.2f} s, "
                f"api/status {item.status_s:6.2f} s",
                flush=True,
            )
        time.sleep(2)
        memory["busy"] = measure_memory(serve, with_containers=True)
        print(f"memory sampled with {memory['busy'].sessions} sessions; load avg {load()}")
        sessions = session_times(serve, keep_log=work / "session.log")

        concurrent: list[Launch] = []
        if args.concurrent:
            print("stopping those sessions (Jupyter api/shutdown)…", flush=True)
            shut_down_sessions(http, sequential, serve)
            print(f"\nat once: {args.concurrent} launches", flush=True)
            concurrent = concurrent_launches(serve.url, path, args.concurrent)
            for i, item in enumerate(sorted(concurrent, key=lambda x: x.status_s)):
                print(
                    f"[{i + 1:>2}/{args.concurrent}] ready {item.ready_s:6.2f} s, "
                    f"api/status {item.status_s:6.2f} s",
                    flush=True,
                )
            sessions.update(session_times(serve))
        print(f"load avg: {load()} at the end", flush=True)

    lines, ok = report(sequential, concurrent, memory, hub_log_times(serve.hub_log), sessions)
    data = {
        "date": datetime.date.today().isoformat(),
        "load_avg_end": os.getloadavg(),
        "sequential": [x.__dict__ for x in sequential],
        "concurrent": [x.__dict__ for x in concurrent],
        "memory": {k: m.__dict__ for k, m in memory.items()},
    }
    return lines, ok, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=20, help="sequential launches (20)")
    parser.add_argument("--concurrent", type=int, default=10, help="launches at once (10)")
    parser.add_argument("--docker", default="/usr/bin/docker", help="docker CLI")
    parser.add_argument("--json", dest="json_out", help="also write the results to this file")
    parser.add_argument(
        "--logs", help="copy the logs of serve, the hub and one session into this folder"
    )
    args = parser.parse_args()
    if args.launches < 1 or args.concurrent < 0:
        parser.error("--launches must be at least 1 and --concurrent at least 0")
    if not shutil.which("git"):
        print("error: git is needed (git daemon serves the fixture repository)")
        return 2

    # SIGTERM runs the clean-up below, like Ctrl-C does. Ctrl-C works even when a shell
    # started us with SIGINT ignored (a background job), and binderbox serve inherits that.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="binderbox-bench-launch-") as tmp:
        serve = Serve(Path(tmp), args.docker)
        try:
            lines, ok, data = benchmark(args, Path(tmp), serve)
        except (BenchError, httpx.HTTPError, subprocess.TimeoutExpired) as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted; stopping binderbox serve", file=sys.stderr)
            return 130
        finally:
            serve.stop()
            serve.remove_images()
            if args.logs:
                logs = Path(args.logs)
                logs.mkdir(parents=True, exist_ok=True)
                for source in (serve.log_path, serve.hub_log, Path(tmp) / "session.log"):
                    if source.exists():
                        shutil.copy(source, logs / source.name)
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(data, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
