"""A real OCI registry for tests: Debian's ``docker-registry`` (the CNCF distribution
registry) with its storage in a temporary folder, on an address the test chooses.

``running_registry()`` is the context manager (a swarm test can listen on a network's
gateway so that worker nodes pull from it); ``registry_fixture`` is a module-scoped pytest
fixture named ``registry`` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REGISTRY_BINARY = "docker-registry"

_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {host}:{port}
"""


@dataclass(frozen=True)
class Registry:
    host: str
    port: int
    root: Path
    log: Path

    @property
    def address(self) -> str:
        """``host:port``, the part image references start with."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def registry_missing() -> str:
    """Why no registry can be started here, or "" when one can."""
    if shutil.which(REGISTRY_BINARY) is None:
        return (
            "Debian's docker-registry is not installed (apt-get install docker-registry; "
            "./bootstrap test installs it)"
        )
    return ""


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_registry(
    host: str = "127.0.0.1", port: int = 0, timeout: float = 30
) -> Iterator[Registry]:
    """Start ``docker-registry serve`` on ``host:port`` (a free port when 0) and stop it
    (and remove its storage) at the end."""
    why = registry_missing()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="binderbox-registry-"))
    port = port or _free_port(host)
    config = root / "config.yml"
    storage = root / "storage"
    storage.mkdir()
    config.write_text(_CONFIG.format(root=storage, host=host, port=port))
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    registry = Registry(host=host, port=port, root=storage, log=log)
    try:
        _wait_until_answering(registry, proc, timeout)
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_answering(registry: Registry, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {proc.returncode}: "
                    + registry.log.read_text(errors="replace")[-2000:]
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get(registry.url + "/v2/").status_code == 200:
                    return
            time.sleep(0.05)
    raise TimeoutError(f"docker-registry did not answer on {registry.url} within {timeout} s")


@pytest.fixture(scope="module", name="registry")
def registry_fixture() -> Iterator[Registry]:
    """A registry on 127.0.0.1 for the tests of one module."""
    with running_registry() as registry:
        yield registry
