"""/usage's numbers: counted by the real state stores (a SQLite file and a PostgreSQL
server the tests start, tests/postgres.py) from launches and builds recorded through
their own methods, then moved back in time; the same numbers in the page, JSON and CSV;
launches through the real app (fakes for builder, images and hub) counted as cache hits
and misses; bounded output for a flood of repositories; hostile query parameters.
The browser half is tests/test_browser_usage.py."""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient
from tests.postgres import PostgresCluster, postgres_cluster

from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.service.app import create_app
from binderbox.service.charts import Bar, bar_chart, nice_step
from binderbox.service.usage import (
    DAY_COLUMNS,
    REPOSITORY_COLUMNS,
    TOP,
    BadUsageQuery,
    parse_query,
    read_usage,
    usage_csv,
    usage_page,
)
from binderbox.state_usage import SQLITE, statements
from binderbox.store import BuildStore

UTC = datetime.UTC
# "Now" for the counts: noon UTC on 10 March 2026; TODAY is that day.
NOW = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
TODAY = datetime.date(2026, 3, 10)
SECRET = "s3cret-t0ken"
FAILURE = "boom: 10.1.2.3 said no to user alice"
PRIVATE = "gh/someone/their-own-thing/main"


def at(day: datetime.date, hour: int, minute: int = 0, second: float = 0) -> float:
    moment = datetime.datetime.combine(day, datetime.time(hour, minute), UTC)
    return moment.timestamp() + second


def days_ago(count: int) -> datetime.date:
    return TODAY - datetime.timedelta(days=count)


class History:
    """Records launches and builds through a store's own methods, then moves each row to
    the moment a test names (the stores stamp rows with the time they were called)."""

    def __init__(
        self,
        store: Any,
        raw: Callable[[str, tuple], None],
        many: Callable[[str, list[tuple]], None] | None = None,
    ) -> None:
        self.store = store
        self.raw = raw
        # Rows written straight into a table in one transaction (for floods).
        self.many = many or (lambda statement, rows: [raw(statement, row) for row in rows])

    def build(self, image: str, started: float, seconds: float, status: str = "success") -> None:
        build_id = self.store.start(image, "https://example.org/repo", "c0ffee", owner="t")
        self.store.finish(build_id, status, "" if status == "success" else FAILURE)
        self.raw(
            "UPDATE builds SET started = ?, finished = ? WHERE id = ?",
            (started, started + seconds, build_id),
        )

    def launch(
        self,
        spec: str,
        ended: float,
        seconds: float = 2.0,
        status: str = "success",
        image: str = "",
        message: str = "",
    ) -> None:
        provider, _, rest = spec.partition("/")
        self.store.record_launch(provider, rest, "c0ffee", status, seconds, message, image)
        self.raw("UPDATE launches SET at = ? WHERE id = (SELECT MAX(id) FROM launches)", (ended,))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def history(request, tmp_path: Path) -> Iterator[History]:
    if request.param == "sqlite":
        path = tmp_path / "binderbox.sqlite"
        store: Any = BuildStore(path)
        conn: Any = sqlite3.connect(path, isolation_level=None)

        def raw(statement: str, params: tuple) -> None:
            conn.execute(statement, params)

        def many(statement: str, rows: list[tuple]) -> None:
            conn.execute("BEGIN")
            conn.executemany(statement, rows)
            conn.execute("COMMIT")

    else:
        import psycopg

        from binderbox.state_postgres import PostgresStateStore

        url = request.getfixturevalue("postgres").new_database()
        store = PostgresStateStore(url)
        conn = psycopg.connect(url, autocommit=True)

        def raw(statement: str, params: tuple) -> None:
            conn.execute(statement.replace("?", "%s"), params)

        def many(statement: str, rows: list[tuple]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(statement.replace("?", "%s"), rows)

    yield History(store, raw, many)
    conn.close()
    store.close()


def record_three_days(h: History) -> None:
    """Three days of launches, and one outside the window (see the test below)."""
    # Two days ago: repository A is built (100 s) by its first launch, which needed it;
    # eleven more launches find it built.
    d = days_ago(2)
    h.build("img-a:1", at(d, 10), 100)
    h.launch("gh/org/a/main", at(d, 10, 1, 45), seconds=105, image="img-a:1")
    for minute in range(11):
        h.launch("gh/org/a/main", at(d, 11, minute), image="img-a:1")
    # Yesterday: B's build fails (its launch failed, needing a build), the next one takes
    # 300 s with a second launch joining it half way; then three launches find B built.
    d = days_ago(1)
    h.build("img-b:1", at(d, 9), 30, status="failed")
    h.launch("gh/org/b/main", at(d, 9, 0, 31), 31, "failed", "img-b:1", FAILURE)
    h.build("img-b:1", at(d, 10), 300)
    h.launch("gh/org/b/main", at(d, 10, 5, 2), seconds=302, image="img-b:1")
    h.launch("gh/org/b/main", at(d, 10, 5, 3), seconds=150, image="img-b:1")
    for minute in range(3):
        h.launch("gh/org/b/main", at(d, 12, minute), image="img-b:1")
    # Today: a repository launched once (built for it, 40 s); one whose address carries a
    # token, launched often from an image built long ago; and a spec that never resolved.
    d = TODAY
    h.build("img-private:1", at(d, 8), 40)
    h.launch(PRIVATE, at(d, 8, 0, 42), seconds=42, image="img-private:1")
    h.build("img-token:1", at(days_ago(60), 8), 50)
    token_spec = "git/" + quote(f"https://example.org/r.git?token={SECRET}", safe="") + "/main"
    for minute in range(10):
        h.launch(token_spec, at(d, 9, minute), image="img-token:1")
    h.launch("gh/not-a-spec", at(d, 10), seconds=0.1, status="failed", message=FAILURE)
    # Before the window: counted nowhere.
    h.build("img-old:1", at(days_ago(3), 23, 0), 20)
    h.launch("gh/org/old/main", at(days_ago(3), 23, 59), image="img-old:1")


def test_the_store_counts_launches_builds_and_cache_hits_per_day(history: History):
    record_three_days(history)
    usage = read_usage(history.store, 3, min_launches=10, now=NOW)
    assert (usage.since, usage.until) == (days_ago(2), TODAY)
    rows = {day.day: day for day in usage.per_day}
    assert list(rows) == [days_ago(2), days_ago(1), TODAY]

    a = rows[days_ago(2)]
    assert (a.launches, a.launches_succeeded, a.cache_hits, a.cache_misses) == (12, 12, 11, 1)
    assert (a.builds, a.builds_succeeded, a.build_median_seconds, a.build_p95_seconds) == (
        1,
        1,
        100,
        100,
    )
    b = rows[days_ago(1)]
    assert (b.launches, b.launches_succeeded, b.launches_failed) == (6, 5, 1)
    # The failed one and the one that joined the build under way needed a build too.
    assert (b.cache_hits, b.cache_misses) == (3, 3)
    assert (b.builds, b.builds_failed, b.build_median_seconds) == (2, 1, 300)
    t = rows[TODAY]
    assert (t.launches, t.launches_succeeded, t.launches_failed) == (12, 11, 1)
    # The unresolved launch named no image: neither a hit nor a miss.
    assert (t.cache_hits, t.cache_misses) == (10, 1)
    assert (t.builds, t.build_median_seconds) == (1, 40)
    assert t.pool_hits is None and not usage.warm_pool

    totals = usage.totals()
    assert totals["launches"] == 30 and totals["launches_succeeded"] == 28
    assert (totals["cache_hits"], totals["cache_misses"]) == (24, 5)
    assert totals["cache_hit_rate"] == round(24 / 29, 4)
    # Over the window: 40, 100, 300 s.
    assert (totals["build_median_seconds"], totals["build_p95_seconds"]) == (100, 300)
    assert totals["pool_hit_rate"] is None

    # Only A has 10 successful launches; the token's spec has too, but is never named.
    assert [(r.repository, r.launches, r.launches_succeeded) for r in usage.repositories] == [
        ("gh/org/a/main", 12, 12)
    ]
    assert (usage.other_repositories, usage.other_launches) == (4, 18)
    assert usage.other_launches_succeeded == 16

    with_one = read_usage(history.store, 3, min_launches=1, now=NOW)
    names = [r.repository for r in with_one.repositories]
    assert names == ["gh/org/a/main", "gh/org/b/main", PRIVATE]
    assert with_one.other_repositories == 2  # the token's spec and the unresolved one

    # One day: today's numbers only; a window longer than the records: empty days.
    today = read_usage(history.store, 1, min_launches=10, now=NOW)
    assert [d.day for d in today.per_day] == [TODAY]
    assert today.totals()["launches"] == 12
    year = read_usage(history.store, 365, min_launches=10, now=NOW)
    assert len(year.per_day) == 365 and year.totals()["launches"] == 31


def test_build_times_are_the_nearest_rank_median_and_95th_percentile(history: History):
    for seconds in range(1, 21):  # 20 builds on one day: 1 … 20 s
        history.build(f"img-{seconds}:1", at(days_ago(1), 10, seconds), seconds)
    history.build("img-x:1", at(TODAY, 9), 50)
    history.build("img-y:1", at(TODAY, 10), 9, status="failed")
    history.build("img-running:1", at(TODAY, 11), 5)
    history.raw(
        "UPDATE builds SET finished = NULL, status = 'running' WHERE image = ?", ("img-running:1",)
    )
    usage = read_usage(history.store, 2, min_launches=10, now=NOW)
    yesterday, today = usage.per_day
    assert (yesterday.build_median_seconds, yesterday.build_p95_seconds) == (10, 19)
    assert (today.builds, today.builds_succeeded) == (2, 1)
    assert (today.build_median_seconds, today.build_p95_seconds) == (50, 50)
    # 1 … 20 and 50: the 11th and the 20th.
    assert (usage.build_median_seconds, usage.build_p95_seconds) == (11, 20)
    empty = read_usage(history.store, 1, min_launches=10, now=NOW + 2 * 86400)
    assert empty.build_median_seconds is None and empty.per_day[0].build_median_seconds is None


def test_a_flood_of_repositories_stays_a_short_answer(history: History):
    """Thousands of distinct repositories (each launched once) and a few popular ones:
    the store answers in one count, the page and the data name at most TOP of them."""
    start = at(days_ago(29), 0)
    flood = [
        (start + i * 500.0, "gh", f"flood/r{i}/main", "c", "success", 1.0, "", f"img-{i}:1")
        for i in range(4000)
    ]
    popular = [
        (start + i * 60.0, "gh", f"popular/p{i % 25}/main", "c", "success", 1.0, "", "img-p:1")
        for i in range(25 * 12)
    ]
    rows = flood + popular
    history.many(
        "INSERT INTO launches (at, provider, spec, ref, status, seconds, message, image)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    began = time.monotonic()
    usage = read_usage(history.store, 30, min_launches=10, now=NOW)
    took = time.monotonic() - began
    assert took < 5, f"counting {len(rows)} launches took {took:.1f} s"
    assert len(usage.repositories) == TOP
    assert all(r.repository.startswith("gh/popular/") for r in usage.repositories)
    assert usage.other_repositories == 4000 + 25 - TOP
    assert usage.totals()["launches"] == len(rows)
    page = usage_page(usage)
    assert len(page) < 120_000 and page.count("gh/flood/") == 0
    assert len(json.dumps(usage.as_json())) < 30_000
    assert len(usage_csv(usage, "repositories").splitlines()) == TOP + 2


def test_the_sqlite_counts_use_the_indexes(tmp_path: Path):
    store = BuildStore(tmp_path / "state.sqlite")
    plans = {
        name: " ".join(
            str(row[-1])
            for row in store._db.execute(
                f"EXPLAIN QUERY PLAN {sql}",
                (0.0,) * sql.count("?"),
            )
        )
        for name, sql in statements(SQLITE).items()
    }
    store.close()
    assert "INDEX launches_at" in plans["launch_days"]
    assert "INDEX builds_image" in plans["launch_days"]
    assert "INDEX builds_finished" in plans["build_days"]
    assert "INDEX launches_at" in plans["repositories"]


def test_the_postgres_schema_has_the_index_the_counts_use(postgres: PostgresCluster):
    from binderbox.state_postgres import PostgresStateStore

    url = postgres.new_database()
    store = PostgresStateStore(url)
    store.close()
    dbname = url.rsplit("/", 1)[1]
    found = postgres.sql(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'builds_image'", dbname=dbname
    )
    assert found and "(image, started)" in found[0][0]


# --- the page, JSON and CSV through the app ---------------------------------------------


def recorded_state(path: Path, record: Callable[[History], None] = record_three_days) -> None:
    """Record a history into the SQLite state file at ``path``, moved by whole days so
    that its TODAY is the real today (the pages count up to now)."""
    store = BuildStore(path)
    conn = sqlite3.connect(path, isolation_level=None)
    shift = (datetime.datetime.now(UTC).date() - TODAY).days * 86400.0

    def raw(statement: str, params: tuple) -> None:
        conn.execute(statement, tuple(p + shift if isinstance(p, float) else p for p in params))

    record(History(store, raw))
    conn.close()
    store.close()


@pytest.fixture
def recorded_app(tmp_path: Path) -> Iterator[tuple[TestClient, BuildStore]]:
    path = tmp_path / "state" / "binderbox.sqlite"
    recorded_state(path)
    store = BuildStore(path)
    settings = Settings(state_dir=str(tmp_path / "state"), usage_min_launches=10)
    with TestClient(create_app(settings, None, store=store)) as client:
        yield client, store
    store.close()


def test_page_json_and_csv_give_the_same_numbers(recorded_app):
    client, _ = recorded_app
    page = client.get("/usage?days=3")
    assert page.status_code == 200
    data = client.get("/usage.json", params={"days": "3"}).json()
    assert data["days"] == 3 and data["timezone"] == "UTC" and data["warm_pool"] is False
    totals = data["totals"]
    assert totals["launches"] == 30 and totals["cache_hit_rate"] == round(24 / 29, 4)
    assert f'id="usage-launches">{totals["launches"]}<' in page.text
    assert f'id="usage-cache-rate">{round(totals["cache_hit_rate"] * 100)}%<' in page.text
    assert 'id="usage-pool">no warm pool<' in page.text
    assert '<svg class="chart" id="launch-chart"' in page.text
    assert '<svg class="chart" id="build-chart"' in page.text

    days = list(csv.DictReader(io.StringIO(client.get("/usage.csv?days=3").text)))
    assert list(days[0]) == list(DAY_COLUMNS) and len(days) == 3
    for row, day in zip(days, data["per_day"], strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in day.items()}
    response = client.get("/usage.csv?days=3&table=repositories")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    repositories = list(csv.DictReader(io.StringIO(response.text)))
    assert list(repositories[0]) == list(REPOSITORY_COLUMNS)
    assert repositories == [
        {
            "repository": "gh/org/a/main",
            "repositories": "1",
            "launches": "12",
            "launches_succeeded": "12",
        },
        {
            "repository": "(others)",
            "repositories": "4",
            "launches": "18",
            "launches_succeeded": "16",
        },
    ]
    assert data["repositories"] == [
        {"repository": "gh/org/a/main", "launches": 12, "launches_succeeded": 12}
    ]
    assert data["others"] == {"repositories": 4, "launches": 18, "launches_succeeded": 16}

    # Nothing personal in any of them: no failure message, no token, no address, no
    # repository launched only once.
    for body in [page.text, json.dumps(data), *[client.get(u).text for u in CSVS]]:
        assert_nothing_personal(body)


CSVS = ["/usage.csv?days=3", "/usage.csv?days=3&table=repositories"]
_IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


def assert_nothing_personal(body: str) -> None:
    for marker in [SECRET, quote(SECRET), "alice", "boom", "their-own-thing", "c0ffee"]:
        assert marker not in body, marker
    assert not _IPV4.search(body), _IPV4.search(body)
    assert "token=" not in body.lower() and "token%3d" not in body.lower()


@pytest.mark.parametrize(
    "query, sentence",
    [
        ("days=0", "The parameter days must be a whole number from 1 to 365."),
        ("days=366", "The parameter days must be a whole number from 1 to 365."),
        ("days=-3", "The parameter days must be a whole number from 1 to 365."),
        ("days=1e3", "The parameter days must be a whole number from 1 to 365."),
        ("days=%EF%BC%93", "The parameter days must be a whole number from 1 to 365."),
        ("days=" + "9" * 5000, "The parameter days must be a whole number from 1 to 365."),
        ("days=", "The parameter days must be a whole number from 1 to 365."),
        ("days=3&days=4", "Give the parameter days once."),
        ("day=3", "{path} takes only the parameter days."),
        ("%3Cscript%3E=1", "{path} takes only the parameter days."),
        ("table=repositories", "{path} takes only the parameter days."),
    ],
)
def test_hostile_query_parameters_get_one_sentence(recorded_app, query: str, sentence: str):
    client, _ = recorded_app
    for path in ["/usage", "/usage.json"]:
        response = client.get(f"{path}?{query}")
        expected = sentence.format(path=path)
        assert response.status_code == 400, (path, query)
        if path.endswith(".json"):
            assert response.json() == {"error": expected}
        else:
            assert f'<p id="usage-error">{expected}</p>' in response.text
            assert "<script>" not in response.text
    csv_response = client.get(f"/usage.csv?{query}")
    if query == "table=repositories":
        assert csv_response.status_code == 200
    else:
        assert csv_response.status_code == 400
        assert csv_response.text.endswith(".\n") and csv_response.text.count("\n") == 1
    assert client.get("/usage.csv?table=mine").text == (
        "The parameter table must be days or repositories.\n"
    )


def test_parse_query_defaults_and_bounds():
    assert parse_query([]) == (30, "days")
    assert parse_query([("days", "365")]) == (365, "days")
    assert parse_query([("days", "7"), ("table", "repositories")], "/usage.csv") == (
        7,
        "repositories",
    )
    with pytest.raises(BadUsageQuery, match=r"^The parameter days"):
        parse_query([("days", "0365 ")])


def test_a_store_that_fails_is_one_sentence_and_503(tmp_path: Path):
    class Gone(BuildStore):
        def usage(self, since, top, min_succeeded):
            raise BinderboxError("The state database at sqlite cannot be reached.")

    store = Gone(tmp_path / "s.sqlite")
    with TestClient(create_app(Settings(state_dir=str(tmp_path)), None, store=store)) as client:
        response = client.get("/usage.json")
        assert response.status_code == 503
        assert response.json() == {"error": "The state database at sqlite cannot be reached."}
        page = client.get("/usage")
        assert page.status_code == 503 and "cannot be reached." in page.text
    store.close()

    class Broken(BuildStore):
        def usage(self, since, top, min_succeeded):
            raise sqlite3.OperationalError("disk I/O error")

    store = Broken(tmp_path / "b.sqlite")
    with TestClient(create_app(Settings(state_dir=str(tmp_path)), None, store=store)) as client:
        response = client.get("/usage.csv")
        assert (response.status_code, response.text) == (
            503,
            "The usage numbers cannot be counted right now.\n",
        )
    store.close()


def test_a_warm_pool_fills_the_pool_hit_rate(tmp_path: Path):
    """The hook issue 14.1's pool fills: per day, launches that took a waiting server and
    launches that started one."""

    class Pool:
        def pool_days(self, since: float) -> dict[datetime.date, tuple[int, int]]:
            return {TODAY: (3, 1), days_ago(1): (0, 4)}

    store = BuildStore(tmp_path / "s.sqlite")
    usage = read_usage(store, 3, min_launches=10, now=NOW, pool=Pool())
    store.close()
    assert usage.warm_pool
    assert [(d.pool_hits, d.pool_misses) for d in usage.per_day] == [(0, 0), (0, 4), (3, 1)]
    assert usage.totals()["pool_hit_rate"] == round(3 / 8, 4)
    page = usage_page(usage)
    assert 'id="usage-pool">38%<' in page and "3 of 8 launches took a waiting server." in page
    assert usage_csv(usage, "days").splitlines()[-1].endswith(",3,1")


# --- launches through the real app, counted -------------------------------------------------


def test_launches_through_the_app_count_as_cache_misses_then_hits(git_server, tmp_path: Path):
    from tests.test_pipeline_fakes import FakeBuilder, FakeImageStore, FakeLauncher, stream

    work = tmp_path / "work"
    work.mkdir()
    (work / "requirements.txt").write_text("six\n")
    from tests.conftest import commit_all

    commit_all(work)
    url = git_server.publish(work, f"usage-{tmp_path.name}.git")
    path = f"/build/git/{quote(url, safe='')}/main"
    settings = Settings(
        state_dir=str(tmp_path / "state"),
        allowed_hosts="127.0.0.1",
        public_url="http://binder.test/",
        usage_min_launches=2,
    )
    images = FakeImageStore()
    builder, launcher = FakeBuilder(images), FakeLauncher()
    builder.go_on.clear()  # the first build waits until a second launch has joined it
    app = create_app(settings, launcher, builder=builder, images=images)
    with TestClient(app) as client:
        results: list[list[dict]] = []
        seen: list[dict] = []  # the second launch's events, as they come
        first = threading.Thread(target=lambda: results.append(stream(client, path)))
        first.start()
        wait_until(lambda: builder.calls, "the build to start")
        second = threading.Thread(target=lambda: results.append(stream(client, path, seen)))
        second.start()
        # It joined the build under way when the build's first line reaches it.
        wait_until(lambda: any(e["phase"] == "building" for e in seen), "the second to join")
        builder.go_on.set()
        first.join(30)
        second.join(30)
        assert [r[-1]["phase"] for r in results] == ["ready", "ready"]
        assert len(builder.calls) == 1  # one build, shared
        assert stream(client, path)[-1]["phase"] == "ready"  # found built
        assert stream(client, "/build/gh/not-a-spec")[-1]["phase"] == "failed"
        data = client.get("/usage.json?days=1").json()
    totals = data["totals"]
    assert (totals["launches"], totals["launches_succeeded"], totals["launches_failed"]) == (
        4,
        3,
        1,
    )
    assert (totals["cache_hits"], totals["cache_misses"]) == (1, 2)
    assert (totals["builds"], totals["builds_succeeded"]) == (1, 1)
    assert totals["build_median_seconds"] is not None
    spec = "git/" + url + "/main"
    assert data["repositories"] == [{"repository": spec, "launches": 3, "launches_succeeded": 3}]
    assert data["others"] == {"repositories": 1, "launches": 1, "launches_succeeded": 0}


def wait_until(check: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- the charts ----------------------------------------------------------------------------


def test_grid_steps_are_round():
    assert nice_step(0) == 1
    assert nice_step(7) == 2
    assert nice_step(40) == 10
    assert nice_step(130) == 50
    assert nice_step(95, steps=(1, 2, 5, 10, 15, 30, 60)) == 30


def test_a_chart_is_one_named_image_with_a_title_per_bar():
    bars = [Bar(f"{i} Mar", f"day {i}: <{i}>", (i, 1)) for i in range(1, 31)]
    svg = bar_chart(
        "c", title="Launches & more", desc="Thirty days.", bars=bars, classes=("a", "b")
    )
    assert svg.startswith('<svg class="chart" id="c" width="100%" height="200" role="img"')
    assert 'aria-labelledby="c-title c-desc"' in svg
    assert '<title id="c-title">Launches &amp; more</title>' in svg
    assert svg.count('<g class="bar">') == 30 and svg.count('class="a"') == 30
    assert "<title>day 3: &lt;3&gt;</title>" in svg
    assert svg.count('class="day"') == 5  # labels that fit a phone
    assert "viewBox" not in svg  # text keeps the page's size on any width
