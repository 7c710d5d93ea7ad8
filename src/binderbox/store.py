"""SQLite state: builds and their logs, kept across restarts of the service.

The SQLite implementation of ``binderbox.state.StateStore`` (the embedded default);
``SqliteStateStore`` is the same class under the seam's name.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from binderbox.state_usage import SQLITE, UsageRows, usage_rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    repo_url TEXT NOT NULL,
    ref TEXT NOT NULL,
    status TEXT NOT NULL,          -- running, success, failed
    message TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    owner TEXT NOT NULL DEFAULT ''  -- the service (hub id) that runs the build
);
CREATE TABLE IF NOT EXISTS launches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    provider TEXT NOT NULL,
    spec TEXT NOT NULL,
    ref TEXT NOT NULL,             -- the resolved commit or content id ("" if unresolved)
    status TEXT NOT NULL,          -- success, failed
    seconds REAL NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    image TEXT NOT NULL DEFAULT ''  -- the image launched ("" if none was named)
);
CREATE TABLE IF NOT EXISTS build_locks (
    build_id TEXT PRIMARY KEY REFERENCES builds(id),
    lock TEXT NOT NULL             -- the build's lock file (binderbox/builder/lock.py)
);
CREATE TABLE IF NOT EXISTS build_log (
    build_id TEXT NOT NULL REFERENCES builds(id),
    seq INTEGER NOT NULL,
    line TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT 'building',  -- the event's phase, for replaying the stream
    PRIMARY KEY (build_id, seq)
);
"""
# After the columns of older files are added: what the cleaner's queries look up.
INDEXES = """
CREATE INDEX IF NOT EXISTS launches_at ON launches (at);
CREATE INDEX IF NOT EXISTS launches_image ON launches (image, at);
CREATE INDEX IF NOT EXISTS builds_finished ON builds (finished);
CREATE INDEX IF NOT EXISTS builds_image ON builds (image, started);
"""
# Builds forgotten in one transaction: a large first clean-up must not hold the store
# (and every launch waiting on it) for long.
FORGET_BATCH = 200


@dataclass(frozen=True)
class BuildRecord:
    id: str
    image: str
    repo_url: str
    ref: str
    status: str
    message: str
    started: float
    finished: float | None


@dataclass(frozen=True)
class Forgotten:
    """What one retention pass deleted."""

    builds: int = 0
    log_lines: int = 0
    launches: int = 0


def builds_to_forget(
    old: list[tuple[str, str, str, float]],
    newest_success: dict[str, float],
    keep_images: set[str],
) -> list[str]:
    """The ids among ``old`` (id, image, status, finished) to delete: all of them but the
    newest successful build of each image in ``keep_images`` (an image still present
    keeps the log that says how it was made)."""
    return [
        build_id
        for build_id, image, status, finished in old
        if not (
            status == "success" and image in keep_images and finished == newest_success.get(image)
        )
    ]


@dataclass(frozen=True)
class LaunchRecord:
    at: float
    provider: str
    spec: str
    ref: str
    status: str
    seconds: float
    message: str


class BuildStore:
    """Builds, their log lines and launches in one SQLite file; safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # New files give deleted pages back to the disk bit by bit (see forget_older_than);
        # the pragma does nothing to a file that already has tables.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(build_log)")}
        if "phase" not in columns:  # a state file from before phases were kept
            self._db.execute(
                "ALTER TABLE build_log ADD COLUMN phase TEXT NOT NULL DEFAULT 'building'"
            )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(builds)")}
        if "owner" not in columns:  # a state file from before builds had owners
            self._db.execute("ALTER TABLE builds ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(launches)")}
        if "image" not in columns:  # a state file from before launches named their image
            self._db.execute("ALTER TABLE launches ADD COLUMN image TEXT NOT NULL DEFAULT ''")
        self._db.executescript(INDEXES)
        self._lock = threading.Lock()
        self._next_seq: dict[str, int] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def start(self, image: str, repo_url: str, ref: str, owner: str = "") -> str:
        """A new running build of ``image``, run by the service ``owner``; its id."""
        build_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO builds (id, image, repo_url, ref, status, started, owner)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (build_id, image, repo_url, ref, time.time(), owner),
            )
            self._next_seq[build_id] = 0
        return build_id

    def append(self, build_id: str, line: str, phase: str = "building") -> None:
        self.append_many(build_id, [(phase, line)])

    def append_many(self, build_id: str, events: list[tuple[str, str]]) -> None:
        """Add (phase, message) pairs to a build's log, in order, in one transaction (a
        commit per line made a chatty build wait on the disk for every line)."""
        if not events:
            return
        with self._lock:
            seq = self._next_seq.get(build_id, 0)
            rows = [(build_id, seq + i, line, phase) for i, (phase, line) in enumerate(events)]
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO build_log (build_id, seq, line, phase) VALUES (?, ?, ?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._next_seq[build_id] = seq + len(rows)

    def finish(self, build_id: str, status: str, message: str = "") -> None:
        with self._lock:
            self._db.execute(
                "UPDATE builds SET status = ?, message = ?, finished = ? WHERE id = ?",
                (status, message, time.time(), build_id),
            )
            self._next_seq.pop(build_id, None)

    def set_lock(self, build_id: str, lock: str) -> None:
        """Keep the lock file of a build (replacing one kept before)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO build_locks (build_id, lock) VALUES (?, ?)",
                (build_id, lock),
            )

    def lock(self, build_id: str) -> str | None:
        """A build's lock file, or None when it has none."""
        with self._lock:
            row = self._db.execute(
                "SELECT lock FROM build_locks WHERE build_id = ?", (build_id,)
            ).fetchone()
        return row[0] if row else None

    def interrupted(self, owner: str) -> int:
        """Mark the builds an earlier process of ``owner`` left running as failed (other
        services sharing the store may still be running theirs), and those recorded
        without an owner (from before owners were kept); return how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE builds SET status = 'failed', finished = ?,"
                " message = 'binderbox was restarted while this build ran; launch again.'"
                " WHERE status = 'running' AND owner IN (?, '')",
                (time.time(), owner),
            )
            return cursor.rowcount

    def get(self, build_id: str) -> BuildRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, image, repo_url, ref, status, message, started, finished"
                " FROM builds WHERE id = ?",
                (build_id,),
            ).fetchone()
        return BuildRecord(*row) if row else None

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
        with self._lock:
            self._db.execute(
                "INSERT INTO launches (at, provider, spec, ref, status, seconds, message, image)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), provider, spec, ref, status, seconds, message, image),
            )

    def last_launched(self) -> dict[str, float]:
        """When each image was last launched successfully (the cleaner removes the least
        recently launched first); images without a kept launch are missing."""
        with self._lock:
            rows = self._db.execute(
                "SELECT image, MAX(at) FROM launches WHERE image != '' AND status = 'success'"
                " GROUP BY image"
            ).fetchall()
        return {image: at for image, at in rows}

    def forget_older_than(
        self, cutoff: float, keep_images: set[str] | frozenset[str] = frozenset()
    ) -> Forgotten:
        """Delete launches from before ``cutoff`` and builds (with their logs) that
        finished before it, except the newest successful build of each image in
        ``keep_images``; running builds stay. Then give the freed pages back to the disk:
        ``PRAGMA incremental_vacuum``, or once, for a file made before binderbox chose
        incremental vacuuming, a VACUUM that switches it over."""
        with self._lock:
            old = self._db.execute(
                "SELECT id, image, status, finished FROM builds WHERE finished < ?", (cutoff,)
            ).fetchall()
            newest = dict(
                self._db.execute(
                    "SELECT image, MAX(finished) FROM builds WHERE status = 'success'"
                    " GROUP BY image"
                ).fetchall()
            )
        doomed = builds_to_forget(old, newest, set(keep_images))
        builds = lines = 0
        for start in range(0, len(doomed), FORGET_BATCH):
            batch = doomed[start : start + FORGET_BATCH]
            marks = ",".join("?" * len(batch))
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    lines += self._db.execute(
                        f"DELETE FROM build_log WHERE build_id IN ({marks})", batch
                    ).rowcount
                    self._db.execute(f"DELETE FROM build_locks WHERE build_id IN ({marks})", batch)
                    builds += self._db.execute(
                        f"DELETE FROM builds WHERE id IN ({marks})", batch
                    ).rowcount
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        with self._lock:
            launches = self._db.execute("DELETE FROM launches WHERE at < ?", (cutoff,)).rowcount
            if builds or launches:
                self._compact()
        return Forgotten(builds, lines, launches)

    def _compact(self) -> None:
        """Return free pages to the disk (the lock is held by the caller)."""
        if not self._db.execute("PRAGMA freelist_count").fetchone()[0]:
            return
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # incremental
            self._db.execute("PRAGMA incremental_vacuum").fetchall()
        else:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def file_pages(self) -> tuple[int, int]:
        """(pages in the file, of which free): how compact the file is."""
        with self._lock:
            total = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return total, free

    def recent_launches(self, limit: int = 50) -> list[LaunchRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, provider, spec, ref, status, seconds, message FROM launches"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [LaunchRecord(*row) for row in rows]

    def log(self, build_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT line FROM build_log WHERE build_id = ? ORDER BY seq", (build_id,)
            ).fetchall()
        return [row[0] for row in rows]

    def events(self, build_id: str, start: int, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` (phase, message) pairs of a build's log from number ``start``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT phase, line FROM build_log WHERE build_id = ? AND seq >= ?"
                " ORDER BY seq LIMIT ?",
                (build_id, start, limit),
            ).fetchall()
        return [(phase, line) for phase, line in rows]

    def usage(self, since: float, top: int, min_succeeded: int) -> UsageRows:
        """The usage page's aggregates from ``since`` on (binderbox.state_usage), in one
        read transaction on a connection of their own: WAL lets it read while launches
        and builds write, so a long count never holds them up."""
        reader = sqlite3.connect(self._path, isolation_level=None)
        try:
            reader.execute("PRAGMA query_only=ON")
            reader.execute("BEGIN")
            return usage_rows(
                lambda sql, params: reader.execute(sql, params).fetchall(),
                SQLITE,
                since,
                top=top,
                min_succeeded=min_succeeded,
            )
        finally:
            reader.close()


# The seam's name for this implementation (binderbox.state.StateStore).
SqliteStateStore = BuildStore
