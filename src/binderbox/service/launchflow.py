"""One launch as named steps: spec → resolve → image → build (queued) → launch → ready.

Each step is a plain function or coroutine; ``launch_events`` strings them together and
yields the events the /build stream sends. Errors become one ``failed`` event.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from binderbox.builder.backend import Builder, LocalBuilder
from binderbox.builder.pipeline import BuildRequest, BuildResult
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.events import Emit, Event
from binderbox.images import ImageStore, LocalImageStore
from binderbox.providers.base import Source
from binderbox.providers.content import PROVIDERS as CONTENT_PROVIDERS
from binderbox.providers.content import content_source
from binderbox.providers.git import GitPolicy, GitSource
from binderbox.providers.image import PROVIDER as IMAGE_PROVIDER
from binderbox.providers.image import binder_fields as image_binder_fields
from binderbox.providers.image import spec_for_records as image_spec_for_records
from binderbox.service.blocking import BlockingPool
from binderbox.service.buildqueue import BuildQueue
from binderbox.service.limits import InFlight, Limits
from binderbox.service.observe import LaunchEventLog, Metrics
from binderbox.service.prebuilt import PrebuiltImages, PreparedImage
from binderbox.service.specs import (
    USERINFO_REFUSED,
    RepoSpec,
    SpecError,
    has_userinfo,
    parse_spec,
    without_userinfo,
)
from binderbox.state import StateStore

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
    # The service's public address (public_url), e.g. "https://binder.example.org/"; links
    # and binder_launch_host start with it. Never the request's Host header.
    launch_host: str
    build_only: bool = False
    # Who asks (a limits bucket: an IPv4 address or an IPv6 /64), for per-address caps.
    client: str = ""


@dataclass
class ServiceContext:
    settings: Settings
    queue: BuildQueue
    launcher: Launcher | None
    metrics: Metrics = field(default_factory=Metrics)
    events: LaunchEventLog | None = None
    limits: Limits | None = None
    refs: RefCache | None = None
    store: StateStore | None = None
    # The seams (see ARCHITECTURE.md): who builds, and where built images are kept.
    builder: Builder = field(default_factory=LocalBuilder)
    images: ImageStore = field(default_factory=LocalImageStore)
    # Sessions run on this machine's dockerd: an image kept elsewhere (a registry) is
    # pulled here before the launch. Off when the session backend's nodes pull themselves.
    pull_before_launch: bool = True
    # Threads for calls to hosts users name, and for local ones (Docker, the store):
    # never asyncio's small default pool, which everything else shares.
    remote: BlockingPool = field(default_factory=lambda: BlockingPool("binderbox-remote", 16, 64))
    local: BlockingPool = field(default_factory=lambda: BlockingPool("binderbox-local", 8, 64))
    # Launches under way per address.
    launches: InFlight = field(default_factory=lambda: InFlight(0))
    # Images that launches under way resolved to: the cleaner leaves them alone.
    launching: collections.Counter[str] = field(default_factory=collections.Counter)
    # Prebuilt images (/v2/image/…): pulled and checked instead of built.
    prebuilt: PrebuiltImages = field(default_factory=PrebuiltImages)


# Seconds a local call (Docker, the state database) may take.
LOCAL_TIMEOUT = 30.0
# Seconds pulling an image onto this machine before a launch may take.
PULL_TIMEOUT = 900.0


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
        image = BuildRequest(source=source).image_for(settings, content_id)
        record = RepoSpec(provider, source.repo_url, content_id)
        return ResolvedLaunch(record, source, content_id, image)
    parsed = parse_spec(provider, spec)
    cached = refs.get(parsed.repo_url, parsed.ref) if refs else ""
    # Hosts are checked where git connects, and git is pinned to what passed.
    policy = GitPolicy.from_settings(settings, allowed_hosts(settings))
    source = GitSource(parsed.repo_url, parsed.ref, cached, policy)
    commit = source.resolve()
    if refs and commit and not cached:
        refs.put(parsed.repo_url, parsed.ref, commit)
    if not commit:
        # An abbreviated commit: resolving it needs the clone the build makes anyway.
        raise BinderboxError(
            f"'{parsed.ref}' looks like an abbreviated commit; use the full 40-character "
            "commit, a branch or a tag."
        )
    # The same request the build gets (see _launch), so both agree on the name.
    image = BuildRequest(source=source).image_for(settings, commit)
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
    userinfo = has_userinfo(request.spec)
    if userinfo:
        # From here on (store, events, pages) only the address without it is known.
        request = dataclasses.replace(request, spec=without_userinfo(request.spec))
    if request.provider == IMAGE_PROVIDER:  # one image is one name, however it was written
        request = dataclasses.replace(request, spec=image_spec_for_records(request.spec))
    if request.client and not ctx.launches.acquire(request.client):
        count = ctx.launches.cap
        yield Event(
            "failed",
            f"Your address already has {count} launch{'es' if count != 1 else ''} in progress "
            "here; wait for one to finish before starting another.",
        )
        return
    # A call still stuck when the launch ended (timed out, or the client left) keeps the
    # address's place until it returns: one address cannot pile up stuck threads.
    calls: list[concurrent.futures.Future[Any]] = []
    ctx.metrics.launches_in_progress.inc()
    try:
        try:
            if userinfo:
                raise SpecError(USERINFO_REFUSED)
            async with contextlib.aclosing(_launch(request, ctx, resolved, calls)) as events:
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
        if resolved:
            image = resolved[0].image
            ctx.launching[image] -= 1
            if ctx.launching[image] <= 0:
                del ctx.launching[image]
        if request.client:
            _release_when_returned(ctx, request.client, calls)


def _release_when_returned(
    ctx: ServiceContext, client: str, calls: list[concurrent.futures.Future[Any]]
) -> None:
    pending = [call for call in calls if not call.done()]
    if not pending:
        ctx.launches.release(client)
        return
    loop = asyncio.get_running_loop()
    left = [len(pending)]

    def returned(_: concurrent.futures.Future[Any]) -> None:  # in the call's thread
        def count() -> None:
            left[0] -= 1
            if left[0] == 0:
                ctx.launches.release(client)

        loop.call_soon_threadsafe(count)

    for call in pending:
        call.add_done_callback(returned)


async def _record(
    request: LaunchRequest,
    ctx: ServiceContext,
    resolved: list[ResolvedLaunch],
    final: Event,
    seconds: float,
) -> None:
    status = "success" if final.phase == "ready" else "failed"
    ref = resolved[0].commit if resolved else ""
    try:
        if status == "success" and ctx.events and not request.build_only and resolved:
            await ctx.local.run(
                ctx.events.record,
                request.provider,
                request.spec,
                ref,
                urlsplit(request.launch_host).netloc,
                timeout=LOCAL_TIMEOUT,
                what="The launch-events file",
            )
        if ctx.store:
            reason = str(final.fields.get("reason", "")) if status == "failed" else ""
            await ctx.local.run(
                ctx.store.record_launch,
                request.provider,
                request.spec,
                ref,
                status,
                seconds,
                reason,
                resolved[0].image if resolved else "",
                timeout=LOCAL_TIMEOUT,
                what="The state database",
            )
    except BinderboxError as error:  # the user still gets the outcome; the record is lost
        logger.warning("the launch of %s was not recorded: %s", request.spec, error.message)
    ctx.metrics.launches.labels(status).inc()
    ctx.metrics.launch_seconds.labels(status).observe(seconds)


def _remote_name(provider: str, spec: str) -> str:
    """Who a resolve waits for, for the sentence that says it did not answer."""
    if provider in CONTENT_PROVIDERS:
        return f"The {provider} site"
    try:
        host = urlsplit(parse_spec(provider, spec).repo_url).netloc
    except BinderboxError:
        host = ""
    return f"The git server {host}" if host else "The git server"


def _resolving_message(provider: str, spec: str) -> str:
    """What is being resolved, in the words of the repository's own address."""
    if provider in CONTENT_PROVIDERS:
        return f"Resolving the {provider} record {unquote(spec)}"
    try:
        parsed = parse_spec(provider, spec)
    except BinderboxError:
        return f"Resolving {provider}/{unquote(spec)}"
    return f"Resolving {parsed.ref} of {parsed.repo_url}"


def _image_store_name(images: ImageStore) -> str:
    """Who a call to the image store waits for, for the sentence that says it did not."""
    return "Docker" if isinstance(images, LocalImageStore) else "The image registry"


async def _launch(
    request: LaunchRequest,
    ctx: ServiceContext,
    found: list[ResolvedLaunch],
    calls: list[concurrent.futures.Future[Any]],
) -> AsyncIterator[Event]:
    settings = ctx.settings
    if ctx.limits:
        ctx.limits.check_spec(request.provider, request.spec)
    if request.provider == IMAGE_PROVIDER:
        prepared: list[PreparedImage] = []
        async with contextlib.aclosing(
            ctx.prebuilt.prepare(request.spec, ctx, prepared, calls)
        ) as steps:
            async for event in steps:
                yield event
        ready = prepared[0]
        found.append(ResolvedLaunch(ready.record, ready.source, ready.record.ref, ready.image))
        ctx.launching[ready.image] += 1  # until the launch ends (launch_events)
        fields = image_binder_fields(request.launch_host, ready.reference, ready.pinned)
        async with contextlib.aclosing(_start_session(request, ctx, ready.image, fields)) as steps:
            async for event in steps:
                yield event
        return
    yield Event("fetching", _resolving_message(request.provider, request.spec))
    # git stops itself at the deadline (then its thread is free again); the pool's own
    # deadline, a little later, is for calls that would not.
    quick = settings.with_overrides(git_timeout=min(settings.git_timeout, settings.remote_timeout))
    resolved = await ctx.remote.run(
        resolve_launch,
        request.provider,
        request.spec,
        quick,
        ctx.refs,
        timeout=settings.remote_timeout + 5,
        what=_remote_name(request.provider, request.spec),
        busy="binderbox is busy talking to other servers right now; try again in a minute.",
        holds=calls,
    )
    found.append(resolved)
    image = resolved.image
    ctx.launching[image] += 1  # until the launch ends (launch_events)
    fields = binder_fields(request, resolved)
    images, builder = ctx.images, ctx.builder
    kept_here = isinstance(images, LocalImageStore)
    store_name = _image_store_name(images)

    # "Built" means the image store has it (with a registry: any node can pull it).
    if await ctx.local.run(images.exists, image, timeout=LOCAL_TIMEOUT, what=store_name):
        yield Event("built", "Found a built image for this commit, launching.", {"image": image})
    else:
        build = BuildRequest(source=resolved.source)
        builder_settings = settings.with_overrides(check_remote_hosts=True)

        def build_and_push(emit: Emit) -> BuildResult:
            # Anonymous repositories: the builder treats them as untrusted.
            result = builder.build(build, builder_settings, emit)
            if not kept_here and not getattr(builder, "pushes_to_registry", False):
                # Inside the job, so launches sharing this build wait for the push too.
                emit(Event("building", f"Pushing {image} to the image registry."))
                images.push(image)
            return result

        job, _ = ctx.queue.submit(
            image,
            build_and_push,
            resolved.spec.repo_url,
            resolved.commit,
            owner=request.client,
        )
        async for event in ctx.queue.follow(job):
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
            if job.result and job.result.lock:
                fields_built["lock_url"] = f"{request.launch_host}logs/{job.build_id}/lock"
        yield Event("built", f"Built {image}.", fields_built)
    async with contextlib.aclosing(_start_session(request, ctx, image, fields)) as steps:
        async for event in steps:
            yield event


async def _start_session(
    request: LaunchRequest, ctx: ServiceContext, image: str, fields: dict[str, str]
) -> AsyncIterator[Event]:
    """The image is there: the session, from quotas to ``ready`` (or build_only's end)."""
    images = ctx.images
    kept_here = isinstance(images, LocalImageStore)
    store_name = _image_store_name(images)
    if request.build_only:
        yield Event(
            "ready", "The image is built; nothing was launched.", {"image": image, **fields}
        )
        return
    if ctx.launcher is None:
        raise BinderboxError("This binderbox only builds images; launching is not enabled.")
    if ctx.limits:
        ctx.limits.check_quota(image, await ctx.launcher.running_images(), request.spec)
    if ctx.pull_before_launch and not kept_here:
        # Sessions run on this machine: bring the image here from where it is kept.
        await ctx.local.run(images.pull, image, timeout=PULL_TIMEOUT, what=store_name)
    async for event in ctx.launcher.launch(image, fields):
        if event.phase == "ready":
            yield Event("ready", event.message, {**event.fields, "image": image, **fields})
            return
        yield event
    raise BinderboxError("The session ended before it was ready.")
