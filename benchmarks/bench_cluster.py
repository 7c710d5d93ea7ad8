"""Benchmark launches on a Docker Swarm cluster beside launches on one machine.

The script makes the cluster the swarm tests use (tests/cluster.py: this dockerd as the
Swarm manager, ``--workers`` Docker-in-Docker workers on a bridge network, Debian's
docker-registry), serves a tiny repository (``six``, one notebook) with ``git daemon``
and runs the real ``binderbox serve`` twice, one after the other:

1. ``backend = "local"`` (one machine): a warm-up launch builds the image, then
   ``--launches`` sequential launches.
2. ``backend = "swarm"`` (registry, node guard on, pre-pulling left to the script): a
   warm-up launch builds and pushes the image, then ``--reps`` launches of each case:
   - pulled: no worker has the image (removed from every worker first), so the node
     Swarm picks pulls it from the registry during the launch;
   - pre-pulled: removed from every worker, then ``SwarmBackend.prepull`` (the code
     serve's pre-pull loop runs) puts it on every worker ahead of the launch; the pre-pull
     itself is timed too;
   - present: the image is on the node from an earlier session;
   and then ``--launches`` sequential launches with the image on every worker.

Each launch is timed from sending ``GET /build/git/<url>/main`` to the ``ready`` event
and to ``api/status`` answering 200 through the proxy (bench_launch.launch). Between the
single cases the script removes the sessions' Swarm services itself (the hub finds them
stopped at its next poll); the sequential launches keep their sessions, which Swarm
spreads over the workers (counted per worker). Memory: resident memory of serve and its
children on one machine (serve, hub, proxy, culler), and on the swarm of serve on the
manager plus the hub's and the proxy's containers (docker stats), idle and with the
``--launches`` sessions running.

Run from the repository root as root, with dockerd running and the base image present:
    .venv/bin/python benchmarks/bench_cluster.py [--workers 2] [--reps 3] [--launches 20]
Exit status: 0 when done, 2 on an error. Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import docker
import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_launch import (  # noqa: E402  (after the path set-up above)
    BenchError,
    Launch,
    Serve,
    git_daemon,
    http_client,
    launch,
    machine_lines,
    measure_memory,
    mib,
    p95,
    parse_mem,
    publish_repo,
    run,
    wait_until,
)
from tests.cluster import Cluster, swarm_cluster, swarm_unavailable  # noqa: E402

from binderbox.config import Settings, load_settings  # noqa: E402
from binderbox.launch.options import LABEL_USER  # noqa: E402
from binderbox.launch.swarm import SwarmBackend, hub_id_for  # noqa: E402

DOCKER = "/usr/bin/docker"
LAUNCH_TIMEOUT = 420  # a pulled launch downloads and unpacks a base-sized image
WARMUP_TIMEOUT = 1200


class SwarmServe(Serve):
    """``binderbox serve`` with ``backend = "swarm"`` on this cluster."""

    def __init__(self, work: Path, cluster: Cluster) -> None:
        super().__init__(work, DOCKER)
        self.cluster = cluster
        self.start_timeout = 600  # the first start builds the hub image and pushes it
        self.hub_id = hub_id_for(Settings().with_overrides(state_dir=str(self.state_dir)))
        self.env.update(
            BINDERBOX_BACKEND="swarm",
            BINDERBOX_REGISTRY_URL=f"http://{cluster.registry.push_url}",
            BINDERBOX_REGISTRY_PULL_URL=cluster.registry.pull_url,
            BINDERBOX_SWARM_NETWORK=f"binderbox-bench-{self.hub_id[:6]}",
            BINDERBOX_SESSION_START_TIMEOUT=str(LAUNCH_TIMEOUT - 30),
            # The script pre-pulls when it means to (the loop's own code, SwarmBackend.prepull).
            BINDERBOX_SWARM_PREPULL_EVERY="0",
        )

    def find_hub(self) -> None:
        """The hub and the proxy are containers on the manager, not serve's children."""

    def settings(self) -> Settings:
        return load_settings(environ=self.env)

    def session_services(self) -> list[docker.models.services.Service]:
        client = docker.from_env()
        return [
            s
            for s in client.services.list(filters={"label": f"binderbox.hub={self.hub_id}"})
            if LABEL_USER in (s.attrs["Spec"].get("Labels") or {})
        ]

    def node_of(self, launched: Launch) -> str:
        client = docker.from_env()
        (service,) = client.services.list(filters={"label": f"{LABEL_USER}={launched.user}"})
        (task,) = [t for t in service.tasks() if t["Status"]["State"] == "running"]
        return self.cluster.nodes.get(task["NodeID"], task["NodeID"][:12])

    def end_sessions(self) -> None:
        for service in self.session_services():
            with contextlib.suppress(docker.errors.APIError):
                service.remove()

    def remove_image_from_workers(self, image: str) -> None:
        reference = f"{self.cluster.registry.pull_url}/{image}"

        def gone(worker: str) -> bool:
            run(DOCKER, "exec", worker, "docker", "rmi", "-f", reference, check=False)
            found = run(DOCKER, "exec", worker, "docker", "images", "-q", reference, check=False)
            return not found.strip()

        for worker in self.cluster.workers:
            # The session's container on the worker goes a moment after its service.
            wait_until(lambda worker=worker: gone(worker), 120, f"{image} gone from {worker}", 1)

    def memory(self) -> dict[str, int]:
        assert self.process is not None
        table_memory = measure_container_memory(
            [f"binderbox-hub-{self.hub_id}", f"binderbox-proxy-{self.hub_id}"]
        )
        from bench_launch import descendants, process_table, rss_bytes

        serve_rss = sum(rss_bytes(pid) for pid in descendants(self.process.pid, process_table()))
        return {"binderbox serve (manager)": serve_rss, **table_memory}


def measure_container_memory(names: list[str]) -> dict[str, int]:
    out = run(DOCKER, "stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}", *names)
    found = {}
    for line in out.splitlines():
        name, usage = line.split("\t")
        label = "hub container" if name.startswith("binderbox-hub-") else "proxy container"
        found[label] = parse_mem(usage.split("/")[0])
    return found


def one(serve: Serve, path: str, timeout: float = LAUNCH_TIMEOUT) -> Launch:
    with http_client() as http:
        return launch(http, serve.url, path, timeout)


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": p95(values),
        "min": min(values),
        "max": max(values),
    }


def line(title: str, values: list[float]) -> str:
    s = stats(values)
    return (
        f"{title:<44} {s['n']:>3} {s['median']:>8.2f} {s['p95']:>7.2f}"
        f" {s['min']:>7.2f} {s['max']:>7.2f}"
    )


def one_machine(work: Path, path: str, launches: int) -> dict:
    serve = Serve(work / "local", DOCKER)
    serve.env["BINDERBOX_PER_REPO_QUOTA"] = str(launches + 5)
    try:
        serve.start()
        one(serve, path, WARMUP_TIMEOUT)
        idle = measure_memory(serve, with_containers=False)
        done = [one(serve, path) for _ in range(launches)]
        busy = measure_memory(serve, with_containers=False)
        return {
            "ready": [x.ready_s for x in done],
            "status": [x.status_s for x in done],
            "memory idle": idle.service_total + idle.hub_total,
            "memory busy": busy.service_total + busy.hub_total,
        }
    finally:
        serve.stop()
        serve.remove_images()


def on_the_swarm(work: Path, cluster: Cluster, path: str, reps: int, launches: int) -> dict:
    serve = SwarmServe(work / "swarm", cluster)
    serve.env["BINDERBOX_PER_REPO_QUOTA"] = str(launches + reps * 3 + 5)
    result: dict = {"pulled": [], "pre-pulled": [], "present": [], "prepull job": []}
    try:
        began = time.monotonic()
        serve.start()
        result["serve start"] = time.monotonic() - began
        warm = one(serve, path, WARMUP_TIMEOUT)
        image = warm.image
        serve.end_sessions()
        backend = SwarmBackend(serve.settings())
        for _ in range(reps):
            serve.remove_image_from_workers(image)
            result["pulled"].append(one(serve, path).status_s)
            serve.end_sessions()
            serve.remove_image_from_workers(image)
            began = time.monotonic()
            placed = backend.prepull([image])
            result["prepull job"].append(time.monotonic() - began)
            if len(placed.get(image, ())) < len(cluster.workers):
                raise BenchError(f"the pre-pull reached {len(placed.get(image, ()))} workers")
            result["pre-pulled"].append(one(serve, path).status_s)
            serve.end_sessions()
            result["present"].append(one(serve, path).status_s)
            serve.end_sessions()
        idle = serve.memory()
        done = [one(serve, path) for _ in range(launches)]
        busy = serve.memory()
        per_node: dict[str, int] = {}
        for item in done:
            node = serve.node_of(item)
            per_node[node] = per_node.get(node, 0) + 1
        result.update(
            ready=[x.ready_s for x in done],
            status=[x.status_s for x in done],
            per_node=per_node,
            memory_idle=idle,
            memory_busy=busy,
        )
        return result
    finally:
        serve.stop()
        serve.remove_images()


def report(local: dict, swarm: dict, args: argparse.Namespace) -> list[str]:
    n = args.launches
    lines = [
        *machine_lines(DOCKER),
        f"cluster:  this dockerd as manager + {args.workers} Docker-in-Docker workers on the "
        "same machine (they share its 2 cores)",
        f"repository: requirements.txt {args.requirements!r}",
        "",
        "Seconds from GET /build/… to api/status 200 (image built; sessions on the workers)",
        "",
        f"{'case':<44} {'n':>3} {'median':>8} {'p95':>7} {'min':>7} {'max':>7}",
        "-" * 80,
        line("swarm: image pulled from the registry", swarm["pulled"]),
        line("swarm: image pre-pulled", swarm["pre-pulled"]),
        line("swarm: image present from an earlier session", swarm["present"]),
        line("  (the pre-pull job itself, all workers)", swarm["prepull job"]),
        line(f"swarm: {n} sequential, 'ready' event", swarm["ready"]),
        line(f"swarm: {n} sequential, api/status 200", swarm["status"]),
        line(f"one machine: {n} sequential, 'ready' event", local["ready"]),
        line(f"one machine: {n} sequential, api/status 200", local["status"]),
        "",
        "swarm sessions per worker: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(swarm["per_node"].items())),
        f"swarm serve start (hub image built if missing, pushed, node guard up): "
        f"{swarm['serve start']:.0f} s",
        "",
        "Memory (MiB, resident)                       idle   with the sequential sessions",
        f"{'one machine: serve + hub + proxy + culler':<44} {mib(local['memory idle']):>5}"
        f" {mib(local['memory busy']):>8}",
    ]
    for part in swarm["memory_idle"]:
        lines.append(
            f"{'swarm: ' + part:<44} {mib(swarm['memory_idle'][part]):>5}"
            f" {mib(swarm['memory_busy'][part]):>8}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="launches of each single case")
    parser.add_argument("--launches", type=int, default=20, help="sequential launches")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    parser.add_argument(
        "--requirements",
        default="six",
        help="the repository's requirements.txt, space-separated (a bigger image: "
        "'numpy pandas matplotlib')",
    )
    args = parser.parse_args()
    if reason := swarm_unavailable():
        print(f"error: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="binderbox-bench-cluster-") as tmp:
        work = Path(tmp)
        served = work / "served"
        served.mkdir()
        publish_repo(
            work / "repo", served, "cluster.git", "\n".join(args.requirements.split()) + "\n"
        )
        (work / "cluster").mkdir()
        try:
            with git_daemon(served) as port, swarm_cluster(work / "cluster") as cluster:
                while len(cluster.workers) < args.workers:
                    cluster.add_worker()
                path = f"/build/git/{quote(f'git://127.0.0.1:{port}/cluster.git', safe='')}/main"
                local = one_machine(work, path, args.launches)
                swarm = on_the_swarm(work, cluster, path, args.reps, args.launches)
        except (BenchError, httpx.HTTPError, subprocess.TimeoutExpired) as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return 2
    lines = report(local, swarm, args)
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"local": local, "swarm": swarm}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
