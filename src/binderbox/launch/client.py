"""A small client for the JupyterHub REST API: users, servers and spawn progress."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from binderbox.errors import BinderboxError
from binderbox.launch.options import (
    NO_JUPYTER_SERVER,
    SessionOptions,
    check_binder_fields,
    check_image,
    check_token,
)


class HubError(BinderboxError):
    """The hub answered, but not as expected."""


class HubUnavailable(HubError):
    """The hub cannot be reached."""


class SpawnFailed(HubError):
    """A server did not start; trying again may work."""


class SpawnRejected(HubError):
    """The hub refused to start a server (bad options, missing image); retrying won't help."""


@dataclass(frozen=True)
class SpawnProgress:
    """One event of the hub's progress stream for a starting server."""

    message: str
    progress: int | None = None
    ready: bool = False
    # The server's path on the proxy once ready, e.g. "/user/binder-1a2b/".
    url: str = ""


class HubClient:
    """Talks to the hub as the binderbox service (``admin:users`` and ``servers`` scopes).

    ``api_url`` is the hub's API (``http://127.0.0.1:8081/hub/api``), ``public_url`` the
    proxy on this machine (``http://127.0.0.1:8000/``), ``sessions_url`` where people
    reach that proxy (the same unless a reverse proxy stands in front of it).
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        public_url: str,
        *,
        timeout: float = 30,
        start_timeout: float = 180,
        sessions_url: str = "",
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.public_url = public_url.rstrip("/") + "/"
        self.sessions_url = (sessions_url or public_url).rstrip("/") + "/"
        self.start_timeout = start_timeout
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"token {token}"},
            timeout=timeout,
            trust_env=False,
        )

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        """True when the hub answers with this token and the proxy forwards to it."""
        try:
            hub = await self._http.get(f"{self.api_url}/")
            proxied = await self._http.get(f"{self.public_url}hub/api/")
        except httpx.HTTPError:
            return False
        return hub.status_code == 200 and proxied.status_code == 200

    async def create_user(self, name: str) -> None:
        """Create a user (no server yet)."""
        response = await self._request("POST", f"/users/{quote(name, safe='')}")
        if response.status_code != 201:
            raise HubError(f"The hub did not create the user {name}: {_reason(response)}")

    async def get_user(self, name: str) -> dict[str, Any] | None:
        """The hub's model of a user (with ``servers``), or None when there is no such user."""
        response = await self._request("GET", f"/users/{quote(name, safe='')}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise HubError(f"The hub did not describe the user {name}: {_reason(response)}")
        return response.json()

    async def start_server(
        self,
        name: str,
        image: str,
        token: str,
        binder_env: Mapping[str, str] | None = None,
    ) -> AsyncIterator[SpawnProgress]:
        """Start ``name``'s server and yield the hub's progress events until it is ready.

        ``binder_env`` holds the Binder fields (``repo_url``, ``binder_ref_url``,
        ``binder_launch_host``, ``binder_request``, ``binder_persistent_request``); the
        session sees them as ``BINDER_*`` variables. The last event has ``ready=True``.
        Raises SpawnRejected when the hub refuses, SpawnFailed when the start fails.
        """
        options = SessionOptions(
            image=check_image(image, ""),
            token=check_token(token),
            binder=check_binder_fields(binder_env or {}),
        )
        path = f"/users/{quote(name, safe='')}/server"
        response = await self._request(
            "POST", path, json={"user_options": options.as_user_options()}
        )
        if response.status_code in (400, 403, 404):
            raise SpawnRejected(_reason(response))
        if response.status_code not in (201, 202):
            raise SpawnFailed(_reason(response))
        async with contextlib.aclosing(self._progress(name)) as events:
            async for event in events:
                yield event
                if event.ready:
                    return

    async def _progress(self, name: str) -> AsyncIterator[SpawnProgress]:
        url = f"{self.api_url}/users/{quote(name, safe='')}/server/progress"
        deadline = time.monotonic() + self.start_timeout
        try:
            async with self._http.stream(
                "GET", url, headers={"Accept": "text/event-stream"}, timeout=30
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise SpawnFailed(f"The hub's progress stream failed: {_reason(response)}")
                async for line in response.aiter_lines():
                    if time.monotonic() > deadline:
                        raise SpawnFailed(
                            f"The server did not start within {self.start_timeout:g} s."
                        )
                    if not line.startswith("data:"):
                        continue  # blank keepalive lines
                    event = json.loads(line[5:])
                    if event.get("failed"):
                        message = _spawn_message(event.get("message", ""))
                        if message.startswith(NO_JUPYTER_SERVER):
                            raise SpawnRejected(NO_JUPYTER_SERVER)  # the same every time
                        raise SpawnFailed(message)
                    yield SpawnProgress(
                        message=str(event.get("message", "")),
                        progress=event.get("progress"),
                        ready=bool(event.get("ready")),
                        url=str(event.get("url", "")),
                    )
                    if event.get("ready"):
                        return
        except httpx.TransportError as error:
            raise HubUnavailable(f"The hub's progress stream broke off: {error}") from None
        raise SpawnFailed("The hub stopped reporting progress before the server was ready.")

    async def running_images(self) -> list[str]:
        """The image of every server that runs or is starting (for quotas)."""
        return [image for image, _ in await self.running_sessions()]

    async def running_sessions(self) -> list[tuple[str, str]]:
        """(image, repository address) of every server that runs or is starting."""
        response = await self._request("GET", "/users?state=active")
        if response.status_code != 200:
            raise HubError(f"The hub did not list its users: {_reason(response)}")
        sessions = []
        for user in response.json():
            for server in (user.get("servers") or {}).values():
                options = server.get("user_options") or {}
                if options.get("image"):
                    sessions.append((str(options["image"]), str(options.get("repo_url", ""))))
        return sessions

    async def server_url(self, name: str) -> str:
        """The public URL of ``name``'s running server, ending in ``/``."""
        user = await self.get_user(name)
        server = (user or {}).get("servers", {}).get("")
        if not server or not server.get("ready"):
            raise HubError(f"The user {name} has no running server.")
        return self.url_for(server["url"])

    def url_for(self, path: str) -> str:
        """Where people reach a path of the proxy, e.g. ``/user/x/`` → ``http://…/user/x/``."""
        return self.sessions_url + path.lstrip("/")

    async def stop_server(self, name: str, *, query: str = "") -> None:
        """Ask the hub to stop ``name``'s server (it may still be stopping on return).

        ``query`` rides along on the request: the hub ignores it but writes it into its
        log with the request, which is how a stop's reason reaches that log.
        """
        path = f"/users/{quote(name, safe='')}/server" + (f"?{query}" if query else "")
        response = await self._request("DELETE", path)
        if response.status_code not in (202, 204, 400, 404):  # 400: not running
            raise HubError(f"The hub did not stop the server of {name}: {_reason(response)}")

    async def delete_user(self, name: str, timeout: float = 120) -> None:
        """Stop ``name``'s server if it runs and delete the user; no error if it is gone."""
        deadline = time.monotonic() + timeout
        path = f"/users/{quote(name, safe='')}"
        while True:
            user = await self.get_user(name)
            if user is None:
                return
            server = user.get("servers", {}).get("")
            # Deleting a user while its server is still starting would orphan the container.
            if not (server and server.get("pending") == "spawn"):
                response = await self._request("DELETE", path)
                if response.status_code in (204, 404):
                    return
                if response.status_code != 400:  # 400: the server is still stopping
                    raise HubError(f"The hub did not delete {name}: {_reason(response)}")
            if time.monotonic() > deadline:
                raise HubError(f"The user {name} could not be deleted within {timeout:g} s.")
            await asyncio.sleep(0.5)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, f"{self.api_url}{path}", **kwargs)
        except httpx.TransportError as error:
            raise HubUnavailable(f"The hub at {self.api_url} cannot be reached: {error}") from None


def _reason(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return message or f"HTTP {response.status_code} {response.reason_phrase}".strip()


def _spawn_message(message: str) -> str:
    return message.removeprefix("Spawn failed: ") or "The server failed to start."
