"""Run a built image on this machine, as ``repo2docker`` does after a build."""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from binderbox.errors import BinderboxError, UsageError

_PORT = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<host>\d{1,5}):(?P<container>\d{1,5})(?:/tcp)?$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
JUPYTER_PORT = 8888


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    host_port: int
    container_port: int


@dataclass(frozen=True)
class RunOptions:
    """How to start the container; built from ``binderbox run`` flags."""

    ports: tuple[PortMapping, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)  # host path -> container path
    command: tuple[str, ...] = ()


def parse_ports(values: tuple[str, ...]) -> tuple[PortMapping, ...]:
    mappings = []
    for value in values:
        match = _PORT.match(value)
        if not match or not all(0 < int(match[k]) < 65536 for k in ("host", "container")):
            raise UsageError(f"-p {value!r} is not HOST:CONTAINER, for example 8888:8888.")
        mappings.append(
            PortMapping(match["ip"] or "127.0.0.1", int(match["host"]), int(match["container"]))
        )
    return tuple(mappings)


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for value in values:
        if not _ENV.match(value):
            raise UsageError(f"-e {value!r} is not KEY=VALUE.")
        key, _, val = value.partition("=")
        env[key] = val
    return env


def parse_volumes(values: tuple[str, ...]) -> dict[str, str]:
    volumes = {}
    for value in values:
        src, sep, dst = value.partition(":")
        if not sep or not src or not dst.startswith("/"):
            raise UsageError(f"-v {value!r} is not SOURCE:/absolute/destination.")
        path = Path(src).expanduser().resolve()
        if not path.exists():
            raise UsageError(f"-v {value!r}: '{src}' does not exist.")
        volumes[str(path)] = dst
    return volumes


def _start(client: docker.DockerClient, image: str, options: RunOptions, **extra) -> Container:
    ports: dict[str, object] = {}
    for mapping in options.ports:
        ports[f"{mapping.container_port}/tcp"] = (mapping.host_ip, mapping.host_port)
    return client.containers.run(
        image,
        command=list(options.command) or None,
        detach=True,
        ports=ports,
        environment=options.environment,
        volumes={src: {"bind": dst, "mode": "rw"} for src, dst in options.volumes.items()},
        # The session never needs privileges: the image's user is not root.
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=4096,
        labels={"binderbox.run": "1"},
        **extra,
    )


def run_command(client: docker.DockerClient, image: str, options: RunOptions) -> int:
    """Run ``options.command`` in the image (through ``start``), stream output, return its code."""
    container = _start(client, image, options)
    try:
        with _stop_on_signals():
            for chunk in container.logs(stream=True, follow=True):
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            return int(container.wait().get("StatusCode", 1))
    finally:
        _remove(container)


def serve_jupyter(
    client: docker.DockerClient,
    image: str,
    options: RunOptions,
    announce: Callable[[str], None],
    timeout: float = 120,
) -> int:
    """Start JupyterLab on 127.0.0.1 with a fresh token, print its URL and wait for Ctrl-C."""
    token = secrets.token_hex(24)
    ports = options.ports
    if not any(m.container_port == JUPYTER_PORT for m in ports):
        ports = (*ports, PortMapping("127.0.0.1", 0, JUPYTER_PORT))
    opts = RunOptions(
        ports=tuple(
            PortMapping(m.host_ip, m.host_port or None, m.container_port)  # type: ignore[arg-type]
            for m in ports
        ),
        environment={**options.environment, "JUPYTER_TOKEN": token},
        volumes=options.volumes,
        command=options.command,
    )
    container = _start(client, image, opts)
    try:
        with _stop_on_signals():
            host_port = _published_port(container, JUPYTER_PORT)
            base = f"http://127.0.0.1:{host_port}/"
            _wait_for_jupyter(container, base, token, timeout)
            announce(f"{base}lab?token={token}")
            for _ in container.logs(stream=True, follow=True, since=int(time.time())):
                pass
            return int(container.wait().get("StatusCode", 1))
    except KeyboardInterrupt:
        return 0
    finally:
        _remove(container)


def _published_port(container: Container, port: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        container.reload()
        bindings = (container.ports or {}).get(f"{port}/tcp") or []
        if bindings:
            return int(bindings[0]["HostPort"])
        if container.status == "exited":
            break
        time.sleep(0.1)
    raise BinderboxError(_exited_message(container, "before its port was published"))


def _wait_for_jupyter(container: Container, base: str, token: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        container.reload()
        if container.status == "exited":
            raise BinderboxError(_exited_message(container, "before Jupyter answered"))
        time.sleep(0.2)
    raise BinderboxError(f"Jupyter did not answer within {timeout:g} seconds.")


def _exited_message(container: Container, when: str) -> str:
    tail = container.logs(tail=15).decode(errors="replace").strip()
    return f"The container stopped {when}. Its last output:\n{tail}"


def _remove(container: Container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


class _stop_on_signals:
    """Turn SIGTERM into KeyboardInterrupt so the container is removed either way."""

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
