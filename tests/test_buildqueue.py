"""Followers of a shared build: one going away must not disturb the others."""

from __future__ import annotations

import asyncio
import threading
import time

from binderbox.errors import BinderboxError
from binderbox.events import Event
from binderbox.service.buildqueue import BuildJob, BuildQueue, follow


async def collect(job: BuildJob, into: list[str]) -> None:
    async for event in follow(job):
        into.append(event.message)


def test_a_follower_that_leaves_does_not_cancel_the_others_wake_up():
    async def scenario() -> tuple[list[str], list[str]]:
        job = BuildJob(image="x")
        job.add(Event("building", "first"))
        leaving, staying = [], []
        gone = asyncio.create_task(collect(job, leaving))
        kept = asyncio.create_task(collect(job, staying))
        while len(leaving) < 1 or len(staying) < 1:
            await asyncio.sleep(0)
        gone.cancel()  # its client disconnected while both waited for the next event
        await asyncio.gather(gone, return_exceptions=True)
        job.add(Event("building", "second"))
        job.done = True
        job.notify()
        await asyncio.wait_for(kept, timeout=5)
        # A follower joining now (a reconnecting page) replays everything once.
        late: list[str] = []
        await asyncio.wait_for(collect(job, late), timeout=5)
        return staying, late

    staying, late = asyncio.run(scenario())
    assert staying == ["first", "second"]
    assert late == ["first", "second"]


def test_only_builds_without_a_free_slot_are_told_their_place_in_the_queue():
    async def scenario() -> dict[str, list[str]]:
        queue = BuildQueue(limit=2)
        release = threading.Event()

        def slow(emit):
            release.wait(10)
            raise BinderboxError("stopped on purpose")

        jobs = {name: queue.submit(name, slow)[0] for name in "abcd"}
        deadline = time.monotonic() + 5
        while queue.running < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waited = {name: [e.message for e in job.events] for name, job in jobs.items()}
        release.set()
        while not all(job.done for job in jobs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert all(job.done for job in jobs.values())
        return waited

    waited = asyncio.run(scenario())
    assert waited["a"] == [] and waited["b"] == []
    assert waited["c"][-1] == "Waiting for a build slot: position 1 in the queue (2 builds ahead)."
    assert waited["d"][-1] == "Waiting for a build slot: position 2 in the queue (3 builds ahead)."
