"""Benchmark the abuse bounds: /health under a hostile flood, and memory over many builds.

(1) ``/health`` latency of the real ``binderbox serve`` (JupyterHub and the proxy
    included) while ``--hostile`` (default 50) launches of git URLs on 127.0.0.5 are in
    flight; the server there accepts connections and never answers, so each launch
    holds a thread of the service's remote pool (or waits for one) until
    ``remote_timeout`` (30 s here). ``--probes`` sequential /health requests, p50, p95
    and max, against the same number with the service idle. Target: p95 <= 200 ms.
(2) Memory after 1,000 finished builds, sampled every 100 (VmRSS, after a gc), in two
    parts:
    a. the build queue in this process with a trivial build function (150 log lines of
       about 60 bytes, a real SQLite store, one follower reading each build to the end).
       Real builds run in BuildKit, outside the service; what a finished build can leave
       in the service is exactly what the queue, the store object and the followers
       keep, and a trivial build exercises all of it 1,000 times in seconds, where 1,000
       real builds of distinct commits would take hours.
    b. ``--launches`` (default 1,000) ``build_only`` launches through the real serve of a
       tiny repository whose image exists (built once first): the service's launch path
       (tokens, rate limiter, ref cache, metrics, the store's launch records) with serve's
       VmRSS every 100.

Run from the repository root:  .venv/bin/python benchmarks/bench_abuse.py

Exit status 0 when the /health target is met and neither memory series grows by more than
10 MiB from its second sample to its last, 1 otherwise, 2 on an error. serve is stopped
with SIGINT at the end; its image, the git daemon and the temporary folders are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import requests

from binderbox.config import Settings
from binderbox.events import Event
from binderbox.launch.proxy import ensure_proxy
from binderbox.service.buildqueue import BuildQueue
from binderbox.store import BuildStore

STREAM = {"Accept": "text/event-stream"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class SilentServer:
    """Accepts TCP connections and never answers."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0), backlog=512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def events_of(url: str, timeout: float = 900) -> list[dict]:
    response = requests.get(url, headers=STREAM, stream=True, timeout=timeout)
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["phase"] in {"ready", "failed"}:
                break
    response.close()
    return events


def git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org"}
    env |= {"GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def probe_health(base: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        response = requests.get(base + "/health", timeout=10)
        times.append(time.perf_counter() - began)
        if response.status_code != 200:
            raise RuntimeError(f"/health answered {response.status_code}: {response.text}")
    return times


def summary(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return (
        f"p50 {statistics.median(ms):.1f} ms, p95 {percentile(ms, 95):.1f} ms, max {max(ms):.1f} ms"
    )


def queue_memory(builds: int, every: int) -> list[tuple[int, float]]:
    """(builds finished, VmRSS MiB) of this process, through the in-process queue."""
    folder = Path(tempfile.mkdtemp(prefix="bench-abuse-store-"))
    samples: list[tuple[int, float]] = []

    async def run() -> None:
        store = BuildStore(folder / "state.sqlite")
        local = ThreadPoolExecutor(4)

        async def read(build_id: str, start: int, limit: int) -> list[Event]:
            loop = asyncio.get_running_loop()
            rows = await loop.run_in_executor(local, store.events, build_id, start, limit)
            return [Event(phase, line) for phase, line in rows]  # type: ignore[arg-type]

        queue = BuildQueue(
            2, store=store, queue_size=50, per_owner=3, log_max_bytes=5_000_000, read_store=read
        )

        def trivial(emit):
            for n in range(150):
                emit(
                    Event(
                        "building", f"#7 0.{n:03d} a line of a trivial build, number {n}", log=True
                    )
                )
            return None

        for done in range(1, builds + 1):
            job, _ = queue.submit(f"bench-{done}:x", trivial, "git://127.0.0.1/x", "c", "192.0.2.1")
            seen = sum(1 for _ in [e async for e in queue.follow(job)])
            assert seen == 150, seen
            if done % every == 0:
                gc.collect()
                samples.append((done, rss_mib()))
                assert queue.jobs == 0
        queue.close()
        local.shutdown()
        store.close()

    try:
        gc.collect()
        samples.append((0, rss_mib()))
        asyncio.run(run())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostile", type=int, default=50)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--builds", type=int, default=1000)
    parser.add_argument("--launches", type=int, default=1000)
    args = parser.parse_args()

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}"
    )

    print(f"(2a) {args.builds} trivial builds through the in-process build queue")
    queue_samples = queue_memory(args.builds, 100)
    for done, mib in queue_samples:
        print(f"  after {done:5d} builds: {mib:6.1f} MiB")

    work = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    prefix = f"binderbox-benchabuse-{uuid.uuid4().hex[:6]}-"
    silent = SilentServer("127.0.0.5")
    daemon = serve = None
    ok = True
    try:
        repo, served_root = work / "tiny", work / "served"
        repo.mkdir()
        served_root.mkdir()
        (repo / "hello.txt").write_text("hello\n")
        git("init", "-q", "-b", "main", cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", "tiny", cwd=repo)
        git("clone", "-q", "--bare", str(repo), str(served_root / "tiny.git"), cwd=work)
        git_port = free_port()
        daemon = subprocess.Popen(
            [
                "git",
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                f"--port={git_port}",
                f"--base-path={served_root}",
                str(served_root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = free_port()
        env = {
            **os.environ,
            "BINDERBOX_STATE_DIR": str(work / "state"),
            "BINDERBOX_SERVICE_PORT": str(port),
            "BINDERBOX_SESSIONS_PORT": str(free_port()),
            "BINDERBOX_HUB_PORT": str(free_port()),
            "BINDERBOX_PROXY_API_PORT": str(free_port()),
            "BINDERBOX_PROXY_COMMAND": str(ensure_proxy(Settings())),
            "BINDERBOX_ALLOWED_HOSTS": "127.0.0.1,127.0.0.5",
            "BINDERBOX_IMAGE_PREFIX": prefix,
            "BINDERBOX_BUILD_ONLY_ENABLED": "true",
            "BINDERBOX_RATE_LIMIT_PER_MINUTE": "0",
            "BINDERBOX_LAUNCHES_PER_ADDRESS": str(args.hostile + 10),
            "BINDERBOX_REMOTE_TIMEOUT": "30",
        }
        log = (work / "serve.log").open("w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "binderbox", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(base + "/health", timeout=5).status_code == 200:
                    break
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n" + (work / "serve.log").read_text())
            time.sleep(0.2)

        idle = probe_health(base, args.probes)
        print(f"(1) /health, idle: {summary(idle)}")
        hostile = ThreadPoolExecutor(args.hostile)
        flood = [
            hostile.submit(
                events_of,
                f"{base}/build/git/"
                + quote(f"git://127.0.0.5:{silent.port}/never-{n}.git", safe="")
                + "/main",
                120,
            )
            for n in range(args.hostile)
        ]
        deadline = time.monotonic() + 30
        while True:  # all of them are in flight, as the service itself counts
            text = requests.get(base + "/metrics", timeout=10).text
            line = next(
                x for x in text.splitlines() if x.startswith("binderbox_launches_in_progress")
            )
            if float(line.split()[1]) >= args.hostile or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(
            f"    in flight: {line.split()[1]} launches, {len(silent.accepted)} connections "
            "held open by the silent server"
        )
        loaded = probe_health(base, args.probes)
        still = sum(1 for f in flood if not f.done())
        print(
            f"    /health with {args.hostile} hostile launches in flight: {summary(loaded)} "
            f"({still} still in flight at the last probe)"
        )
        finals = [f.result() for f in flood]
        hostile.shutdown()
        ended = Counter(
            re.sub(r"'git://[^']*'|\d+\.\d+\.\d+\.\d+:\d+", "…", e[-1]["message"]) for e in finals
        )
        for message, count in ended.most_common():
            print(f"    {count:3d} ended with: {message}")
        ok &= percentile(loaded, 95) <= 0.2

        url = f"git://127.0.0.1:{git_port}/tiny.git"
        launch = f"{base}/build/git/{quote(url, safe='')}/main?build_only=true"
        began = time.monotonic()
        first = events_of(launch)
        if first[-1]["phase"] != "ready":
            raise RuntimeError(f"the warm-up build failed: {first[-1]['message']}")
        print(
            f"(2b) warm-up build: {time.monotonic() - began:.1f} s; then {args.launches} "
            "build_only launches of the built image"
        )
        launch_samples = [(0, rss_mib(serve.pid))]
        began = time.monotonic()
        for n in range(1, args.launches + 1):
            events = events_of(launch)
            if events[-1]["phase"] != "ready":
                raise RuntimeError(f"launch {n} failed: {events[-1]['message']}")
            if n % 100 == 0:
                launch_samples.append((n, rss_mib(serve.pid)))
        print(f"  {args.launches / (time.monotonic() - began):.1f} launches/s")
        for done, mib in launch_samples:
            print(f"  after {done:5d} launches: serve {mib:6.1f} MiB")

        for name, series in (("queue", queue_samples), ("serve", launch_samples)):
            growth = series[-1][1] - series[1][1]
            print(f"growth of {name} from the 2nd sample to the last: {growth:+.1f} MiB")
            ok &= growth <= 10
    except Exception as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        silent.close()
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(timeout=90)
        if daemon is not None:
            daemon.terminate()
        with contextlib.suppress(Exception):
            import docker

            client = docker.from_env()
            for image in client.images.list():
                for tag in image.tags:
                    if tag.startswith(prefix):
                        client.images.remove(tag, force=True)
        shutil.rmtree(work, ignore_errors=True)
    print("target met" if ok else "target missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
