"""The disk budget: what binderbox serve removes so a public binderbox never fills its disk.

Every ``cleaner_every`` seconds one run does three things, each on its own (one failing
is logged in one sentence and the others still run):

1. Images. When the images this deployment built (named under ``image_prefix`` and
   labelled by binderbox's builder; never base images, never anything else on the
   dockerd) hold more than ``image_cache_max_bytes``, the least recently used go first
   (last successful launch on record, else build time) until they fit. Never one a
   container uses (running or stopped: docker asks for the container's removal first),
   one the hub lists as a running session's, one a launch under way resolved to, or one
   used in the last ``min_age`` seconds (a launch may be about to start from it).
2. Retention. Build logs and launch records older than ``log_retention_days`` are
   deleted (``StateStore.forget_older_than``), keeping the log of the build that made
   each image still present.
3. BuildKit's cache, pruned to ``build_cache_max_bytes`` — only at a moment when no build
   runs, and no build starts until the prune is done (``BuildQueue.paused``): a prune
   beside a build crashed dockerd 20.10.

The images are measured and removed through ``ImageHoldings`` (this dockerd:
``LocalImageHoldings``). Images kept in a registry (``registry_url``) are not cleaned
there; the local copies the builds leave on this machine are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import docker
import docker.errors
from prometheus_client import CollectorRegistry, Counter, Gauge

from binderbox.errors import BinderboxError
from binderbox.store import Forgotten

if TYPE_CHECKING:
    from binderbox.config import Settings
    from binderbox.service.buildqueue import BuildQueue
    from binderbox.state import StateStore

logger = logging.getLogger(__name__)

# The label binderbox's builder puts on every repository image (base images lack it).
BUILT_LABEL = "binderbox.repo"
# Seconds since an image was last built or launched during which it is never removed.
MIN_AGE = 600.0
DAY = 86400.0


@dataclass(frozen=True)
class HeldImage:
    """One image binderbox built: its names, id, build time and the bytes it adds to the
    base image it was built on (layers shared with other binderbox images count for
    each of them, so the budget errs towards removing early)."""

    names: tuple[str, ...]
    image_id: str
    bytes: int
    created: float


class ImageHoldings(Protocol):
    """Where built images take disk space, as the cleaner sees it; blocking calls."""

    def held(self) -> list[HeldImage]:
        """The images this deployment built."""
        ...

    def in_use(self) -> set[str]:
        """Ids and names of images that containers use (running or not)."""
        ...

    def remove(self, image: HeldImage) -> bool:
        """Remove the image (all its names); False when the store refuses (in use)."""
        ...


class BuildCache(Protocol):
    """BuildKit's cache; blocking calls."""

    def size(self) -> int:
        """Bytes the cache holds (records that images share not counted)."""
        ...

    def prune(self, keep_bytes: int) -> int:
        """Prune least recently used records down to ``keep_bytes``; bytes freed."""
        ...

    def busy(self) -> bool:
        """Whether a build (anyone's, not only this service's) uses the cache now."""
        ...


def _client(client: docker.DockerClient | None) -> docker.DockerClient:
    if client is not None:
        return client
    from binderbox.builder.engine import docker_client

    return docker_client()


class LocalImageHoldings:
    """The images under ``prefix`` on a dockerd (this machine's unless a client is given)."""

    def __init__(self, prefix: str, client: docker.DockerClient | None = None) -> None:
        self.prefix = prefix
        self._given = client

    def _ours(self, summary: dict[str, Any]) -> bool:
        tags = [t for t in summary.get("RepoTags") or [] if t != "<none>:<none>"]
        labels = summary.get("Labels") or {}
        # An image someone also tagged under another name is theirs too: left alone.
        return bool(tags) and BUILT_LABEL in labels and all(t.startswith(self.prefix) for t in tags)

    def held(self) -> list[HeldImage]:
        client = _client(self._given)
        try:
            summaries = client.api.images()
            ours, others = [], []
            for summary in summaries:
                tagged = [t for t in summary.get("RepoTags") or [] if t != "<none>:<none>"]
                if self._ours(summary):
                    ours.append(summary)
                elif tagged:
                    others.append(summary)
            layers = {
                s["Id"]: tuple(client.api.inspect_image(s["Id"])["RootFS"].get("Layers") or ())
                for s in ours + others
            }
        finally:
            if client is not self._given:
                client.close()
        bases = [(layers[s["Id"]], int(s["Size"])) for s in others]
        held = []
        for summary in ours:
            own = layers[summary["Id"]]
            # The base it was built on: the other image whose layers start it, the longest.
            base = max(
                (size for base_layers, size in bases if own[: len(base_layers)] == base_layers),
                default=0,
            )
            held.append(
                HeldImage(
                    names=tuple(sorted(summary["RepoTags"])),
                    image_id=summary["Id"],
                    bytes=max(int(summary["Size"]) - base, 0),
                    created=float(summary.get("Created") or 0),
                )
            )
        return held

    def in_use(self) -> set[str]:
        client = _client(self._given)
        try:
            containers = client.api.containers(all=True)
        finally:
            if client is not self._given:
                client.close()
        used = set()
        for container in containers:
            used.update(v for v in (container.get("ImageID"), container.get("Image")) if v)
        return used

    def remove(self, image: HeldImage) -> bool:
        client = _client(self._given)
        try:
            for name in image.names:
                try:
                    client.api.remove_image(name, force=False, noprune=False)
                except docker.errors.NotFound:
                    continue  # gone already
                except docker.errors.APIError as error:
                    if error.status_code == 409:  # a container uses it
                        return False
                    raise
        finally:
            if client is not self._given:
                client.close()
        return True


class DockerBuildCache:
    """BuildKit's cache in a dockerd (this machine's unless a client is given)."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self._given = client

    def _records(self) -> list[dict[str, Any]]:
        client = _client(self._given)
        try:
            return client.api.df().get("BuildCache") or []
        finally:
            if client is not self._given:
                client.close()

    def size(self) -> int:
        # As `docker system df` counts it: records shared with images are theirs.
        return sum(int(r.get("Size") or 0) for r in self._records() if not r.get("Shared"))

    def busy(self) -> bool:
        # A build running on this dockerd (`binderbox build`, another service) holds
        # records in use; the queue only knows this service's own builds.
        return any(r.get("InUse") for r in self._records())

    def prune(self, keep_bytes: int) -> int:
        client = _client(self._given)
        try:
            # all: unused records of every kind may go, least recently used first.
            answer = client.api.prune_builds(keep_storage=keep_bytes, all=True)
        finally:
            if client is not self._given:
                client.close()
        return int((answer or {}).get("SpaceReclaimed") or 0)


def last_used(image: HeldImage, launched: dict[str, float]) -> float:
    """When the image was last wanted: its last launch on record, or its build."""
    return max([image.created, *(launched.get(name, 0.0) for name in image.names)])


def choose_removals(
    images: list[HeldImage],
    launched: dict[str, float],
    protected: Collection[str],
    budget: int,
    now: float,
    min_age: float = MIN_AGE,
) -> list[HeldImage]:
    """The images to remove, in order, to bring ``images`` under ``budget`` bytes: least
    recently used first, never a ``protected`` one (by id or name) or one used within
    ``min_age`` seconds. Fewer (even none) when the rest may not go."""
    total = sum(image.bytes for image in images)
    if budget <= 0 or total <= budget:
        return []
    keep = set(protected)
    candidates = sorted(
        (
            image
            for image in images
            if image.image_id not in keep
            and not keep.intersection(image.names)
            and now - last_used(image, launched) >= min_age
        ),
        key=lambda image: last_used(image, launched),
    )
    chosen = []
    for image in candidates:
        if total <= budget:
            break
        chosen.append(image)
        total -= image.bytes
    return chosen


@dataclass
class CleanerReport:
    """What one run found and did (shown on /status and in /metrics)."""

    at: float
    seconds: float = 0.0
    images_bytes: int | None = None
    images_count: int = 0
    images_removed: list[str] = field(default_factory=list)
    images_freed: int = 0
    build_cache_bytes: int | None = None
    build_cache_freed: int = 0
    # Why the cache was not pruned although over budget (builds kept running).
    build_cache_note: str = ""
    forgotten: Forgotten = field(default_factory=Forgotten)
    errors: list[str] = field(default_factory=list)


class CleanerMetrics:
    """The budget's numbers in the service's Prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, registry=registry)

        self.images_bytes = gauge(
            "binderbox_image_cache_bytes", "Bytes binderbox's images add to their base images."
        )
        self.images_budget = gauge(
            "binderbox_image_cache_budget_bytes", "image_cache_max_bytes (0: no budget)."
        )
        self.images_count = gauge("binderbox_image_cache_images", "Images binderbox built.")
        self.cache_bytes = gauge("binderbox_build_cache_bytes", "Bytes BuildKit's cache holds.")
        self.cache_budget = gauge(
            "binderbox_build_cache_budget_bytes", "build_cache_max_bytes (0: no budget)."
        )
        self.last_run = gauge(
            "binderbox_cleaner_last_run_timestamp_seconds", "When the cleaner last ran."
        )
        self.runs = Counter(
            "binderbox_cleaner_runs", "Cleaner runs, by status.", ["status"], registry=registry
        )
        self.removed = Counter(
            "binderbox_cleaner_removed_images", "Images the cleaner removed.", registry=registry
        )
        self.freed = Counter(
            "binderbox_cleaner_freed_bytes",
            "Bytes the cleaner freed, by store (images, build_cache).",
            ["store"],
            registry=registry,
        )
        self.forgotten = Counter(
            "binderbox_cleaner_forgotten_rows",
            "Rows retention deleted, by kind (builds, log_lines, launches).",
            ["kind"],
            registry=registry,
        )

    def record(self, report: CleanerReport) -> None:
        self.last_run.set(report.at)
        self.runs.labels("failed" if report.errors else "ok").inc()
        if report.images_bytes is not None:
            self.images_bytes.set(report.images_bytes)
            self.images_count.set(report.images_count)
        if report.build_cache_bytes is not None:
            self.cache_bytes.set(report.build_cache_bytes)
        self.removed.inc(len(report.images_removed))
        self.freed.labels("images").inc(report.images_freed)
        self.freed.labels("build_cache").inc(report.build_cache_freed)
        for kind in ("builds", "log_lines", "launches"):
            self.forgotten.labels(kind).inc(getattr(report.forgotten, kind))


@contextlib.asynccontextmanager
async def _no_queue() -> AsyncIterator[bool]:
    """Without a build queue (no builds run here) any moment is quiet."""
    yield True


def _sentence(what: str, error: BaseException) -> str:
    """One sentence for the log and /status: what failed and why."""
    if isinstance(error, BinderboxError):
        return f"{what} failed: {error.message.rstrip('.')}."
    if isinstance(error, docker.errors.DockerException):
        return f"{what} failed: Docker did not answer ({type(error).__name__}); is dockerd running?"
    return f"{what} failed unexpectedly: {type(error).__name__}: {error}."


class Cleaner:
    """Keeps the images, the build cache and the state database within their budgets."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        *,
        holdings: ImageHoldings | None = None,
        cache: BuildCache | None = None,
        queue: BuildQueue | None = None,
        running_images: Callable[[], Awaitable[list[str]]] | None = None,
        launching: Callable[[], Collection[str]] = frozenset,
        registry: CollectorRegistry | None = None,
        min_age: float = MIN_AGE,
        prune_wait: float | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.holdings = holdings
        self.cache = cache
        self.queue = queue
        self.running_images = running_images
        self.launching = launching
        self.min_age = min_age
        # How long a run waits for a moment without builds before it leaves the prune to
        # the next run.
        self.prune_wait = settings.cleaner_every / 2 if prune_wait is None else prune_wait
        self.metrics = CleanerMetrics(registry) if registry is not None else None
        if self.metrics:
            self.metrics.images_budget.set(settings.image_cache_max_bytes)
            self.metrics.cache_budget.set(settings.build_cache_max_bytes)
        self.last: CleanerReport | None = None
        # One thread of its own: never the pools launches use.
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="binderbox-clean"
        )
        self._lock = asyncio.Lock()

    async def _blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def run_once(self) -> CleanerReport:
        """One run (runs never overlap); never raises: failures are in ``errors``."""
        async with self._lock:
            started = time.monotonic()
            report = CleanerReport(at=time.time())
            kept: set[str] | None = None
            try:
                kept = await self._images(report)
            except Exception as error:
                report.errors.append(_sentence("Cleaning the images", error))
            try:
                await self._retention(report, kept)
            except Exception as error:
                report.errors.append(_sentence("Deleting old build logs and launches", error))
            try:
                await self._build_cache(report)
            except Exception as error:
                report.errors.append(_sentence("Pruning the build cache", error))
            report.seconds = time.monotonic() - started
            for sentence in report.errors:
                logger.warning("%s", sentence)
            self.last = report
            if self.metrics:
                self.metrics.record(report)
            return report

    async def _images(self, report: CleanerReport) -> set[str] | None:
        """Measure and, over budget, remove; the names still present (None: unknown)."""
        if self.holdings is None:
            return None
        holdings = self.holdings
        images: list[HeldImage] = await self._blocking(holdings.held)
        report.images_count = len(images)
        report.images_bytes = sum(image.bytes for image in images)
        present = {name for image in images for name in image.names}
        budget = self.settings.image_cache_max_bytes
        if budget <= 0 or report.images_bytes <= budget:
            return present
        protected: set[str] = set(await self._blocking(holdings.in_use))
        if self.running_images is not None:
            protected.update(await self.running_images())
        protected.update(self.launching())
        launched = await self._blocking(self.store.last_launched)
        for image in choose_removals(
            images, launched, protected, budget, time.time(), self.min_age
        ):
            if set(image.names) & set(self.launching()):
                continue  # a launch resolved to it since the list was made
            if await self._blocking(holdings.remove, image):
                report.images_removed.extend(image.names)
                report.images_freed += image.bytes
                report.images_bytes -= image.bytes
                report.images_count -= 1
                present.difference_update(image.names)
        return present

    async def _retention(self, report: CleanerReport, present: set[str] | None) -> None:
        days = self.settings.log_retention_days
        if days <= 0:
            return
        cutoff = time.time() - days * DAY
        # Without a list of present images, every old build's log may go.
        report.forgotten = await self._blocking(
            self.store.forget_older_than, cutoff, frozenset(present or ())
        )

    async def _build_cache(self, report: CleanerReport) -> None:
        if self.cache is None:
            return
        cache = self.cache
        report.build_cache_bytes = await self._blocking(cache.size)
        budget = self.settings.build_cache_max_bytes
        if budget <= 0 or report.build_cache_bytes <= budget:
            return
        held = self.queue.paused(self.prune_wait) if self.queue else _no_queue()
        async with held as quiet:
            if not quiet:
                report.build_cache_note = (
                    "Builds ran the whole time; the build cache is pruned on a later run."
                )
                return
            if await self._blocking(cache.busy):
                report.build_cache_note = (
                    "A build outside this service was running on dockerd; the build "
                    "cache is pruned on a later run."
                )
                return
            freed = await self._blocking(cache.prune, budget)
        report.build_cache_freed = freed
        report.build_cache_bytes = await self._blocking(cache.size)

    async def run_forever(self) -> None:
        """A run now and every ``cleaner_every`` seconds, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception as error:  # run_once catches its own; this is a last guard
                logger.warning("%s", _sentence("The cleaner", error))
            await asyncio.sleep(self.settings.cleaner_every)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
