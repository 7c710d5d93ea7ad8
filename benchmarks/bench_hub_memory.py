"""JupyterHub's own memory over many throwaway users, without containers.

bench_soak.py sees the hub process grow during a soak. This script tells a leak from a
cache that fills: it starts a real JupyterHub with the configuration binderbox serve
writes (render_config: roles, the idle culler, its settings) but a spawner that starts
nothing (every "server" is one tiny HTTP server of this script), and drives it with
binderbox's own HubClient the way serve does for each launch: list the active sessions
(the quota check), create a throwaway user, start its server and read the progress
stream to ``ready``, then one request through the proxy. The idle culler (2 s idle,
checked every second) stops the servers and deletes the users; at most
``--alive`` users exist at once. The jupyterhub process's VmRSS is printed every 100
users. No Docker, no sessions: only the hub, its proxy and its culler.

Run from the repository root:  .venv/bin/python benchmarks/bench_hub_memory.py --users 1500
Exit status 0 when done, 2 on an error. The hub and its temporary folder are removed at
the end, also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_launch import MIB, BenchError, free_port, rss_bytes  # puts src/ on the path

from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.launch.client import HubClient
from binderbox.launch.hub import SERVICE_TOKEN_ENV, render_config
from binderbox.launch.proxy import ensure_proxy

# Imported by the hub process from the temporary folder.
NULL_SPAWNER = '''\
import os
from jupyterhub.spawner import Spawner


class NullSpawner(Spawner):
    """Starts nothing: every server is the benchmark's one HTTP server."""

    running = False

    async def start(self):
        self.running = True
        return ("127.0.0.1", int(os.environ["NULL_SERVER_PORT"]))

    async def poll(self):
        return None if self.running else 0

    async def stop(self, now=False):
        self.running = False
'''
IMAGE_PREFIX = "binderbox-hubmem-"


class Answer(BaseHTTPRequestHandler):
    """200 with ``{}`` for every GET: the hub's readiness check and api/status."""

    def do_GET(self) -> None:  # the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


async def drive(
    client: HubClient, hub_pid: int, users: int, alive: int, at_once: int
) -> list[tuple[int, float, int]]:
    """Launch ``users`` throwaway users; (users done, seconds, hub RSS bytes) samples."""
    samples: list[tuple[int, float, int]] = []
    began = time.monotonic()
    done = 0

    async def one() -> None:
        nonlocal done
        name = "binder-" + uuid.uuid4().hex[:12]
        await client.running_sessions()
        await client.create_user(name)
        async for _ in client.start_server(name, IMAGE_PREFIX + "x:latest", uuid.uuid4().hex):
            pass
        url = await client.server_url(name)
        await client._http.get(url + "api/status")  # traffic through the proxy
        done += 1

    def sample() -> None:
        samples.append((done, time.monotonic() - began, rss_bytes(hub_pid)))
        _, seconds, rss = samples[-1]
        print(f"{done:>6} {seconds:>7.0f} {rss / MIB:>8.1f}", flush=True)

    print(f"{'users':>6} {'s':>7} {'hub MiB':>8}", flush=True)
    sample()
    pending: set[asyncio.Future] = set()
    next_sample = 100
    for _ in range(users):
        while len(pending) >= at_once or len(await client.running_sessions()) >= alive:
            if pending:
                finished, pending = await asyncio.wait(
                    pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                )
                for future in finished:
                    future.result()
            else:
                await asyncio.sleep(0.5)  # the culler's turn
        pending.add(asyncio.ensure_future(one()))
        if done >= next_sample:
            sample()
            next_sample += 100
    for future in asyncio.as_completed(pending):
        await future
    deadline = time.monotonic() + 60
    while await client.running_sessions():
        if time.monotonic() > deadline:
            raise BenchError("the culler did not stop every server within 60 s")
        await asyncio.sleep(0.5)
    sample()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1500, help="throwaway users (1500)")
    parser.add_argument("--alive", type=int, default=15, help="users at once at most (15)")
    parser.add_argument("--at-once", type=int, default=4, help="starts in flight (4)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="binderbox-bench-hubmem-"))
    hub: subprocess.Popen[bytes] | None = None
    try:
        settings = Settings().with_overrides(
            sessions_port=free_port(),
            hub_port=free_port(),
            proxy_api_port=free_port(),
            cull_idle_timeout=2,
            cull_every=1,
            image_prefix=IMAGE_PREFIX,
        )
        proxy = ensure_proxy(settings)
        config = render_config(settings, state_dir=tmp, proxy=proxy, hub_id="hubmem")
        config += "c.JupyterHub.spawner_class = 'nullspawner.NullSpawner'\n"
        (tmp / "jupyterhub_config.py").write_text(config)
        (tmp / "nullspawner.py").write_text(NULL_SPAWNER)
        token = uuid.uuid4().hex * 2
        with (tmp / "jupyterhub.log").open("wb") as log:
            hub = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
                cwd=tmp,
                env={
                    **os.environ,
                    SERVICE_TOKEN_ENV: token,
                    "NULL_SERVER_PORT": str(server.server_address[1]),
                    "PYTHONPATH": str(tmp),
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        async def run() -> None:
            api = f"http://127.0.0.1:{settings.hub_port}/hub/api"
            public = f"http://127.0.0.1:{settings.sessions_port}/"
            async with HubClient(api, token, public) as client:
                deadline = time.monotonic() + 120
                while not await client.healthy():
                    if hub.poll() is not None or time.monotonic() > deadline:
                        raise BenchError("JupyterHub did not start (see its log)")
                    await asyncio.sleep(0.2)
                samples = await drive(client, hub.pid, args.users, args.alive, args.at_once)
            first, last = samples[0], samples[-1]
            print(
                f"\njupyterhub: {first[2] / MIB:.1f} MiB at the start, {last[2] / MIB:.1f} MiB "
                f"after {last[0]} users ({(last[2] - first[2]) / MIB:+.1f} MiB)"
            )

        asyncio.run(run())
    except (BenchError, BinderboxError, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        log_tail = (tmp / "jupyterhub.log").read_text(errors="replace")[-1500:]
        print(log_tail, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if hub is not None and hub.poll() is None:
            hub.terminate()  # the hub stops its proxy and culler
            try:
                hub.wait(30)
            except subprocess.TimeoutExpired:
                hub.kill()
                hub.wait()
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
