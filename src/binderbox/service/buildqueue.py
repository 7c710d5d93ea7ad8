"""Build admission: a concurrency limit, a bounded visible queue, and one build per image.

Two requests for the same image share one build; each follower gets the full log from
the start, however late it joins. Builds run on threads of their own (the builder is
synchronous), their events cross into the event loop thread-safely.

Memory stays bounded: a build's log is capped (``log_max_bytes``, with a note where it
was cut), a finished build leaves the queue at once, and its events leave memory too —
they stay in the store, where a follower still reading a finished build gets the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from binderbox.builder.pipeline import BuildResult
from binderbox.errors import BinderboxError
from binderbox.events import Emit, Event
from binderbox.service.limits import InFlight
from binderbox.state import StateStore

BuildFunction = Callable[[Emit], BuildResult]
# Reads up to ``limit`` stored events of a build from number ``start``.
StoreReader = Callable[[str, int, int], Awaitable[list[Event]]]

# A log line counts at least this many bytes against the cap: each line kept costs
# memory beyond its text, so a flood of empty lines is capped as well.
LINE_COST = 100
# Log lines written to the store in one transaction.
WRITE_BATCH = 500


class QueueFull(BinderboxError):
    """Every build slot is taken and the queue is full."""


class TooManyBuilds(BinderboxError):
    """One address already has as many builds under way as it may."""


@dataclass
class BuildJob:
    """One build of one image, with everything it said so far."""

    image: str
    # The build's id in the store ("" without one): its log is at /logs/<build_id>.
    build_id: str = ""
    # What is built, for people (the status page): the repository address and commit.
    repo_url: str = ""
    ref: str = ""
    # Who asked for it (a limits bucket), counted against builds_per_address.
    owner: str = ""
    # Where it waits for a slot (0: it has one, or has not been told yet).
    position: int = 0
    building: bool = False
    # Queue-place events, all before the build's own events.
    waiting_events: list[Event] = field(default_factory=list)
    # The build's own events from number ``first_in_memory`` on (all of them while it
    # runs; none once it finished and the store holds them).
    events: list[Event] = field(default_factory=list)
    first_in_memory: int = 0
    result: BuildResult | None = None
    error: BinderboxError | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    # Resolved and replaced on every change, so no follower can miss a wake-up.
    changed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def count(self) -> int:
        """How many events the build itself said."""
        return self.first_in_memory + len(self.events)

    def add(self, event: Event) -> None:
        self.events.append(event)
        self.notify()

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        if not changed.done():
            changed.set_result(None)


class _CappedLog:
    """A build's events on their way to the store and the event loop, the log capped.

    ``emit`` runs on the build's own thread; ``flush`` there and on the queue's flusher
    (so the live log at /logs/<id> is never more than a moment behind a quiet build).
    """

    def __init__(
        self, job: BuildJob, store: StateStore | None, max_bytes: int, deliver: Emit
    ) -> None:
        self.job, self.store, self.max_bytes, self.deliver = job, store, max_bytes, deliver
        self.used = 0
        self.cut = False
        self.pending: list[tuple[str, str]] = []
        # Held while a batch is taken and written, so batches reach the store in order.
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def emit(self, event: Event) -> None:
        if self.max_bytes > 0:
            self.used += max(len(event.message.encode("utf-8", "replace")) + 1, LINE_COST)
            if self.used > self.max_bytes:
                if not event.log:
                    pass  # binderbox's own step messages still get through
                elif self.cut:
                    return
                else:
                    self.cut = True
                    event = Event("building", truncation_note(self.max_bytes))
        if self.store and self.job.build_id:
            with self._lock:
                self.pending.append((event.phase, event.message))
                due = len(self.pending) >= WRITE_BATCH or time.monotonic() - self._flushed > 0.5
            if due:
                self.flush()
        self.deliver(event)

    def flush(self) -> None:
        with self._lock:
            self._flushed = time.monotonic()
            if self.pending and self.store:
                pending, self.pending = self.pending, []
                self.store.append_many(self.job.build_id, pending)


def truncation_note(max_bytes: int) -> str:
    """What the log says where it was cut."""
    return (
        f"[binderbox: the build log was cut here; it passed the limit of "
        f"{_size(max_bytes)} kept per build (build_log_max_bytes). The build goes on.]"
    )


def _size(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1_000_000:g} MB"
    if count >= 1000:
        return f"{count / 1000:g} kB"
    return f"{count} bytes"


class BuildQueue:
    """Runs at most ``limit`` builds at once; identical requests share one build.

    ``queue_size`` builds may wait for a slot (None: any number), each ``owner`` may
    have ``per_owner`` builds running or waiting (0: any number), and each build keeps
    ``log_max_bytes`` of log (0: all of it). Builds are recorded in ``store`` as run by
    ``state_owner`` (this service), so only this service's next start judges them.
    """

    def __init__(
        self,
        limit: int,
        on_finish: Callable[[BuildJob, float], None] = lambda job, s: None,
        store: StateStore | None = None,
        *,
        state_owner: str = "",
        queue_size: int | None = None,
        per_owner: int = 0,
        log_max_bytes: int = 0,
        read_store: StoreReader | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("the build limit must be at least 1")
        self.limit = limit
        # Told about every finished build and how long it ran (for metrics).
        self.on_finish = on_finish
        self.store = store
        self.state_owner = state_owner
        self.queue_size = queue_size
        self.log_max_bytes = log_max_bytes
        self.owners = InFlight(per_owner)
        self._read_store = read_store
        self._slots = asyncio.Semaphore(limit)
        # Builds are long and blocking: threads of their own, one per slot, so they never
        # take the threads short calls need.
        self._threads = concurrent.futures.ThreadPoolExecutor(
            limit, thread_name_prefix="binderbox-build"
        )
        # Writes what a quiet build said, while its own thread waits for more output.
        self._flusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="binderbox-log")
        self._jobs: dict[str, BuildJob] = {}
        self._waiting: list[BuildJob] = []
        self.running = 0
        # Held (``paused``): BuildKit's cache is pruned, which must not run beside a build
        # (a concurrent prune crashed dockerd 20.10). Set when no build runs / none is held.
        self._held = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._resumed = asyncio.Event()
        self._resumed.set()

    def job(self, image: str) -> BuildJob | None:
        """The unfinished build of ``image``, if one is queued or running."""
        job = self._jobs.get(image)
        return job if job and not job.done else None

    def unfinished(self) -> list[BuildJob]:
        """The builds that run or wait, oldest first."""
        return sorted((j for j in self._jobs.values() if not j.done), key=lambda j: j.started)

    @property
    def jobs(self) -> int:
        """Builds the queue holds (finished ones are forgotten)."""
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        image: str,
        build: BuildFunction,
        repo_url: str = "",
        ref: str = "",
        owner: str = "",
    ) -> tuple[BuildJob, bool]:
        """The build of ``image``: the running one, or a new one. True when new.

        Raises QueueFull or TooManyBuilds (one sentence each) instead of a new build.
        """
        existing = self.job(image)
        if existing:
            return existing, False
        if owner and not self.owners.acquire(owner):
            count = self.owners.cap
            raise TooManyBuilds(
                f"Your address already has {count} build{'s' if count != 1 else ''} running "
                "or waiting here; wait for one to finish before starting another."
            )
        job = BuildJob(image, repo_url=repo_url, ref=ref, owner=owner)
        try:
            # Builds that would wait for a slot, this one included.
            must_wait = len(self._waiting) - (self.limit - self.running) + 1
            if self.queue_size is not None and must_wait > self.queue_size:
                raise QueueFull("The build queue is full; try again in a few minutes.")
            if self.store:
                job.build_id = self.store.start(image, repo_url, ref, owner=self.state_owner)
        except BaseException:
            if owner:
                self.owners.release(owner)
            raise
        self._jobs[image] = job
        self._waiting.append(job)
        self._announce_positions()
        asyncio.get_running_loop().create_task(self._run(job, build))
        return job, True

    async def _run(self, job: BuildJob, build: BuildFunction) -> None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            if self._held:
                job.waiting_events.append(
                    Event("waiting", "Waiting while binderbox cleans its build cache.")
                )
                job.notify()
            while self._held:
                await self._resumed.wait()
            self._waiting.remove(job)
            self.running += 1
            self._idle.clear()
            job.position, job.building = 0, True
            self._announce_positions()
            began = time.monotonic()
            store = self.store
            log = _CappedLog(
                job, store, self.log_max_bytes, lambda e: loop.call_soon_threadsafe(job.add, e)
            )

            def run() -> BuildResult:  # on the build's own thread, store writes included
                try:
                    result = build(log.emit)
                    if store and job.build_id and getattr(result, "lock", ""):
                        try:
                            store.set_lock(job.build_id, result.lock)
                        except BinderboxError as error:  # the image is built all the same
                            log.emit(Event("building", f"Warning: the lock was not kept: {error}"))
                    return result
                finally:
                    log.flush()

            flushing = loop.create_task(self._flush_now_and_then(log))
            try:
                job.result = await loop.run_in_executor(self._threads, run)
            except BinderboxError as error:
                job.error = error
            except Exception as error:  # a bug must still end the stream with a reason
                job.error = BinderboxError(
                    f"The build failed unexpectedly: {type(error).__name__}: {error}"
                )
            finally:
                flushing.cancel()
                self.running -= 1
                if not self.running:
                    self._idle.set()
                # Let events already scheduled by the build's thread land first.
                await asyncio.sleep(0)
                if store and job.build_id:
                    status = "failed" if job.error else "success"
                    message = job.error.message if job.error else ""
                    try:
                        await loop.run_in_executor(
                            self._threads, store.finish, job.build_id, status, message
                        )
                    except Exception:  # the outcome still reaches the followers
                        pass
                    if self._read_store:
                        # The store has every event: followers still reading get the rest
                        # from there, and the log leaves memory now.
                        job.first_in_memory, job.events = job.count, []
                if self._jobs.get(job.image) is job:
                    del self._jobs[job.image]
                if job.owner:
                    self.owners.release(job.owner)
                job.done = True
                job.notify()
                self.on_finish(job, time.monotonic() - began)

    @contextlib.asynccontextmanager
    async def paused(self, wait: float) -> AsyncIterator[bool]:
        """Wait up to ``wait`` seconds for a moment when no build runs, then start no
        build until the block ends (builds that get a slot meanwhile wait); yields False,
        holding nothing, when builds ran all that time."""
        if not await self._until_idle(wait):
            yield False
            return
        # No await since the queue was seen idle: no build can have started in between.
        self._held += 1
        self._resumed.clear()
        try:
            yield True
        finally:
            self._held -= 1
            if not self._held:
                self._resumed.set()

    async def _until_idle(self, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.running:
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
        return True

    async def _flush_now_and_then(self, log: _CappedLog) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1)
            if log.pending:
                with contextlib.suppress(Exception):  # the build's own flush still comes
                    await loop.run_in_executor(self._flusher, log.flush)

    def _announce_positions(self) -> None:
        """Tell each build that has to wait for a slot where it stands (when that
        changed); builds that get a free slot at once are not told they wait."""
        free = self.limit - self.running
        for index, job in enumerate(self._waiting, start=1):
            position = index - free
            if position < 1 or position == job.position:
                continue
            job.position = position
            ahead = self.running + index - 1
            job.waiting_events.append(
                Event(
                    "waiting",
                    f"Waiting for a build slot: position {position} in the queue "
                    f"({ahead} build{'s' if ahead != 1 else ''} ahead).",
                    {"position": position},
                )
            )
            job.notify()

    def follow(self, job: BuildJob) -> AsyncIterator[Event]:
        """Every event of ``job`` (reading the store for what left memory)."""
        return follow(job, self._read_store)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._flusher.shutdown(wait=False, cancel_futures=True)


async def follow(job: BuildJob, read: StoreReader | None = None) -> AsyncIterator[Event]:
    """Every event of ``job`` from the first, then new ones as they come, until it ends.

    Queue-place events come first (a build that runs says no more of them), then the
    build's own events: from memory while it is there, else from the store (``read``).
    """
    waited = 0
    index = 0
    while True:
        changed = job.changed
        while waited < len(job.waiting_events):
            yield job.waiting_events[waited]
            waited += 1
        while index < job.count:
            if index >= job.first_in_memory:
                yield job.events[index - job.first_in_memory]
                index += 1
                continue
            batch = await read(job.build_id, index, 1000) if read else []
            if not batch:
                return  # the store lost them: end rather than wait forever
            for event in batch:
                yield event
            index += len(batch)
        if job.done:
            return
        # Shielded: a follower that goes away (its client disconnected) must not
        # cancel the wake-up every other follower is waiting for.
        await asyncio.shield(changed)
