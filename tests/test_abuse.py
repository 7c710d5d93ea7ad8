"""Abuse stays bounded: replayed build tokens are rate limited, per-address caps, proxy
headers only from trusted proxies, blocking calls on bounded pools, and against the real
``binderbox serve``: a flood of launches to a git server that never answers (the
service keeps answering /health) and a build printing hundreds of MB (log capped,
memory bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from tests.conftest import commit_all
from tests.test_serve import serving

from binderbox.service import buildtoken
from binderbox.service.blocking import BlockingPool, Busy, CallTimedOut, SingleFlight

BAD_SPEC = "/build/gh/org/repo/..bad"  # refused at once, no network, no build
STREAM = {"Accept": "text/event-stream"}


# ---------- the pools (pure asyncio, real threads) ----------


def test_a_full_pool_refuses_and_a_stuck_call_keeps_its_place():
    async def scenario() -> None:
        pool = BlockingPool("test", threads=2, waiting=1)
        release = threading.Event()
        stuck = [
            asyncio.create_task(pool.run(release.wait, 10, timeout=0.2, what="The host"))
            for _ in range(3)
        ]
        await asyncio.sleep(0)
        assert pool.admitted == 3
        with pytest.raises(Busy, match=r"^binderbox is busy"):
            await pool.run(time.sleep, 0, timeout=1, what="The host")
        results = await asyncio.gather(*stuck, return_exceptions=True)
        timed_out = [r for r in results if isinstance(r, CallTimedOut)]
        assert [str(r) for r in timed_out] == ["The host did not answer within 0.2 seconds."] * 2
        # The queued one never got a thread: it is refused as busy, not as slow.
        assert sum(isinstance(r, Busy) for r in results) == 1
        # The two threads still wait: they keep their places until they return.
        assert pool.admitted == 2
        release.set()
        deadline = time.monotonic() + 5
        while pool.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pool.admitted == 0
        assert await pool.run(lambda: 42, timeout=1, what="x") == 42
        pool.shutdown()

    asyncio.run(scenario())


def test_a_flood_of_checks_shares_one_blocking_call():
    calls = []

    def check() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "ok"

    async def scenario() -> list[str]:
        flight = SingleFlight(BlockingPool("health", 1, 0), check, fresh=5)
        return await asyncio.gather(*(flight.get(timeout=2, what="Docker") for _ in range(50)))

    assert asyncio.run(scenario()) == ["ok"] * 50
    assert len(calls) == 1


# ---------- tokens and addresses, against the real app under uvicorn ----------


@pytest.fixture
def in_process():
    from tests.test_service_build import Service

    made = []

    def start(**overrides):
        made.append(Service(**overrides))
        return made[-1]

    yield start
    for svc in made:
        svc.stop()


def get(url: str, path: str, source: str = "127.0.0.1", headers: dict | None = None):
    """GET from a chosen loopback address (127.0.0.2 is "another client")."""
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", path, headers={**STREAM, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def page_token(url: str, path: str, source: str = "127.0.0.1") -> str:
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    connection.request("GET", path)
    page = connection.getresponse().read().decode()
    connection.close()
    return json.loads(re.search(r'id="page-data">(.*?)</script>', page)[1])["build_token"]


def test_a_replayed_build_token_is_rate_limited(in_process):
    svc = in_process(rate_limit_per_minute=2, build_token_uses=3)
    token = page_token(svc.url, "/v2/gh/org/repo/..bad")
    codes = [get(svc.url, f"{BAD_SPEC}?build_token={token}")[0] for _ in range(8)]
    # Three uses past the limit (the page and two reconnects), then it counts: two more
    # fit in the per-minute limit, the rest are refused.
    assert codes == [200] * 5 + [429] * 3
    status, body = get(svc.url, f"{BAD_SPEC}?build_token={token}")
    event = json.loads(body.removeprefix("data: "))
    assert status == 429 and event["phase"] == "failed"
    assert re.fullmatch(
        r"Too many launch requests from your address; try again in \d+ seconds\.", event["message"]
    )


def test_a_token_is_no_pass_from_another_address_or_once_expired(in_process):
    svc = in_process(rate_limit_per_minute=1)
    secret = Path(svc.state_dir, "build-token-secret").read_text()
    expired = buildtoken.issue(
        bytes.fromhex(secret), "gh/org/repo/..bad", "127.0.0.1", now=time.time() - 3600
    )
    # An expired token (a long build's reconnect) counts like a request without one:
    # within the limit it still works.
    assert get(svc.url, f"{BAD_SPEC}?build_token={expired}")[0] == 200
    assert get(svc.url, f"{BAD_SPEC}?build_token={expired}")[0] == 429
    # A token handed to 127.0.0.1 does not help 127.0.0.2 ...
    token = page_token(svc.url, "/v2/gh/org/repo/..bad")
    other = [get(svc.url, f"{BAD_SPEC}?build_token={token}", "127.0.0.2")[0] for _ in range(2)]
    assert other == [200, 429]
    # ... while its own page's token does.
    own = page_token(svc.url, "/v2/gh/org/repo/..bad", "127.0.0.2")
    assert get(svc.url, f"{BAD_SPEC}?build_token={own}", "127.0.0.2")[0] == 200


def test_forwarded_for_counts_only_from_a_trusted_proxy(in_process):
    svc = in_process(rate_limit_per_minute=1, trusted_proxies="127.0.0.1")
    # 127.0.0.1 is the proxy: each forwarded client has a limit of its own.
    via_proxy = [
        get(svc.url, BAD_SPEC, headers={"X-Forwarded-For": f"198.51.100.{n}"})[0]
        for n in (1, 2, 3, 1)
    ]
    assert via_proxy == [200, 200, 200, 429]
    # 127.0.0.2 is no proxy: what it claims is ignored, it is one client.
    claimed = [
        get(svc.url, BAD_SPEC, "127.0.0.2", {"X-Forwarded-For": f"198.51.100.{n}"})[0]
        for n in (4, 5)
    ]
    assert claimed == [200, 429]
    # The proxy's own right-most entry wins over anything the client put before it.
    chained = get(svc.url, BAD_SPEC, headers={"X-Forwarded-For": "198.51.100.9, 198.51.100.1"})
    assert chained[0] == 429


# ---------- a git server that accepts connections and never answers ----------


class SilentServer:
    """Accepts TCP connections on ``host`` and never says a word."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0), backlog=512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    server = SilentServer("127.0.0.5")
    yield server
    server.close()


def hostile_path(server: SilentServer, n: int) -> str:
    url = f"git://{server.host}:{server.port}/never-{n}.git"
    return f"/build/git/{quote(url, safe='')}/main"


def stream_events(url: str, path: str, source: str = "127.0.0.1", timeout: float = 120):
    response = requests.get(url + path, headers=STREAM, stream=True, timeout=timeout)
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["phase"] in {"ready", "failed"}:
                break
    response.close()
    return events


def test_launches_in_flight_are_capped_per_address(in_process, silent):
    svc = in_process(
        allowed_hosts="127.0.0.1,127.0.0.5",
        launches_per_address=2,
        rate_limit_per_minute=0,
        remote_timeout=4,
    )
    with ThreadPoolExecutor(2) as pool:
        hanging = [pool.submit(stream_events, svc.url, hostile_path(silent, n)) for n in (1, 2)]
        deadline = time.monotonic() + 10
        while len(silent.accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        third = stream_events(svc.url, hostile_path(silent, 3))
        elsewhere = get(svc.url, BAD_SPEC, "127.0.0.2")
        ended = [future.result() for future in hanging]
    assert [e["phase"] for e in third] == ["failed"]
    assert third[0]["message"] == (
        "Your address already has 2 launches in progress here; wait for one to finish "
        "before starting another."
    )
    assert elsewhere[0] == 200 and "already has" not in elsewhere[1]  # another address
    for events in ended:
        assert events[-1]["phase"] == "failed"
        assert one_sentence(events[-1]["message"])
    # Once they ended, the address may launch again.
    again = stream_events(svc.url, BAD_SPEC)
    assert "already has" not in again[-1]["message"]


def one_sentence(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message and message.endswith(".")


# ---------- the real binderbox serve ----------


def serve_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_image, silent):
    with serving(
        tmp_path_factory,
        "abuse",
        BINDERBOX_ALLOWED_HOSTS="127.0.0.1,127.0.0.5",
        BINDERBOX_BUILD_ONLY_ENABLED="true",
        BINDERBOX_RATE_LIMIT_PER_MINUTE="0",
        BINDERBOX_LAUNCHES_PER_ADDRESS="100",
        BINDERBOX_BLOCKING_THREADS="8",
        BINDERBOX_REMOTE_TIMEOUT="5",
        BINDERBOX_BUILD_LOG_MAX_BYTES="200000",
    ) as process:
        yield process


@pytest.mark.docker
def test_a_flood_to_a_silent_git_server_does_not_freeze_the_service(served, silent):
    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        flood = [pool.submit(stream_events, served.url, hostile_path(silent, n)) for n in range(50)]
        slowest = 0.0
        while not all(f.done() for f in flood):
            began = time.monotonic()
            response = requests.get(served.url + "/health", timeout=5)
            slowest = max(slowest, time.monotonic() - began)
            assert response.status_code == 200
            assert time.monotonic() - started < 120, "the flood did not end"
        results = [f.result() for f in flood]
    assert slowest < 1.0, f"/health took {slowest:.2f} s during the flood"
    assert len(silent.accepted) >= 8  # the flood really reached the silent server
    finals = [events[-1] for events in results]
    assert all(final["phase"] == "failed" for final in finals)
    assert all(one_sentence(final["message"]) for final in finals), finals
    messages = {final["message"] for final in finals}
    allowed = re.compile(
        r".*did not (finish|answer) within \d+ seconds\."
        r"|binderbox is busy talking to other servers right now; try again in a minute\."
    )
    assert all(allowed.fullmatch(m) for m in messages), messages
    # Each ended after the timeout (5 s), not git's 10 minutes.
    assert time.monotonic() - started < 60
    # The status page and metrics answered throughout as well.
    assert requests.get(served.url + "/status", timeout=5).status_code == 200
    assert requests.get(served.url + "/metrics", timeout=5).status_code == 200


@pytest.mark.docker
def test_a_build_printing_hundreds_of_megabytes_is_capped(served, git_server, tmp_path):
    """BuildKit (dockerd 20.10) itself thins a step's output to 200 KiB/s; what still
    arrives is cut at build_log_max_bytes (200 kB here), with a note in the stream and in
    /logs/<id>, and serve's memory does not grow with it."""
    work = tmp_path / "chatty"
    work.mkdir()
    (work / "postBuild").write_text("#!/bin/sh\nyes 'a line of a chatty build' | head -c 300M\n")
    (work / "postBuild").chmod(0o755)
    commit_all(work)
    url = git_server.publish(work, "chatty.git")
    before = serve_rss_kib(served.process.pid)
    path = f"/build/git/{quote(url, safe='')}/main?build_only=true"
    events = stream_events(served.url, path, timeout=900)
    after = serve_rss_kib(served.process.pid)
    assert events[-1]["phase"] == "ready", events[-1]
    notes = [e for e in events if "the build log was cut here" in e["message"]]
    assert len(notes) == 1 and "200 kB" in notes[0]["message"]
    # What came after the note is binderbox's own steps, not the build's output.
    after_note = [e["message"] for e in events[events.index(notes[0]) + 1 :]]
    assert not any("a line of a chatty build" in m for m in after_note)
    assert sum(len(e["message"]) + 1 for e in events) < 230_000
    built = next(e for e in events if e["phase"] == "built")
    log = requests.get(built["log_url"], timeout=30).text
    assert "the build log was cut here" in log and len(log) < 240_000
    assert after - before < 100_000, f"serve grew by {after - before} KiB"
