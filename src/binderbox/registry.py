"""Images through an OCI registry: the ImageStore behind ``registry_url``.

An image "exists" when the registry has its manifest (a v2 manifest HEAD, no download),
builds push there, and sessions on any node run ``reference(name)``, the name under the
address nodes pull from (``registry_pull_url``, by default the same as ``registry_url``).

The manager's dockerd pushes to ``registry_url``'s address. dockerd treats registries on
127.0.0.0/8 as insecure by itself, so a loopback registry works over plain http; nodes
that pull from another plain-http address need it in their ``insecure-registries``.
Registries that ask for credentials are not supported yet.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import requests

from binderbox.builder.engine import docker_client
from binderbox.config import Settings
from binderbox.errors import BinderboxError, shortened

# What a manifest HEAD accepts: OCI and Docker v2, single images and multi-platform lists.
# Without these a registry may answer for a v1 schema it would have to convert, or 404.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
# A manifest HEAD is one small request; a registry that takes longer is not well.
LOOKUP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Seconds a whole push or pull may take (the base, about 1 GB, takes some 20 s locally).
TRANSFER_TIMEOUT = 1800.0

# The distribution spec's repository path and tag grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class RegistryError(BinderboxError):
    """The image registry cannot be reached, or refused what was asked of it."""


def repository_and_tag(name: str) -> tuple[str, str]:
    """Split an image name such as ``binderbox-git-host-repo-1a2b3c:<commit>-o<digest>``
    into its repository path and tag (``latest`` when it has none).

    A colon names the tag only after the last slash; before it, it would be a port.
    """
    repository, tag = name, "latest"
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:
        repository, tag = head, tail
    if not _REPOSITORY.fullmatch(repository) or len(repository) > 255:
        raise RegistryError(
            f"The image name {name!r} cannot be stored in a registry (a registry takes "
            "lowercase letters and digits, separated by '.', '_', '-' or '/')."
        )
    if not _TAG.fullmatch(tag):
        raise RegistryError(f"The image tag {tag!r} cannot be stored in a registry.")
    return repository, tag


def registry_address(url: str) -> str:
    """``host:port`` of a registry URL (``http://127.0.0.1:5000`` → ``127.0.0.1:5000``);
    a bare ``host:port`` is taken as it is."""
    return urlsplit(url if "://" in url else "http://" + url).netloc


def _one_line(text: str) -> str:
    return shortened(" ".join(str(text).split()), 300).rstrip(".")


class RegistryImageStore:
    """Images kept in an OCI registry; the local dockerd pushes and pulls them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        parts = urlsplit(settings.registry_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        # Where this machine's dockerd pushes to and pulls from.
        self.address = parts.netloc
        # Where session nodes pull from; the manager may know the registry as loopback.
        self.pull_address = registry_address(settings.registry_pull_url or settings.registry_url)
        self._docker: docker.DockerClient | None = None

    # -- what the service asks ---------------------------------------------------------

    def exists(self, name: str) -> bool:
        """Whether the registry holds ``name`` (its manifest answers a HEAD)."""
        repository, tag = repository_and_tag(name)
        url = f"{self.base_url}/v2/{repository}/manifests/{tag}"
        try:
            with self._http() as client:
                response = client.head(url, headers={"Accept": MANIFEST_TYPES})
        except httpx.TimeoutException:
            raise RegistryError(
                f"The image registry at {self.address} did not answer within "
                f"{LOOKUP_TIMEOUT.read:.0f} s."
            ) from None
        except httpx.HTTPError as err:
            raise RegistryError(
                f"The image registry at {self.address} cannot be reached ({_one_line(err)})."
            ) from None
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        if response.status_code in (401, 403):
            raise RegistryError(
                f"The image registry at {self.address} asks for credentials, which binderbox "
                "does not send; use a registry open to this machine."
            )
        raise RegistryError(
            f"The image registry at {self.address} answered HTTP {response.status_code} "
            f"when asked for {name}."
        )

    def reference(self, name: str) -> str:
        """What sessions pull and run: ``<registry host:port>/<name>``."""
        repository, tag = repository_and_tag(name)
        return f"{self.pull_address}/{repository}:{tag}"

    def push(self, name: str) -> None:
        """Push the local image ``name`` (just built) to the registry."""
        self._push(self._client(), self.address, name, "", keep=False)

    def push_from(self, client: docker.DockerClient, name: str, where: str) -> None:
        """Push ``name`` from another dockerd (a build node's, ``where``), which reaches
        the registry as session nodes do. The node keeps the pushed name, which is what
        its sessions run: a session there starts without a pull."""
        self._push(client, self.pull_address, name, f" from {where}", keep=True)

    def _push(
        self, client: docker.DockerClient, address: str, name: str, where: str, *, keep: bool
    ) -> None:
        repository, tag = repository_and_tag(name)
        target = f"{address}/{repository}"
        try:
            client.images.get(name).tag(target, tag)
        except docker.errors.ImageNotFound:
            raise RegistryError(f"There is no local image {name} to push.") from None
        except docker.errors.APIError as err:
            raise RegistryError(
                f"Tagging {name} for the registry failed: {_one_line(err)}."
            ) from None
        try:
            self._follow(
                lambda: client.api.push(target, tag=tag, stream=True, decode=True),
                f"Pushing {name}{where} to the image registry at {address}",
            )
        finally:
            # The local store keeps one name per built image; the registry has this one.
            if not keep:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(f"{target}:{tag}", noprune=True)

    def pull(self, name: str) -> None:
        """Pull ``name`` from the registry into the local store, as ``name`` and as
        ``reference(name)``."""
        repository, tag = repository_and_tag(name)
        source = f"{self.address}/{repository}"
        client = self._client()
        self._follow(
            lambda: client.api.pull(source, tag=tag, stream=True, decode=True),
            f"Pulling {name} from the image registry at {self.address}",
        )
        pulled = f"{source}:{tag}"
        try:
            image = client.images.get(pulled)
            image.tag(repository, tag)
            if self.reference(name) != pulled:
                image.tag(*self.reference(name).rsplit(":", 1))
        except docker.errors.APIError as err:
            raise RegistryError(f"Tagging the pulled {name} failed: {_one_line(err)}.") from None
        if self.reference(name) != pulled:
            self._untag(pulled)

    # -- plumbing ----------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        # The machine's proxy settings are for the internet, not for the registry.
        return httpx.Client(trust_env=False, timeout=LOOKUP_TIMEOUT, verify=self._tls())

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.settings.ca_bundle:
            # The system's CAs plus the operator's bundle, as git and builds trust them.
            context.load_verify_locations(cafile=self.settings.ca_bundle)
        return context

    def _client(self) -> docker.DockerClient:
        if self._docker is None:
            self._docker = docker_client()
        return self._docker

    def _untag(self, reference: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self._client().images.remove(reference, noprune=True)

    def _follow(self, start: Any, doing: str) -> None:
        """Run a streaming push or pull to its end, within TRANSFER_TIMEOUT; a failure
        becomes one sentence starting with ``doing``."""
        deadline = time.monotonic() + TRANSFER_TIMEOUT
        stream: Iterator[Any] | None = None
        try:
            stream = iter(start())
            for event in stream:
                if not isinstance(event, dict):
                    continue
                error = event.get("error") or (event.get("errorDetail") or {}).get("message")
                if error:
                    raise RegistryError(f"{doing} failed: {_one_line(error)}.")
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"{doing} took longer than {TRANSFER_TIMEOUT:.0f} s and was stopped."
                    )
        except docker.errors.APIError as err:
            cause = err.explanation if isinstance(err.explanation, str) else str(err)
            raise RegistryError(f"{doing} failed: {_one_line(cause)}.") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as err:
            raise RegistryError(
                f"{doing} failed: Docker stopped answering ({_one_line(err)})."
            ) from None
        finally:
            # Closing the stream early (an error, the deadline) makes dockerd cancel it.
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
