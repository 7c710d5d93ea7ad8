"""Launching a prebuilt image (``/v2/image/<name>``): pulled, checked and named, never built.

The steps of ``PrebuiltImages.prepare``, each blocking call on the service's local pool:

1. the reference is checked and matched against ``prebuilt_images`` (providers/image.py);
2. dockerd pulls it from its registry: a tag is asked for again at most every
   ``ref_cache_seconds`` (tags move), a digest never once the image is here;
3. the image must have a Jupyter server, asked as uid 1000 with no network (what a
   session runs); the answer is kept per image content id, so an image is probed once;
4. it gets a local name under ``image_prefix`` with its content id as the tag
   (``naming.prebuilt_image_name``): sessions run that name, through the same spawner and
   lock-down as built images, and a tag that moves later cannot change what they run;
5. with a registry (``registry_url``), that name is pushed there: session nodes pull the
   checked content from binderbox's registry, never the reference from its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import docker
import docker.errors
import requests

from binderbox.config import Settings
from binderbox.errors import BinderboxError, shortened
from binderbox.events import Event
from binderbox.images import LocalImageStore
from binderbox.naming import prebuilt_image_name
from binderbox.providers.image import (
    OFF,
    PROVIDER,
    ImageReference,
    ImageRefused,
    ImageSource,
    check_allowed,
    parse_image_reference,
    parse_patterns,
    pinned_reference,
)
from binderbox.service.specs import RepoSpec

if TYPE_CHECKING:
    import concurrent.futures

    from binderbox.service.launchflow import ServiceContext

# Sessions run as this user (BinderSpawnerMixin.uid); the probe asks as it too.
SESSION_UID = 1000
# Seconds a pull may take, and the Jupyter probe (two tries, each bounded in engine.py).
PULL_SECONDS = 900.0
PROBE_SECONDS = 150.0
LOCAL_SECONDS = 30.0
# Image content ids whose probe answer is kept.
_CHECKS_KEPT = 10_000


class PullFailed(BinderboxError):
    """dockerd could not pull the image (unknown, private, registry unreachable)."""


def no_jupyter_server(reference: ImageReference) -> str:
    return (
        f"The image {reference} has no jupyter server; install jupyter_server in it "
        "(pip install jupyterlab brings it), on the PATH of uid 1000."
    )


@dataclass(frozen=True)
class ImageFacts:
    """What dockerd says of a pulled image."""

    id: str  # the content id, "sha256:…"
    repo_digests: tuple[str, ...] = ()
    user: str = ""  # the image's default user (Config.User), "" for root


@dataclass(frozen=True)
class ImageCheck:
    """The probe's answer for one image content id."""

    # None: the probe got no answer in time (the session start will tell).
    jupyter: bool | None
    # Sentences about the image's default user, shown as launch events.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedImage:
    """A prebuilt image ready to launch."""

    reference: ImageReference
    pinned: ImageReference  # at the digest its registry gave, for persistent links
    image: str  # the local name sessions run
    facts: ImageFacts

    @property
    def record(self) -> RepoSpec:
        return RepoSpec(PROVIDER, str(self.reference), self.pinned.digest or self.facts.id)

    @property
    def source(self) -> ImageSource:
        return ImageSource(self.reference)


def pull_failure(reference: ImageReference, raw: str) -> str:
    """dockerd's reason a pull failed, as one sentence for the user."""
    detail = shortened(" ".join(str(raw).split()), 240).rstrip(".")
    text = detail.lower()
    if "http response to https client" in text:
        return (
            f"The registry {reference.registry} answers only over plain http, which this "
            "machine's dockerd does not accept from it (insecure-registries)."
        )
    unreachable = (
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "timeout exceeded",
        "tls handshake",
        "x509",
        "connection reset",
    )
    if any(word in text for word in unreachable):
        return f"The registry {reference.registry} cannot be reached ({detail})."
    if any(
        word in text for word in ("manifest unknown", "not found", "does not exist", "name unknown")
    ):
        return f"The image {reference} was not found in the registry {reference.registry}."
    if any(word in text for word in ("unauthorized", "authentication required", "denied")):
        return (
            f"The registry {reference.registry} does not let binderbox pull {reference} "
            "(it asks for credentials, which binderbox does not send)."
        )
    return f"Pulling {reference} failed: {detail}."


def user_notes(config_user: str, passwd: str | None, uid: int = SESSION_UID) -> tuple[str, ...]:
    """What to say about an image whose user is not the session's: sessions always run as
    ``uid`` (never root, never the image's own user); ``passwd`` is its /etc/passwd."""
    accounts: dict[str, str] = {}
    for line in (passwd or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            accounts.setdefault(fields[0], fields[2])
    name = config_user.split(":", 1)[0] or "root"
    number = name if name.isdigit() else accounts.get(name, "0" if name == "root" else "")
    notes = []
    if number != str(uid):
        who = "root" if number == "0" else f"'{shortened(name, 40)}'"
        notes.append(
            f"The image runs as {who} by default; sessions here always run as uid {uid}, "
            f"so files only {who} may change stay read-only in the session."
        )
    if str(uid) not in accounts.values():
        notes.append(
            f"The image has no user with uid {uid} in /etc/passwd: the session's home "
            "folder is /, where Jupyter may not be able to write its files."
        )
    return tuple(notes)


class PrebuiltDocker(Protocol):
    """The Docker calls the steps make (blocking); ``DockerPrebuilt`` on this dockerd."""

    def pull(self, reference: ImageReference, timeout: float) -> None:
        """Pull the reference; raise PullFailed with one sentence."""
        ...

    def inspect(self, reference: str) -> ImageFacts | None:
        """The local image by name or id, or None when there is none."""
        ...

    def has_jupyter_server(self, image_id: str) -> bool | None: ...

    def passwd(self, image_id: str) -> str | None:
        """The image's /etc/passwd, or None."""
        ...

    def tag(self, image_id: str, name: str) -> None: ...


class DockerPrebuilt:
    """The steps' Docker calls on this machine's dockerd (a fresh connection per call, so a
    dockerd that came back is used again)."""

    def __init__(self, docker_cli: str) -> None:
        self.docker_cli = docker_cli

    @contextlib.contextmanager
    def _engine(self) -> Any:
        from binderbox.builder.engine import DockerEngine, docker_client

        client = docker_client()
        try:
            yield DockerEngine(self.docker_cli, client)
        finally:
            client.close()

    def pull(self, reference: ImageReference, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        stream: Any = None
        with self._engine() as engine:
            try:
                stream = engine.client.api.pull(
                    reference.repository,
                    tag=reference.digest or reference.tag,
                    stream=True,
                    decode=True,
                )
                for event in stream:
                    if not isinstance(event, dict):
                        continue
                    error = event.get("error") or (event.get("errorDetail") or {}).get("message")
                    if error:
                        raise PullFailed(pull_failure(reference, error))
                    if time.monotonic() > deadline:
                        raise PullFailed(
                            f"Pulling {reference} took longer than {timeout:.0f} s and was stopped."
                        )
            except docker.errors.APIError as error:
                cause = error.explanation if isinstance(error.explanation, str) else str(error)
                raise PullFailed(pull_failure(reference, cause)) from None
            except (requests.exceptions.RequestException, docker.errors.DockerException) as err:
                raise PullFailed(
                    f"Pulling {reference} failed: Docker stopped answering "
                    f"({shortened(str(err), 200)})."
                ) from None
            finally:
                close = getattr(stream, "close", None)  # an early end cancels the pull
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()

    def inspect(self, reference: str) -> ImageFacts | None:
        with self._engine() as engine:
            attrs = engine.image_attrs(reference)
        if attrs is None:
            return None
        config = attrs.get("Config") or {}
        return ImageFacts(
            id=str(attrs.get("Id", "")),
            repo_digests=tuple(str(d) for d in attrs.get("RepoDigests") or ()),
            user=str(config.get("User") or ""),
        )

    def has_jupyter_server(self, image_id: str) -> bool | None:
        with self._engine() as engine:
            return engine.has_jupyter_server(image_id, SESSION_UID, timeout=60)

    def passwd(self, image_id: str) -> str | None:
        with self._engine() as engine:
            raw = engine.read_file(image_id, "/etc/passwd", 1_000_000)
        return raw.decode(errors="replace") if raw is not None else None

    def tag(self, image_id: str, name: str) -> None:
        with self._engine() as engine:
            engine.tag(image_id, name)


class PrebuiltImages:
    """Pulls, checks and names prebuilt images for launches; keeps what it learnt (the
    probe's answer per content id, when a tag was last pulled). Safe across threads."""

    def __init__(self, docker: PrebuiltDocker | None = None) -> None:
        self._docker = docker
        self._lock = threading.Lock()
        self._checks: dict[str, ImageCheck] = {}
        self._pulled: dict[str, float] = {}  # reference → when it was pulled
        self._pulling: dict[str, threading.Lock] = {}
        self.probes = 0  # how often an image was probed (the cache's misses)

    def docker(self, settings: Settings) -> PrebuiltDocker:
        if self._docker is None:
            self._docker = DockerPrebuilt(settings.docker_cli)
        return self._docker

    # -- the blocking steps ------------------------------------------------------------

    def fetch(self, reference: ImageReference, settings: Settings) -> ImageFacts:
        """Pull ``reference`` unless it is here and fresh enough; what dockerd says of it."""
        side = self.docker(settings)
        key = str(reference)
        with self._lock:
            if len(self._pulling) > _CHECKS_KEPT:
                self._pulling.clear()
            gate = self._pulling.setdefault(key, threading.Lock())
        with gate:  # one pull of a reference at a time; the others then find it here
            facts = side.inspect(key)
            fresh = time.monotonic() - self._pulled.get(key, -1e12) < settings.ref_cache_seconds
            if facts is None or not (reference.digest or fresh):
                side.pull(reference, PULL_SECONDS)
                with self._lock:
                    self._pulled[key] = time.monotonic()
                facts = side.inspect(key)
        if facts is None or not facts.id:
            raise PullFailed(f"dockerd pulled {reference} but does not show it.")
        return facts

    def known(self, facts: ImageFacts) -> ImageCheck | None:
        with self._lock:
            return self._checks.get(facts.id)

    def check(self, facts: ImageFacts, settings: Settings) -> ImageCheck:
        """Whether the image has a Jupyter server (probed once per content id)."""
        found = self.known(facts)
        if found is not None:
            return found
        side = self.docker(settings)
        jupyter = side.has_jupyter_server(facts.id)
        notes = user_notes(facts.user, side.passwd(facts.id)) if jupyter else ()
        result = ImageCheck(jupyter, notes)
        with self._lock:
            self.probes += 1
            if jupyter is not None:  # no answer in time: ask again next launch
                if len(self._checks) >= _CHECKS_KEPT:
                    self._checks.clear()
                self._checks[facts.id] = result
        return result

    def name(self, reference: ImageReference, facts: ImageFacts, settings: Settings) -> str:
        """Tag the image under the prefix by its content id; the name sessions run."""
        name = prebuilt_image_name(settings, str(reference), facts.id)
        self.docker(settings).tag(facts.id, name)
        return name

    # -- the step as events ------------------------------------------------------------

    async def prepare(
        self,
        spec: str,
        ctx: ServiceContext,
        prepared: list[PreparedImage],
        calls: list[concurrent.futures.Future[Any]],
    ) -> AsyncIterator[Event]:
        """Events of pulling and checking the image ``spec`` names; the image ready to
        launch is appended to ``prepared``. Refusals raise one sentence."""
        settings = ctx.settings
        patterns = parse_patterns(settings.prebuilt_images)
        if not patterns:
            raise ImageRefused(OFF)
        reference = parse_image_reference(unquote(spec))
        check_allowed(reference, patterns)

        async def local(function: Any, *args: Any, timeout: float = LOCAL_SECONDS) -> Any:
            return await ctx.local.run(function, *args, timeout=timeout, what="Docker", holds=calls)

        yield Event("fetching", f"Pulling {reference}")
        facts = await local(self.fetch, reference, settings, timeout=PULL_SECONDS + 30)
        pinned = pinned_reference(reference, list(facts.repo_digests))
        if self.known(facts) is None:
            yield Event("fetching", f"Checking that {pinned} has a Jupyter server")
        checked = await local(self.check, facts, settings, timeout=PROBE_SECONDS)
        if checked.jupyter is False:
            raise ImageRefused(no_jupyter_server(reference))
        for note in checked.notes:
            yield Event("fetching", note)
        image = await local(self.name, reference, facts, settings)
        images = ctx.images
        # With a registry, session nodes pull binderbox's copy: the content that was checked.
        if not isinstance(images, LocalImageStore) and not await local(images.exists, image):
            yield Event("building", f"Pushing {reference} to the image registry.")
            await local(images.push, image, timeout=PULL_SECONDS)
        prepared.append(PreparedImage(reference, pinned, image, facts))
        yield Event("built", f"Found the image {pinned}, launching.", {"image": image})
