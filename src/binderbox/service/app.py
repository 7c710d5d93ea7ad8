"""The HTTP face of the service: routes that turn launch steps into responses.

Handlers stay thin: parsing and launching live in ``launchflow``; here events become
``text/event-stream`` lines, JSON or pages.
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

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
from starlette.routing import Route

from binderbox import __version__
from binderbox.build.engine import docker_client
from binderbox.config import Settings
from binderbox.errors import BinderboxError
from binderbox.events import Event
from binderbox.providers.content import PROVIDERS as CONTENT_PROVIDERS
from binderbox.service import buildtoken
from binderbox.service.buildqueue import BuildJob, BuildQueue
from binderbox.service.launchflow import (
    Launcher,
    LaunchRequest,
    RefCache,
    ServiceContext,
    launch_events,
)
from binderbox.service.limits import Limits, RateLimiter
from binderbox.service.observe import LaunchEventLog, Metrics, badge_svg
from binderbox.service.specs import PROVIDERS
from binderbox.store import BuildStore

KEEPALIVE_SECONDS = 25.0


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
) -> Starlette:
    """The ASGI app for ``binderbox serve``."""
    metrics = Metrics()

    def build_finished(job: BuildJob, seconds: float) -> None:
        status = "failure" if job.error else "success"
        metrics.builds.labels(status).inc()
        metrics.build_seconds.labels(status).observe(seconds)

    events_file = settings.launch_events_file or str(
        Path(settings.state_dir).expanduser() / "launch-events.jsonl"
    )
    store = BuildStore(Path(settings.state_dir).expanduser() / "binderbox.sqlite")
    store.interrupted()  # builds a previous run left unfinished can never finish now
    ctx = ServiceContext(
        settings=settings,
        queue=BuildQueue(settings.build_concurrency, build_finished, store),
        launcher=launcher,
        metrics=metrics,
        events=LaunchEventLog(Path(events_file)),
        limits=Limits.from_settings(settings),
        refs=RefCache(settings.ref_cache_seconds),
        store=store,
    )
    rate = RateLimiter(settings.rate_limit_per_minute)
    token_secret = buildtoken.load_secret(Path(settings.state_dir).expanduser())

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
        address = request.client.host if request.client else ""
        if ctx.limits.address_banned(address):
            return refuse("Requests from your network are not accepted here.", 403)
        token = request.query_params.get("build_token", "")
        from_page = bool(token) and buildtoken.valid(token_secret, token, f"{provider}/{spec}")
        wait = 0.0 if from_page else rate.retry_after(address)
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
            launch_host=str(request.base_url),
            build_only=build_only,
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
        return cors(
            JSONResponse(
                [
                    {
                        "provider": p.name,
                        "display_name": p.display_name,
                        "regex_detail": p.regex,
                        "repo_label": p.repo_label,
                        "ref_label": p.ref_label,
                    }
                    for p in PROVIDERS.values()
                ]
                + [
                    {
                        "provider": name,
                        "display_name": cls.label,
                        "regex_detail": r"^(.+)$",
                        "repo_label": f"{cls.label} DOI, address or id",
                        "ref_label": "",
                    }
                    for name, cls in CONTENT_PROVIDERS.items()
                ]
            )
        )

    async def health(request: Request) -> Response:
        checks = []
        try:
            await asyncio.to_thread(docker_client)
            checks.append({"service": "Docker", "ok": True})
        except BinderboxError as error:
            checks.append({"service": "Docker", "ok": False, "message": error.message})
        if launcher is not None:
            ok = await launcher.healthy()
            checks.append({"service": "JupyterHub", "ok": ok})
        checks.append(
            {
                "service": "Build queue",
                "ok": True,
                "running": ctx.queue.running,
                "waiting": ctx.queue.waiting,
            }
        )
        ok = all(c["ok"] for c in checks)
        return cors(JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503))

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
        record = await asyncio.to_thread(store.get, build_id) if build_id.isalnum() else None
        if record is None:
            return PlainTextResponse("There is no build with that id.\n", status_code=404)
        lines = await asyncio.to_thread(store.log, build_id)
        head = [
            f"build {record.id}",
            f"repository: {record.repo_url} at {record.ref}",
            f"image: {record.image}",
            f"status: {record.status}" + (f" ({record.message})" if record.message else ""),
            "",
        ]
        return cors(PlainTextResponse("\n".join(head + lines) + "\n"))

    async def launch_page(request: Request) -> Response:
        provider, spec = raw_spec(request, "/v2/")
        token = buildtoken.issue(token_secret, f"{provider}/{spec}")
        return HTMLResponse(_launch_page(provider, spec, token))

    return Starlette(
        routes=[
            Route("/build/{provider}/{spec:path}", build),
            Route("/v2/{provider}/{spec:path}", launch_page),
            Route("/repo/{user}/{repo}", legacy_repo),
            Route("/api/repoproviders", repoproviders),
            Route("/health", health),
            Route("/versions", versions),
            Route("/metrics", metrics_page),
            Route("/logs/{build_id}", build_log),
            Route("/badge.svg", badge),
            Route("/badge_logo.svg", badge),
        ]
    )


def _js_string(text: str) -> str:
    """A JavaScript string literal that cannot end the surrounding <script> element."""
    return json.dumps(text).replace("<", "\\u003c").replace(">", "\\u003e")


def _launch_page(provider: str, spec: str, build_token: str) -> str:
    """A plain launch page: phase, live log, the error, then the redirect."""
    title = html.escape(f"{provider}/{spec}")
    build_url = _js_string(f"/build/{provider}/{spec}")
    token = _js_string(build_token)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Launching {title} · binderbox</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#111;color:#ddd;padding:1rem;max-height:60vh;overflow:auto;white-space:pre-wrap}}
#phase{{font-weight:bold}} .failed{{color:#b00}}</style></head>
<body><h1>Launching {title}</h1>
<p>Phase: <span id="phase" role="status">starting</span></p>
<p id="message"></p><pre id="log" aria-label="Build log"></pre>
<script>
const query = new URLSearchParams(location.search);
const buildQuery = new URLSearchParams(location.search);
buildQuery.set("build_token", {token});
const source = new EventSource({build_url} + "?" + buildQuery.toString());
const log = document.getElementById("log");
source.onmessage = (e) => {{
  const data = JSON.parse(e.data);
  document.getElementById("phase").textContent = data.phase;
  if (data.phase === "building" || data.phase === "waiting") {{
    log.textContent += data.message.endsWith("\\n") ? data.message : data.message + "\\n";
    log.scrollTop = log.scrollHeight;
  }} else {{ document.getElementById("message").textContent = data.message; }}
  if (data.phase === "failed") {{
    document.getElementById("phase").className = "failed"; source.close();
  }}
  if (data.phase === "ready") {{
    source.close();
    let path = query.get("urlpath") || "";
    if (query.get("labpath")) path = "lab/tree/" + query.get("labpath");
    else if (query.get("filepath")) path = "tree/" + query.get("filepath");
    path = path.replace(/^\\/+/, "");
    const url = new URL(data.url + path);
    url.searchParams.set("token", data.token);
    location.href = url.toString();
  }}
}};
</script></body></html>
"""
