"""Push and pull time of a base-sized image through a local OCI registry.

Starts Debian's docker-registry on 127.0.0.1 (storage in a temporary folder), makes an
image as large as the base with a layer no other local image shares (the base's root
filesystem exported and imported again with one file added, so a pull really downloads
and unpacks it), then times binderbox's RegistryImageStore:

- push to an empty registry, and again when the registry already has the layer;
- pull after the image was removed locally (download and unpack), and again when the
  layer is still here (manifest only).

    .venv/bin/python benchmarks/bench_registry.py [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.registry import running_registry

from binderbox.builder.engine import DockerEngine
from binderbox.config import load_settings
from binderbox.registry import RegistryImageStore

DOCKER = "/usr/bin/docker"


def base_image() -> str:
    tags = DockerEngine.connect(DOCKER).tags_of("binderbox/base")
    bookworm = sorted(t for t in tags if ":bookworm-" in t)
    if not bookworm:
        raise SystemExit("No binderbox/base:bookworm-* image here; run `binderbox base` first.")
    return bookworm[-1]


def unique_copy(base: str, name: str) -> None:
    """``name``: the base's files plus one, as a single layer shared with nothing else."""
    marker = f"bench-{uuid.uuid4().hex}"
    container = subprocess.run(
        [DOCKER, "create", base, "true"], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        export = subprocess.Popen([DOCKER, "export", container], stdout=subprocess.PIPE)
        subprocess.run(
            [DOCKER, "import", "--message", marker, "-", name],
            stdin=export.stdout,
            check=True,
            capture_output=True,
        )
        export.wait()
    finally:
        subprocess.run([DOCKER, "rm", container], capture_output=True)


def timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    runs = parser.parse_args().runs
    client = docker.from_env()
    base = base_image()
    results: dict[str, list[float]] = {
        "push, empty registry": [],
        "push, registry has the layer": [],
        "pull, layer not here": [],
        "pull, layer here": [],
    }
    size = 0
    for _ in range(runs):
        name = f"binderbox-bench-registry-{uuid.uuid4().hex[:6]}:base-sized"
        with running_registry() as registry:
            store = RegistryImageStore(load_settings(environ={}).with_overrides(
                registry_url=registry.url
            ))  # fmt: skip
            unique_copy(base, name)
            try:
                size = client.images.get(name).attrs["Size"]
                results["push, empty registry"].append(timed(store.push, name))
                results["push, registry has the layer"].append(timed(store.push, name))
                client.images.remove(name)  # the layer goes with it: nothing shares it
                results["pull, layer not here"].append(timed(store.pull, name))
                results["pull, layer here"].append(timed(store.pull, name))
            finally:
                for reference in (name, store.reference(name)):
                    try:
                        client.images.remove(reference)
                    except docker.errors.ImageNotFound:
                        pass
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, Python {platform.python_version()}",
                "image_mb": round(size / 1e6),
                "runs": runs,
                "seconds": {k: round(statistics.median(v), 2) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
