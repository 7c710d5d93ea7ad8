"""The build queue: followers of a shared build, its bounds (queue, per-address cap, log
cap) and finished builds leaving memory."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from binderbox.errors import BinderboxError
from binderbox.events import Event
from binderbox.service.buildqueue import (
    BuildJob,
    BuildQueue,
    QueueFull,
    TooManyBuilds,
    follow,
    truncation_note,
)
from binderbox.store import BuildStore


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
        waited = {name: [e.message for e in job.waiting_events] for name, job in jobs.items()}
        release.set()
        while not all(job.done for job in jobs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert all(job.done for job in jobs.values())
        return waited

    waited = asyncio.run(scenario())
    assert waited["a"] == [] and waited["b"] == []
    assert waited["c"][-1] == "Waiting for a build slot: position 1 in the queue (2 builds ahead)."
    assert waited["d"][-1] == "Waiting for a build slot: position 2 in the queue (3 builds ahead)."


def wait_for(check, what: str, timeout: float = 10):
    async def waiting():
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
            await asyncio.sleep(0.01)

    return waiting()


def test_a_full_queue_and_an_address_at_its_cap_are_refused_in_one_sentence():
    async def scenario() -> None:
        queue = BuildQueue(limit=1, queue_size=1, per_owner=2)
        release = threading.Event()

        def slow(emit):
            release.wait(10)
            raise BinderboxError("stopped on purpose")

        queue.submit("a", slow, owner="192.0.2.1")
        queue.submit("b", slow, owner="192.0.2.1")  # waits: the queue holds one
        with pytest.raises(TooManyBuilds, match=r"^Your address already has 2 builds running"):
            queue.submit("c", slow, owner="192.0.2.1")
        with pytest.raises(QueueFull, match=r"^The build queue is full; try again in a few"):
            queue.submit("d", slow, owner="192.0.2.2")
        # Joining a build that runs is no new build: always allowed.
        assert queue.submit("a", slow, owner="192.0.2.1")[1] is False
        assert queue.owners["192.0.2.2"] == 0  # the refused build counted nothing
        release.set()
        await wait_for(lambda: queue.jobs == 0, "both builds finishing")
        assert queue.owners["192.0.2.1"] == 0
        queue.submit("e", slow, owner="192.0.2.1")
        release.set()
        await wait_for(lambda: queue.jobs == 0, "the next build finishing")

    asyncio.run(scenario())


def test_finished_builds_leave_memory_and_late_followers_read_the_store(tmp_path):
    async def scenario() -> None:
        store = BuildStore(tmp_path / "state.sqlite")

        async def read(build_id: str, start: int, limit: int) -> list[Event]:
            rows = await asyncio.to_thread(store.events, build_id, start, limit)
            return [Event(phase, line) for phase, line in rows]

        queue = BuildQueue(limit=1, store=store, read_store=read)
        go = threading.Event()

        def chatty(emit):
            emit(Event("fetching", "Fetching"))
            for n in range(2500):
                emit(Event("building", f"line {n}", log=True))
            go.wait(10)
            return None

        job, _ = queue.submit("img", chatty)
        await wait_for(lambda: job.count == 2501, "the log reaching the loop")
        seen: list[str] = []
        follower = follow(job, read)
        async for event in follower:  # a follower that reads one event, then stalls
            seen.append(event.message)
            break
        go.set()
        await wait_for(lambda: job.done, "the build finishing")
        assert queue.jobs == 0 and queue.job("img") is None
        assert job.events == []  # its log left memory...
        async for event in follower:  # ...and the stalled follower gets it from the store
            seen.append(event.message)
        assert seen == ["Fetching"] + [f"line {n}" for n in range(2500)]
        assert store.events(job.build_id, 2500, 10) == [("building", "line 2499")]
        assert store.get(job.build_id).status == "success"

    asyncio.run(scenario())


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_build_printing_hundreds_of_megabytes_keeps_a_capped_log(tmp_path):
    """300 MB of log lines: the stream and the store keep 1 MB and say where it was cut,
    and memory does not grow with what the build printed."""

    async def scenario() -> tuple[list[Event], int]:
        store = BuildStore(tmp_path / "state.sqlite")
        queue = BuildQueue(limit=1, store=store, log_max_bytes=1_000_000)
        line = "y" * 999

        def flood(emit):
            for _ in range(300_000):  # 300 MB
                emit(Event("building", line, log=True))
            emit(Event("building", "Built it"))

        before = rss_kib()
        job, _ = queue.submit("img", flood)
        events = [event async for event in follow(job)]
        return events, rss_kib() - before, store.log(job.build_id)

    events, grew_kib, stored = asyncio.run(scenario())
    note = truncation_note(1_000_000)
    assert "cut here" in note and "1 MB" in note
    messages = [e.message for e in events]
    assert messages.count(note) == 1 and messages[-1] == "Built it"
    assert sum(len(m) + 1 for m in messages) < 1_100_000
    assert stored == messages  # /logs/<id> shows the same, the note included
    assert grew_kib < 50_000, f"memory grew by {grew_kib} KiB"


def test_what_a_quiet_build_said_reaches_the_store_while_it_runs(tmp_path):
    async def scenario() -> list[str]:
        store = BuildStore(tmp_path / "state.sqlite")
        queue = BuildQueue(limit=1, store=store)
        go = threading.Event()

        def quiet(emit):
            for n in range(3):
                emit(Event("building", f"line {n}", log=True))
            go.wait(20)  # says nothing more for a while, as a long step does

        job, _ = queue.submit("img", quiet)
        await wait_for(lambda: len(store.log(job.build_id)) == 3, "the live log", timeout=5)
        live = store.log(job.build_id)
        go.set()
        await wait_for(lambda: job.done, "the build finishing")
        return live

    assert asyncio.run(scenario()) == ["line 0", "line 1", "line 2"]
