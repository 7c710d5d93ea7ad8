"""Followers of a shared build: one going away must not disturb the others."""

from __future__ import annotations

import asyncio

from binderbox.events import Event
from binderbox.service.buildqueue import BuildJob, follow


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
