"""The usage page's numbers, counted by the state database itself.

One set of SQL statements for both stores (SQLite and PostgreSQL differ only in how a
timestamp becomes a day and in their parameter marks), so the two cannot drift apart.
Every statement aggregates in the database and returns at most one row per day, plus
the ``top`` most launched repositories: however many launches or distinct repositories
the window holds, what comes back is small.

Days are whole UTC days since 1970-01-01 (``at // 86400``).

A launch "needed a build" when a build of the image it named overlapped it in time
(started before the launch ended, and had not finished before the launch began): it
either started that build or waited for one under way. The other launches that named an
image found it built: those are the cache hits. The ``builds_image`` index keeps this one
index look-up per launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Spellings that may carry a credential or a private detail in an address: a query or
# fragment, user-info, or an escape of them (also escaped twice). Repositories whose spec
# contains one are never named; they count among the others.
UNNAMED_PATTERNS = ("%?%", "%#%", "%@%", r"%\%3f%", r"%\%23%", r"%\%40%", r"%\%25%")


@dataclass(frozen=True)
class Dialect:
    mark: str  # the driver's parameter mark
    day: str  # a timestamp column ({col}) as a whole UTC day number


# ``at`` is never negative, so SQLite's truncating cast is the floor (its FLOOR needs the
# optional math functions).
SQLITE = Dialect(mark="?", day="CAST({col} / 86400 AS INTEGER)")
POSTGRES = Dialect(mark="%s", day="CAST(FLOOR({col} / 86400) AS INTEGER)")


@dataclass(frozen=True)
class UsageRows:
    """The aggregates of launches and builds from ``since`` on."""

    # (day, launches, of which succeeded, of which named an image, of which needed a build)
    launch_days: list[tuple[int, int, int, int, int]]
    # (day, builds finished, of which succeeded)
    build_days: list[tuple[int, int, int]]
    # (day, median, 95th percentile) seconds of the successful builds finished that day
    build_time_days: list[tuple[int, float, float]]
    # (median, 95th percentile) over the whole window, None without successful builds
    build_time_all: tuple[float, float] | None
    # (provider, spec, launches, of which succeeded): the most launched nameable ones
    repositories: list[tuple[str, str, int, int]]
    # distinct (provider, spec) pairs launched in the window
    repository_count: int


def _percentiles(dialect: Dialect, day: str) -> str:
    """Median and 95th percentile (nearest rank: the ceil(p·n)-th smallest) of successful
    build times per ``day`` (an expression, or a constant for the whole window). Window
    functions both databases have, and integer division for the ranks."""
    return (
        "WITH times AS ("
        f" SELECT {day} AS day, finished - started AS seconds FROM builds"
        f" WHERE finished >= {dialect.mark} AND status = 'success'"
        "), ranked AS ("
        " SELECT day, seconds,"
        " ROW_NUMBER() OVER (PARTITION BY day ORDER BY seconds) AS n,"
        " COUNT(*) OVER (PARTITION BY day) AS total FROM times"
        ") SELECT day,"
        " MAX(CASE WHEN n = (total + 1) / 2 THEN seconds END),"
        " MAX(CASE WHEN n = (total * 95 + 99) / 100 THEN seconds END)"
        " FROM ranked GROUP BY day ORDER BY day"
    )


def statements(dialect: Dialect) -> dict[str, str]:
    """The usage statements in ``dialect``; each takes the window's start, but
    "repositories" takes (least successful launches, *UNNAMED_PATTERNS, start, top)."""
    mark = dialect.mark
    launch_day = dialect.day.format(col="l.at")
    finished_day = dialect.day.format(col="finished")
    nameable = " ".join(f"AND LOWER(spec) NOT LIKE {mark} ESCAPE '\\'" for _ in UNNAMED_PATTERNS)
    return {
        "launch_days": (
            f"SELECT {launch_day} AS day, COUNT(*),"
            " SUM(CASE WHEN l.status = 'success' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN l.image != '' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN l.image != '' AND EXISTS ("
            "  SELECT 1 FROM builds b WHERE b.image = l.image AND b.started <= l.at"
            "  AND (b.finished IS NULL OR b.finished >= l.at - l.seconds)"
            " ) THEN 1 ELSE 0 END)"
            f" FROM launches l WHERE l.at >= {mark} GROUP BY 1 ORDER BY 1"
        ),
        "build_days": (
            f"SELECT {finished_day} AS day, COUNT(*),"
            " SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END)"
            f" FROM builds WHERE finished >= {mark} GROUP BY 1 ORDER BY 1"
        ),
        "build_time_days": _percentiles(dialect, finished_day),
        "build_time_all": _percentiles(dialect, "0"),
        # One pass: every (provider, spec) launched, counted (with how many there are),
        # the nameable ones with enough successful launches first; the caller keeps those.
        "repositories": (
            "SELECT provider, spec, launches, succeeded, total, nameable FROM ("
            " SELECT provider, spec, launches, succeeded, COUNT(*) OVER () AS total,"
            f" CASE WHEN succeeded >= {mark} {nameable} THEN 1 ELSE 0 END AS nameable"
            " FROM ("
            "  SELECT provider, spec, COUNT(*) AS launches,"
            "  SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END) AS succeeded"
            f"  FROM launches WHERE at >= {mark} GROUP BY provider, spec"
            " ) AS counted"
            ") AS ranked"
            f" ORDER BY nameable DESC, succeeded DESC, launches DESC, provider, spec LIMIT {mark}"
        ),
    }


Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def usage_rows(
    run: Run, dialect: Dialect, since: float, *, top: int, min_succeeded: int
) -> UsageRows:
    """Run the usage statements through ``run(sql, params)`` (the store gives it one read
    transaction, so every number comes from the same moment)."""
    sql = statements(dialect)

    def counts(name: str) -> list[tuple[int, ...]]:
        return [tuple(int(value) for value in row) for row in run(sql[name], (since,))]

    build_all = run(sql["build_time_all"], (since,))
    found = run(sql["repositories"], (min_succeeded, *UNNAMED_PATTERNS, since, top))
    return UsageRows(
        launch_days=counts("launch_days"),  # type: ignore[arg-type]
        build_days=counts("build_days"),  # type: ignore[arg-type]
        build_time_days=[
            (int(day), float(median), float(p95))
            for day, median, p95 in run(sql["build_time_days"], (since,))
        ],
        build_time_all=(float(build_all[0][1]), float(build_all[0][2])) if build_all else None,
        repositories=[
            (str(provider), str(spec), int(launches), int(succeeded))
            for provider, spec, launches, succeeded, _, named in found
            if named
        ],
        repository_count=int(found[0][4]) if found else 0,
    )
