"""The ImageStore seam: where built images live and how sessions get them.

The embedded default is this machine's Docker image store (``LocalImageStore``): an
image exists when dockerd has it, and sessions run it by its name. On many machines an
OCI registry (``binderbox.registry.RegistryImageStore``) holds them: builds push, nodes
pull, and sessions run ``<registry>/<name>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import docker
import docker.errors

from binderbox.errors import DockerUnavailable, UsageError

if TYPE_CHECKING:
    from binderbox.builder.engine import DockerEngine
    from binderbox.config import Settings


class ImageStore(Protocol):
    """Built images by name (``binderbox-<slug>:<commit>``); blocking calls."""

    def exists(self, name: str) -> bool:
        """Whether the image is built already (the build can be skipped)."""
        ...

    def reference(self, name: str) -> str:
        """The name sessions pull and run the image by."""
        ...

    def push(self, name: str) -> None:
        """Make a freshly built local image available to sessions."""
        ...

    def pull(self, name: str) -> None:
        """Bring the image onto this machine."""
        ...


class LocalImageStore:
    """This machine's dockerd holds the images; sessions run on it too.

    Give it a DockerEngine or a Docker SDK client, or nothing: then each call connects
    anew, so a dockerd that is down fails the launch in one sentence and one that came
    back is used again.
    """

    def __init__(self, engine_or_client: DockerEngine | docker.DockerClient | None = None) -> None:
        client = getattr(engine_or_client, "client", engine_or_client)
        self._client: docker.DockerClient | None = client

    def exists(self, name: str) -> bool:
        from binderbox.builder.engine import docker_client

        client = self._client or docker_client()
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.DockerException:
            raise DockerUnavailable(
                "Docker did not answer while binderbox looked for the image; is dockerd running?"
            ) from None
        finally:
            if client is not self._client:
                client.close()
        return True

    def reference(self, name: str) -> str:
        return name

    def push(self, name: str) -> None:
        """Nothing to do: sessions run where the image was built."""

    def pull(self, name: str) -> None:
        """Nothing to do: the image is on this machine or nowhere."""


def open_image_store(settings: Settings) -> ImageStore:
    """A registry when ``settings.registry_url`` is set, else this machine's dockerd."""
    if settings.registry_url:
        try:
            from binderbox.registry import RegistryImageStore
        except ModuleNotFoundError as error:
            raise UsageError(
                f"Setting 'registry_url' names a registry, which this binderbox cannot use "
                f"(the Python module {error.name} is missing)."
            ) from None

        return RegistryImageStore(settings)
    return LocalImageStore()
