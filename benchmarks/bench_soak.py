"""Soak benchmark: sustained launches through ``binderbox serve``, sessions culled behind.

The script starts the real ``binderbox serve`` (bench_launch.Serve: free ports on
127.0.0.1, a temporary state directory, its own image prefix) with a short idle culler,
and serves a tiny repository (``six``, one notebook) with ``git daemon`` on 127.0.0.1.
A warm-up launch builds the image once and the culler removes its session. Then
``--launches`` launches (default 200) start at a steady rate over ``--minutes``
(default 10: one every 3 s), each one on schedule whether or not the one before has
finished: ``GET /build/git/<escaped url>/main`` with ``Accept: text/event-stream`` (the
API Thebe uses) until the ``ready`` event, then ``GET {url}api/status?token=…`` through
the proxy until it answers 200 (bench_launch.launch). Nobody uses the sessions again, so
JupyterHub's idle culler (``cull_idle_timeout`` ``--idle-timeout`` s, checked every
``--cull-every`` s) stops them and deletes their users, as it does for a user who closed
the tab.

Reported: every error with its one-line message (goal: none); p50/p95 of the time from
the request to ``ready`` for the first 20 and the last 20 launches; resident memory
(VmRSS from /proc) of the serve process, the hub, the proxy and the culler at the start
(after the warm-up session is culled) and at the end (after the culler has removed every
session), and the growth per launch; the session containers still there at the end; the
hub's database rows left at the end; tracebacks in serve's log and error lines in the
hub's.

Run from the repository root:  .venv/bin/python benchmarks/bench_soak.py
    (about 12 minutes; --minutes 2 --launches 40 for a short run)

Exit status: 0 when there was no error and memory grew little (GROWTH_* and
HUB_CACHES_MIB below), 1 otherwise, 2 when the set-up failed. At the end, also after a
failure or Ctrl-C, serve is stopped with SIGINT (which removes the hub's containers),
leftover containers are removed by label, and the image, the session network, the git
daemon and the temporary folders are removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_launch import (  # bench_launch puts src/ on the path
    LAUNCH_TIMEOUT,
    MIB,
    WARMUP_TIMEOUT,
    BenchError,
    Launch,
    Serve,
    descendants,
    git_daemon,
    http_client,
    launch,
    load,
    machine_lines,
    p95,
    process_label,
    process_table,
    publish_repo,
    rss_bytes,
    run,
)

from binderbox.launch.hub import DB_FILE

# Memory growth from the start to the end (both with no session running) that still
# counts as "no growth": a fixed allowance for what fills once and stays (lazy imports,
# caches that reach their size, SQLite's page cache of 2 MiB, allocator arenas), plus a
# little per launch. A leak of one session's worth of objects per launch (events, a
# client, a user) is tens of KiB or more and shows over 200 launches.
GROWTH_ALLOWANCE_MIB = 4.0
GROWTH_PER_LAUNCH_KIB = 16.0
# The hub also fills JupyterHub's scope caches (LRU caches of 1024 entries in
# jupyterhub/scopes.py, keyed by each throwaway user's scopes): +23 MiB over the first
# 500 users, +1 MiB over the next 1000 (bench_hub_memory.py, without containers).
HUB_CACHES_MIB = 24.0
SAMPLE_EVERY_S = 15.0
# Launches counted as "the start" and "the end" for the launch-time percentiles.
EDGE = 20


@dataclass
class Outcome:
    """One soak launch: when it began against its schedule, and how it went."""

    index: int
    scheduled: float  # seconds after the soak began
    began: float = 0.0
    launch: Launch | None = None
    error: str = ""


@dataclass
class Sample:
    """Memory and sessions at one moment of the soak."""

    at: float  # seconds after the soak began
    begun: int  # launches begun by then
    rss: dict[str, int] = field(default_factory=dict)  # bytes per part
    sessions: int = 0

    @property
    def hub_total(self) -> int:
        return sum(v for k, v in self.rss.items() if k != "serve")


PARTS = ("serve", "jupyterhub", "proxy", "culler")


def one_line(error: BaseException | str) -> str:
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 240 else first[:237] + "…"


def memory(serve: Serve) -> dict[str, int]:
    """VmRSS of the serve process itself, the hub, its proxy and its culler (found again
    each time: serve's supervisor may have restarted the hub)."""
    assert serve.process is not None
    table = process_table()
    rss = {"serve": rss_bytes(serve.process.pid)}
    for pid in descendants(serve.process.pid, table):
        label = process_label(table[pid][1])
        part = {
            "jupyterhub (python)": "jupyterhub",
            "configurable-http-proxy (node)": "proxy",
            "idle culler (python)": "culler",
        }.get(label)
        if part:
            rss[part] = rss.get(part, 0) + rss_bytes(pid)
    return rss


def hub_rows(state_dir: Path) -> dict[str, int]:
    """Rows left in the hub's database (read-only): users, servers, tokens, clients."""
    path = state_dir / DB_FILE
    rows: dict[str, int] = {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return rows
    try:
        for table in ("users", "spawners", "servers", "api_tokens", "oauth_clients"):
            try:
                rows[table] = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            except sqlite3.Error:
                continue
    finally:
        db.close()
    return rows


def log_problems(serve: Serve) -> tuple[list[str], list[str]]:
    """Tracebacks' last lines in serve's log, and the hub's error lines ("[E …")."""
    tracebacks: list[str] = []
    try:
        lines = serve.log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j] and not lines[j][0].isspace()),
                i,
            )
            tracebacks.append(lines[end].strip())
    try:
        hub = serve.hub_log.read_text(errors="replace").splitlines()
    except OSError:
        hub = []
    return tracebacks, [line[:240] for line in hub if line.startswith("[E ")]


class Soak:
    """Launches on a steady schedule, each in its own thread, and a memory sampler."""

    def __init__(self, serve: Serve, path: str, launches: int, seconds: float) -> None:
        self.serve, self.path = serve, path
        self.interval = seconds / launches
        self.outcomes = [Outcome(i, i * self.interval) for i in range(launches)]
        self.samples: list[Sample] = []
        self.begun = 0
        self.start = 0.0
        self._lock = threading.Lock()
        self._done = threading.Event()

    def one(self, outcome: Outcome) -> None:
        try:
            with http_client() as http:
                item = launch(http, self.serve.url, self.path, LAUNCH_TIMEOUT)
            if any(phase == "building" for _, phase, _ in item.events):
                outcome.error = "the image was built again (expected: found built)"
            outcome.launch = item
        except (BenchError, httpx.HTTPError) as error:
            outcome.error = one_line(error)
        except Exception as error:  # a soak counts what breaks, and goes on
            outcome.error = f"{type(error).__name__}: {one_line(error)}"
        with self._lock:
            ok = outcome.launch is not None and not outcome.error
            item = outcome.launch
            status = (
                f"ready {item.ready_s:6.2f} s, api/status {item.status_s:6.2f} s"
                if ok and item
                else f"ERROR {outcome.error}"
            )
            print(
                f"[{outcome.index + 1:>3}/{len(self.outcomes)}] t={outcome.began:6.1f} s  {status}",
                flush=True,
            )

    def sampler(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(SAMPLE_EVERY_S)

    def sample(self) -> Sample:
        item = Sample(
            at=time.monotonic() - self.start,
            begun=self.begun,
            rss=memory(self.serve),
            sessions=len(self.serve.containers()),
        )
        with self._lock:
            self.samples.append(item)
        return item

    def run(self) -> None:
        """Start every launch on schedule, then wait for them all (each has a deadline)."""
        self.start = time.monotonic()
        threading.Thread(target=self.sampler, daemon=True).start()
        threads = []
        try:
            for outcome in self.outcomes:
                delay = self.start + outcome.scheduled - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the load, not waiting for anything
                outcome.began = time.monotonic() - self.start
                # Daemon threads: a Ctrl-C ends the script without waiting for them.
                thread = threading.Thread(target=self.one, args=(outcome,), daemon=True)
                thread.start()
                threads.append(thread)
                self.begun += 1
            for thread in threads:
                thread.join(LAUNCH_TIMEOUT + 60)
        finally:
            self._done.set()


def wait_for_culling(serve: Serve, timeout: float) -> tuple[float, int]:
    """Seconds until no session container of this hub is left (running or stopped), or
    the timeout; and how many are left then."""
    began = time.monotonic()
    while True:
        left = len(serve.containers(running_only=False))
        waited = time.monotonic() - began
        if left == 0 or waited > timeout:
            return waited, left
        time.sleep(1)


def stats(values: list[float]) -> str:
    if not values:
        return f"{0:>4} {'-':>7} {'-':>7} {'-':>7}"
    return (
        f"{len(values):>4} {statistics.median(values):>7.2f} {p95(values):>7.2f}"
        f" {max(values):>7.2f}"
    )


def growth_limit(launches: int, *, hub: bool = False) -> float:
    """Bytes of growth from start to end still counted as none, for ``launches``."""
    fixed = GROWTH_ALLOWANCE_MIB + (HUB_CACHES_MIB if hub else 0)
    return fixed * MIB + GROWTH_PER_LAUNCH_KIB * 1024 * launches


def report(
    args: argparse.Namespace,
    soak: Soak,
    start: dict[str, int],
    end: dict[str, int],
    end_errors: list[str],
    culled: tuple[float, int],
    rows: dict[str, int],
    logs: tuple[list[str], list[str]],
) -> tuple[list[str], bool]:
    n = len(soak.outcomes)
    good = [o for o in soak.outcomes if o.launch is not None and not o.error]
    failed = [o for o in soak.outcomes if o.error]
    errors = [f"launch {o.index + 1}: {o.error}" for o in failed] + end_errors
    # Each distinct message once, with the launches that ended with it.
    by_message: dict[str, list[int]] = {}
    for o in failed:
        by_message.setdefault(o.error, []).append(o.index + 1)
    grouped = [
        f"  {len(which)} x {message} (launch{'es' if len(which) > 1 else ''} "
        f"{', '.join(map(str, which))})"
        for message, which in by_message.items()
    ] + [f"  {e}" for e in end_errors]
    lines = [
        "",
        f"Soak: {n} launches over {args.minutes:g} min (one every {soak.interval:.2f} s); "
        f"idle culler: {args.idle_timeout} s idle, checked every {args.cull_every} s",
        "",
        f"errors: {len(errors)}",
        *grouped,
        "",
        f"{'seconds from the /build request':<40} {'n':>4} {'p50':>7} {'p95':>7} {'max':>7}",
        "-" * 68,
    ]
    for title, group in (
        (f"'ready', first {EDGE} launches", [o for o in good if o.index < EDGE]),
        (f"'ready', last {EDGE} launches", [o for o in good if o.index >= n - EDGE]),
        ("'ready', all launches", good),
        ("api/status 200, all launches", good),
    ):
        values = [
            o.launch.status_s if title.startswith("api") else o.launch.ready_s
            for o in group
            if o.launch
        ]
        lines.append(f"{title:<40} {stats(values)}")
    late = max((o.began - o.scheduled for o in soak.outcomes), default=0.0)
    sessions = [s.sessions for s in soak.samples]
    lines += [
        "",
        f"schedule: the latest launch began {late:.2f} s after its time",
        f"session containers during the soak (every {SAMPLE_EVERY_S:g} s): "
        f"median {statistics.median(sessions) if sessions else 0:g}, "
        f"max {max(sessions, default=0)}",
        f"session containers at the end: {culled[1]} "
        f"({culled[0]:.0f} s after the last launch finished)",
        "hub database rows at the end: "
        + (", ".join(f"{k} {v}" for k, v in rows.items()) or "not readable"),
        "",
        "Memory (MiB, VmRSS; no session running at either point)",
        "",
        f"{'':<26}{'start':>9}{'end':>9}{'growth':>9}{'KiB/launch':>12}",
        "-" * 65,
    ]
    for part in (*PARTS, "hub total"):
        if part == "hub total":
            a = sum(v for k, v in start.items() if k != "serve")
            b = sum(v for k, v in end.items() if k != "serve")
        else:
            a, b = start.get(part, 0), end.get(part, 0)
        label = {
            "serve": "binderbox serve",
            "jupyterhub": "jupyterhub",
            "proxy": "configurable-http-proxy",
            "culler": "idle culler",
            "hub total": "hub + proxy + culler",
        }[part]
        lines.append(
            f"{label:<26}{a / MIB:>9.1f}{b / MIB:>9.1f}{(b - a) / MIB:>+9.1f}"
            f"{(b - a) / 1024 / n:>+12.1f}"
        )
    if soak.samples:
        lines += ["", "Memory during the soak (MiB): t s, launches begun, sessions, serve, hub"]
        last = len(soak.samples) - 1
        step = max(1, last // 12)
        for s in [soak.samples[i] for i in sorted({*range(0, last, step), last})]:
            lines.append(
                f"  {s.at:6.0f} {s.begun:>4} {s.sessions:>3} {s.rss.get('serve', 0) / MIB:7.1f}"
                f" {s.hub_total / MIB:7.1f}"
            )
    tracebacks, hub_errors = logs
    lines += [
        "",
        f"serve's log: {len(tracebacks)} traceback(s)"
        + "".join(f"\n  {t}" for t in sorted(set(tracebacks))[:10]),
        f"hub's log: {len(hub_errors)} error line(s)"
        + "".join(f"\n  {e}" for e in hub_errors[:10]),
    ]

    limit, hub_limit = growth_limit(n), growth_limit(n, hub=True)
    service_growth = end.get("serve", 0) - start.get("serve", 0)
    hub_growth = sum(v for k, v in end.items() if k != "serve") - sum(
        v for k, v in start.items() if k != "serve"
    )
    memory_ok = service_growth <= limit and hub_growth <= hub_limit
    ok = not errors and memory_ok

    def verdict(what: str, value: str, good: bool) -> str:
        return f"  {what:<58}{value:>7}  {'PASS' if good else 'FAIL'}"

    lines += [
        "",
        "Verdict:",
        verdict("errors == 0", str(len(errors)), not errors),
        verdict(
            f"serve growth <= {limit / MIB:.1f} MiB "
            f"({GROWTH_ALLOWANCE_MIB:g} MiB + {GROWTH_PER_LAUNCH_KIB:g} KiB x {n})",
            f"{service_growth / MIB:+.1f}",
            service_growth <= limit,
        ),
        verdict(
            f"hub growth <= {hub_limit / MIB:.1f} MiB (the same + {HUB_CACHES_MIB:g} MiB "
            "JupyterHub caches)",
            f"{hub_growth / MIB:+.1f}",
            hub_growth <= hub_limit,
        ),
    ]
    return lines, ok


def others_on_machine(docker_cli: str, serve: Serve) -> str:
    out = run(docker_cli, "ps", "-q", "--no-trunc", check=False).split()
    mine = set(serve.containers())
    return f"load avg {load()}, {len(set(out) - mine)} other running container(s)"


def benchmark(args: argparse.Namespace, work: Path, serve: Serve) -> tuple[list[str], bool, dict]:
    for line in machine_lines(args.docker):
        print(line, flush=True)
    print(f"before:   {others_on_machine(args.docker, serve)}", flush=True)
    served = work / "git"
    served.mkdir()
    publish_repo(work / "repo", served, "soakbench.git")
    cull_wait = args.idle_timeout + 3 * args.cull_every + 90
    with git_daemon(served) as git_port, http_client() as http:
        repo_url = f"git://127.0.0.1:{git_port}/soakbench.git"
        path = f"/build/git/{quote(repo_url, safe='')}/main"
        print(f"repo:     {repo_url} (requirements.txt: six; one notebook)", flush=True)

        began = time.monotonic()
        serve.start()
        print(f"serve:    {serve.url} up after {time.monotonic() - began:.1f} s", flush=True)
        began = time.monotonic()
        try:
            warm = launch(http, serve.url, path, WARMUP_TIMEOUT)
        except (BenchError, httpx.HTTPError) as error:
            raise BenchError(f"the warm-up launch: {one_line(error)}") from None
        built = "building" in {phase for _, phase, _ in warm.events}
        print(
            f"warm-up:  {time.monotonic() - began:.1f} s "
            f"({'built' if built else 'found'} {warm.image})",
            flush=True,
        )
        waited, left = wait_for_culling(serve, cull_wait)
        if left:
            raise BenchError(f"the culler left the warm-up session running for {waited:.0f} s")
        print(f"warm-up session culled after {waited:.0f} s", flush=True)
        start = memory(serve)

        soak = Soak(serve, path, args.launches, args.minutes * 60)
        print(
            f"\nsoak: {args.launches} launches, one every {soak.interval:.2f} s; load avg {load()}",
            flush=True,
        )
        soak.run()
        print(f"all launches done; load avg {load()}; waiting for the culler…", flush=True)
        culled = wait_for_culling(serve, cull_wait)
        end_errors = []
        if culled[1]:
            end_errors.append(
                f"{culled[1]} session container(s) still there {culled[0]:.0f} s "
                "after the last launch"
            )
        end = memory(serve)
        if serve.process is not None and serve.process.poll() is not None:
            end_errors.append(f"binderbox serve exited (code {serve.process.returncode})")
        rows = hub_rows(serve.state_dir)
        if rows.get("users"):
            end_errors.append(f"{rows['users']} hub user(s) left after culling")
    print(f"after:    {others_on_machine(args.docker, serve)}", flush=True)
    lines, ok = report(args, soak, start, end, end_errors, culled, rows, log_problems(serve))
    data = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "launches": args.launches,
        "minutes": args.minutes,
        "idle_timeout": args.idle_timeout,
        "cull_every": args.cull_every,
        "memory_start": start,
        "memory_end": end,
        "hub_rows_end": rows,
        "containers_end": culled[1],
        "samples": [s.__dict__ for s in soak.samples],
        "outcomes": [
            {
                "index": o.index,
                "scheduled": o.scheduled,
                "began": o.began,
                "error": o.error,
                "ready_s": o.launch.ready_s if o.launch else None,
                "status_s": o.launch.status_s if o.launch else None,
            }
            for o in soak.outcomes
        ],
    }
    return lines, ok, data


def remove_network(docker_cli: str, name: str) -> None:
    """The session network serve made for this run, once no container is on it."""
    if run(docker_cli, "network", "ls", "-q", "--filter", f"name=^{name}$", check=False).strip():
        run(docker_cli, "network", "rm", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="length of the soak (10)")
    parser.add_argument("--launches", type=int, default=200, help="launches, evenly (200)")
    parser.add_argument(
        "--idle-timeout", type=int, default=20, help="cull_idle_timeout, seconds (20)"
    )
    parser.add_argument("--cull-every", type=int, default=5, help="cull_every, seconds (5)")
    parser.add_argument("--docker", default="/usr/bin/docker", help="docker CLI")
    parser.add_argument("--json", dest="json_out", help="also write the results to this file")
    parser.add_argument("--logs", help="copy serve's and the hub's logs into this folder")
    args = parser.parse_args()
    if args.launches < 1 or args.minutes <= 0:
        parser.error("--launches must be at least 1 and --minutes more than 0")
    if args.idle_timeout < 1 or args.cull_every < 1:
        parser.error("--idle-timeout and --cull-every must be at least 1")
    if not shutil.which("git"):
        print("error: git is needed (git daemon serves the fixture repository)")
        return 2

    # As in bench_launch: SIGTERM cleans up like Ctrl-C, and Ctrl-C works even when a
    # shell started us with SIGINT ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tag = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="binderbox-bench-soak-") as tmp:
        serve = Serve(Path(tmp), args.docker)
        serve.prefix = f"binderbox-bench-soak-{tag}-"
        network = f"binderbox-soak-{tag}"
        serve.env.update(
            {
                "BINDERBOX_IMAGE_PREFIX": serve.prefix,
                "BINDERBOX_SESSION_NETWORK": network,
                "BINDERBOX_CULL_IDLE_TIMEOUT": str(args.idle_timeout),
                "BINDERBOX_CULL_EVERY": str(args.cull_every),
                # Every launch comes from 127.0.0.1; the per-address limits are for
                # many users, and would refuse a faster --launches/--minutes.
                "BINDERBOX_RATE_LIMIT_PER_MINUTE": "0",
                "BINDERBOX_LAUNCHES_PER_ADDRESS": "0",
            }
        )
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
            remove_network(args.docker, network)
            if args.logs:
                logs = Path(args.logs)
                logs.mkdir(parents=True, exist_ok=True)
                for source in (serve.log_path, serve.hub_log):
                    if source.exists():
                        shutil.copy(source, logs / source.name)
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(data, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
