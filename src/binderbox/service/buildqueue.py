"""Build admission: a concurrency limit, a visible queue, and one build per image.

Two requests for the same image share one build; each follower gets the full log from
the start, however late it joins. Builds run in worker threads (the builder is
synchronous), their events cross into the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from binderbox.build.pipeline import BuildResult
from binderbox.errors import BinderboxError
from binderbox.events import Emit, Event
from binderbox.store import BuildStore

BuildFunction = Callable[[Emit], BuildResult]


@dataclass
class BuildJob:
    """One build of one image, with everything it said so far."""

    image: str
    # The build's id in the store ("" without one): its log is at /logs/<build_id>.
    build_id: str = ""
    # What is built, for people (the status page): the repository address and commit.
    repo_url: str = ""
    ref: str = ""
    # Where it waits for a slot (0: it has one, or has not been told yet).
    position: int = 0
    building: bool = False
    events: list[Event] = field(default_factory=list)
    result: BuildResult | None = None
    error: BinderboxError | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    # Resolved and replaced on every change, so no follower can miss a wake-up.
    changed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def add(self, event: Event) -> None:
        self.events.append(event)
        self.notify()

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        if not changed.done():
            changed.set_result(None)


class BuildQueue:
    """Runs at most ``limit`` builds at once; identical requests share one build."""

    def __init__(
        self,
        limit: int,
        on_finish: Callable[[BuildJob, float], None] = lambda job, s: None,
        store: BuildStore | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("the build limit must be at least 1")
        self.limit = limit
        # Told about every finished build and how long it ran (for metrics).
        self.on_finish = on_finish
        self.store = store
        self._slots = asyncio.Semaphore(limit)
        self._jobs: dict[str, BuildJob] = {}
        self._waiting: list[BuildJob] = []
        self.running = 0

    def job(self, image: str) -> BuildJob | None:
        """The unfinished build of ``image``, if one is queued or running."""
        job = self._jobs.get(image)
        return job if job and not job.done else None

    def unfinished(self) -> list[BuildJob]:
        """The builds that run or wait, oldest first."""
        return sorted((j for j in self._jobs.values() if not j.done), key=lambda j: j.started)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self, image: str, build: BuildFunction, repo_url: str = "", ref: str = ""
    ) -> tuple[BuildJob, bool]:
        """The build of ``image``: the running one, or a new one. True when new."""
        existing = self.job(image)
        if existing:
            return existing, False
        job = BuildJob(image, repo_url=repo_url, ref=ref)
        if self.store:
            job.build_id = self.store.start(image, repo_url, ref)
        self._jobs[image] = job
        self._waiting.append(job)
        self._announce_positions()
        asyncio.get_running_loop().create_task(self._run(job, build))
        return job, True

    async def _run(self, job: BuildJob, build: BuildFunction) -> None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            self._waiting.remove(job)
            self.running += 1
            job.position, job.building = 0, True
            self._announce_positions()
            began = time.monotonic()
            store = self.store

            def emit(event: Event) -> None:  # runs in the build's worker thread
                if store and job.build_id:
                    store.append(job.build_id, event.message)
                loop.call_soon_threadsafe(job.add, event)

            try:
                job.result = await asyncio.to_thread(build, emit)
            except BinderboxError as error:
                job.error = error
            except Exception as error:  # a bug must still end the stream with a reason
                job.error = BinderboxError(
                    f"The build failed unexpectedly: {type(error).__name__}: {error}"
                )
            finally:
                self.running -= 1
                # Let events already scheduled by the worker thread land first.
                await asyncio.sleep(0)
                if store and job.build_id:
                    status = "failed" if job.error else "success"
                    message = job.error.message if job.error else ""
                    await asyncio.to_thread(store.finish, job.build_id, status, message)
                job.done = True
                job.notify()
                self.on_finish(job, time.monotonic() - began)

    def _announce_positions(self) -> None:
        """Tell each build that has to wait for a slot where it stands; builds that get a
        free slot at once are not told they wait."""
        free = self.limit - self.running
        for index, job in enumerate(self._waiting, start=1):
            position = index - free
            if position < 1:
                continue
            job.position = position
            ahead = self.running + index - 1
            job.add(
                Event(
                    "waiting",
                    f"Waiting for a build slot: position {position} in the queue "
                    f"({ahead} build{'s' if ahead != 1 else ''} ahead).",
                    {"position": position},
                )
            )


async def follow(job: BuildJob) -> AsyncIterator[Event]:
    """Every event of ``job`` from the first, then new ones as they come, until it ends."""
    index = 0
    while True:
        changed = job.changed
        while index < len(job.events):
            yield job.events[index]
            index += 1
        if job.done:
            return
        if index == len(job.events):
            # Shielded: a follower that goes away (its client disconnected) must not
            # cancel the wake-up every other follower is waiting for.
            await asyncio.shield(changed)
