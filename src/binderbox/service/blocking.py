"""Threads for blocking calls, bounded, each call with a deadline.

asyncio's default pool is small (min(32, CPUs + 4) threads) and shared by everything
that calls ``asyncio.to_thread``: a few requests to a git server that never answers used
to take all of it, and with it /health and every page. Here each kind of call gets a pool
of its own: calls to hosts users name (git, record APIs), local calls (Docker, the
state database), and /health's Docker check. A pool runs ``threads`` calls at once, lets
``waiting`` more queue, and refuses the rest at once; a caller stops waiting at its
deadline. A thread that is still stuck in its call keeps its place until the call returns
(Python cannot stop a thread), so a pool stays bounded however many callers gave up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from binderbox.errors import BinderboxError

T = TypeVar("T")


class Busy(BinderboxError):
    """Every thread of a pool is taken and its queue is full."""


class CallTimedOut(BinderboxError):
    """A blocking call did not return in time; ``pending`` is the call, maybe still running."""

    def __init__(self, message: str, pending: concurrent.futures.Future[Any]) -> None:
        super().__init__(message)
        self.pending = pending


class BlockingPool:
    """At most ``threads`` blocking calls at once, ``waiting`` more queued."""

    def __init__(self, name: str, threads: int, waiting: int) -> None:
        if threads < 1:
            raise ValueError("a pool needs at least one thread")
        self.name = name
        self.threads = threads
        self.capacity = threads + max(0, waiting)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
        # Calls admitted and not yet returned (running or queued); changed on the loop only.
        self.admitted = 0

    @property
    def running(self) -> int:
        return min(self.admitted, self.threads)

    async def run(
        self,
        function: Callable[..., T],
        *args: Any,
        timeout: float,
        what: str,
        busy: str = "binderbox is busy with other requests right now; try again in a minute.",
        holds: list[concurrent.futures.Future[Any]] | None = None,
    ) -> T:
        """``function(*args)`` on a thread of this pool.

        Raises ``Busy`` (with the sentence ``busy``) when the pool is full, and
        ``CallTimedOut`` ("<what> did not answer within N seconds.") at the deadline.
        The call is added to ``holds``, for callers that must know when it really ended
        (a caller that gave up may leave it running).
        """
        if self.admitted >= self.capacity:
            raise Busy(busy)
        loop = asyncio.get_running_loop()
        self.admitted += 1
        future = self._executor.submit(functools.partial(function, *args))

        def returned(_: concurrent.futures.Future[Any]) -> None:
            # Runs in the worker thread (or here, for a call cancelled before it ran).
            try:
                loop.call_soon_threadsafe(self._returned)
            except RuntimeError:  # the loop is closed: nobody counts any more
                pass

        future.add_done_callback(returned)
        if holds is not None:
            holds.append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            if future.cancel():  # it never got a thread
                raise Busy(busy) from None
            raise CallTimedOut(
                f"{what} did not answer within {timeout:g} seconds.", future
            ) from None
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: a call still queued need not run
            raise

    def _returned(self) -> None:
        self.admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SingleFlight:
    """One blocking check at a time, its answer shared by everyone who asks meanwhile and
    reused for ``fresh`` seconds (so a flood of /health requests makes one Docker ping)."""

    def __init__(self, pool: BlockingPool, check: Callable[[], T], fresh: float = 1.0) -> None:
        self.pool = pool
        self.check = check
        self.fresh = fresh
        self._task: asyncio.Task[Any] | None = None
        self._at = 0.0

    async def get(self, timeout: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or (task.done() and loop.time() - self._at > self.fresh):
            self._at = loop.time()
            task = self._task = loop.create_task(self._run(timeout, what))
        return await asyncio.shield(task)

    async def _run(self, timeout: float, what: str) -> Any:
        try:
            return await self.pool.run(self.check, timeout=timeout, what=what)
        finally:
            self._at = asyncio.get_running_loop().time()
