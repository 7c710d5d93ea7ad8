"""One contract for every state store: the SQLite file (one machine) and PostgreSQL (many
machines) must behave alike, so both run the same tests. PostgreSQL is a real server the
tests start (tests/postgres.py)."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tests.postgres import PostgresCluster, postgres_cluster

from binderbox.store import BuildStore


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with postgres_cluster() as cluster:
        yield cluster


# A store factory: each call opens a new store object on the same database (a restart).
Opener = Callable[[], Any]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path: Path) -> Iterator[Opener]:
    opened: list[Any] = []
    if request.param == "sqlite":
        path = tmp_path / "state" / "binderbox.sqlite"

        def opener() -> Any:
            opened.append(BuildStore(path))
            return opened[-1]

    else:
        from binderbox.state_postgres import PostgresStateStore

        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.new_database()

        def opener() -> Any:
            opened.append(PostgresStateStore(url))
            return opened[-1]

    yield opener
    for store in opened:
        store.close()


def test_a_build_is_running_then_finished(open_store: Opener):
    store = open_store()
    build_id = store.start("img:abc", "https://example.org/repo", "abc", owner="hub1")
    record = store.get(build_id)
    assert (record.id, record.image, record.repo_url, record.ref) == (
        build_id,
        "img:abc",
        "https://example.org/repo",
        "abc",
    )
    assert (record.status, record.message, record.finished) == ("running", "", None)
    assert record.started > 0

    store.finish(build_id, "failed", "requirements.txt line 4: 'numpyy' was not found.")
    record = store.get(build_id)
    assert record.status == "failed"
    assert record.message == "requirements.txt line 4: 'numpyy' was not found."
    assert record.finished >= record.started
    assert store.get("no-such-build") is None


def test_log_lines_keep_their_order_and_phases(open_store: Opener):
    store = open_store()
    build_id = store.start("img:1", "repo", "1")
    store.append(build_id, "first")
    store.append_many(build_id, [("waiting", "queued"), ("building", "step 1"), ("built", "ok")])
    store.append_many(build_id, [])
    store.append(build_id, "last", phase="building")
    assert store.log(build_id) == ["first", "queued", "step 1", "ok", "last"]
    assert store.events(build_id, 0, 100) == [
        ("building", "first"),
        ("waiting", "queued"),
        ("building", "step 1"),
        ("built", "ok"),
        ("building", "last"),
    ]
    # Paging, as a follower reads a long log.
    assert store.events(build_id, 1, 2) == [("waiting", "queued"), ("building", "step 1")]
    assert store.events(build_id, 4, 10) == [("building", "last")]
    assert store.events(build_id, 5, 10) == []
    assert store.log("no-such-build") == []


def test_logs_of_two_builds_stay_apart(open_store: Opener):
    store = open_store()
    one = store.start("img:1", "repo", "1")
    two = store.start("img:2", "repo", "2")
    store.append_many(one, [("building", "one a"), ("building", "one b")])
    store.append(two, "two a")
    store.append(one, "one c")
    assert store.log(one) == ["one a", "one b", "one c"]
    assert store.log(two) == ["two a"]


def test_text_is_kept_as_printed(open_store: Opener):
    store = open_store()
    build_id = store.start("img:1", "repo", "1")
    lines = ["\x1b[31mred\x1b[0m ünïcode 🐍 'quotes' \"double\" %s %(x)s \\", "x" * 100_000]
    store.append_many(build_id, [("building", line) for line in lines])
    assert store.log(build_id) == lines
    # A build may print NUL, which PostgreSQL's text cannot hold: it is stored as U+FFFD
    # there (kept by SQLite); the rest of the line survives, and nothing fails.
    store.append(build_id, "a\x00b")
    assert store.log(build_id)[-1].replace("\x00", "\ufffd") == "a\ufffdb"


def test_interrupted_fails_only_that_owners_unfinished_builds(open_store: Opener):
    store = open_store()
    mine = store.start("img:1", "repo", "1", owner="hub-a")
    mine_done = store.start("img:2", "repo", "2", owner="hub-a")
    store.finish(mine_done, "success")
    theirs = store.start("img:3", "repo", "3", owner="hub-b")
    nobodys = store.start("img:4", "repo", "4")  # no owner: anyone's restart ends it

    restarted = open_store()
    assert restarted.interrupted("hub-a") == 2
    assert restarted.get(nobodys).status == "failed"
    record = restarted.get(mine)
    assert record.status == "failed"
    assert "restarted" in record.message
    assert record.finished is not None
    assert restarted.get(mine_done).status == "success"
    assert restarted.get(theirs).status == "running"
    assert restarted.interrupted("hub-a") == 0
    assert restarted.interrupted("hub-c") == 0
    assert restarted.interrupted("hub-b") == 1


def test_launches_newest_first(open_store: Opener):
    store = open_store()
    assert store.recent_launches() == []
    for n in range(5):
        store.record_launch("gh", f"org/repo{n}/main", f"c{n}", "success", n + 0.5)
    store.record_launch("git", "x/y", "", "failed", 1.25, "The repository does not exist.")
    launches = store.recent_launches(3)
    assert [launch.spec for launch in launches] == ["x/y", "org/repo4/main", "org/repo3/main"]
    first = launches[0]
    assert (first.provider, first.ref, first.status, first.seconds, first.message) == (
        "git",
        "",
        "failed",
        1.25,
        "The repository does not exist.",
    )
    assert first.at >= launches[1].at > 0
    assert len(store.recent_launches()) == 6


def test_a_restart_finds_everything_again(open_store: Opener):
    store = open_store()
    build_id = store.start("img:1", "repo", "1", owner="hub")
    store.append_many(build_id, [("building", "a"), ("built", "b")])
    store.finish(build_id, "success")
    store.record_launch("gh", "org/repo/main", "1", "success", 2.0)
    before = store.get(build_id)
    store.close()

    again = open_store()
    assert again.get(build_id) == before
    assert again.events(build_id, 0, 10) == [("building", "a"), ("built", "b")]
    assert [launch.spec for launch in again.recent_launches()] == ["org/repo/main"]
    # And it goes on working: new builds next to the old ones.
    other = again.start("img:2", "repo", "2", owner="hub")
    again.append(other, "new")
    assert again.log(other) == ["new"]
    assert again.log(build_id) == ["a", "b"]


def test_worker_threads_can_share_one_store(open_store: Opener):
    store = open_store()
    builds = [store.start(f"img:{n}", "repo", str(n)) for n in range(4)]
    errors: list[BaseException] = []

    def write(build_id: str) -> None:
        try:
            for batch in range(25):
                store.append_many(build_id, [("building", f"{batch}.{i}") for i in range(4)])
                store.events(build_id, 0, 10)
                store.record_launch("gh", build_id, "", "success", 0.1)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(b,)) for b in builds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    expected = [f"{batch}.{i}" for batch in range(25) for i in range(4)]
    for build_id in builds:
        assert store.log(build_id) == expected
    assert len(store.recent_launches(1000)) == 100


def _after(moment: float) -> None:
    """Return once the clock is past ``moment`` (rows written now are newer than it)."""
    deadline = time.monotonic() + 5
    while time.time() <= moment:
        assert time.monotonic() < deadline, "the clock did not move"


def test_launches_name_their_image_and_the_last_success_counts(open_store: Opener):
    store = open_store()
    store.record_launch("gh", "org/a/main", "c1", "success", 1.0, image="img-a:c1")
    _after(time.time())
    store.record_launch("gh", "org/a/main", "c1", "success", 1.0, image="img-a:c1")
    store.record_launch("gh", "org/b/main", "c2", "failed", 1.0, "no session", image="img-b:c2")
    store.record_launch("gh", "org/c/main", "", "failed", 1.0, "no such repository")
    last = store.last_launched()
    assert set(last) == {"img-a:c1"}  # failed launches and unnamed images do not count
    launches = store.recent_launches()
    assert last["img-a:c1"] == max(r.at for r in launches if r.spec == "org/a/main")


def test_retention_forgets_old_builds_logs_and_launches(open_store: Opener):
    store = open_store()

    def build(image: str, status: str, lines: int) -> str:
        build_id = store.start(image, "https://example.org/repo", "c")
        store.append_many(build_id, [("building", f"line {n}") for n in range(lines)])
        if status != "running":
            store.finish(build_id, status)
        return build_id

    gone = build("img-gone:1", "success", 3)
    kept_older = build("img-kept:1", "success", 2)  # the same image built again later
    kept_failed = build("img-kept:1", "failed", 4)
    kept_newest = build("img-kept:1", "success", 5)
    running = build("img-running:1", "running", 1)
    for n in range(3):
        store.record_launch("gh", f"org/old{n}/main", "c", "success", 1.0, image="img-kept:1")
    cutoff = time.time()
    _after(cutoff)
    recent = build("img-recent:1", "success", 2)
    store.record_launch("gh", "org/new/main", "c", "success", 1.0, image="img-recent:1")

    forgotten = store.forget_older_than(cutoff, {"img-kept:1"})
    assert (forgotten.builds, forgotten.log_lines, forgotten.launches) == (3, 3 + 2 + 4, 3)
    for build_id in (gone, kept_older, kept_failed):
        assert store.get(build_id) is None
        assert store.log(build_id) == []
    # The image still present keeps the log of the build that made it; a running build
    # and everything newer than the cutoff stay.
    assert store.log(kept_newest) == [f"line {n}" for n in range(5)]
    assert store.get(running).status == "running"
    assert store.log(recent) == ["line 0", "line 1"]
    assert [r.spec for r in store.recent_launches()] == ["org/new/main"]
    assert store.last_launched() == {"img-recent:1": store.recent_launches()[0].at}

    # Nothing more to forget; a restart sees the same; without the image, its build goes.
    assert store.forget_older_than(cutoff, {"img-kept:1"}).builds == 0
    store.close()
    again = open_store()
    assert again.get(kept_newest) is not None
    assert again.forget_older_than(cutoff).builds == 1
    assert again.get(kept_newest) is None and again.get(recent) is not None


def test_a_build_keeps_its_lock_and_forgets_it_with_the_build(open_store: Opener):
    store = open_store()
    build_id = store.start("img-lock:1", "https://example.org/repo", "c")
    assert store.lock(build_id) is None
    store.set_lock(build_id, '{"format": "binderbox-lock"}\n')
    store.set_lock(build_id, '{"format": "binderbox-lock", "version": 1, "x": "\u00e9"}\n')
    store.finish(build_id, "success")
    other = store.start("img-lock:2", "https://example.org/repo", "d")
    store.close()
    again = open_store()
    assert again.lock(build_id) == '{"format": "binderbox-lock", "version": 1, "x": "\u00e9"}\n'
    assert again.lock(other) is None and again.lock("no-such-build") is None
    cutoff = time.time()
    _after(cutoff)
    assert again.forget_older_than(cutoff).builds == 1
    assert again.lock(build_id) is None and again.get(other) is not None


def test_sqlite_gives_the_space_of_forgotten_logs_back(tmp_path: Path):
    import sqlite3

    path = tmp_path / "binderbox.sqlite"
    # A file from before the disk budget: no incremental vacuuming, no image column.
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE launches (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
        " provider TEXT NOT NULL, spec TEXT NOT NULL, ref TEXT NOT NULL, status TEXT NOT NULL,"
        " seconds REAL NOT NULL, message TEXT NOT NULL DEFAULT '');"
        "INSERT INTO launches (at, provider, spec, ref, status, seconds)"
        " VALUES (1.0, 'gh', 'org/old/main', 'c', 'success', 1.0);"
    )
    old.close()
    store = BuildStore(path)
    assert [r.spec for r in store.recent_launches()] == ["org/old/main"]
    for n in range(20):
        build_id = store.start(f"img:{n}", "repo", "c")
        store.append_many(build_id, [("building", "x" * 200 + str(i)) for i in range(1000)])
        store.finish(build_id, "success")

    def on_disk() -> int:  # the file and its write-ahead log
        wal = path.with_name(path.name + "-wal")
        return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    full = on_disk()
    assert full > 4_000_000
    cutoff = time.time()
    _after(cutoff)
    forgotten = store.forget_older_than(cutoff)
    assert (forgotten.builds, forgotten.log_lines, forgotten.launches) == (20, 20_000, 1)
    total, free = store.file_pages()
    assert free == 0 and total * 4096 < full / 10
    assert on_disk() < full / 10
    # The old file now vacuums incrementally, so the next clean-up needs no VACUUM.
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    check.close()
    store.close()


# --- PostgreSQL only: what the server adds (passwords, outages, schema versions, the hub) ---


def test_postgres_schema_1_is_migrated_and_keeps_its_launches(postgres: PostgresCluster):
    from binderbox.state_postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStateStore

    url = postgres.new_database()
    dbname = url.rsplit("/", 1)[1]
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:  # a database binderbox left at 1
        conn.execute("CREATE TABLE binderbox_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO binderbox_schema VALUES (1)")
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO launches (at, provider, spec, ref, status, seconds)"
            " VALUES (1.0, 'gh', 'org/old/main', 'c', 'success', 1.0)"
        )
    store = PostgresStateStore(url)
    assert store.schema_version() == SCHEMA_VERSION >= 2
    assert [r.spec for r in store.recent_launches()] == ["org/old/main"]
    assert store.last_launched() == {}  # it named no image
    store.record_launch("gh", "org/new/main", "c", "success", 1.0, image="img:c")
    assert set(store.last_launched()) == {"img:c"}
    assert store.forget_older_than(2.0).launches == 1
    assert postgres.sql("SELECT count(*) FROM launches", dbname=dbname) == [(1,)]
    store.close()


def test_postgres_schema_is_versioned_and_a_newer_one_is_refused(postgres: PostgresCluster):
    from binderbox.state_postgres import SCHEMA_VERSION, PostgresStateStore, StateUnavailable

    url = postgres.new_database()
    store = PostgresStateStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    PostgresStateStore(url).close()  # a second start migrates nothing and fails nothing
    dbname = url.rsplit("/", 1)[1]
    assert postgres.sql("SELECT count(*) FROM binderbox_schema", dbname=dbname) == [(1,)]
    postgres.sql("UPDATE binderbox_schema SET version = 99", dbname=dbname)
    with pytest.raises(StateUnavailable, match="newer binderbox"):
        PostgresStateStore(url)


def test_postgres_passwords_never_appear_in_errors(postgres: PostgresCluster):
    from binderbox.state_postgres import PostgresStateStore, StateUnavailable, redacted

    url = postgres.new_database(password="Sup3r-S3cret")
    wrong = url.replace("Sup3r-S3cret", "Wr0ng-S3cret")
    with pytest.raises(StateUnavailable) as refused:
        PostgresStateStore(wrong)
    assert "Wr0ng-S3cret" not in str(refused.value)
    assert "password authentication failed" in str(refused.value)
    assert ":***@127.0.0.1" in str(refused.value)

    closed_port = url.replace(f":{postgres.port}/", ":1/")
    with pytest.raises(StateUnavailable) as unreachable:
        PostgresStateStore(closed_port)
    assert "Sup3r-S3cret" not in str(unreachable.value)
    assert "cannot be reached" in str(unreachable.value)

    store = PostgresStateStore(url)
    assert "Sup3r-S3cret" not in repr(store)
    store.close()
    assert redacted("postgresql://u:p%40ss@h:5/d?x=1") == "postgresql://u:***@h:5/d?x=1"
    assert redacted("postgresql://u@h/d") == "postgresql://u@h/d"


def test_postgres_outage_fails_a_call_in_one_sentence_then_reconnects(
    postgres: PostgresCluster,
):
    from binderbox.state_postgres import PostgresStateStore, StateUnavailable

    url = postgres.new_database()
    store = PostgresStateStore(url)
    build_id = store.start("img:1", "repo", "1")
    postgres.stop()
    try:
        with pytest.raises(StateUnavailable) as failed:
            store.append(build_id, "lost")
        assert "\n" not in str(failed.value)
        assert url.split("@")[0].split(":")[-1] not in str(failed.value)  # the password
    finally:
        postgres.start()
    store.append(build_id, "after")
    assert store.log(build_id) == ["after"]
    store.close()


def test_postgres_hub_database_is_made_beside_the_state(postgres: PostgresCluster):
    from binderbox.state_postgres import (
        ensure_hub_database,
        hub_database_name,
        reset_hub_database,
    )

    url = postgres.new_database()
    dbname = url.rsplit("/", 1)[1]
    assert hub_database_name(url) == dbname + "_hub"
    hub_url = ensure_hub_database(url)
    assert hub_url.startswith("postgresql+psycopg://")
    assert hub_url.endswith(f"/{dbname}_hub")
    assert ensure_hub_database(url) == hub_url  # already there: fine
    owners = postgres.sql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", dbname + "_hub"
    )
    assert owners == [(dbname,)]
    hub_db = dbname + "_hub"
    reset_hub_database(url)  # no tables yet: nothing to do
    # Tables as the hub makes them (as the database's user), then emptied again.
    import psycopg

    with psycopg.connect(url, dbname=hub_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT)")
        conn.execute("CREATE TABLE servers (id SERIAL PRIMARY KEY, user_id INT REFERENCES users)")
    reset_hub_database(url)
    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    assert postgres.sql(tables, dbname=hub_db) == []
    assert ensure_hub_database(url) == hub_url  # the database itself stays


def test_the_hub_config_takes_its_database_from_the_environment(tmp_path: Path):
    from binderbox.config import Settings
    from binderbox.launch.hub import DB_FILE, HUB_DB_URL_ENV, render_config

    url = "postgresql://bb:Sup3r-S3cret@127.0.0.1:5432/bb"
    text = render_config(
        Settings(database_url=url), state_dir=tmp_path, proxy=Path("/x/chp"), hub_id="abc"
    )
    assert f"c.JupyterHub.db_url = os.environ[{HUB_DB_URL_ENV!r}]" in text
    assert "Sup3r-S3cret" not in text and DB_FILE not in text
    plain = render_config(Settings(), state_dir=tmp_path, proxy=Path("/x/chp"), hub_id="abc")
    assert f"sqlite:///{tmp_path / DB_FILE}" in plain


# --- through the real binderbox serve -------------------------------------------------------


@pytest.mark.docker
def test_serve_keeps_builds_launches_and_sessions_in_postgresql_over_a_restart(
    postgres: PostgresCluster, tmp_path_factory, base_image, git_server, tmp_path
):
    import requests
    from tests.test_serve import serve_env, served_repo, start_serve, stop_and_clean, wait_until

    password = "S3cret-" + uuid.uuid4().hex[:8]
    url = postgres.new_database(password=password)
    dbname = url.rsplit("/", 1)[1]
    prefix = f"binderbox-pgstate-{uuid.uuid4().hex[:6]}-"
    env = {
        **serve_env(tmp_path_factory, prefix),
        "BINDERBOX_DATABASE_URL": url,
        "BINDERBOX_BUILD_ONLY_ENABLED": "true",
    }
    state_dir = Path(env["BINDERBOX_STATE_DIR"])
    log = tmp_path / "serve.log"
    first = start_serve(env, log, prefix)
    second = None
    try:
        repo = served_repo(git_server, tmp_path, "pgstate")
        events = first.stream(f"/build/git/{quote(repo, safe='')}/main?build_only=true")
        assert events[-1]["phase"] == "ready", events[-1]
        built = [e for e in events if e["phase"] == "built"][-1]
        build_id = built["log_url"].rsplit("/", 1)[1]
        # And a session of the image just built (no build this time).
        ready = first.stream(f"/build/git/{quote(repo, safe='')}/main")[-1]
        assert ready["phase"] == "ready", ready

        # Recorded in PostgreSQL, not in a file of state_dir.
        rows = postgres.sql("SELECT id, status, image, owner FROM builds", dbname=dbname)
        assert [(r[0], r[1]) for r in rows] == [(build_id, "success")]
        assert rows[0][2] == events[-1]["image"]
        assert rows[0][3]  # the service that ran it
        assert (
            postgres.sql(
                "SELECT count(*) FROM build_log WHERE build_id = %s", build_id, dbname=dbname
            )[0][0]
            > 3
        )
        launches = postgres.sql("SELECT provider, status FROM launches", dbname=dbname)
        assert launches == [("git", "success"), ("git", "success")]
        hub_tables = postgres.sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", dbname=dbname + "_hub"
        )
        assert {"users", "servers", "alembic_version"} <= {t[0] for t in hub_tables}
        assert not list(state_dir.glob("*.sqlite"))

        # The password is nowhere to be seen or read.
        status = requests.get(first.url + "/status", timeout=30).text
        assert password not in status
        for written in [log, *state_dir.glob("*.log"), *state_dir.glob("*.py")]:
            assert password not in written.read_text(errors="replace"), written

        # A restart (a service manager's SIGTERM) finds the build and its log again.
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=90) == 0
        second = start_serve(env, log, prefix)

        def session_answers() -> bool:
            try:
                status = requests.get(
                    f"{ready['url']}api/status", params={"token": ready["token"]}, timeout=5
                )
            except requests.RequestException:
                return False
            return status.status_code == 200

        # The restarted hub found the session in its PostgreSQL database and routes it.
        wait_until(session_answers, 60, "the session answering after the restart")
        names = postgres.sql("SELECT name FROM users", dbname=dbname + "_hub")
        assert [n[0] for n in names] == [ready["url"].rstrip("/").rsplit("/", 1)[1]]
        page = requests.get(f"{second.url}/logs/{build_id}", timeout=30)
        assert page.status_code == 200
        stored = postgres.sql(
            "SELECT line FROM build_log WHERE build_id = %s ORDER BY seq",
            build_id,
            dbname=dbname,
        )
        assert stored[-1][0].strip() and stored[-1][0].strip()[:60] in page.text
        assert postgres.sql("SELECT status FROM builds", dbname=dbname) == [("success",)]
        assert password not in log.read_text(errors="replace")
    finally:
        if second is not None:
            stop_and_clean(second)
        stop_and_clean(first)
    # Stopped for good (Ctrl-C): the hub's sessions are gone, so are its tables.
    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    assert postgres.sql(tables, dbname=dbname + "_hub") == []
    assert postgres.sql("SELECT count(*) FROM builds", dbname=dbname) == [(1,)]


@pytest.mark.docker
def test_serve_with_an_unreachable_database_refuses_to_start_in_one_sentence(tmp_path_factory):
    from tests.conftest import binderbox, free_port
    from tests.test_serve import serve_env

    url = f"postgresql://bb:Sup3r-S3cret@127.0.0.1:{free_port()}/bb"
    env = {**serve_env(tmp_path_factory, "binderbox-pgdown-"), "BINDERBOX_DATABASE_URL": url}
    result = binderbox("serve", env=env, timeout=120)
    assert result.code == 1
    said = result.stderr.strip()
    assert said.startswith("Error: The state database at postgresql://bb:***@127.0.0.1:")
    assert "Connection refused" in said and "Traceback" not in said
    assert len(said.splitlines()) == 1
    assert "Sup3r-S3cret" not in result.stderr + result.stdout
