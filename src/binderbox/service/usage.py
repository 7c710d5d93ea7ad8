"""/usage: how this binderbox is used, for everyone to see, as a page, JSON and CSV.

Launches per day and per repository, build times, the cache hit rate (launches that found
their image built) and the warm pool's hit rate, over the last ``days`` UTC days (30 by
default, at most 365). The state database counts (binderbox.state_usage); this module
turns its rows into a ``Usage``, and that into the page (with two SVG charts), JSON and
CSV, which all show the same numbers.

No personal data: binderbox keeps no addresses, user names or tokens with its launches,
and this page shows nothing finer than a day. Repositories are public addresses, but one
only its author launches may be private in spirit (or reached with an operator's token),
so a repository is named only with at least ``usage_min_launches`` successful launches in
the days shown, never when its spec holds a query, a fragment or user-info, and at most
the ``TOP`` most launched; every other launch counts among "others". Failure messages,
refs beyond the spec, images and build logs are not shown.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime
import html
import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from binderbox import __version__
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.service import pages
from binderbox.service.blocking import BlockingPool
from binderbox.service.charts import TIME_STEPS, Bar, bar_chart
from binderbox.state import StateStore

DEFAULT_DAYS = 30
MAX_DAYS = 365
TOP = 20  # repositories named at most; the rest are "others"
FRESH_SECONDS = 60.0  # a window's numbers are counted again after this
CACHED_WINDOWS = 16  # windows (values of days) kept counted at once
READ_TIMEOUT = 60.0
EPOCH = datetime.date(1970, 1, 1)
OTHERS = "(others)"

logger = logging.getLogger(__name__)

DAY_COLUMNS = (
    "day",
    "launches",
    "launches_succeeded",
    "launches_failed",
    "cache_hits",
    "cache_misses",
    "builds",
    "builds_succeeded",
    "builds_failed",
    "build_median_seconds",
    "build_p95_seconds",
    "pool_hits",
    "pool_misses",
)
REPOSITORY_COLUMNS = ("repository", "repositories", "launches", "launches_succeeded")
_DIGITS = re.compile(r"[0-9]{1,4}")
# What the database already keeps out of the named repositories (state_usage), checked
# again on the name people see, with control characters besides.
_UNNAMED = re.compile(r"[?#@\x00-\x1f\x7f]|%(?:3f|23|40|25)", re.IGNORECASE)


class PoolUsage(Protocol):
    """What a warm pool tells the usage page (issue 14.1 brings the pool; until one is
    given, the page says there is none). Per UTC day from ``since`` (a timestamp) on:
    (hits, misses), launches that took a server waiting in the pool and launches that
    had to start one. Blocking; called from a worker thread."""

    def pool_days(self, since: float) -> dict[datetime.date, tuple[int, int]]: ...


class BadUsageQuery(BinderboxError):
    """A query parameter /usage cannot use; its message is one sentence for the caller."""


def rate(hits: int | None, misses: int | None) -> float | None:
    """hits / (hits + misses), None when there is nothing to divide."""
    if hits is None or misses is None or hits + misses == 0:
        return None
    return hits / (hits + misses)


@dataclass(frozen=True)
class Day:
    """One UTC day's numbers (pool numbers are None without a warm pool)."""

    day: datetime.date
    launches: int = 0
    launches_succeeded: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    builds: int = 0
    builds_succeeded: int = 0
    build_median_seconds: float | None = None
    build_p95_seconds: float | None = None
    pool_hits: int | None = None
    pool_misses: int | None = None

    @property
    def launches_failed(self) -> int:
        return self.launches - self.launches_succeeded

    @property
    def builds_failed(self) -> int:
        return self.builds - self.builds_succeeded

    def row(self) -> dict[str, Any]:
        """The day as /usage.json and /usage.csv give it (DAY_COLUMNS)."""
        values = {name: getattr(self, name) for name in DAY_COLUMNS}
        values["day"] = self.day.isoformat()
        for name in ("build_median_seconds", "build_p95_seconds"):
            values[name] = _seconds(values[name])
        return values


@dataclass(frozen=True)
class Repository:
    repository: str  # provider/spec as launched, unescaped ("gh/org/repo/main")
    launches: int
    launches_succeeded: int


@dataclass(frozen=True)
class Usage:
    """The numbers of one window, as every format shows them."""

    days: int
    since: datetime.date
    until: datetime.date
    generated: float
    per_day: list[Day]
    repositories: list[Repository]
    other_repositories: int
    build_median_seconds: float | None
    build_p95_seconds: float | None
    min_launches: int
    top: int
    retention_days: int
    warm_pool: bool

    def total(self, name: str) -> int | None:
        values = [getattr(day, name) for day in self.per_day]
        return None if any(v is None for v in values) else sum(values)

    @property
    def other_launches(self) -> int:
        return (self.total("launches") or 0) - sum(r.launches for r in self.repositories)

    @property
    def other_launches_succeeded(self) -> int:
        named = sum(r.launches_succeeded for r in self.repositories)
        return (self.total("launches_succeeded") or 0) - named

    def totals(self) -> dict[str, Any]:
        """The whole window's numbers: the days' counts summed, the rates, and the build
        times' median and 95th percentile over all its successful builds."""
        sums = {name: self.total(name) for name in DAY_COLUMNS[1:] if "seconds" not in name}
        return {
            **sums,
            "cache_hit_rate": _rate(rate(sums["cache_hits"], sums["cache_misses"])),
            "pool_hit_rate": _rate(rate(sums["pool_hits"], sums["pool_misses"])),
            "build_median_seconds": _seconds(self.build_median_seconds),
            "build_p95_seconds": _seconds(self.build_p95_seconds),
        }

    def as_json(self) -> dict[str, Any]:
        """What /usage.json answers (documented in the README)."""
        return {
            "days": self.days,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "timezone": "UTC",
            "generated_at": _iso(self.generated),
            "min_launches": self.min_launches,
            "top": self.top,
            "retention_days": self.retention_days,
            "warm_pool": self.warm_pool,
            "totals": self.totals(),
            "per_day": [day.row() for day in self.per_day],
            "repositories": [dataclasses.asdict(r) for r in self.repositories],
            "others": {
                "repositories": self.other_repositories,
                "launches": self.other_launches,
                "launches_succeeded": self.other_launches_succeeded,
            },
        }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC).replace(microsecond=0)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def window(days: int, now: float) -> tuple[datetime.date, datetime.date, float]:
    """The last ``days`` UTC days up to ``now``, today included: first day, last day and
    the timestamp the first one starts at."""
    until = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    since = until - datetime.timedelta(days=days - 1)
    start = datetime.datetime.combine(since, datetime.time(), datetime.UTC).timestamp()
    return since, until, start


def nameable(repository: str) -> bool:
    """Whether a repository's name may be shown (see the module's docstring)."""
    return not _UNNAMED.search(repository)


def read_usage(
    store: StateStore,
    days: int,
    *,
    min_launches: int,
    retention_days: int = 0,
    top: int = TOP,
    pool: PoolUsage | None = None,
    now: float | None = None,
) -> Usage:
    """Count the last ``days`` days in ``store`` (blocking)."""
    now = time.time() if now is None else now
    since, until, start = window(days, now)
    rows = store.usage(start, top, min_launches)
    pooled = pool.pool_days(start) if pool is not None else {}

    def date(number: int) -> datetime.date:
        return EPOCH + datetime.timedelta(days=number)

    launches = {date(d): row for d, *row in rows.launch_days}
    builds = {date(d): row for d, *row in rows.build_days}
    times = {date(d): row for d, *row in rows.build_time_days}
    per_day = []
    for offset in range(days):
        day = since + datetime.timedelta(days=offset)
        count, succeeded, named, needed = launches.get(day, (0, 0, 0, 0))
        built, built_ok = builds.get(day, (0, 0))
        median, p95 = times.get(day, (None, None))
        hits, misses = pooled.get(day, (0, 0)) if pool is not None else (None, None)
        per_day.append(
            Day(
                day,
                launches=count,
                launches_succeeded=succeeded,
                cache_hits=named - needed,
                cache_misses=needed,
                builds=built,
                builds_succeeded=built_ok,
                build_median_seconds=median,
                build_p95_seconds=p95,
                pool_hits=hits,
                pool_misses=misses,
            )
        )
    named = [
        Repository(unquote(f"{provider}/{spec}"), count, succeeded)
        for provider, spec, count, succeeded in rows.repositories
    ]
    shown = [r for r in named if nameable(r.repository)]
    median_all, p95_all = rows.build_time_all or (None, None)
    return Usage(
        days=days,
        since=since,
        until=until,
        generated=now,
        per_day=per_day,
        repositories=shown,
        other_repositories=rows.repository_count - len(shown),
        build_median_seconds=median_all,
        build_p95_seconds=p95_all,
        min_launches=min_launches,
        top=top,
        retention_days=retention_days,
        warm_pool=pool is not None,
    )


# --- query parameters ------------------------------------------------------------------


def parse_query(items: Sequence[tuple[str, str]], path: str = "/usage") -> tuple[int, str]:
    """(days, table) from the query of a request for ``path``; BadUsageQuery (one
    sentence) for anything else. ``table`` ("days" or "repositories") is a parameter of
    /usage.csv only."""
    allowed = ("days", "table") if path.endswith(".csv") else ("days",)
    seen: dict[str, str] = {}
    for key, value in items:
        if key not in allowed:
            takes = "the parameters days and table" if len(allowed) > 1 else "the parameter days"
            raise BadUsageQuery(f"{path} takes only {takes}.")
        if key in seen:
            raise BadUsageQuery(f"Give the parameter {key} once.")
        seen[key] = value
    days = DEFAULT_DAYS
    if "days" in seen:
        text = seen["days"]
        if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_DAYS:
            raise BadUsageQuery(f"The parameter days must be a whole number from 1 to {MAX_DAYS}.")
        days = int(text)
    table = seen.get("table", "days")
    if table not in {"days", "repositories"}:
        raise BadUsageQuery("The parameter table must be days or repositories.")
    return days, table


# --- CSV -------------------------------------------------------------------------------


def usage_csv(usage: Usage, table: str) -> str:
    """One table of ``usage`` as CSV: per day (DAY_COLUMNS), or per repository
    (REPOSITORY_COLUMNS, the last row the others); empty cells for unknown values."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if table == "repositories":
        writer.writerow(REPOSITORY_COLUMNS)
        for r in usage.repositories:
            writer.writerow([r.repository, 1, r.launches, r.launches_succeeded])
        writer.writerow(
            [OTHERS, usage.other_repositories, usage.other_launches, usage.other_launches_succeeded]
        )
    else:
        writer.writerow(DAY_COLUMNS)
        for day in usage.per_day:
            writer.writerow(["" if v is None else v for v in day.row().values()])
    return out.getvalue()


# --- the page --------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """Seconds for people: 8.5 s, 42 s, 3.2 min, 1.5 h; a dash when unknown."""
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _tick_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _short(day: datetime.date) -> str:
    return f"{day.day} {day.strftime('%b')}"


def _plural(count: int, word: str, many: str = "") -> str:
    return f"{count} {word if count == 1 else many or word + 's'}"


def launch_chart(usage: Usage) -> str:
    bars = [
        Bar(
            _short(d.day),
            f"{d.day.isoformat()}: {_plural(d.launches, 'launch', 'launches')}"
            f" ({d.launches_succeeded} succeeded, {d.launches_failed} failed)",
            (d.launches_succeeded, d.launches_failed),
        )
        for d in usage.per_day
    ]
    total = usage.total("launches") or 0
    busiest = max(usage.per_day, key=lambda d: d.launches)
    desc = (
        f"{total} launches from {usage.since.isoformat()} to {usage.until.isoformat()}, "
        f"{usage.total('launches_succeeded')} of them succeeded"
        + (
            f"; the busiest day was {busiest.day.isoformat()} with {busiest.launches}."
            if total
            else "."
        )
        + " The table below gives each day's numbers."
    )
    return bar_chart(
        "launch-chart",
        title="Launches per day",
        desc=desc,
        bars=bars,
        classes=("part-ok", "part-failed"),
    )


def build_chart(usage: Usage) -> str:
    bars = [
        Bar(
            _short(d.day),
            f"{d.day.isoformat()}: "
            + (
                f"median {duration(d.build_median_seconds)}, 95th percentile "
                f"{duration(d.build_p95_seconds)} ({_plural(d.builds_succeeded, 'build')})"
                if d.build_median_seconds is not None
                else "no successful build"
            ),
            (d.build_median_seconds or 0,),
            d.build_p95_seconds,
        )
        for d in usage.per_day
    ]
    built = usage.total("builds_succeeded") or 0
    desc = (
        (
            f"{_plural(built, 'successful build')}: median {duration(usage.build_median_seconds)},"
            f" 95th percentile {duration(usage.build_p95_seconds)} over these days."
        )
        if built
        else "No build succeeded in these days."
    ) + " The table below gives each day's numbers."
    return bar_chart(
        "build-chart",
        title="Build time per day: median (bar) and 95th percentile (tick)",
        desc=desc,
        bars=bars,
        classes=("part-median",),
        marker_class="part-p95",
        tick=_tick_time,
        steps=TIME_STEPS,
    )


def _days_table(usage: Usage) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(d.day.isoformat())}</td>"
        f'<td class="num">{d.launches}</td><td class="num">{d.launches_succeeded}</td>'
        f'<td class="num">{d.cache_hits}</td><td class="num">{d.cache_misses}</td>'
        f'<td class="num">{d.builds}</td>'
        f'<td class="num">{esc(duration(d.build_median_seconds))}</td>'
        f'<td class="num">{esc(duration(d.build_p95_seconds))}</td></tr>'
        for d in reversed(usage.per_day)
    )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in (
            "Day (UTC)",
            "Launches",
            "Succeeded",
            "Found built",
            "Needed a build",
            "Builds",
            "Median build",
            "95th pct. build",
        )
    )
    return (
        '<div class="table-wrap"><table id="usage-days"><thead><tr>'
        f"{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _repositories_table(usage: Usage) -> str:
    esc = html.escape
    rows = "".join(
        f'<tr><td class="spec">{esc(r.repository)}</td>'
        f'<td class="num">{r.launches}</td><td class="num">{r.launches_succeeded}</td></tr>'
        for r in usage.repositories
    )
    if usage.other_repositories or usage.other_launches:
        rows += (
            f'<tr class="others"><td class="spec">{_plural(usage.other_repositories, "other")}'
            f" (fewer than {usage.min_launches} successful launches, or beyond the top"
            f' {usage.top})</td><td class="num">{usage.other_launches}</td>'
            f'<td class="num">{usage.other_launches_succeeded}</td></tr>'
        )
    if not rows:
        return '<p class="hint">No launches in these days.</p>'
    return (
        '<div class="table-wrap"><table id="usage-repositories"><thead><tr>'
        '<th scope="col">Repository (as launched)</th><th scope="col">Launches</th>'
        f'<th scope="col">Succeeded</th></tr></thead><tbody>{rows}</tbody></table></div>'
    )


def _window_links(days: int) -> str:
    links = []
    for choice in (7, 30, 90, 365):
        if choice == days:
            links.append(f'<strong aria-current="page">{choice} days</strong>')
        else:
            links.append(f'<a href="/usage?days={choice}">{choice} days</a>')
    return " · ".join(links)


def usage_page(usage: Usage) -> str:
    """The /usage page (pages/usage.html in the site's layout)."""
    totals = usage.totals()
    launches = totals["launches"]
    named = (totals["cache_hits"] or 0) + (totals["cache_misses"] or 0)
    if usage.warm_pool:
        pool = percent(totals["pool_hit_rate"])
        pool_detail = (
            f"{totals['pool_hits']} of {totals['pool_hits'] + totals['pool_misses']} "
            "launches took a waiting server."
        )
    else:
        pool = "no warm pool"
        pool_detail = "This binderbox starts a server for every launch."
    retention = ""
    if usage.retention_days and usage.days > usage.retention_days:
        retention = (
            f'<p class="hint" id="usage-retention">Launch records are kept '
            f"{usage.retention_days} days here, so earlier days show none.</p>"
        )
    return pages.render(
        "usage.html",
        title="Usage · binderbox",
        description="Launches per day and per repository, build times and cache hit rate "
        "of this binderbox.",
        page="usage",
        version=__version__,
        days=usage.days,
        since=usage.since.isoformat(),
        until=usage.until.isoformat(),
        windows=_window_links(usage.days),
        max_days=MAX_DAYS,
        retention=retention,
        launches=launches,
        launches_succeeded=totals["launches_succeeded"],
        launches_failed=totals["launches_failed"],
        cache_rate=percent(totals["cache_hit_rate"]),
        cache_hits=totals["cache_hits"],
        cache_named=named,
        build_median=duration(usage.build_median_seconds),
        build_p95=duration(usage.build_p95_seconds),
        builds=totals["builds"],
        builds_failed=totals["builds_failed"],
        pool=pool,
        pool_detail=pool_detail,
        launch_chart=launch_chart(usage),
        build_chart=build_chart(usage),
        days_table=_days_table(usage),
        repositories=_repositories_table(usage),
        min_launches=usage.min_launches,
        top=usage.top,
        generated=_iso(usage.generated),
    )


def error_page(message: str, status: int) -> str:
    return pages.render(
        "usage_error.html",
        title="Usage · binderbox",
        description="Usage of this binderbox.",
        page="usage",
        version=__version__,
        message=message,
        status=status,
    )


# --- the routes ------------------------------------------------------------------------


class UsageCounts:
    """Windows counted recently, so reloads and many readers cost the database one
    count per window a minute (or, for a count that took long, ten times as long as it
    took: the database spends at most a tenth of its time on this page); one count at a
    time, on a thread of its own."""

    def __init__(self, read: Callable[[int], Usage], fresh: float = FRESH_SECONDS) -> None:
        self.read = read
        self.fresh = fresh
        self._pool = BlockingPool("binderbox-usage", 1, 4)
        self._known: dict[int, tuple[float, Usage]] = {}
        self._pending: dict[int, asyncio.Future[tuple[Usage, float]]] = {}

    async def get(self, days: int) -> Usage:
        known = self._known.get(days)
        if known and known[0] > time.monotonic():
            return known[1]
        pending = self._pending.get(days)
        if pending is None:
            pending = asyncio.ensure_future(
                self._pool.run(
                    self._timed,
                    days,
                    timeout=READ_TIMEOUT,
                    what="The state database",
                    busy="The usage numbers are being counted for other readers; "
                    "try again in a minute.",
                )
            )
            self._pending[days] = pending
            pending.add_done_callback(lambda _: self._pending.pop(days, None))
        usage, took = await asyncio.shield(pending)
        now = time.monotonic()
        self._known = {d: k for d, k in self._known.items() if k[0] > now}
        if len(self._known) >= CACHED_WINDOWS:
            self._known.pop(min(self._known, key=lambda d: self._known[d][0]))
        self._known[days] = (now + max(self.fresh, 10 * took), usage)
        return usage

    def _timed(self, days: int) -> tuple[Usage, float]:
        began = time.monotonic()
        usage = self.read(days)
        return usage, time.monotonic() - began


def usage_routes(
    settings: Settings, store: StateStore, pool: PoolUsage | None = None
) -> list[Route]:
    """/usage, /usage.json and /usage.csv over ``store``; ``pool`` fills the pool hit
    rate (none yet: the page says there is no warm pool)."""
    counts = UsageCounts(
        lambda days: read_usage(
            store,
            days,
            min_launches=settings.usage_min_launches,
            retention_days=settings.log_retention_days,
            pool=pool,
        )
    )

    def headers(extra: dict[str, str] | None = None) -> dict[str, str]:
        values = {"Cache-Control": f"max-age={int(FRESH_SECONDS)}", **(extra or {})}
        if settings.cors_allow_origin:
            values["Access-Control-Allow-Origin"] = settings.cors_allow_origin
        return values

    async def read(request: Request, kind: str) -> tuple[Usage, str] | Response:
        try:
            days, table = parse_query(request.query_params.multi_items(), request.url.path)
            return await counts.get(days), table
        except BinderboxError as error:
            status = 400 if isinstance(error, BadUsageQuery) else 503
            return refusal(kind, error.message, status)
        except Exception:  # a bug, or a driver's own error: a sentence, never a traceback
            logger.exception("the usage numbers could not be counted")
            return refusal(kind, "The usage numbers cannot be counted right now.", 503)

    def refusal(kind: str, message: str, status: int) -> Response:
        if kind == "json":
            return JSONResponse({"error": message}, status, headers=headers())
        if kind == "csv":
            return PlainTextResponse(message + "\n", status, headers=headers())
        return HTMLResponse(error_page(message, status), status)

    async def page(request: Request) -> Response:
        found = await read(request, "html")
        if isinstance(found, Response):
            return found
        return HTMLResponse(usage_page(found[0]), headers=headers())

    async def as_json(request: Request) -> Response:
        found = await read(request, "json")
        if isinstance(found, Response):
            return found
        return Response(
            json.dumps(found[0].as_json(), indent=1) + "\n",
            media_type="application/json",
            headers=headers(),
        )

    async def as_csv(request: Request) -> Response:
        found = await read(request, "csv")
        if isinstance(found, Response):
            return found
        usage, table = found
        name = f"binderbox-usage-{table}-{usage.days}-days.csv"
        return Response(
            usage_csv(usage, table),
            media_type="text/csv; charset=utf-8",
            headers=headers({"Content-Disposition": f'inline; filename="{name}"'}),
        )

    return [
        Route("/usage", page),
        Route("/usage.json", as_json),
        Route("/usage.csv", as_csv),
    ]
