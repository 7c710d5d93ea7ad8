"""The StateStore seam: builds, their logs and launches, kept across restarts.

SQLite in ``state_dir`` is the embedded default (``binderbox.store.BuildStore``);
PostgreSQL (``binderbox.state_postgres``) lets several services, or a restarted manager,
share one store. Every build row names its ``owner``, the service that runs it, so a
service that starts marks failed only the builds that it itself left unfinished.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from binderbox.errors import UsageError

if TYPE_CHECKING:
    from binderbox.config import Settings
    from binderbox.state_usage import UsageRows
    from binderbox.store import BuildRecord, Forgotten, LaunchRecord

SQLITE_FILE = "binderbox.sqlite"


class StateStore(Protocol):
    """Builds, build logs and launches; every method is blocking and thread-safe."""

    def start(self, image: str, repo_url: str, ref: str, owner: str = "") -> str:
        """Record a running build of ``image`` run by service ``owner``; its new id."""
        ...

    def append(self, build_id: str, line: str, phase: str = "building") -> None:
        """Add one line to a build's log."""
        ...

    def append_many(self, build_id: str, events: list[tuple[str, str]]) -> None:
        """Add (phase, message) pairs to a build's log, in order, in one transaction."""
        ...

    def finish(self, build_id: str, status: str, message: str = "") -> None:
        """A build ended: ``status`` is "success" or "failed"."""
        ...

    def interrupted(self, owner: str) -> int:
        """Mark failed the running builds of ``owner`` (and those without an owner),
        which its earlier process can never finish; return how many."""
        ...

    def get(self, build_id: str) -> BuildRecord | None: ...

    def set_lock(self, build_id: str, lock: str) -> None:
        """Keep a build's lock file (builder/lock.py), shown at /logs/<id>/lock."""
        ...

    def lock(self, build_id: str) -> str | None:
        """A build's lock file, or None when it has none."""
        ...

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
        """One /build request's outcome and the image it named (no addresses are kept)."""
        ...

    def recent_launches(self, limit: int = 50) -> list[LaunchRecord]: ...

    def last_launched(self) -> dict[str, float]:
        """Image name → time of its last successful launch still on record."""
        ...

    def forget_older_than(
        self, cutoff: float, keep_images: set[str] | frozenset[str] = frozenset()
    ) -> Forgotten:
        """Retention: delete launches before ``cutoff`` and builds (with their logs) that
        finished before it, but keep the newest successful build of each image in
        ``keep_images``; then keep the database compact."""
        ...

    def usage(self, since: float, top: int, min_succeeded: int) -> UsageRows:
        """The usage page's aggregates of launches and builds from ``since`` on: per UTC
        day, and the ``top`` repositories with at least ``min_succeeded`` successful
        launches (binderbox.state_usage)."""
        ...

    def log(self, build_id: str) -> list[str]:
        """Every line of a build's log, in order."""
        ...

    def events(self, build_id: str, start: int, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` (phase, message) pairs of a build's log from number ``start``."""
        ...

    def close(self) -> None: ...


def state_owner(settings: Settings) -> str:
    """This service's owner id: the hub id of its state directory (the same short hash
    labels its sessions and names its firewall hooks), stable across restarts."""
    state_dir = Path(settings.state_dir).expanduser().resolve()
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


def open_state_store(settings: Settings) -> StateStore:
    """The store ``settings.database_url`` names: PostgreSQL for a postgresql:// URL,
    else SQLite in ``state_dir``."""
    url = settings.database_url
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from binderbox.state_postgres import PostgresStateStore
        except ModuleNotFoundError as error:
            raise UsageError(
                f"Setting 'database_url' names PostgreSQL, which is not available in this "
                f"binderbox (the Python module {error.name} is missing)."
            ) from None
        return PostgresStateStore(url)
    from binderbox.store import BuildStore

    return BuildStore(Path(settings.state_dir).expanduser() / SQLITE_FILE)
