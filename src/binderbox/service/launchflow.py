"""One launch as named steps: spec → resolve → image → build (queued) → launch → ready.

Each step is a plain function or coroutine; ``launch_events`` strings them together and
yields the events the /build stream sends. Errors become one ``failed`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

from binderbox.build.engine import DockerEngine
from binderbox.build.pipeline import BuildRequest, build_repository
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.events import Event
from binderbox.naming import image_name_for
from binderbox.providers.base import Source
from binderbox.providers.content import PROVIDERS as CONTENT_PROVIDERS
from binderbox.providers.content import content_source
from binderbox.providers.git import GitSource
from binderbox.providers.hosts import check_remote_url
from binderbox.service.buildqueue import BuildQueue, follow
from binderbox.service.limits import Limits
from binderbox.service.observe import LaunchEventLog, Metrics
from binderbox.service.specs import RepoSpec, parse_spec
from binderbox.store import BuildStore

logger = logging.getLogger(__name__)


class BuildFailed(BinderboxError):
    """A build that failed and left its whole log at ``log_url``."""

    def __init__(self, message: str, *, log_tail: str = "", log_url: str = "") -> None:
        super().__init__(message, log_tail=log_tail)
        self.log_url = log_url


class Launcher(Protocol):
    """Starts a session from an image; yields ``launching`` events, then ``ready``."""

    def launch(self, image: str, binder_env: dict[str, str]) -> AsyncIterator[Event]: ...

    async def healthy(self) -> bool: ...

    async def running_images(self) -> list[str]: ...

    async def running_sessions(self) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class LaunchRequest:
    provider: str
    spec: str
    # Scheme and host the user reached us at, e.g. "http://127.0.0.1:8585/".
    launch_host: str
    build_only: bool = False


@dataclass
class ServiceContext:
    settings: Settings
    queue: BuildQueue
    launcher: Launcher | None
    metrics: Metrics = field(default_factory=Metrics)
    events: LaunchEventLog | None = None
    limits: Limits | None = None
    refs: RefCache | None = None
    store: BuildStore | None = None


@dataclass(frozen=True)
class ResolvedLaunch:
    spec: RepoSpec
    source: Source
    commit: str
    image: str


def allowed_hosts(settings: Settings) -> list[str]:
    return [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]


class RefCache:
    """Recently resolved (repository, ref) → commit, so a burst of launches of one link
    asks the git host once. Safe to share between worker threads."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._known: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, repo_url: str, ref: str) -> str:
        with self._lock:
            commit, until = self._known.get((repo_url, ref), ("", 0.0))
        return commit if until > time.monotonic() else ""

    def put(self, repo_url: str, ref: str, commit: str) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            if len(self._known) > 10_000:
                self._known.clear()
            self._known[(repo_url, ref)] = (commit, time.monotonic() + self.seconds)


def resolve_launch(
    provider: str, spec: str, settings: Settings, refs: RefCache | None = None
) -> ResolvedLaunch:
    """Parse and check the spec, resolve its ref to a commit and name the image (blocking)."""
    if provider in CONTENT_PROVIDERS:
        # Every request these make (DOI redirects, APIs, downloads) is host-checked.
        source = content_source(provider, spec, settings.with_overrides(check_remote_hosts=True))
        content_id = source.resolve()
        image = image_name_for(settings.image_prefix, source.slug(), content_id, {})
        record = RepoSpec(provider, source.repo_url, content_id)
        return ResolvedLaunch(record, source, content_id, image)
    parsed = parse_spec(provider, spec)
    check_remote_url(parsed.repo_url, allowed_hosts(settings))
    cached = refs.get(parsed.repo_url, parsed.ref) if refs else ""
    source = GitSource(parsed.repo_url, parsed.ref, cached)
    commit = source.resolve()
    if refs and commit and not cached:
        refs.put(parsed.repo_url, parsed.ref, commit)
    if not commit:
        # An abbreviated commit: resolving it needs the clone the build makes anyway.
        raise BinderboxError(
            f"'{parsed.ref}' looks like an abbreviated commit; use the full 40-character "
            "commit, a branch or a tag."
        )
    image = image_name_for(settings.image_prefix, source.slug(), commit, {})
    return ResolvedLaunch(parsed, source, commit, image)


def binder_fields(request: LaunchRequest, resolved: ResolvedLaunch) -> dict[str, str]:
    """The binder_* fields of the ready event, also given to the session as BINDER_*."""
    spec = resolved.spec
    # A record's spec already names one version; a git spec gets its commit.
    persistent = (
        request.spec if spec.provider in CONTENT_PROVIDERS else spec.persistent(resolved.commit)
    )
    ref_url = spec.repo_url
    if spec.provider in {"gh", "gl"}:
        ref_url = f"{spec.repo_url}/tree/{resolved.commit}"
    return {
        "repo_url": spec.repo_url,
        "binder_ref_url": ref_url,
        "binder_launch_host": request.launch_host,
        "binder_request": f"v2/{request.provider}/{request.spec}",
        "binder_persistent_request": f"v2/{request.provider}/{persistent}",
    }


async def launch_events(request: LaunchRequest, ctx: ServiceContext) -> AsyncIterator[Event]:
    """The whole launch as events; always ends with ``ready`` or ``failed``.

    The outcome is recorded (metrics, store, launch events) before the last event is
    sent, so whoever saw that event also sees it counted.
    """
    started = time.monotonic()
    resolved: list[ResolvedLaunch] = []
    final: Event | None = None
    ctx.metrics.launches_in_progress.inc()
    try:
        try:
            async with contextlib.aclosing(_launch(request, ctx, resolved)) as events:
                async for event in events:
                    if event.phase == "ready":
                        final = event
                        break
                    yield event
        except BinderboxError as error:
            fields: dict[str, str] = {"log_tail": error.log_tail} if error.log_tail else {}
            if isinstance(error, BuildFailed) and error.log_url:
                fields["log_url"] = error.log_url
            message = error.message
            if error.log_tail:
                message += "\n\nThe last lines of the build log:\n" + error.log_tail
            final = Event("failed", message, {**fields, "reason": error.message})
        except Exception as error:  # a bug must still end the stream with a reason
            logger.exception("launch of %s/%s failed unexpectedly", request.provider, request.spec)
            reason = f"binderbox failed unexpectedly: {type(error).__name__}: {error}"
            final = Event("failed", reason, {"reason": reason})
        if final is None:
            final = Event("failed", "The launch ended without a result.", {"reason": ""})
        await _record(request, ctx, resolved, final, time.monotonic() - started)
        if final.phase == "failed":
            final = Event(
                "failed", final.message, {k: v for k, v in final.fields.items() if k != "reason"}
            )
        yield final
    finally:
        ctx.metrics.launches_in_progress.dec()


async def _record(
    request: LaunchRequest,
    ctx: ServiceContext,
    resolved: list[ResolvedLaunch],
    final: Event,
    seconds: float,
) -> None:
    status = "success" if final.phase == "ready" else "failed"
    ref = resolved[0].commit if resolved else ""
    if status == "success" and ctx.events and not request.build_only and resolved:
        await asyncio.to_thread(
            ctx.events.record,
            request.provider,
            request.spec,
            ref,
            urlsplit(request.launch_host).netloc,
        )
    if ctx.store:
        reason = str(final.fields.get("reason", "")) if status == "failed" else ""
        await asyncio.to_thread(
            ctx.store.record_launch, request.provider, request.spec, ref, status, seconds, reason
        )
    ctx.metrics.launches.labels(status).inc()
    ctx.metrics.launch_seconds.labels(status).observe(seconds)


def _resolving_message(provider: str, spec: str) -> str:
    """What is being resolved, in the words of the repository's own address."""
    if provider in CONTENT_PROVIDERS:
        return f"Resolving the {provider} record {unquote(spec)}"
    try:
        parsed = parse_spec(provider, spec)
    except BinderboxError:
        return f"Resolving {provider}/{unquote(spec)}"
    return f"Resolving {parsed.ref} of {parsed.repo_url}"


async def _launch(
    request: LaunchRequest, ctx: ServiceContext, found: list[ResolvedLaunch]
) -> AsyncIterator[Event]:
    settings = ctx.settings
    if ctx.limits:
        ctx.limits.check_spec(request.provider, request.spec)
    yield Event("fetching", _resolving_message(request.provider, request.spec))
    resolved = await asyncio.to_thread(
        resolve_launch, request.provider, request.spec, settings, ctx.refs
    )
    found.append(resolved)
    engine = await asyncio.to_thread(DockerEngine.connect, settings.docker_cli)
    image = resolved.image
    fields = binder_fields(request, resolved)

    if await asyncio.to_thread(engine.image_exists, image):
        yield Event("built", "Found a built image for this commit, launching.", {"image": image})
    else:
        build = BuildRequest(source=resolved.source)
        job, _ = ctx.queue.submit(
            image,
            lambda emit: build_repository(build, settings, emit),
            resolved.spec.repo_url,
            resolved.commit,
        )
        async for event in follow(job):
            if event.phase == "built":
                continue  # said once below, after the build really ended
            yield event
        if job.error:
            if not job.build_id:
                raise job.error
            log_url = f"{request.launch_host}logs/{job.build_id}"
            raise BuildFailed(
                f"{job.error.message} The whole log: {log_url}",
                log_tail=job.error.log_tail,
                log_url=log_url,
            )
        fields_built = {"image": image}
        if job.build_id:
            fields_built["build_id"] = job.build_id
            fields_built["log_url"] = f"{request.launch_host}logs/{job.build_id}"
        yield Event("built", f"Built {image}.", fields_built)

    if request.build_only:
        yield Event(
            "ready", "The image is built; nothing was launched.", {"image": image, **fields}
        )
        return
    if ctx.launcher is None:
        raise BinderboxError("This binderbox only builds images; launching is not enabled.")
    if ctx.limits:
        ctx.limits.check_quota(image, await ctx.launcher.running_images(), request.spec)
    async for event in ctx.launcher.launch(image, fields):
        if event.phase == "ready":
            yield Event("ready", event.message, {**event.fields, "image": image, **fields})
            return
        yield event
    raise BinderboxError("The session ended before it was ready.")
