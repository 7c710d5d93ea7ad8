"""The HTTP face of the service: routes that turn launch steps into responses.

Handlers stay thin: parsing and launching live in ``launchflow``; here events become
``text/event-stream`` lines, JSON or pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from binderbox import __version__
from binderbox.builder.backend import Builder, LocalBuilder
from binderbox.builder.engine import docker_client
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.events import Event
from binderbox.images import ImageStore, open_image_store
from binderbox.launch.supervisor import Supervisor
from binderbox.providers.content import PROVIDERS as CONTENT_PROVIDERS
from binderbox.providers.image import PROVIDER as IMAGE_PROVIDER
from binderbox.service import buildtoken, pages, public
from binderbox.service.blocking import BlockingPool, SingleFlight
from binderbox.service.buildqueue import BuildJob, BuildQueue
from binderbox.service.cleaner import (
    BuildCache,
    Cleaner,
    CleanerReport,
    DockerBuildCache,
    ImageHoldings,
    LocalImageHoldings,
)
from binderbox.service.launchflow import (
    LOCAL_TIMEOUT,
    Launcher,
    LaunchRequest,
    RefCache,
    ServiceContext,
    launch_events,
)
from binderbox.service.limits import (
    InFlight,
    Limits,
    RateLimiter,
    address_bucket,
    client_address,
    parse_trusted_proxies,
)
from binderbox.service.observe import LaunchEventLog, Metrics, badge_svg
from binderbox.service.prebuilt import PrebuiltImages
from binderbox.service.specs import PROVIDERS, parse_spec, without_userinfo
from binderbox.service.usage import usage_routes
from binderbox.state import StateStore, open_state_store, state_owner
from binderbox.store import LaunchRecord

KEEPALIVE_SECONDS = 25.0

logger = logging.getLogger(__name__)


def sse(event: Event) -> str:
    return f"data: {json.dumps(event.as_json())}\n\n"


async def with_keepalive(events: AsyncIterator[Event], every: float) -> AsyncIterator[str]:
    """Event-stream lines, with a ``:keepalive`` comment whenever ``every`` s pass quietly."""
    iterator = events.__aiter__()
    pending: asyncio.Task[Event] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield ":keepalive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield sse(event)
    finally:
        if pending is not None:
            pending.cancel()


def raw_spec(request: Request, prefix: str) -> tuple[str, str]:
    """Provider and spec as sent, still URL-escaped: ``git`` and ``gl`` specs escape their
    URL's slashes, which the decoded path would lose."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    path = raw.decode("latin-1").removeprefix(prefix)
    provider, _, spec = path.partition("/")
    return provider, spec


def create_app(
    settings: Settings,
    launcher: Launcher | None = None,
    *,
    keepalive: float = KEEPALIVE_SECONDS,
    notes: list[str] | None = None,
    builder: Builder | None = None,
    images: ImageStore | None = None,
    store: StateStore | None = None,
    owner: str = "",
    describe: Callable[[], dict[str, Any]] | None = None,
    pull_before_launch: bool = True,
    clean: bool = False,
    image_holdings: ImageHoldings | None = None,
    build_cache: BuildCache | None = None,
    supervisor: Supervisor | None = None,
    prebuilt: PrebuiltImages | None = None,
) -> Starlette:
    """The ASGI app for ``binderbox serve``; ``notes`` are shown on the status page's
    sessions card (e.g. whether the session firewall is on).

    The seams default to the embedded single machine: ``builder`` builds here, ``images``
    and ``store`` are what the settings name (this dockerd and SQLite in state_dir unless
    a registry or database is set), ``owner`` (the builds this service runs) is the hub
    id of ``state_dir``. ``describe`` tells /health and /status about the session backend;
    ``pull_before_launch``: sessions run on this machine (see ServiceContext).

    ``clean`` runs the disk budget's cleaner (service/cleaner.py) while the app runs
    (what serve does), on ``image_holdings`` and ``build_cache`` (default: this dockerd's
    images under ``image_prefix`` and its BuildKit cache); it is ``app.state.cleaner``.

    ``supervisor`` (serve's, launch/supervisor.py) adds its restart counts to /metrics and a
    part that keeps dying to /health. ``prebuilt`` pulls and checks prebuilt images
    (service/prebuilt.py; this dockerd unless given).
    """
    metrics = Metrics()
    if supervisor is not None:
        metrics.registry.register(supervisor)

    def build_finished(job: BuildJob, seconds: float) -> None:
        status = "failure" if job.error else "success"
        metrics.builds.labels(status).inc()
        metrics.build_seconds.labels(status).observe(seconds)

    events_file = settings.launch_events_file or str(
        Path(settings.state_dir).expanduser() / "launch-events.jsonl"
    )
    store = store if store is not None else open_state_store(settings)
    owner = owner or state_owner(settings)
    # Builds this service's previous run left unfinished can never finish now (another
    # service sharing the store may still be running its own).
    store.interrupted(owner)
    # Blocking calls get bounded pools of their own (see service/blocking.py): calls to
    # hosts users name, local ones (Docker, the store), and /health's Docker check.
    remote = BlockingPool(
        "binderbox-remote", settings.blocking_threads, 4 * settings.blocking_threads
    )
    local = BlockingPool("binderbox-local", 8, 256)
    docker_check = SingleFlight(BlockingPool("binderbox-health", 2, 0), docker_client)

    async def read_store(build_id: str, start: int, limit: int) -> list[Event]:
        rows = await local.run(
            store.events, build_id, start, limit, timeout=LOCAL_TIMEOUT, what="The state database"
        )
        return [Event(phase, line) for phase, line in rows]  # type: ignore[arg-type]

    ctx = ServiceContext(
        settings=settings,
        queue=BuildQueue(
            settings.build_concurrency,
            build_finished,
            store,
            state_owner=owner,
            queue_size=settings.build_queue_size,
            per_owner=settings.builds_per_address,
            log_max_bytes=settings.build_log_max_bytes,
            read_store=read_store,
        ),
        launcher=launcher,
        metrics=metrics,
        events=LaunchEventLog(Path(events_file)),
        limits=Limits.from_settings(settings),
        refs=RefCache(settings.ref_cache_seconds),
        store=store,
        builder=builder or LocalBuilder(),
        images=images if images is not None else open_image_store(settings),
        pull_before_launch=pull_before_launch,
        remote=remote,
        local=local,
        launches=InFlight(settings.launches_per_address),
        prebuilt=prebuilt or PrebuiltImages(),
    )
    cleaner = (
        Cleaner(
            settings,
            store,
            holdings=image_holdings or LocalImageHoldings(settings.image_prefix),
            cache=build_cache or DockerBuildCache(),
            queue=ctx.queue,
            running_images=launcher.running_images if launcher is not None else None,
            launching=lambda: set(ctx.launching),
            registry=metrics.registry,
        )
        if clean
        else None
    )
    rate = RateLimiter(settings.rate_limit_per_minute)
    # Requests with a valid launch-page token: each token a few times, each address at
    # most this often; past either, they count against ``rate`` like any other.
    page_rate = RateLimiter(settings.page_rate_limit_per_minute)
    token_uses = buildtoken.TokenUses(settings.build_token_uses)
    trusted = parse_trusted_proxies(settings.trusted_proxies)
    token_secret = buildtoken.load_secret(Path(settings.state_dir).expanduser())

    def client_of(request: Request) -> tuple[str, str]:
        """The client's address (behind trusted proxies) and its limits bucket."""
        peer = request.client.host if request.client else ""
        address = client_address(peer, request.headers, trusted)
        return address, address_bucket(address)

    def refuse(message: str, status: int) -> Response:
        event = Event("failed", message, {"status_code": status})
        return cors(Response(sse(event), status_code=status, media_type="text/event-stream"))

    def cors(response: Response) -> Response:
        if settings.cors_allow_origin:
            response.headers["Access-Control-Allow-Origin"] = settings.cors_allow_origin
        return response

    async def build(request: Request) -> Response:
        provider, spec = raw_spec(request, "/build/")
        if "text/event-stream" not in request.headers.get("accept", ""):
            event = Event(
                "failed",
                "This endpoint streams events: send the header 'Accept: text/event-stream'.",
                {"status_code": 400},
            )
            return cors(Response(sse(event), status_code=400, media_type="text/event-stream"))
        address, bucket = client_of(request)
        if ctx.limits.address_banned(address):
            return refuse("Requests from your network are not accepted here.", 403)
        token = request.query_params.get("build_token", "")
        expires = (
            buildtoken.expiry(token_secret, token, f"{provider}/{spec}", bucket) if token else 0
        )
        # A token lets its request past the rate limit only while it has uses left and
        # its address has not used tokens too often this minute.
        from_page = (
            expires > 0 and page_rate.retry_after(bucket) == 0 and token_uses.take(token, expires)
        )
        wait = 0.0 if from_page else rate.retry_after(bucket)
        if wait:
            return refuse(
                f"Too many launch requests from your address; try again in {wait:.0f} seconds.",
                429,
            )
        build_only = request.query_params.get("build_only", "").lower() == "true"
        if build_only and not settings.build_only_enabled:
            event = Event("failed", "build_only is not enabled on this binderbox.", {})
            return cors(Response(sse(event), status_code=400, media_type="text/event-stream"))
        launch = LaunchRequest(
            provider=provider,
            spec=spec,
            # Links and binder_launch_host come from settings, never from the Host header.
            launch_host=public.base_url(settings),
            build_only=build_only,
            client=bucket,
        )
        stream = with_keepalive(launch_events(launch, ctx), keepalive)
        return cors(
            StreamingResponse(
                stream,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        )

    async def repoproviders(request: Request) -> Response:
        return cors(JSONResponse(provider_list(settings)))

    async def health_checks() -> tuple[bool, list[dict]]:
        checks = []
        try:
            # Not on the pools launches use: /health answers however busy they are.
            await docker_check.get(timeout=5, what="Docker")
            checks.append({"service": "Docker", "ok": True})
        except BinderboxError as error:
            checks.append({"service": "Docker", "ok": False, "message": error.message})
        if launcher is not None:
            ok = await launcher.healthy()
            checks.append({"service": "JupyterHub", "ok": ok})
        if supervisor is not None:
            checks.extend(supervisor.checks())
        checks.append(
            {
                "service": "Build queue",
                "ok": True,
                "running": ctx.queue.running,
                "waiting": ctx.queue.waiting,
            }
        )
        return all(c["ok"] for c in checks), checks

    # A cluster backend asks its manager (blocking calls): off the event loop, shared by
    # whoever asks within two seconds.
    described = (
        SingleFlight(BlockingPool("binderbox-describe", 1, 0), describe, fresh=2.0)
        if describe is not None
        else None
    )

    async def sessions_backend() -> dict[str, Any] | None:
        if described is None:
            return None
        try:
            return await described.get(timeout=10, what="The session backend")
        except Exception:  # /health and /status still answer
            logger.exception("the session backend could not describe itself")
            return {"backend": "unknown", "error": "The session backend did not answer."}

    async def health(request: Request) -> Response:
        ok, checks = await health_checks()
        body: dict[str, Any] = {"ok": ok, "checks": checks}
        backend = await sessions_backend()
        if backend is not None:
            body["sessions"] = backend
        return cors(JSONResponse(body, status_code=200 if ok else 503))

    async def versions(request: Request) -> Response:
        return cors(JSONResponse({"binderhub": f"binderbox {__version__}", "builder": __version__}))

    async def legacy_repo(request: Request) -> Response:
        user, repo = request.path_params["user"], request.path_params["repo"]
        target = f"/v2/gh/{quote(user)}/{quote(repo)}/HEAD"
        if request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(target, status_code=302)

    async def metrics_page(request: Request) -> Response:
        metrics.builds_running.set(ctx.queue.running)
        metrics.build_queue.set(ctx.queue.waiting)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def badge(request: Request) -> Response:
        svg = badge_svg(with_logo=request.url.path.endswith("_logo.svg"))
        return cors(
            Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
        )

    async def build_log(request: Request) -> Response:
        build_id = request.path_params["build_id"]
        database = {"timeout": LOCAL_TIMEOUT, "what": "The state database"}
        try:
            record = None
            if build_id.isalnum():
                record = await local.run(store.get, build_id, **database)
            if record is not None:
                lines = await local.run(store.log, build_id, **database)
                locked = await local.run(store.lock, build_id, **database)
        except BinderboxError as error:
            return PlainTextResponse(error.message + "\n", status_code=503)
        if record is None:
            return PlainTextResponse("There is no build with that id.\n", status_code=404)
        head = [
            f"build {record.id}",
            f"repository: {record.repo_url} at {record.ref}",
            f"image: {record.image}",
            f"status: {record.status}" + (f" ({record.message})" if record.message else ""),
            *([f"lock: {public.base_url(settings)}logs/{build_id}/lock"] if locked else []),
            "",
        ]
        return cors(PlainTextResponse("\n".join(head + lines) + "\n"))

    async def build_lock(request: Request) -> Response:
        """The build's lock file (builder/lock.py): what to give `binderbox build --from-lock`."""
        build_id = request.path_params["build_id"]
        try:
            text = None
            if build_id.isalnum():
                text = await local.run(
                    store.lock, build_id, timeout=LOCAL_TIMEOUT, what="The state database"
                )
        except BinderboxError as error:
            return PlainTextResponse(error.message + "\n", status_code=503)
        if text is None:
            return PlainTextResponse(
                "There is no lock of a build with that id (unknown, failed or still running).\n",
                status_code=404,
            )
        disposition = f'inline; filename="binderbox-lock-{build_id[:12]}.json"'
        return cors(
            Response(
                text,
                media_type="application/json",
                headers={"Content-Disposition": disposition, "X-Content-Type-Options": "nosniff"},
            )
        )

    async def launch_page(request: Request) -> Response:
        provider, spec = raw_spec(request, "/v2/")
        token = buildtoken.issue(
            token_secret,
            f"{provider}/{spec}",
            client_of(request)[1],
            seconds=settings.build_token_seconds,
        )
        return HTMLResponse(_launch_page(provider, spec, token))

    async def home_page(request: Request) -> Response:
        return HTMLResponse(_home_page(settings))

    async def status_page(request: Request) -> Response:
        ok, checks = await health_checks()
        try:
            launches = await local.run(
                store.recent_launches, 30, timeout=LOCAL_TIMEOUT, what="The state database"
            )
        except BinderboxError:
            launches = []  # the page still shows everything else
        sessions: list[tuple[str, str]] | str | None = None
        if launcher is not None:
            try:
                sessions = await launcher.running_sessions()
            except Exception:  # the page still shows everything else
                logger.exception("the status page could not list the sessions")
                sessions = "The sessions cannot be listed right now: the hub did not answer."
        backend = await sessions_backend()
        page = _status_page(
            ok, checks, ctx.queue, settings, launches, sessions, notes or [], backend
        )
        if cleaner is not None:
            page = page.replace(DISK_MARK, _disk_card(settings, cleaner.last), 1)
        return HTMLResponse(page, status_code=200 if ok else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The cleaner runs beside the service; its failures are logged, never raised.
        task = asyncio.create_task(cleaner.run_forever()) if cleaner is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                cleaner.close()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", home_page),
            Route("/status", status_page),
            Mount("/static", StaticFiles(directory=pages.STATIC), name="static"),
            Route("/build/{provider}/{spec:path}", build),
            Route("/v2/{provider}/{spec:path}", launch_page),
            Route("/repo/{user}/{repo}", legacy_repo),
            Route("/api/repoproviders", repoproviders),
            Route("/health", health),
            Route("/versions", versions),
            Route("/metrics", metrics_page),
            Route("/logs/{build_id}", build_log),
            Route("/logs/{build_id}/lock", build_lock),
            Route("/badge.svg", badge),
            Route("/badge_logo.svg", badge),
            *usage_routes(settings, store),
        ],
    )
    app.state.cleaner = cleaner
    return app


# Where the status page gets the disk card (after the sessions card) when a cleaner runs:
# status.html's "disk" field, filled with this mark, then replaced by the card.
DISK_MARK = "<!-- disk -->"


def _bytes(count: int | None) -> str:
    """Bytes for people: 1.2 GB, 340 MB, 12 kB."""
    if count is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _disk_card(settings: Settings, report: CleanerReport | None) -> str:
    """The disk budget on /status: use against budgets and the last cleaner run."""
    esc = html.escape

    def against(used: int | None, budget: int) -> str:
        limit = f"of {_bytes(budget)}" if budget > 0 else "(no budget)"
        return f"{esc(_bytes(used))} {limit}"

    items = []
    if report is None:
        items.append('<p class="hint" id="disk-last-run">The cleaner has not run yet.</p>')
    else:
        count = report.images_count
        items.append(
            f'<p>Images: <strong id="disk-images">'
            f"{against(report.images_bytes, settings.image_cache_max_bytes)}</strong>"
            f" ({count} image{'s' if count != 1 else ''} beyond their base images).</p>"
            f'<p>Build cache: <strong id="disk-build-cache">'
            f"{against(report.build_cache_bytes, settings.build_cache_max_bytes)}</strong>.</p>"
        )
        done = [
            f"removed {len(report.images_removed)} image"
            f"{'s' if len(report.images_removed) != 1 else ''}"
            f" ({_bytes(report.images_freed)})",
            f"pruned {_bytes(report.build_cache_freed)} of build cache",
            f"forgot {report.forgotten.builds} builds and {report.forgotten.launches} launches"
            f" older than {settings.log_retention_days} days"
            if settings.log_retention_days
            else "keeps logs and launches forever",
        ]
        items.append(
            f'<p id="disk-last-run">Last clean-up {esc(_ago(time.time() - report.at))}: '
            f"{esc(', '.join(done))}.</p>"
        )
        if report.images_removed:
            names = ", ".join(report.images_removed)
            items.append(f'<p class="hint" id="disk-removed">Removed: {esc(names)}</p>')
        notes = [*report.errors, *([report.build_cache_note] if report.build_cache_note else [])]
        items.extend(f'<p class="bad">{esc(note)}</p>' for note in notes)
    return (
        '<section class="card" aria-labelledby="disk-title"><h2 id="disk-title">Disk</h2>'
        + "".join(items)
        + "</section>"
    )


def provider_list(settings: Settings | None = None) -> list[dict[str, str]]:
    """Every provider, as /api/repoproviders lists it and the home page offers it (prebuilt
    images only when ``prebuilt_images`` allows some)."""
    listed = [
        {
            "provider": p.name,
            "display_name": p.display_name,
            "regex_detail": p.regex,
            "repo_label": p.repo_label,
            "ref_label": p.ref_label,
        }
        for p in PROVIDERS.values()
    ] + [
        {
            "provider": name,
            "display_name": cls.label,
            "regex_detail": r"^(.+)$",
            "repo_label": f"{cls.label} DOI, address or id",
            "ref_label": "",
        }
        for name, cls in CONTENT_PROVIDERS.items()
    ]
    if settings is not None and settings.prebuilt_images:
        listed.append(
            {
                "provider": IMAGE_PROVIDER,
                "display_name": "Docker image",
                "regex_detail": r"^(\S+)$",
                "repo_label": "Docker image name (registry/path:tag)",
                "ref_label": "",
            }
        )
    return listed


PLACEHOLDERS = {
    "gh": "https://github.com/org/repo or org/repo",
    "gl": "https://gitlab.com/group/project",
    "gist": "https://gist.github.com/user/0123abcd",
    "git": "https://example.org/repo.git",
    "zenodo": "10.5281/zenodo.3242074",
    "figshare": "10.6084/m9.figshare.9782777.v1",
    "hydroshare": "https://www.hydroshare.org/resource/<id>/",
    "dataverse": "10.7910/DVN/TJCLKP",
    "ckan": "https://demo.ckan.org/dataset/<name>",
    "image": "quay.io/jupyter/base-notebook:latest",
}


def _home_page(settings: Settings) -> str:
    providers = provider_list(settings)
    options = "".join(
        f'<option value="{html.escape(p["provider"])}">{html.escape(p["display_name"])}</option>'
        for p in providers
    )
    return pages.render(
        "home.html",
        title="binderbox: turn a repository into a live Jupyter session",
        description="Paste a Git repository, a Gist or a DOI and open it in JupyterLab, "
        "with a link and a badge to share.",
        page="home",
        data={"providers": providers, "placeholders": PLACEHOLDERS},
        version=__version__,
        provider_options=options,
    )


def _launch_page(provider: str, spec: str, build_token: str) -> str:
    """The launch page: phases, live log, the error or the redirect (pages/launch.html)."""
    name = unquote(f"{provider}/{without_userinfo(spec)}")
    try:
        parsed = parse_spec(provider, spec)
        heading, detail = parsed.repo_url, f"at {parsed.ref}"
    except BinderboxError:
        heading, detail = name, ""
    return pages.render(
        "launch.html",
        title=f"Launching {name} · binderbox",
        description=f"Launch {name} in JupyterLab with binderbox.",
        page="launch",
        data={
            "name": name,
            "build_url": f"/build/{provider}/{spec}",
            "build_token": build_token,
        },
        version=__version__,
        heading=heading,
        detail=detail,
    )


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _builds_table(jobs: list[BuildJob]) -> str:
    """The builds that run or wait: repository, state, time so far, live log."""
    if not jobs:
        return ""
    esc = html.escape
    now = time.monotonic()
    rows = "".join(
        f'<tr><td class="spec">{esc(job.repo_url or job.image)}</td>'
        f"<td>{'building' if job.building else f'waiting ({job.position})'}</td>"
        f'<td class="num">{now - job.started:.0f} s</td>'
        + (f'<td><a href="/logs/{esc(job.build_id)}">log</a></td>' if job.build_id else "<td></td>")
        + "</tr>"
        for job in jobs
    )
    return _table(["Repository", "State", "Time", "Log"], rows, "builds")


_LOG_LINK = re.compile(r"(?:https?://[^\s/]+)?/logs/([A-Za-z0-9]+)")


def _reason_html(message: str) -> str:
    """A failure's reason, its closing "The whole log: <url>" turned into a link to this
    service's own log page. Nothing else becomes a link: the rest may be text a build
    printed, and the address in it may be older than ``public_url``, so the link is
    relative."""
    reason, sep, log_url = message.rpartition(" The whole log: ")
    found = _LOG_LINK.fullmatch(log_url) if sep else None
    if not found:
        return html.escape(message)
    return f'{html.escape(reason)} <a href="/logs/{found[1]}">The whole log</a>'


def _backend_html(backend: dict[str, Any]) -> str:
    """The session backend's description: its plain values on one line, and each list of
    records (such as ``nodes``) as a table."""
    esc = html.escape
    plain = [
        f"{esc(str(key))}: {esc(str(value))}"
        for key, value in backend.items()
        if not isinstance(value, list | dict)
    ]
    parts = [f'<p class="hint" id="sessions-backend">{" · ".join(plain)}</p>'] if plain else []
    for key, value in backend.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            headers = list(dict.fromkeys(k for record in value for k in record))
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(str(r.get(h, '')))}</td>" for h in headers) + "</tr>"
                for r in value
            )
            parts.append(_table([str(h) for h in headers], rows, f"sessions-{key}"))
    return "".join(parts)


def _table(headers: list[str], rows: str, table_id: str = "") -> str:
    """A table of the status page (rows already HTML), scrolling sideways if it must."""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    ident = f' id="{table_id}"' if table_id else ""
    return (
        f'<div class="table-wrap"><table{ident}><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _status_page(
    ok: bool,
    checks: list[dict],
    queue: BuildQueue,
    settings: Settings,
    launches: list[LaunchRecord],
    sessions: list[tuple[str, str]] | str | None,
    notes: list[str],
    backend: dict[str, Any] | None = None,
) -> str:
    """``sessions``: (image, repository) pairs, a reason they are unknown, or None
    when this binderbox runs no sessions; ``backend``: the session backend's own
    description (its name, and e.g. its nodes)."""
    esc = html.escape
    check_items = "".join(
        f'<li><span class="{"ok" if c["ok"] else "bad"}">{"✓" if c["ok"] else "✗"}</span> '
        f"{esc(c['service'])}: {'ok' if c['ok'] else 'not ok'}"
        + (f" ({esc(c['message'])})" if c.get("message") else "")
        + "</li>"
        for c in checks
    )
    if sessions is None:
        sessions_html = (
            '<p class="hint">This binderbox only builds images; it runs no sessions.</p>'
        )
    elif isinstance(sessions, str):
        sessions_html = f'<p class="bad">{esc(sessions)}</p>'
    else:
        per_repo = Counter(repo or image.rsplit(":", 1)[0] for image, repo in sessions)
        rows = "".join(
            f'<tr><td class="spec">{esc(repo)}</td><td class="num">{count}</td></tr>'
            for repo, count in per_repo.most_common()
        )
        limit = f" (at most {settings.total_quota} in all)" if settings.total_quota else ""
        sessions_html = (
            f'<p><strong id="sessions-total">{len(sessions)}</strong> running{limit}.</p>'
        )
        if rows:
            sessions_html += _table(["Repository", "Sessions"], rows)
    sessions_html += "".join(f'<p class="hint note">{esc(note)}</p>' for note in notes)
    if backend:
        sessions_html += _backend_html(backend)
    now = time.time()
    launch_rows = "".join(
        f"<tr><td>{esc(_ago(now - r.at))}</td>"
        f'<td class="spec">{esc(unquote(r.provider + "/" + r.spec))}</td>'
        f'<td class="{"ok" if r.status == "success" else "bad"}">{esc(r.status)}'
        + (f'<br><span class="hint">{_reason_html(r.message)}</span>' if r.message else "")
        + f'</td><td class="num">{r.seconds:.1f} s</td></tr>'
        for r in launches
    )
    launch_table = (
        _table(["When", "Repository", "Result", "Took"], launch_rows, "launches")
        if launches
        else '<p class="hint">No launches yet.</p>'
    )
    return pages.render(
        "status.html",
        title="Status · binderbox",
        description="Health, builds, sessions and recent launches of this binderbox.",
        page="status",
        version=__version__,
        health="ok" if ok else "not ok",
        health_class="ok" if ok else "bad",
        checks=check_items,
        running=queue.running,
        waiting=queue.waiting,
        builds=_builds_table(queue.unfinished()),
        concurrency=settings.build_concurrency,
        sessions=sessions_html,
        disk=DISK_MARK,
        launches=launch_table,
    )
