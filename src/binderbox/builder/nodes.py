"""Builds on cluster nodes: the Builder seam's second implementation.

With ``swarm_build_nodes`` set, a build runs on the dockerd of one of those machines (the
one with the fewest builds of this service running that answers), through the Docker API
protected by TLS client certificates, and the node pushes the image to the registry
itself. Everything before the build — fetching the repository, checking its files,
writing the Dockerfile — stays on this machine, as for a local build; the docker CLI sends
the context to the node's BuildKit. The node keeps the image under the name sessions run,
so a session placed there starts without a pull.

A node needs binderbox's base image: the first build there copies this machine's (image
save → load over the same API) instead of bootstrapping it again. The node guard
(launch/nodeguard.py) puts the build firewall on each node's docker0, where BuildKit's
steps are; the build memory and process limits are not set on build nodes yet.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import docker.tls
import requests

from binderbox.builder import base
from binderbox.builder.engine import DockerEngine
from binderbox.builder.pipeline import BuildRequest, BuildResult, build_repository
from binderbox.config import Settings, build_nodes
from binderbox.errors import BinderboxError
from binderbox.events import Emit, Event
from binderbox.registry import RegistryImageStore

PING_TIMEOUT = 5
# The Docker API version spoken to build nodes: dockerd 20.10's, which later ones accept.
API_VERSION = "1.41"
# Copying the base image (a few hundred MB) to a node that lacks it.
COPY_TIMEOUT = 600


@dataclass(frozen=True)
class BuildNode:
    """One build node's Docker API: ``tcp://host:port`` with TLS client files."""

    host: str
    tls_dir: Path

    def tls(self) -> docker.tls.TLSConfig:
        return docker.tls.TLSConfig(
            client_cert=(str(self.tls_dir / "cert.pem"), str(self.tls_dir / "key.pem")),
            ca_cert=str(self.tls_dir / "ca.pem"),
            verify=True,
        )

    def client(self, timeout: float) -> docker.DockerClient:
        client = docker.DockerClient(
            base_url=self.host.replace("tcp://", "https://", 1),
            tls=self.tls(),
            timeout=timeout,
            # A fixed version: asking the node for its own would be a request made before
            # the line below could keep REQUESTS_CA_BUNDLE from replacing the node's CA.
            version=API_VERSION,
        )
        client.api.trust_env = False  # nor an HTTPS proxy meant for the internet
        return client

    def engine(self, docker_cli: str) -> DockerEngine:
        return DockerEngine(
            docker_cli=docker_cli,
            client=self.client(timeout=120),
            cli_env={
                "DOCKER_HOST": self.host,
                "DOCKER_TLS_VERIFY": "1",
                "DOCKER_CERT_PATH": str(self.tls_dir),
                # This machine's CLI configuration (contexts, credentials) stays out.
                "DOCKER_CONTEXT": "default",
            },
        )


class NodeBuilder:
    """Builds on the least busy build node that answers, and pushes from there."""

    pushes_to_registry = True

    def __init__(
        self, settings: Settings, fit: Callable[[str], str | None] = lambda node_id: None
    ) -> None:
        """``fit(swarm_node_id)`` says why a node may not build (its firewall is not in
        place), or None; a node it refuses is passed over."""
        self.fit = fit
        tls_dir = Path(settings.swarm_build_tls_dir)
        self.nodes = [BuildNode(host, tls_dir) for host in build_nodes(settings)]
        self.registry = RegistryImageStore(settings)
        self._busy: Counter[str] = Counter()
        self._lock = threading.Lock()

    def build(self, request: BuildRequest, settings: Settings, emit: Emit) -> BuildResult:
        node = self._take(emit)
        try:
            engine = node.engine(settings.docker_cli)
            self._copy_base_images(node, engine, emit)
            result = build_repository(request, settings, emit, engine=engine)
            emit(Event("building", f"Pushing {result.image} from {node.host} to the registry."))
            self.registry.push_from(engine.client, result.image, node.host)
            return result
        finally:
            with self._lock:
                self._busy[node.host] -= 1

    def _take(self, emit: Emit) -> BuildNode:
        """The answering node with the fewest running builds (counted as taken)."""
        with self._lock:
            order = sorted(self.nodes, key=lambda n: self._busy[n.host])
        problems = []
        for node in order:
            problem = _ping(node, self.fit)
            if problem is None:
                with self._lock:
                    self._busy[node.host] += 1
                emit(Event("building", f"Building on the build node {node.host}."))
                return node
            problems.append(f"{node.host}: {problem}")
        raise BinderboxError(
            f"No build node answers ({'; '.join(problems)}); check 'swarm_build_nodes' and "
            "that each node's dockerd listens there with TLS."
        )

    def _copy_base_images(self, node: BuildNode, engine: DockerEngine, emit: Emit) -> None:
        here = DockerEngine.connect(engine.docker_cli)
        for suite in base.SUITE_PYTHON:
            tag = base.find_base(here, suite)
            if not tag or engine.image_labels(tag) is not None:
                continue
            emit(Event("building", f"Copying the base image {tag} to {node.host} (once)."))
            copier = node.client(timeout=COPY_TIMEOUT)
            try:
                copier.images.load(here.client.images.get(tag).save(named=True))
            except (docker.errors.DockerException, requests.RequestException) as error:
                raise BinderboxError(
                    f"Copying the base image {tag} to the build node {node.host} failed: "
                    f"{str(error).splitlines()[0][:200]}."
                ) from None
            finally:
                copier.close()


def _ping(node: BuildNode, fit: Callable[[str], str | None]) -> str | None:
    """None when the node's dockerd answers and ``fit`` accepts its Swarm node, else what
    went wrong, in a few words."""
    try:
        client = node.client(timeout=PING_TIMEOUT)
    except docker.errors.DockerException as error:
        return _few_words(error)
    try:
        client.ping()
        node_id = (client.info().get("Swarm") or {}).get("NodeID", "")
    except requests.exceptions.SSLError:
        return "its TLS certificate is not trusted, or ours is refused"
    except (requests.RequestException, docker.errors.DockerException) as error:
        return _few_words(error)
    finally:
        client.close()
    return fit(node_id)


def _few_words(error: Exception) -> str:
    """The innermost cause of a requests/docker error, on one line."""
    text = " ".join(str(error).split()).rsplit("Caused by ", 1)[-1]
    return text[:120] or "no answer"
