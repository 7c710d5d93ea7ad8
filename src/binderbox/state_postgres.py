"""PostgreSQL state: builds, their logs and launches, for binderbox on many machines.

The same behaviour as the SQLite store (``binderbox.store``) behind the same methods
(``binderbox.state.StateStore``); ``tests/test_state_store.py`` runs one contract suite
over both. The schema is created on first use and carries a version number, so a later
binderbox can migrate it. JupyterHub's own tables go in a database of their own on the
same server (``<dbname>_hub``, see ``ensure_hub_database``).

Only imported when ``database_url`` is set: psycopg (3) is an optional dependency
(``pip install 'binderbox[postgres]'``).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from binderbox.errors import BinderboxError
from binderbox.state_usage import POSTGRES, UsageRows, usage_rows
from binderbox.store import FORGET_BATCH, BuildRecord, Forgotten, LaunchRecord, builds_to_forget

# The schema, one list of statements per version; a database at version N gets the
# statements of N+1, N+2, … in one transaction.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE builds (
            id TEXT PRIMARY KEY,
            image TEXT NOT NULL,
            repo_url TEXT NOT NULL,
            ref TEXT NOT NULL,
            status TEXT NOT NULL,          -- running, success, failed
            message TEXT NOT NULL DEFAULT '',
            started DOUBLE PRECISION NOT NULL,
            finished DOUBLE PRECISION,
            owner TEXT NOT NULL DEFAULT '' -- the service (hub id) that runs the build
        )""",
        # interrupted() looks for the running builds of one owner only.
        "CREATE INDEX builds_running ON builds (owner) WHERE status = 'running'",
        """CREATE TABLE build_log (
            build_id TEXT NOT NULL REFERENCES builds(id),
            seq INTEGER NOT NULL,
            line TEXT NOT NULL,
            phase TEXT NOT NULL DEFAULT 'building', -- the event's phase, for replays
            PRIMARY KEY (build_id, seq)
        )""",
        """CREATE TABLE launches (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            provider TEXT NOT NULL,
            spec TEXT NOT NULL,
            ref TEXT NOT NULL,             -- the resolved commit or content id
            status TEXT NOT NULL,          -- success, failed
            seconds DOUBLE PRECISION NOT NULL,
            message TEXT NOT NULL DEFAULT ''
        )""",
    ],
    # The disk budget: launches name their image (the cleaner removes the least recently
    # launched first), and retention looks rows up by age.
    2: [
        "ALTER TABLE launches ADD COLUMN image TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX launches_at ON launches (at)",
        "CREATE INDEX launches_image ON launches (image, at) WHERE status = 'success'",
        "CREATE INDEX builds_finished ON builds (finished)",
    ],
    # The usage page: a launch needed a build when a build of its image overlapped it.
    3: ["CREATE INDEX builds_image ON builds (image, started)"],
    # Every build's lock, shown at /logs/<id>/lock.
    4: [
        """CREATE TABLE build_locks (
            build_id TEXT PRIMARY KEY REFERENCES builds(id),
            lock TEXT NOT NULL             -- the lock file (binderbox/builder/lock.py)
        )""",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)
# Two services starting at once must not both create the schema.
_SCHEMA_LOCK_KEY = 0x62696E64  # "bind"
INTERRUPTED_MESSAGE = "binderbox was restarted while this build ran; launch again."


def _text(value: str) -> str:
    # PostgreSQL's text cannot hold NUL, which a build may well print.
    return value.replace("\x00", "\ufffd")


class StateUnavailable(BinderboxError):
    """The state database cannot be reached or used."""


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages, logs and /status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _scrubbed(text: str, url: str) -> str:
    """The driver's reason for a message: its first line (libpq adds hints on further
    lines), with any password of ``url`` taken out, in either spelling."""
    password = urlsplit(url).password
    if password:
        for spelling in {password, unquote(password)}:
            text = text.replace(spelling, "***")
    lines = [line for line in text.splitlines() if line.strip()] or ["no reason given"]
    reason = " ".join(lines[0].split()).removeprefix("connection failed: ")
    return reason.rstrip(".") + "."


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StateUnavailable(
            "database_url needs the PostgreSQL driver: install binderbox with the postgres "
            "extra (pip install 'binderbox[postgres]')."
        ) from None
    return psycopg


def _connect(url: str, what: str, dbname: str | None = None) -> Any:
    psycopg = _psycopg()
    extra = {"dbname": dbname} if dbname else {}
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10, **extra)
    except psycopg.Error as error:
        raise StateUnavailable(
            f"{what} at {redacted(url)} cannot be reached: {_scrubbed(str(error), url)}"
        ) from None
    except Exception as error:  # a malformed URL is a ProgrammingError or ValueError
        raise StateUnavailable(
            f"{what} address {redacted(url)} is not valid: {_scrubbed(str(error), url)}"
        ) from None


class PostgresStateStore:
    """Builds, their log lines and launches in PostgreSQL; safe across threads.

    One connection behind a lock, as the SQLite store has: the service calls it from a
    few worker threads and every call is one short statement or transaction. A broken
    connection (the server restarted) fails that call in one sentence and the next call
    connects again.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._psycopg = _psycopg()
        self._lock = threading.Lock()
        self._next_seq: dict[str, int] = {}
        self._conn: Any = None
        with self._lock:
            self._call(self._migrate)

    def __repr__(self) -> str:
        return f"PostgresStateStore({redacted(self.url)!r})"

    # --- connection and schema -------------------------------------------------------

    def _call(self, work: Any, *args: Any) -> Any:
        """Run ``work(conn, *args)`` on the connection (the lock is held by the caller)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = _connect(self.url, "The state database")
        try:
            return work(self._conn, *args)
        except self._psycopg.OperationalError as error:
            self._conn.close()
            raise StateUnavailable(
                f"The state database at {redacted(self.url)} failed: "
                f"{_scrubbed(str(error), self.url)}"
            ) from None
        except self._psycopg.Error as error:
            raise StateUnavailable(
                f"The state database at {redacted(self.url)} refused a request: "
                f"{_scrubbed(str(error), self.url)}"
            ) from None

    @staticmethod
    def _migrate(conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS binderbox_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM binderbox_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StateUnavailable(
                    f"The state database was written by a newer binderbox (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}); upgrade binderbox."
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO binderbox_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                conn.execute("UPDATE binderbox_schema SET version = %s", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        """The schema version the database is at."""
        with self._lock:
            row = self._call(lambda c: c.execute("SELECT version FROM binderbox_schema").fetchone())
        return row[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- builds ----------------------------------------------------------------------

    def start(self, image: str, repo_url: str, ref: str, owner: str = "") -> str:
        """A new running build of ``image``, run by the service ``owner``; its id."""
        build_id = uuid.uuid4().hex
        with self._lock:
            self._call(
                lambda c: c.execute(
                    "INSERT INTO builds (id, image, repo_url, ref, status, started, owner)"
                    " VALUES (%s, %s, %s, %s, 'running', %s, %s)",
                    (build_id, _text(image), _text(repo_url), _text(ref), time.time(), owner),
                )
            )
            self._next_seq[build_id] = 0
        return build_id

    def append(self, build_id: str, line: str, phase: str = "building") -> None:
        self.append_many(build_id, [(phase, line)])

    def append_many(self, build_id: str, events: list[tuple[str, str]]) -> None:
        """Add (phase, message) pairs to a build's log, in order, in one transaction."""
        if not events:
            return

        def write(conn: Any) -> int:
            seq = self._next_seq.get(build_id)
            if seq is None:  # a build this process did not start (or forgot)
                seq = conn.execute(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM build_log WHERE build_id = %s",
                    (build_id,),
                ).fetchone()[0]
            rows = [
                (build_id, seq + i, _text(line), _text(phase))
                for i, (phase, line) in enumerate(events)
            ]
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO build_log (build_id, seq, line, phase) VALUES (%s, %s, %s, %s)",
                    rows,
                )
            return seq + len(rows)

        with self._lock:
            self._next_seq[build_id] = self._call(write)

    def finish(self, build_id: str, status: str, message: str = "") -> None:
        with self._lock:
            self._call(
                lambda c: c.execute(
                    "UPDATE builds SET status = %s, message = %s, finished = %s WHERE id = %s",
                    (status, _text(message), time.time(), build_id),
                )
            )
            self._next_seq.pop(build_id, None)

    def interrupted(self, owner: str) -> int:
        """Mark the builds an earlier process of ``owner`` left running as failed (other
        services sharing the database may still be running theirs), and those recorded
        without an owner, as the SQLite store does; return how many."""
        with self._lock:
            cursor = self._call(
                lambda c: c.execute(
                    "UPDATE builds SET status = 'failed', finished = %s, message = %s"
                    " WHERE status = 'running' AND owner IN (%s, '')",
                    (time.time(), INTERRUPTED_MESSAGE, owner),
                )
            )
        return cursor.rowcount

    def get(self, build_id: str) -> BuildRecord | None:
        with self._lock:
            row = self._call(
                lambda c: c.execute(
                    "SELECT id, image, repo_url, ref, status, message, started, finished"
                    " FROM builds WHERE id = %s",
                    (build_id,),
                ).fetchone()
            )
        return BuildRecord(*row) if row else None

    def set_lock(self, build_id: str, lock: str) -> None:
        """Keep the lock file of a build (replacing one kept before)."""
        with self._lock:
            self._call(
                lambda c: c.execute(
                    "INSERT INTO build_locks (build_id, lock) VALUES (%s, %s)"
                    " ON CONFLICT (build_id) DO UPDATE SET lock = EXCLUDED.lock",
                    (build_id, _text(lock)),
                )
            )

    def lock(self, build_id: str) -> str | None:
        """A build's lock file, or None when it has none."""
        with self._lock:
            row = self._call(
                lambda c: c.execute(
                    "SELECT lock FROM build_locks WHERE build_id = %s", (build_id,)
                ).fetchone()
            )
        return row[0] if row else None

    def log(self, build_id: str) -> list[str]:
        with self._lock:
            rows = self._call(
                lambda c: c.execute(
                    "SELECT line FROM build_log WHERE build_id = %s ORDER BY seq", (build_id,)
                ).fetchall()
            )
        return [row[0] for row in rows]

    def events(self, build_id: str, start: int, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` (phase, message) pairs of a build's log from number ``start``."""
        with self._lock:
            rows = self._call(
                lambda c: c.execute(
                    "SELECT phase, line FROM build_log WHERE build_id = %s AND seq >= %s"
                    " ORDER BY seq LIMIT %s",
                    (build_id, start, limit),
                ).fetchall()
            )
        return [(phase, line) for phase, line in rows]

    # --- launches --------------------------------------------------------------------

    def record_launch(
        self,
        provider: str,
        spec: str,
        ref: str,
        status: str,
        seconds: float,
        message: str = "",
        image: str = "",
    ) -> None:
        """One /build request's outcome (no addresses are kept)."""
        texts = tuple(map(_text, (provider, spec, ref, status, message, image)))
        with self._lock:
            self._call(
                lambda c: c.execute(
                    "INSERT INTO launches (at, provider, spec, ref, status, message, image,"
                    " seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (time.time(), *texts, seconds),
                )
            )

    def last_launched(self) -> dict[str, float]:
        """When each image was last launched successfully (see the SQLite store)."""
        with self._lock:
            rows = self._call(
                lambda c: c.execute(
                    "SELECT image, MAX(at) FROM launches WHERE image != '' AND status = 'success'"
                    " GROUP BY image"
                ).fetchall()
            )
        return {image: at for image, at in rows}

    # --- retention -------------------------------------------------------------------

    def forget_older_than(
        self, cutoff: float, keep_images: set[str] | frozenset[str] = frozenset()
    ) -> Forgotten:
        """Delete launches from before ``cutoff`` and builds (with their logs) finished
        before it, keeping the newest successful build of each image in ``keep_images``,
        as the SQLite store does; then VACUUM the tables, so the space is used again
        (autovacuum would get there too, later; the file is not shrunk, as VACUUM FULL
        would, which locks the tables)."""

        def find(conn: Any) -> tuple[list[tuple[str, str, str, float]], dict[str, float]]:
            old = conn.execute(
                "SELECT id, image, status, finished FROM builds WHERE finished < %s", (cutoff,)
            ).fetchall()
            newest = conn.execute(
                "SELECT image, MAX(finished) FROM builds WHERE status = 'success' GROUP BY image"
            ).fetchall()
            return old, dict(newest)

        def delete(conn: Any, batch: list[str]) -> tuple[int, int]:
            with conn.transaction():
                lines = conn.execute(
                    "DELETE FROM build_log WHERE build_id = ANY(%s)", (batch,)
                ).rowcount
                conn.execute("DELETE FROM build_locks WHERE build_id = ANY(%s)", (batch,))
                builds = conn.execute("DELETE FROM builds WHERE id = ANY(%s)", (batch,)).rowcount
            return builds, lines

        with self._lock:
            old, newest = self._call(find)
        doomed = builds_to_forget(old, newest, set(keep_images))
        builds = lines = 0
        for start in range(0, len(doomed), FORGET_BATCH):
            with self._lock:
                done, gone = self._call(delete, doomed[start : start + FORGET_BATCH])
            builds, lines = builds + done, lines + gone
        with self._lock:
            launches = self._call(
                lambda c: c.execute("DELETE FROM launches WHERE at < %s", (cutoff,)).rowcount
            )
            if builds or launches:
                self._call(
                    lambda c: c.execute("VACUUM (ANALYZE) build_log, build_locks, builds, launches")
                )
        return Forgotten(builds, lines, launches)

    def recent_launches(self, limit: int = 50) -> list[LaunchRecord]:
        with self._lock:
            rows = self._call(
                lambda c: c.execute(
                    "SELECT at, provider, spec, ref, status, seconds, message FROM launches"
                    " ORDER BY id DESC LIMIT %s",
                    (limit,),
                ).fetchall()
            )
        return [LaunchRecord(*row) for row in rows]

    def usage(self, since: float, top: int, min_succeeded: int) -> UsageRows:
        """The usage page's aggregates from ``since`` on (binderbox.state_usage), all from
        one snapshot (a read-only repeatable-read transaction), on a connection of their
        own: a long count never holds up the launches and builds waiting for the lock."""
        conn = _connect(self.url, "The state database")
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return usage_rows(
                    lambda sql, params: conn.execute(sql, params).fetchall(),
                    POSTGRES,
                    since,
                    top=top,
                    min_succeeded=min_succeeded,
                )
        except self._psycopg.Error as error:
            raise StateUnavailable(
                f"The state database at {redacted(self.url)} refused a request: "
                f"{_scrubbed(str(error), self.url)}"
            ) from None
        finally:
            conn.close()


# --- JupyterHub's database on the same server --------------------------------------------


def _database_name(url: str) -> str:
    """The database ``url`` names (libpq's default: the user's name)."""
    psycopg = _psycopg()
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as error:
        raise StateUnavailable(
            f"The state database address {redacted(url)} is not valid: {_scrubbed(str(error), url)}"
        ) from None
    return str(params.get("dbname") or params.get("user") or "postgres")


def hub_database_name(url: str) -> str:
    """The database JupyterHub keeps its tables in: ``<dbname>_hub``."""
    return _database_name(url) + "_hub"


def hub_database_url(url: str) -> str:
    """``url`` turned into SQLAlchemy's psycopg 3 URL of the hub's database (password
    kept: it goes to the hub through its environment, never into a file)."""
    parts = urlsplit(url)
    path = "/" + quote(hub_database_name(url), safe="")
    query = "&".join(
        item for item in parts.query.split("&") if item and not item.startswith("dbname=")
    )
    return urlunsplit(("postgresql+psycopg", parts.netloc, path, query, ""))


def ensure_hub_database(url: str) -> str:
    """Create the hub's database on the server of ``url`` if it is missing; return the
    SQLAlchemy URL for JupyterHub's ``db_url``."""
    psycopg = _psycopg()
    from psycopg import sql

    name = hub_database_name(url)
    conn = _connect(url, "The state database")
    try:
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.DuplicateDatabase:
        pass  # another service made it just now
    except psycopg.Error as error:
        raise StateUnavailable(
            f"The hub's database '{name}' cannot be created at {redacted(url)} (create it, "
            f"or let the user create databases): {_scrubbed(str(error), url)}"
        ) from None
    return hub_database_url(url)


def reset_hub_database(url: str) -> None:
    """Drop the hub's tables (all of its sessions are gone), as deleting the hub's SQLite
    file does on one machine; the database itself stays, so an operator may have made it
    for a user who cannot create databases. The next hub start makes the tables again."""
    psycopg = _psycopg()
    from psycopg import sql

    name = hub_database_name(url)
    try:
        with _connect(url, "The state database") as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                return
        with _connect(url, "The hub's database", dbname=name) as conn:
            tables = conn.execute(
                "SELECT schemaname, tablename FROM pg_tables"
                " WHERE schemaname = current_schema() AND tableowner = current_user"
            ).fetchall()
            if tables:
                names = sql.SQL(", ").join(sql.Identifier(*table) for table in tables)
                conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(names))
    except psycopg.Error as error:
        raise StateUnavailable(
            f"The hub's database '{name}' at {redacted(url)} cannot be emptied: "
            f"{_scrubbed(str(error), url)}"
        ) from None
